"""Study files (the YAML next to this module) and the code that reads, imports, runs and reports them.

`spec` declares and checks the study-file schema; `search` builds its sampler and pruner; `worker` runs
trials against a storage; `wandb_import` turns W&B sweeps into study files; `report` answers a finished
study's questions; `cli` is the `pcvit-study` command; `launch` starts workers (`pcvit-launch`).

Nothing is imported here: `pcvit-launch` must start without torch (importing it costs seconds per launcher).
"""
