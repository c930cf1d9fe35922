"""A sweep's summary: one row per job, best first, however the sweep ended.

During a Hydra multirun (``python -m finetune -m ...``), ``SweepSummary`` (a Hydra callback
named in ``conf/config.yaml``) appends a row to ``SWEEP_DIR/sweep_summary.jsonl`` as each job
ends, so a sweep that crashes or is killed keeps the rows of the jobs that ended; when the
sweep ends it writes ``sweep_summary.csv`` (best first) and prints the table, the best job and
the command that reproduces it. Hydra skips ``on_multirun_end`` when a job raises, which is why
jobs never raise here (``finetune.__main__`` records a failed job and goes on) and why the rows
are rebuilt from the job dirs, not from the jsonl alone:

    python -m finetune.sweep SWEEP_DIR      # rebuild and print (finished, partial or crashed sweep)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.config import in_a_sweep, split_override
from finetune.metrics import infer_mode

SUMMARY_JSONL, SUMMARY_CSV = "sweep_summary.jsonl", "sweep_summary.csv"
FAILED = ("failed", "crashed")  # statuses that make a sweep's exit status non-zero
SWEEP_SYNTAX = re.compile(r"^(range|choice|interval|glob|tag|shuffle|sort)\(|,")  # a swept value, not a fixed one
_failed: bool = False  # set when a sweep of this process ended with a failed job


class SweepSummary(Callback):
    """Hydra callback: a summary row per job as it ends, the table when the sweep ends."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not in_a_sweep():
            return
        hydra = HydraConfig.get()
        row = job_row(Path(hydra.runtime.output_dir))
        with (Path(hydra.sweep.dir) / SUMMARY_JSONL).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _failed
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise(sweep_dir)
        print(format_summary(rows, swept_keys(sweep_dir, rows)))
        _failed = any(r["status"] in FAILED for r in rows)


def sweep_failed() -> bool:
    """Whether the sweep this process just ran had a failed job (its exit status is then 1)."""
    return _failed


# ------------------------------------------------------------------ rows
def job_row(job_dir: Path) -> dict[str, Any]:
    """What one job's run dir says about it: number, overrides, status, best value, epochs, time, error."""
    hydra = _read_yaml(job_dir / ".hydra" / "hydra.yaml").get("hydra", {})
    config = _read_yaml(job_dir / ".hydra" / "config.yaml")
    summary = _read_json(job_dir / "summary.json")
    best = summary.get("best") or {}
    metrics = job_dir / "metrics.jsonl"
    epochs = summary.get("epochs", len(metrics.read_text().splitlines()) if metrics.exists() else 0)
    checkpoint = config.get("checkpoint") or {}
    return {"job": int(hydra.get("job", {}).get("num", -1)), "trial": (config.get("sweep") or {}).get("trial"),
            "overrides": [str(o) for o in hydra.get("overrides", {}).get("task", [])],
            "status": summary.get("status", "crashed"), "monitor": best.get("metric", checkpoint.get("monitor")),
            "mode": checkpoint.get("mode"), "best": best.get("value"), "best_epoch": best.get("epoch"),
            "epochs": epochs, "wall_seconds": summary.get("wall_seconds"), "run_dir": str(job_dir),
            "error": summary.get("error"), "chosen_lr": (summary.get("lr_find") or {}).get("lr")}


def summarise(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of the sweep (rebuilt from the job dirs), best first; writes ``sweep_summary.csv``."""
    if not sweep_dir.is_dir():
        raise SystemExit(f"error: sweep dir '{sweep_dir}' does not exist")
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/hydra.yaml")]
    rows = sorted((job_row(d) for d in jobs), key=_rank)
    write_csv(sweep_dir / SUMMARY_CSV, rows, swept_keys(sweep_dir, rows))
    return rows


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
    hydra = _read_yaml(sweep_dir / "multirun.yaml").get("hydra", {})
    given = [str(o) for o in hydra.get("overrides", {}).get("task", [])]
    keys = [split_override(o)[0] for o in given if "=" in o and SWEEP_SYNTAX.search(split_override(o)[1])]
    keys += [k.lstrip("+~") for k in (hydra.get("sweeper") or {}).get("params") or {} if k.lstrip("+~") not in keys]
    if keys:
        return keys
    values = [dict(split_override(o) for o in r["overrides"]) for r in rows]
    every = sorted({k for v in values for k in v})
    return [k for k in every if len({v.get(k) for v in values}) > 1]


# ---------------------------------------------------------------- output
def write_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    monitor = next((r["monitor"] for r in rows if r["monitor"]), "best")
    header = ["job", "trial", *keys, "status", f"best {monitor}", "best_epoch", "epochs", "wall_seconds",
              "run_dir", "error", "chosen_lr"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            values = dict(split_override(o) for o in r["overrides"])
            writer.writerow([r["job"], r["trial"], *(values.get(k, "") for k in keys), r["status"], r["best"],
                             r["best_epoch"], r["epochs"], r["wall_seconds"], r["run_dir"], r["error"] or "",
                             r["chosen_lr"] if r["chosen_lr"] is not None else ""])


def format_summary(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The table (best first), the best job and the command that reproduces it, what failed and why."""
    if not rows:
        return "sweep summary: no job has started yet"
    monitor = next((r["monitor"] for r in rows if r["monitor"]), "best")
    with_trial = any(r["trial"] is not None for r in rows)
    with_lr = any(r.get("chosen_lr") is not None for r in rows)  # optim.lr=auto: the rate each job chose
    header = ["job", *(["trial"] if with_trial else []), *keys, *(["lr chosen"] if with_lr else []), "status",
              monitor, "epoch", "epochs", "seconds"]
    table = [header] + [_cells(r, keys, with_trial=with_trial, with_lr=with_lr) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    lines.insert(0, f"sweep summary: {len(rows)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    best = rows[0]
    if _rank(best)[0] == 0:
        lines.append(f"best: job {best['job']}, {monitor} {best['best']:.4f} at epoch {best['best_epoch']}")
        command = [o for o in best["overrides"] if not split_override(o)[0].startswith("sweep.")]  # a sweeper's own
        lines.append(f"reproduce: python -m finetune {' '.join(command)}".rstrip())
    lines += [f"job {r['job']} {r['status']}: {r['error'] or 'no summary.json (killed?)'}"
              for r in rows if r["status"] in FAILED]
    return "\n".join(lines)


def _cells(row: dict[str, Any], keys: list[str], *, with_trial: bool, with_lr: bool = False) -> list[str]:
    values = dict(split_override(o) for o in row["overrides"])
    value = f"{row['best']:.4f}" if isinstance(row["best"], (int, float)) else "-"
    trial = [str(row["trial"]) if row["trial"] is not None else "-"] if with_trial else []
    seconds = f"{row['wall_seconds']:.0f}" if isinstance(row["wall_seconds"], (int, float)) else "-"
    chosen = [f"{row['chosen_lr']:.4g}" if row.get("chosen_lr") is not None else "-"] if with_lr else []
    return [str(row["job"]), *trial, *(values.get(k, "") for k in keys), *chosen, row["status"], value,
            str(row["best_epoch"] if row["best_epoch"] is not None else "-"), str(row["epochs"]), seconds]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    rows = summarise(args.sweep_dir)
    print(format_summary(rows, swept_keys(args.sweep_dir, rows)))
    print(f"written: {args.sweep_dir / SUMMARY_CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
