"""``manifest.json``: what every checkpoint file of a run must be (digest, size), and which is best."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from finetune.files import DIGESTS, FileFacts, atomic_write_text, file_digest
from finetune.confine import confined
from finetune.errors import UserError

def verify_file(path: str | Path, entry: dict[str, Any] | None) -> None:
    """Check ``path`` against its manifest ``entry`` (size, then digest); raise naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' is listed in manifest.json but missing")
    if entry is None:
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UserError(f"checkpoint '{path}' is truncated or changed: {size} bytes, "
                        f"manifest.json says {entry['bytes']}")
    algorithm = next((a for a in DIGESTS if a in entry), None)
    if algorithm is None:
        raise UserError(f"manifest.json names no digest for '{path}' (expected one of {', '.join(DIGESTS)})")
    if file_digest(path, algorithm) != entry[algorithm]:
        raise UserError(f"checkpoint '{path}' is corrupt: its {algorithm} does not match manifest.json")



class Manifest:
    """``manifest.json``: digest (blake3), size, kind, epoch, step, metric of every checkpoint file; which is best.

    ``fresh=True`` starts an empty manifest (a new run) without reading or touching the file
    until the first ``save``.
    """

    def __init__(self, path: str | Path, *, fresh: bool = False):
        self.path = Path(path)
        self.data: dict[str, Any] = {"files": {}, "best": None}
        if not fresh and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"'{self.path}' cannot be read ({err}): it lists the run's checkpoints; "
                                "resume from a file with resume=FILE.ckpt instead") from None
            self._check()

    def parse(self, raw: bytes, *, source: str) -> None:
        """Take ``raw``, another copy of a manifest (a mirror's), as this one, checked as a file read here is."""
        try:
            self.data = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise UserError(f"'{source}' is not a finetune manifest ({err}): refused") from None
        self._check()

    def _check(self) -> None:
        """Refuse a manifest whose shape is wrong or that names a file outside its directory.

        Its names are later read, hard-linked and deleted: each must stay inside the directory.
        """
        files = self.data.get("files") if isinstance(self.data, dict) else None
        if not isinstance(files, dict) or not isinstance(self.data.get("best"), (str, type(None))):
            raise UserError(f"'{self.path}' is not a finetune manifest (no 'files' table): refused")
        for name, entry in files.items():
            confined(self.path.parent, name, named_in=self.path)
            numbers = [entry.get(k) for k in ("bytes", "epoch", "step")] if isinstance(entry, dict) else [None]
            if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
                raise UserError(f"'{self.path}' has a malformed entry for '{name}' (bytes, epoch and step must be "
                                f"integers): {entry!r:.200}")
        if self.data["best"] is not None:
            confined(self.path.parent, self.data["best"], named_in=self.path)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    def record(self, name: str, facts: FileFacts | None = None, *, kind: str, epoch: int, step: int,
               metric: str, value: float | None) -> None:
        """Describe ``name`` (already in place); ``facts`` from the write, else hashed from disk."""
        file = self.path.parent / name
        facts = facts or FileFacts(file_digest(file), file.stat().st_size)
        self.files[name] = {**facts.entry(), "kind": kind, "epoch": epoch,
                            "step": step, "metric": metric, "value": value,
                            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def set_best(self, name: str | None) -> None:
        self.data["best"] = name

    def states(self) -> list[str]:
        """Training-state files, newest first (``last.ckpt`` before its equal-step twin)."""
        names = [n for n in self.files if n.endswith(".ckpt")]
        return sorted(names, key=lambda n: (self.files[n]["step"], self.files[n]["epoch"], n == "last.ckpt"),
                      reverse=True)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")
