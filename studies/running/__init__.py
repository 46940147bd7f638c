"""Running trials: the worker loop (`worker`, `worker_args`), starting workers (`launch`), finding dead trials and
queueing one retry of each (`owners`, `reaper`, `retries`), stopping between batches on a signal (`stopping`),
side channels that must not fail a trial (`side_channels`, `wandb_log`). Reads study files; never reports."""
