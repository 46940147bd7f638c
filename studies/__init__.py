"""Study files (the YAML next to this module) and the code that reads, imports, runs and reports them.

`spec` declares and checks the study-file schema; `search` builds its sampler and pruner and suggests a
trial's config; `worker` runs trials against a storage; `owners`, `reaper` and `retries` find dead trials
and queue exactly one retry of each; `stopping` makes signals stop a trial between batches;
`side_channels` keeps W&B and uploads from failing a trial; `wandb_import` turns W&B sweeps into study
files; `report` answers a finished study's questions; `cli` is the `pcvit-study` command; `launch` starts
workers (`pcvit-launch`).

Nothing is imported here: `pcvit-launch` must start without torch (importing it costs seconds per launcher).
"""
