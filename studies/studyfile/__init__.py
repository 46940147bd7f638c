"""The study file: its schema (`spec`), the YAML reader that refuses duplicate keys (`strict_yaml`), the search
space and sampler it describes (`search`), where a worker gets it from (`study_source`), and W&B sweeps turned
into study files (`wandb_import`). Knows nothing of running trials."""
