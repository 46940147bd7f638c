"""Checkpoint files of running trials, next to the other artifacts, written so that a kill cannot corrupt one.

A checkpoint is not a dashboard artifact: it is replaced as the trial goes and removed when the trial's
result is stored. Files are named `checkpoint-<lineage>-<random>`; a lineage is a trial and its retries
(they share one chain of checkpoints, and only one of them runs at a time), so the files a killed
process left behind are found by their lineage and removed by whoever runs or ends it next.
Each file is written to a temporary name and renamed into place: a reader sees a whole file or none.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import uuid
from typing import Any

PREFIX = "checkpoint-"
_NAME = re.compile(r"checkpoint-(?P<lineage>[A-Za-z0-9_]+)-[0-9a-f]{32}")


class CheckpointFiles:
    """Checkpoints in `folder` (the artifact folder): save, load, remove, and list them by lineage."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)

    def save(self, lineage: str, checkpoint: dict[str, Any]) -> str:
        """Write `checkpoint` under a new id and return it; the file appears whole or not at all."""
        import torch

        if not re.fullmatch(r"[A-Za-z0-9_]+", lineage):
            raise ValueError(f"checkpoint lineage {lineage!r}: letters, digits and _ only")
        checkpoint_id = f"{PREFIX}{lineage}-{uuid.uuid4().hex}"
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{checkpoint_id}.partial"
        with open(partial, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.folder / checkpoint_id)
        return checkpoint_id

    def load(self, checkpoint_id: str) -> dict[str, Any]:
        import torch

        return torch.load(self._path(checkpoint_id), map_location="cpu", weights_only=True)

    def remove(self, checkpoint_id: str | None) -> None:
        """Remove one checkpoint; one that is already gone is fine."""
        if checkpoint_id:
            self._path(checkpoint_id).unlink(missing_ok=True)

    def ids(self, lineage: str | None = None) -> list[str]:
        """Every checkpoint in the folder, or those of one lineage (partial files of killed writers included)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _NAME.fullmatch(path.name.removeprefix(".").removesuffix(".partial"))
            if match and (lineage is None or match["lineage"] == lineage):
                found.append(path.name)
        return sorted(found)

    def remove_lineage(self, lineage: str, keep: str | None = None) -> list[str]:
        """Remove every file of `lineage` except `keep`; return what was removed."""
        removed = [name for name in self.ids(lineage) if name != keep]
        for name in removed:
            (self.folder / name).unlink(missing_ok=True)
        return removed

    def _path(self, checkpoint_id: str) -> pathlib.Path:
        if not _NAME.fullmatch(checkpoint_id):
            raise ValueError(f"not a checkpoint id: {checkpoint_id!r}")
        return self.folder / checkpoint_id


def lineage_of(name: str) -> str | None:
    """The lineage part of a checkpoint file name, None if it is not one."""
    match = _NAME.fullmatch(name.removeprefix(".").removesuffix(".partial"))
    return match["lineage"] if match else None
