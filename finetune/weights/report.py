"""`LoadReport`: what a pretrained load placed, remapped, dropped, adapted or left out."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.files import atomic_write_text


@dataclass
class LoadReport:
    """Accounts for every tensor of a pretrained load.

    Attributes:
        model: Class name of the target model.
        target_tensors: Number of tensors in the model's ``state_dict``.
        sources: One dict per source: index, path, format, container, tensors,
            method (remap used), stripped/added prefixes, aligned and unexpected keys.
        loaded: ``{target key: "[i] source key"}`` for every tensor copied in.
        remapped: ``{source key: target key}`` where the name changed (prefixes included).
        head: Classifier tensors re-initialised: ``{key, source_shape, target_shape}``.
        adapted: First-conv input-channel adaptations: ``{key, source_shape, target_shape, how}``.
        reshaped: Tensors loaded through a reshape: ``{key, source_shape, target_shape}``.
        mismatched: Shape mismatches allowed by ``allow_mismatch`` (left at init).
        cast: ``{"float16->float32": count}`` dtype conversions while copying.
        missing: Model tensors no source provided (allowed, or listed in ``problems``).
        unexpected: Source tensors that found no place: ``"[i] key"``.
        problems: One line per error; a load with problems raises `LoadError`.
        loaded_fraction: Fraction of backbone parameter elements loaded (head excluded).
    """

    model: str = ""
    target_tensors: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)
    loaded: dict[str, str] = field(default_factory=dict)
    remapped: dict[str, str] = field(default_factory=dict)
    head: list[dict[str, Any]] = field(default_factory=list)
    adapted: list[dict[str, Any]] = field(default_factory=list)
    reshaped: list[dict[str, Any]] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    cast: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    loaded_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (shapes as lists)."""
        return json.loads(json.dumps(asdict(self), default=list))

    def write_json(self, path: str | Path) -> None:
        """Write the report atomically (`finetune.files.atomic_write_text`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    def format_table(self, max_items: int = 3) -> str:
        """A compact, human-readable summary for the start of a run."""
        lines = [f"pretrained weights -> {self.model} ({self.target_tensors} tensors)"]
        for src in self.sources:
            prefixes = ", ".join(f"-{p!r} x{n}" for p, n in src["stripped"].items())
            prefixes += "".join(f", +{p!r} x{n}" for p, n in src["added"].items())
            lines.append(f"  [{src['index']}] {src['path']}  {src['format']}  {src['tensors']} tensors  "
                         f"remap={src['method']}"
                         + (f"  aligned={len(src['aligned'])}" if src["aligned"] else "")
                         + (f"  prefixes: {prefixes}" if prefixes else ""))
        rows = [
            ("loaded", len(self.loaded), f"{len(self.remapped)} renamed" if self.remapped else ""),
            ("head reinit", len(self.head), _shapes(self.head, max_items)),
            ("adapted", len(self.adapted), _shapes(self.adapted, max_items)),
            ("reshaped", len(self.reshaped), _shapes(self.reshaped, max_items)),
            ("mismatched", len(self.mismatched), _shapes(self.mismatched, max_items)),
            ("cast", sum(self.cast.values()), ", ".join(f"{k} x{v}" for k, v in self.cast.items())),
            ("missing", len(self.missing), _names(self.missing, max_items)),
            ("unexpected", len(self.unexpected), _names(self.unexpected, max_items)),
        ]
        lines += [f"  {name:<12}{count:>6}  {detail}".rstrip()
                  for name, count, detail in rows if count or name in ("loaded", "missing")]
        lines.append(f"  backbone parameters loaded: {100 * self.loaded_fraction:.1f}%")
        lines += [f"  ERROR: {p}" for p in self.problems]
        return "\n".join(lines)


def _shapes(items: list[dict[str, Any]], limit: int) -> str:
    """``key (a, b) -> (c, d)`` for the first few items."""
    text = "; ".join(f"{i['key']} {_shape(i['source_shape'])} -> {_shape(i['target_shape'])}"
                     for i in items[:limit])
    return text + (f"; +{len(items) - limit} more" if len(items) > limit else "")


def _shape(shape: Any) -> str:
    """A shape as ``(a, b)``, or ``none`` when the source had no such tensor."""
    return "none" if shape is None else str(tuple(shape))


def _names(items: list[str], limit: int) -> str:
    """The first few names, then a count."""
    return ", ".join(items[:limit]) + (f", +{len(items) - limit} more" if len(items) > limit else "")


class LoadError(UserError):
    """A pretrained load that could not account for every tensor; carries the report."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report
