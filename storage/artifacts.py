"""The artifact store: images, metrics, weights and checkpoints of trials, in a folder shared with the dashboard."""

from __future__ import annotations

import os
import pathlib

from optuna.artifacts import FileSystemArtifactStore

DEFAULT_ARTIFACT_DIR = "storage/artifacts"
ARTIFACT_DIR_ENV = "PCVIT_ARTIFACT_DIR"


def artifact_folder(path: str | None = None) -> pathlib.Path:
    """The artifact folder: `path`, else $PCVIT_ARTIFACT_DIR, else storage/artifacts (created)."""
    folder = pathlib.Path(path or os.environ.get(ARTIFACT_DIR_ENV) or DEFAULT_ARTIFACT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def artifact_store(path: str | None = None) -> FileSystemArtifactStore:
    """The file-system artifact store in `artifact_folder(path)` (images, metrics, weights)."""
    return FileSystemArtifactStore(str(artifact_folder(path)))
