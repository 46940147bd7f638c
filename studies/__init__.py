"""Study files (the YAML next to this module) and the code that reads, runs and reports them, in three layers,
each importing only those before it:

    studyfile/  the study file: schema, search space, sampler, W&B sweep import
    running/    trials: worker, launcher, recovery of dead trials, stopping on signals
    results/    the report, dashboard pictures and notes, replay of a trial
    cli.py      `pcvit-study`, on top of all three

Nothing is imported here: `pcvit-launch` must start without torch (importing it costs seconds per launcher).
"""
