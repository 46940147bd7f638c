"""The worker's command line, without torch: `pcvit-worker` parses it, and `pcvit-launch` checks it before it
starts any worker, so a typo fails once, in the terminal, instead of in every worker's log."""

from __future__ import annotations

import argparse
import pathlib

import storage


class WorkerArgsError(ValueError):
    """Worker arguments that pcvit-worker would refuse; the message is argparse's, or names the file."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise WorkerArgsError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="pcvit-worker", description="Run trials of a PC-ViT study until its budget is spent.",
        epilog="The study file comes from --study-file, else the file stored with the study (by the first "
               "worker), else the packaged studies/NAME.yaml.")
    parser.add_argument("--storage", help=f"storage URL (default: ${storage.URL_ENV} or {storage.DEFAULT_URL})")
    parser.add_argument("--study-name", help="the study (default: the file's name)")
    parser.add_argument("--study-file", help="the study file (YAML), e.g. studies/pcvit-12block.yaml")
    parser.add_argument("--n-trials", type=positive_int, help="run at most this many trials in this worker")
    parser.add_argument("--artifact-dir", help=f"artifact folder (default: ${storage.ARTIFACT_DIR_ENV} "
                                               f"or {storage.DEFAULT_ARTIFACT_DIR})")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log every trial as a W&B run in PROJECT "
                                                         "(offline unless WANDB_API_KEY is set)")
    return parser


def parse_worker_args(argv: list[str] | None = None, parser_class: type = argparse.ArgumentParser
                      ) -> argparse.Namespace:
    """Parsed worker arguments; a bad or missing one exits 2 with argparse's one-line message."""
    parser = build_parser(parser_class)
    args = parser.parse_args(argv)
    if not args.study_file and not args.study_name:
        parser.error("give --study-name NAME (the study file stored with it, or studies/NAME.yaml, is used) "
                     "or --study-file FILE")
    return args


def check_worker_args(argv: list[str]) -> None:
    """Raise WorkerArgsError for arguments the worker would refuse at once (for pcvit-launch, before it starts any)."""
    if {"-h", "--help"} & set(argv):
        return  # the worker prints its help and exits 0
    args = parse_worker_args(argv, _RaisingParser)
    if args.study_file and not pathlib.Path(args.study_file).is_file():
        raise WorkerArgsError(f"--study-file {args.study_file}: no such file")
