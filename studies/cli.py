"""`pcvit-study`: check study files, import W&B sweeps, reap dead trials, and report what a study found.

    pcvit-study validate studies/pcvit-12block.yaml
    pcvit-study import-wandb sweep_12block_comprehensive.yaml -o studies/pcvit-12block-wandb.yaml
    pcvit-study reap --storage URL --study-name NAME      # fail + re-queue trials whose worker died
    pcvit-study report --storage URL --study-name NAME    # per-parameter effects, divergence per value

Exit codes: 0 fine, 1 the file is invalid / an error in the study, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

import storage
from studies.spec import StudyFileError, load_spec


def validate(path: str) -> int:
    spec = load_spec(path)
    print(f"{path}: ok: study {spec.name!r}, {len(spec.space)} sampled parameters, {len(spec.fixed)} fixed, "
          f"{spec.n_trials} trials, sampler {spec.sampler['type']}, pruner {spec.pruner['type']}")
    return 0


def import_wandb(sweep: str, out: str, n_trials: int | None) -> int:
    from studies.wandb_import import import_file

    text = import_file(sweep, n_trials, note=lambda message: print(f"note: {message}", file=sys.stderr))
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0


def reap(url: str, name: str) -> int:
    from studies.reaper import reap_once
    from studies.worker import open_existing_study

    study, spec = open_existing_study(url, name)
    reaped = reap_once(study, spec.grace_period, spec.max_retries)
    print(f"reaped {len(reaped)} dead trial(s){': ' + ', '.join(map(str, reaped)) if reaped else ''}")
    return 0


def report(url: str, name: str) -> int:
    from studies.report import study_report
    from studies.worker import open_existing_study

    study, spec = open_existing_study(url, name)
    print(study_report(study, spec))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcvit-study", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("validate", help="check a study file against the schema and the config")
    p.add_argument("file")
    p = commands.add_parser("import-wandb", help="turn a W&B sweep YAML into a study file")
    p.add_argument("sweep")
    p.add_argument("-o", "--output", required=True, help="the study file to write")
    p.add_argument("--n-trials", type=int, help="trial budget (default: the sweep's run_cap or count)")
    for name, text in (("reap", "fail and re-queue trials whose worker is gone"),
                       ("report", "answer the study's questions from its trials")):
        p = commands.add_parser(name, help=text)
        p.add_argument("--storage", help=f"storage URL (default: ${storage.URL_ENV} or {storage.DEFAULT_URL})")
        p.add_argument("--study-name", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return validate(args.file)
        if args.command == "import-wandb":
            return import_wandb(args.sweep, args.output, args.n_trials)
        url = storage.resolve_url(args.storage)
        return reap(url, args.study_name) if args.command == "reap" else report(url, args.study_name)
    except (StudyFileError, storage.StorageError) as exc:
        print(f"pcvit-study: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
