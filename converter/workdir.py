"""Resumable stages in a work directory.

Each stage writes into ``<work>/<name>.partial/`` and becomes ``<work>/<name>/`` by one rename when
it finished, with ``stage.json`` holding its fingerprint (its options + the fingerprints of the
stages it read) and its report. A rerun skips a finished stage whose fingerprint matches; a stage
that was interrupted resumes from what its partial directory holds (when the fingerprint there
matches) or starts over; a finished stage is replaced only when its successor run has finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    def __init__(self, work: Path, name: str, fp: str):
        self.name, self.fingerprint = name, fp
        self.dir = work / name
        self.partial = work / f"{name}.partial"

    def info(self) -> dict | None:
        f = self.dir / "stage.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return None

    @property
    def done(self) -> bool:
        info = self.info()
        return info is not None and info.get("fingerprint") == self.fingerprint

    def begin(self) -> Path:
        """The partial directory to work in: kept (resume) if it belongs to this fingerprint."""
        marker = self.partial / "fingerprint"
        if self.partial.exists() and (not marker.is_file() or marker.read_text() != self.fingerprint):
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.fingerprint)
        return self.partial

    def finish(self, report: dict) -> dict:
        info = {"stage": self.name, "fingerprint": self.fingerprint, **report}
        write_json(self.partial / "stage.json", info)
        (self.partial / "fingerprint").unlink()
        old = self.dir.with_name(self.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        self.partial.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)
        return info


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
