"""``scripts/bench_fewshot.py``, the benchmark the few-shot target of ``optim.lr=auto`` is read on (issue 26):
each seed draws its own images unless ``--fixed-data``, the digits set is other data drawn the same way, and the
table counts ``auto``'s single runs against the recipes run on the same images."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_fewshot", REPO / "scripts" / "bench_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_draw_their_own_images_unless_fixed_data_is_asked_for():
    bench = bench_module()
    assert bench.parse_args([]).draw_data is True
    assert bench.parse_args(["--draw-data"]).draw_data is True
    assert bench.parse_args(["--fixed-data"]).draw_data is False
    assert bench.parse_args([]).sets == ["easy", "medium", "hard"]
    assert [bench.data_seed("hard", seed, draw=True) for seed in (0, 1, 2)] == [13, 1013, 2013]
    assert [bench.data_seed("hard", seed, draw=False) for seed in (0, 1, 2)] == [13, 13, 13]


def rows_of(run: dict[str, float], *, seed: int, data_seed: int) -> list[dict]:
    return [{"set": "easy", "per_class": 5, "seed": seed, "data_seed": data_seed, "config": config, "best": best,
             "lr": 1e-3} for config, best in run.items()]


def test_the_single_runs_are_judged_against_the_recipes_on_the_same_images(capsys):
    bench = bench_module()
    rows = [*rows_of({"defaults": 0.50, "head_only": 0.70, "lr x3": 0.40, "auto": 0.72}, seed=0, data_seed=11),
            *rows_of({"defaults": 0.60, "head_only": 0.55, "lr x3": 0.50, "auto": 0.45}, seed=1, data_seed=1011),
            # no auto on this draw: not a single run to judge
            *rows_of({"defaults": 0.90, "head_only": 0.10, "lr x3": 0.10}, seed=2, data_seed=2011)]
    bench.print_single_runs(rows)
    out = capsys.readouterr().out
    assert "(2 with every baseline on the same images and seed)" in out
    assert "at or above that run's best recipe: 1 of 2" in out
    assert "more than 0.02 below it: 1; more than 0.03 below: 1; the worst -0.150 (easy 5, seed 1)" in out
    assert "below the defaults: 1 of 2; the worst -0.150" in out


def test_a_cell_still_running_compares_auto_on_the_draws_it_shares_with_the_baselines(capsys):
    bench = bench_module()
    rows = [*rows_of({"defaults": 0.50, "head_only": 0.70, "lr x3": 0.40, "auto": 0.69}, seed=0, data_seed=11),
            # auto has not run on this draw yet; its baselines would lift the best baseline's mean to 0.85
            *rows_of({"defaults": 0.60, "head_only": 1.00, "lr x3": 0.50}, seed=1, data_seed=1011)]
    bench.print_table(rows)
    out = capsys.readouterr().out
    assert "| easy | 5 | 2 | 0.550 ± 0.050 | 0.850 ± 0.150 | 0.450 ± 0.050 | 0.690 ± 0.000 |" in out
    assert "| -0.010 (on the 1 shared draws) | +0.190 (on the 1 shared draws) |" in out
    assert "fewshot_auto_minus_best_baseline_worst_cell: -0.010" in out


def test_digits_are_drawn_per_seed_into_disjoint_train_and_val_folders(tmp_path):
    pytest.importorskip("sklearn", reason="the digits set ships with scikit-learn")
    bench = bench_module()
    first = bench.digits_folder(tmp_path, seed=3, per_class=2, size=32)
    again = bench.digits_folder(tmp_path, seed=3, per_class=2, size=32)
    other = bench.digits_folder(tmp_path, seed=4, per_class=2, size=32)
    assert first == again and first != other
    for folder in (first, other):
        assert sorted(p.name for p in (folder / "train").iterdir()) == [str(d) for d in range(10)]
        for digit in range(10):
            train = {p.name for p in (folder / "train" / str(digit)).iterdir()}
            val = {p.name for p in (folder / "val" / str(digit)).iterdir()}
            assert len(train) == 2 and len(val) == 20 and not train & val
    names = {p.name for p in first.rglob("*.png")}
    assert names != {p.name for p in other.rglob("*.png")}  # another seed, another draw
    image = Image.open(next(first.rglob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image).min() < 64 and np.asarray(image).max() > 192  # dark ink on white paper
    assert not list(tmp_path.glob("*.partial-*"))


def test_the_script_runs_a_drawn_and_a_fixed_cell_and_records_each_draw(tmp_path):
    """The real script, a real model and generated images: seed 1 trains on its own draw (demo seed 1011), and on
    the set's own images (11) with --fixed-data; --table reads them back."""
    out = tmp_path / "fewshot.jsonl"
    for extra in ([], ["--fixed-data"]):
        command = [sys.executable, str(REPO / "scripts" / "bench_fewshot.py"), "--sets", "easy", "--per-class", "2",
                   "--seeds", "1", "--configs", "head_only", "--epochs", "1", "--img-size", "32",
                   "--cache", str(tmp_path / "cache"), "--out", str(out), *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                   "HOME": str(tmp_path)})
        assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["data_seed"] for r in records] == [1011, 11]
    assert all(0.0 <= r["best"] <= 1.0 and r["config"] == "head_only" for r in records)
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_fewshot.py"), "--table", str(out)],
                           capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO)})
    assert table.returncode == 0 and "| easy | 2 | 2 |" in table.stdout, table.stdout + table.stderr
