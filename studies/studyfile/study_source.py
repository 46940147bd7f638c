"""Which study file a worker runs: the one given, else the one stored with the study, else the packaged one.

After `optuna create-study --study-name NAME`, `pcvit-worker --study-name NAME` is enough: the first worker
that joins with a file stores it with the study (system attributes `study_spec`, `study_file`), later workers
read it from there, and a study named like a packaged file (`studies/NAME.yaml`) needs no file at all.
"""

from __future__ import annotations

import pathlib

import optuna

from studies.studyfile.spec import StudyFileError, StudySpec, did_you_mean, load_spec, stored_spec

PACKAGED = pathlib.Path(__file__).resolve().parents[1]  # studies/*.yaml ship with the package


def packaged_file(name: str) -> pathlib.Path | None:
    path = PACKAGED / f"{name}.yaml"
    return path if path.is_file() else None


def resolve_spec(study: optuna.Study | None, name: str | None, where: str) -> StudySpec:
    """The study file of `study` (None: it does not exist yet), else the packaged `studies/NAME.yaml`; a
    StudyFileError says which --study-file to pass. `where` names the study and its storage for messages."""
    if not name:
        raise StudyFileError("give --study-name NAME or --study-file FILE")
    spec = stored_spec(study, f"the study file stored with {where}") if study is not None else None
    if spec is not None:
        return spec
    packaged = packaged_file(name)
    if packaged is not None:
        return load_spec(packaged)
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    if study is None:
        raise StudyFileError(f"{where} does not exist and no packaged studies/{name}.yaml is named so (packaged: "
                             f"{shipped}{did_you_mean(name, shipped.split(', '))}): check the name, or create it with "
                             "--study-file FILE")
    raise StudyFileError(f"{where} has no study file stored with it and no packaged studies/{name}.yaml exists "
                         f"(packaged: {shipped}): pass --study-file FILE, the study's YAML file")
