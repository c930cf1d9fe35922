"""A sweep's summary: one row per job, best first, however the sweep ended.

During a Hydra multirun (``python -m finetune -m ...``), ``SweepSummary`` (a Hydra callback
named in ``conf/config.yaml``) appends a row to ``SWEEP_DIR/sweep_summary.jsonl`` as each job
ends, so a sweep that crashes or is killed keeps the rows of the jobs that ended; when the
sweep ends it writes ``sweep_summary.csv`` (best first) and prints the table, the best job and
the command that reproduces it. Hydra skips ``on_multirun_end`` when a job raises, which is why
jobs never raise here (``finetune.__main__`` records a failed job and goes on) and why the rows
are rebuilt from the job dirs, not from the jsonl alone:

    python -m finetune.sweep SWEEP_DIR      # rebuild and print (finished, partial or crashed sweep)

When ``data.fold`` is among the swept keys (k-fold cross-validation: ``data.folds=5 data.fold='range(5)'``),
``sweep_folds.csv`` has a row per configuration (the other swept keys) with the mean and std over its folds,
and the printed table ranks the configurations by that mean.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.cli import command, has_control, printable, status_of
from finetune.config import in_a_sweep, split_override
from finetune.errors import UserError, message_of
from finetune.files import atomic_write_text, csv_text, open_append, read_json_data, read_yaml_data
from finetune.metrics import infer_mode

SUMMARY_JSONL, SUMMARY_CSV = "sweep_summary.jsonl", "sweep_summary.csv"
FOLDS_CSV, FOLD_KEY = "sweep_folds.csv", "data.fold"  # k-fold cross-validation: a row per configuration
FAILED = ("failed", "crashed", "unreadable")  # statuses that make a sweep's exit status non-zero
STATUSES = ("completed", "interrupted", "pruned", "failed", "running")  # what a summary.json may say
MAX_JOBS = 100_000  # job dirs a summary reads: a bound on the work a sweep dir from someone else can cause
SWEEP_SYNTAX = re.compile(r"^(range|choice|interval|glob|tag|shuffle|sort)\(|,")  # a swept value, not a fixed one
_failed: bool = False  # set when a sweep of this process ended with a failed job
_ended: set[str] = set()  # the run dirs of the jobs that ended in this process


class SweepSummary(Callback):
    """Hydra callback: a summary row per job as it ends, the table when the sweep ends."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not in_a_sweep():
            return
        hydra = HydraConfig.get()
        row = job_row(Path(hydra.runtime.output_dir))
        _ended.add(str(Path(row["run_dir"]).resolve()))
        sweep_dir = Path(hydra.sweep.dir)
        with open_append(sweep_dir / SUMMARY_JSONL, root=sweep_dir) as f:  # never through a planted link
            f.write(json.dumps(row) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _failed
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise(sweep_dir)
        print(format_summary(rows, swept_keys(sweep_dir, rows)))
        shared = OmegaConf.select(config, "hydra.sweeper.storage", default=None) is not None
        _failed = any(r["status"] in FAILED for r in (own_rows(rows) if shared else rows))


def own_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the jobs this process ran, where it knows them. Sweepers sharing an Optuna study
    (``hydra.sweeper.storage`` set) share the sweep dir and see each other's jobs, a starting one without
    its summary yet: those must not fail this sweep (a continued sweep of one sweeper counts every job).
    A launcher that runs its jobs elsewhere (submitit) ends none here: then every row counts."""
    return [r for r in rows if str(Path(r["run_dir"]).resolve()) in _ended] if _ended else rows


def sweep_failed() -> bool:
    """Whether the sweep this process just ran had a failed job (its exit status is then 1)."""
    return _failed


# ------------------------------------------------------------------ rows
def job_row(job_dir: Path) -> dict[str, Any]:
    """What one job's run dir says about it: number, overrides, status, best value, epochs, time, error.

    The files are someone else's data when the sweep dir is: each value is checked, and a job whose
    files make no sense is a row with status ``unreadable`` and the reason as its error.
    """
    try:
        return _job_row(job_dir)
    except UserError as err:
        return {"job": _job_number(job_dir), "trial": None, "overrides": [], "status": "unreadable",
                "monitor": None, "mode": None, "best": None, "best_epoch": None, "epochs": 0, "wall_seconds": None,
                "run_dir": str(job_dir), "error": message_of(err), "chosen_lr": None, "chosen_freeze": None}


def _job_row(job_dir: Path) -> dict[str, Any]:
    hydra = _section(_read_yaml(job_dir / ".hydra" / "hydra.yaml"), "hydra", job_dir / ".hydra" / "hydra.yaml")
    config = _read_yaml(job_dir / ".hydra" / "config.yaml")
    summary = _read_json(job_dir / "summary.json")
    source = job_dir / "summary.json"
    best = _section(summary, "best", source)
    checkpoint = _section(config, "checkpoint", job_dir / ".hydra" / "config.yaml")
    overrides = _section(hydra, "overrides", job_dir).get("task", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"'{job_dir / '.hydra' / 'hydra.yaml'}' has overrides that are not a list of strings")
    metrics = job_dir / "metrics.jsonl"
    status = _checked(summary, "status", source, (str,), "crashed")
    if status not in STATUSES and status != "crashed":
        raise UserError(f"'{source}' says status {printable(status, 40)!r}, which is not a status")
    return {"job": _checked(_section(hydra, "job", job_dir), "num", job_dir, (int,), -1),
            "trial": _checked(_section(config, "sweep", job_dir), "trial", job_dir, (int, type(None)), None),
            "overrides": overrides, "status": status,
            "monitor": _checked(best, "metric", source, (str, type(None)), checkpoint.get("monitor")),
            "mode": _checked(checkpoint, "mode", job_dir, (str, type(None)), None),
            "best": _number(best, "value", source), "best_epoch": _checked(best, "epoch", source, (int, type(None)), None),
            "epochs": _checked(summary, "epochs", source, (int, type(None)), None) or _count_lines(metrics),
            "wall_seconds": _number(summary, "wall_seconds", source), "run_dir": str(job_dir),
            "error": _checked(summary, "error", source, (str, type(None)), None),
            "chosen_lr": _number(_section(summary, "lr_find", source), "lr", source),
            "chosen_freeze": _checked(_section(summary, "lr_find", source), "freeze", source, (str, type(None)),
                                      None)}


def _section(data: dict[str, Any], key: str, source: Path) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"'{source}' has {key} {printable(value, 40)!r}, which is not a table")
    return value


def _checked(data: dict[str, Any], key: str, source: Path, types: tuple[type, ...], default: Any) -> Any:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, types):
        raise UserError(f"'{source}' has {key} {printable(value, 40)!r}, which is not a {types[0].__name__}")
    return value


def _number(data: dict[str, Any], key: str, source: Path) -> float | None:
    value = _checked(data, key, source, (int, float, type(None)), None)
    return None if value is None or not math.isfinite(value) else value


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _job_number(job_dir: Path) -> int:
    return int(job_dir.name) if job_dir.name.isdigit() and len(job_dir.name) < 10 else -1


def summarise(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of the sweep (rebuilt from the job dirs), best first; writes ``sweep_summary.csv``."""
    if not sweep_dir.is_dir():
        raise UserError(f"sweep dir '{sweep_dir}' does not exist: give the directory a -m sweep wrote (hydra.sweep.dir)")
    jobs = [p.parent.parent for _, p in zip(range(MAX_JOBS + 1), sweep_dir.glob("*/.hydra/hydra.yaml"))]
    if len(jobs) > MAX_JOBS:
        raise UserError(f"sweep dir '{sweep_dir}' has more than {MAX_JOBS} job dirs: refused")
    rows = sorted((job_row(d) for d in jobs), key=_rank)
    keys = swept_keys(sweep_dir, rows)
    write_csv(sweep_dir / SUMMARY_CSV, rows, keys)
    if FOLD_KEY in keys:
        write_folds_csv(sweep_dir / FOLDS_CSV, fold_summary(rows, keys), [k for k in keys if k != FOLD_KEY])
    return rows


def fold_summary(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One entry per configuration (the values of the swept keys other than ``data.fold``): the folds that
    completed with a value, the ``mean`` and ``std`` (population, numpy's default) of their best values, and
    every job number of the configuration; ranked by mean (the monitor's mode), configurations without a
    completed fold last.

    >>> rows = [{"overrides": [f"data.fold={f}", f"optim.lr={lr}"], "status": "completed", "best": b, "job": j,
    ...          "mode": "max", "monitor": "val/acc1"}
    ...         for j, (f, lr, b) in enumerate([(0, 1, 0.5), (1, 1, 0.7), (0, 2, 0.9), (1, 2, 0.8)])]
    >>> [(g["config"], g["folds"], round(g["mean"], 3), round(g["std"], 3), g["jobs"])
    ...  for g in fold_summary(rows, ["data.fold", "optim.lr"])]
    [({'optim.lr': '2'}, 2, 0.85, 0.05, [2, 3]), ({'optim.lr': '1'}, 2, 0.6, 0.1, [0, 1])]
    """
    others = [k for k in keys if k != FOLD_KEY]
    groups: dict[tuple, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["job"]):
        values = dict(split_override(o) for o in r["overrides"])
        config = {k: values.get(k, "") for k in others}
        group = groups.setdefault(tuple(config.values()), {"config": config, "values": [], "jobs": [],
                                                           "mode": None, "monitor": None})
        group["jobs"].append(r["job"])
        if r["status"] == "completed" and isinstance(r["best"], (int, float)) and math.isfinite(r["best"]):
            group["values"].append(r["best"])
            group["mode"] = r["mode"] or infer_mode(r["monitor"] or "")
            group["monitor"] = r["monitor"]
    out = []
    for group in groups.values():
        values = group.pop("values")
        mean = sum(values) / len(values) if values else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else None
        out.append(group | {"folds": len(values), "mean": mean, "std": std})
    return sorted(out, key=lambda g: (g["mean"] is None, 0.0 if g["mean"] is None else
                                      (-g["mean"] if g["mode"] == "max" else g["mean"])))


def _rank(row: dict[str, Any]) -> tuple:
    """Completed jobs best first (by the monitor's mode), then stopped ones with a value (pruned,
    interrupted: their value is partial), then the rest by job number."""
    value = row["best"]
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return (2, 0.0, row["job"])
    mode = row["mode"] or infer_mode(row["monitor"] or "")
    return (0 if row["status"] == "completed" else 1, -value if mode == "max" else value, row["job"])


def swept_keys(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The keys the sweep varied: sweep syntax on its command line or a sweeper's params, else
    the overrides whose values differ between jobs."""
    try:
        hydra = _section(_read_yaml(sweep_dir / "multirun.yaml"), "hydra", sweep_dir / "multirun.yaml")
        given = _section(hydra, "overrides", sweep_dir / "multirun.yaml").get("task") or []
        params = _section(hydra, "sweeper", sweep_dir / "multirun.yaml").get("params") or {}
    except UserError:
        given, params = [], {}
    given = [o for o in given if isinstance(o, str)] if isinstance(given, list) else []
    keys = [split_override(o)[0] for o in given if "=" in o and SWEEP_SYNTAX.search(split_override(o)[1])]
    keys += [str(k).lstrip("+~") for k in (params if isinstance(params, dict) else {})
             if str(k).lstrip("+~") not in keys]
    if keys:
        return keys
    values = [dict(split_override(o) for o in r["overrides"]) for r in rows]
    every = sorted({k for v in values for k in v})
    return [k for k in every if len({v.get(k) for v in values}) > 1]


# ---------------------------------------------------------------- output
def write_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """``sweep_summary.csv``, written whole (a link planted at its name is replaced, never followed); a
    text cell that would start a spreadsheet formula gets a leading ``'`` (`finetune.files.csv_cell`)."""
    monitor = next((r["monitor"] for r in rows if r["monitor"]), "best")
    header = ["job", "trial", *keys, "status", f"best {monitor}", "best_epoch", "epochs", "wall_seconds",
              "run_dir", "error", "chosen_lr", "chosen_freeze"]
    table = [header]
    for r in rows:
        values = dict(split_override(o) for o in r["overrides"])
        table.append([r["job"], r["trial"], *(values.get(k, "") for k in keys), r["status"], r["best"],
                      r["best_epoch"], r["epochs"], r["wall_seconds"], r["run_dir"], r["error"] or "",
                      r["chosen_lr"] if r["chosen_lr"] is not None else "", r.get("chosen_freeze") or ""])
    atomic_write_text(path, csv_text(table), root=path.parent)


def write_folds_csv(path: Path, groups: list[dict[str, Any]], keys: list[str]) -> None:
    """``sweep_folds.csv``: per configuration its swept values, ``folds``, ``mean``, ``std`` and ``jobs``."""
    table = [[*keys, "folds", "mean", "std", "jobs"]]
    table += [[*g["config"].values(), g["folds"], "" if g["mean"] is None else g["mean"],
               "" if g["std"] is None else g["std"], " ".join(map(str, g["jobs"]))] for g in groups]
    atomic_write_text(path, csv_text(table), root=path.parent)


def format_folds(groups: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The cross-validation table: configurations ranked by their mean over folds."""
    monitor = next((g["monitor"] for g in groups if g["monitor"]), "best")
    header = [*keys, "folds", f"mean {monitor}", "std", "jobs"]
    table = [[printable(c, 80) for c in row] for row in [header] + [
        [*g["config"].values(), str(g["folds"]), "-" if g["mean"] is None else f"{g['mean']:.4f}",
         "-" if g["std"] is None else f"{g['std']:.4f}", " ".join(map(str, g["jobs"]))] for g in groups]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return [f"cross-validation: {len(groups)} configuration(s), mean and std over folds"] + lines


def format_summary(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The table (best first), the best job and the command that reproduces it, what failed and why."""
    if not rows:
        return "sweep summary: no job has started yet"
    monitor = next((r["monitor"] for r in rows if r["monitor"]), "best")
    with_trial = any(r["trial"] is not None for r in rows)
    with_lr = any(r.get("chosen_lr") is not None for r in rows)  # optim.lr=auto: the rate each job chose
    with_freeze = any(r.get("chosen_freeze") is not None for r in rows)  # ... and the freezing, where it chose one
    header = ["job", *(["trial"] if with_trial else []), *keys, *(["lr chosen"] if with_lr else []),
              *(["freeze chosen"] if with_freeze else []), "status", monitor, "epoch", "epochs", "seconds"]
    table = [[printable(c, 80) for c in row]
             for row in [header] + [_cells(r, keys, with_trial=with_trial, with_lr=with_lr, with_freeze=with_freeze)
                                    for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    lines.insert(0, f"sweep summary: {len(rows)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    best = rows[0]
    if _rank(best)[0] == 0:
        lines.append(f"best: job {best['job']}, {printable(monitor, 80)} {best['best']:.4f} at epoch {best['best_epoch']}")
        lines.append(reproduce_line(best))
    lines += [f"job {r['job']} {r['status']}: {printable(r['error'] or 'no summary.json (killed?)')}"
              for r in rows if r["status"] in FAILED]
    if FOLD_KEY in keys:
        lines += format_folds(fold_summary(rows, keys), [k for k in keys if k != FOLD_KEY])
    return "\n".join(lines)


def reproduce_line(row: dict[str, Any]) -> str:
    """The command that runs ``row``'s job again: its overrides (a sweeper's own ``sweep.*`` left out),
    each one shell word, so that an override read from the job's files can never run as shell code."""
    overrides = [o for o in row["overrides"] if not split_override(o)[0].startswith("sweep.")]
    if any(has_control(o) for o in overrides):
        return f"reproduce: (not shown: job {row['job']}'s overrides hold control characters)"
    return f"reproduce: {command('finetune', *overrides)}"


def _cells(row: dict[str, Any], keys: list[str], *, with_trial: bool, with_lr: bool = False,
           with_freeze: bool = False) -> list[str]:
    values = dict(split_override(o) for o in row["overrides"])
    value = f"{row['best']:.4f}" if isinstance(row["best"], (int, float)) else "-"
    trial = [str(row["trial"]) if row["trial"] is not None else "-"] if with_trial else []
    seconds = f"{row['wall_seconds']:.0f}" if isinstance(row["wall_seconds"], (int, float)) else "-"
    chosen = [f"{row['chosen_lr']:.4g}" if row.get("chosen_lr") is not None else "-"] if with_lr else []
    chosen += [row.get("chosen_freeze") or "-"] if with_freeze else []
    return [str(row["job"]), *trial, *(values.get(k, "") for k in keys), *chosen, row["status"], value,
            str(row["best_epoch"] if row["best_epoch"] is not None else "-"), str(row["epochs"]), seconds]


def _read_yaml(path: Path) -> dict[str, Any]:
    """A job's YAML table as plain data (bounded, no aliases); {} when missing; broken is a `UserError`."""
    return _table(read_yaml_data(path), path) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    return _table(read_json_data(path, max_bytes=1 << 20), path) if path.is_file() else {}


def _table(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UserError(f"'{path}' has {printable(data, 40)!r}, which is not a table")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    return status_of(lambda: print_summary(args.sweep_dir))


def print_summary(sweep_dir: Path) -> None:
    rows = summarise(sweep_dir)
    print(format_summary(rows, swept_keys(sweep_dir, rows)))
    print(f"written: {sweep_dir / SUMMARY_CSV}" + (f", {sweep_dir / FOLDS_CSV}" if (sweep_dir / FOLDS_CSV).is_file()
                                                     else ""))


if __name__ == "__main__":
    sys.exit(main())
