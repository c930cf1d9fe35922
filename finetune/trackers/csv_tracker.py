"""``logger=csv``: ``RUN_DIR/metrics.csv``, one row per logged step.

Columns: ``step``, then every metric name logged so far, sorted; an empty cell is a metric not logged at
that step (``val/*`` only on an epoch's last step). A row is appended when its step is complete (the next
step arrives, or the run ends); a new metric name rewrites the file with the wider header. A resume keeps
the rows before its purge step and drops those an attempt that died logged after its last save, so the
file of a resumed run has the columns and the steps of an uninterrupted one. Images and text are not
tabular: they go to the other trackers. Written through `finetune.files` (no link followed, formula-safe
cells).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from finetune.files import atomic_write_text, csv_cell, csv_text, open_append
from finetune.trackers import TrackerContext

log = logging.getLogger("finetune")
FILE = "metrics.csv"


def make(settings: dict[str, Any], context: TrackerContext) -> CsvLogger:
    return CsvLogger(context.run_dir / FILE, purge_step=context.purge_step)


class CsvLogger:
    """A `finetune.loggers.Logger` writing ``metrics.csv``."""

    def __init__(self, path: Path, *, purge_step: int | None = None):
        """``purge_step``: a resume; the file's rows from that step on are dropped (None: a fresh file)."""
        self.path = path
        self.rows: dict[int, dict[str, Any]] = {}
        self.columns: list[str] = []
        if purge_step is not None and path.is_file():
            self.columns, self.rows = read_rows(path, before=purge_step)
        self.written = 0  # rows of self.rows (in step order) that are in the file
        self._rewrite()

    def log_config(self, config: dict[str, Any]) -> None:
        pass  # config.yaml and .hydra/ hold it

    def log_scalars(self, scalars: dict[str, float], *, step: int) -> None:
        if self.rows and step < max(self.rows):
            self.written = 0  # an earlier row changes: the file is written again
        row = self.rows.setdefault(step, {})
        row.update({k: v if isinstance(v, int) else float(v) for k, v in scalars.items()})
        new = sorted(set(scalars) - set(self.columns))
        if new:
            self.columns = sorted(self.columns + new)
            self.written = 0
        self._flush(keep_last=True)

    def log_image(self, tag: str, image: np.ndarray, *, step: int) -> None:
        pass

    def log_text(self, tag: str, text: str, *, step: int) -> None:
        pass

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass  # summary.json holds the final and best metrics

    def log_artifact(self, path: Path) -> None:
        pass  # the files are in the run dir beside metrics.csv

    def close(self, status: str = "FINISHED") -> None:
        self._flush(keep_last=False)

    def _flush(self, *, keep_last: bool) -> None:
        """Write the complete rows not yet in the file (all but the newest while ``keep_last``)."""
        steps = sorted(self.rows)
        done = len(steps) - 1 if keep_last else len(steps)
        if self.written == 0 and done > 0:
            self._rewrite(upto=done)
        elif done > self.written:
            with open_append(self.path) as f:
                f.write(csv_text(self._row(s) for s in steps[self.written:done]))
            self.written = done

    def _rewrite(self, upto: int | None = None) -> None:
        steps = sorted(self.rows)[:upto]
        atomic_write_text(self.path, csv_text([["step", *self.columns], *(self._row(s) for s in steps)]))
        self.written = len(steps)

    def _row(self, step: int) -> list[Any]:
        row = self.rows[step]
        return [step, *(repr(row[c]) if c in row else "" for c in self.columns)]


def read_rows(path: Path, *, before: int) -> tuple[list[str], dict[int, dict[str, Any]]]:
    """``metrics.csv``'s columns and its rows of steps before ``before``; a row that does not parse is
    dropped with a warning."""
    reader = csv.reader(io.StringIO(path.read_text(errors="replace")))
    header = next(reader, None) or ["step"]
    columns = [c for c in header[1:] if c == csv_cell(c)]  # a name this file did not write: dropped
    rows: dict[int, dict[str, Any]] = {}
    bad = 0
    for cells in reader:
        try:
            step = int(cells[0])
            values = {c: number(v) for c, v in zip(header[1:], cells[1:]) if v != "" and c in columns}
        except (ValueError, IndexError):
            bad += 1
            continue
        if step < before:
            rows[step] = values
    if bad:
        log.warning(f"'{path}': {bad} rows are not metrics (damaged?): dropped")
    return columns, rows


def number(text: str) -> int | float:
    """A cell as the value logged: an int stays one (``epoch``)."""
    try:
        return int(text)
    except ValueError:
        return float(text)
