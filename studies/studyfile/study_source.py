"""Which study file a worker runs: the one given, else the one stored with the study, else the packaged one.

After `optuna create-study --study-name NAME`, `pcvit-worker --study-name NAME` is enough: the first worker
that joins with a file stores it with the study (user attributes `study_spec`, `study_file`), later workers
read it from there, and a study named like a packaged file (`studies/NAME.yaml`) needs no file at all.
"""

from __future__ import annotations

import pathlib

import optuna

import storage
from studies.studyfile.search import check_sampler_and_pruner, load_study_file
from studies.studyfile.spec import SPEC_ATTR, StudyFileError, StudySpec, spec_from_document

PACKAGED = pathlib.Path(__file__).resolve().parents[1]  # studies/*.yaml ship with the package


def packaged_file(name: str) -> pathlib.Path | None:
    path = PACKAGED / f"{name}.yaml"
    return path if path.is_file() else None


def stored_spec(url: str, name: str) -> StudySpec | None:
    """The study file stored with study `name`, or None (no such study, or no worker has stored one yet).

    Creates no database: a SQLite or journal file that does not exist holds no study.
    """
    path = storage.local_file(url)
    if path is not None and not path.is_file():
        return None
    try:
        study = optuna.load_study(study_name=name, storage=storage.open_storage(url))
    except KeyError:
        return None
    document = study.user_attrs.get(SPEC_ATTR)
    if document is None:
        return None
    where = f"the study file stored with study {name!r} in {storage.mask_password(url)}"
    return spec_from_document(document, where, study.user_attrs.get("study_file", ""))


def resolve_spec(url: str, name: str | None, study_file: str | None) -> StudySpec:
    """The study file to run (see the module docstring); StudyFileError says which --study-file to pass."""
    if study_file:
        return load_study_file(study_file)
    if not name:
        raise StudyFileError("give --study-name NAME or --study-file FILE")
    spec = stored_spec(url, name)
    if spec is not None:
        check_sampler_and_pruner(spec)
        return spec
    packaged = packaged_file(name)
    if packaged is not None:
        return load_study_file(packaged)
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    raise StudyFileError(f"study {name!r} in {storage.mask_password(url)} has no study file stored with it and "
                         f"no packaged studies/{name}.yaml exists (packaged: {shipped}): pass --study-file FILE, "
                         "the study's YAML file")
