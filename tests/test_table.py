"""data=table: label tables (CSV, TSV, JSONL, Parquet), their bad rows, and k-fold splits of them.

The tables are generated over a flat folder of tiny images (`make_image_folder(split=False)`); each
test compares against an independent computation (the table's own rows, set algebra over the folds,
the run's metrics.jsonl).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_errors, make_image_folder, run_cli, run_together

from finetune.data import DataSplit, TableColumns, scan_table
from finetune.errors import UserError

TINY = ["model=resnet18", "model.name=test_resnet", "model.pretrained=false", "data.img_size=32",
        "data.batch_size=4", "data.num_workers=0", "logger.progress_bar=false"]


def write_csv(path: Path, rows: list[list[str]], header: str = "path,label") -> Path:
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """A folder with images/class_c/i.png (3 classes, 9 each) and labels.csv naming each with its class."""
    base = tmp_path_factory.mktemp("table")
    make_image_folder(base / "images", classes=3, train=6, val=3, split=False)
    rows = [[f"images/{p.parent.name}/{p.name}", p.parent.name] for p in sorted((base / "images").rglob("*.png"))]
    write_csv(base / "labels.csv", rows)
    return base


def table_rows(base: Path) -> dict[str, str]:
    lines = (base / "labels.csv").read_text().splitlines()[1:]
    return {str(base / line.split(",")[0]): line.split(",")[1] for line in lines}


def named(split: DataSplit, samples) -> dict[str, str]:
    return {path: split.class_names[label] for path, label in samples}


# ------------------------------------------------------------ reading
def test_every_format_gives_the_table_s_labels_and_the_same_split(flat, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [line.split(",") for line in (flat / "labels.csv").read_text().splitlines()[1:]]
    (flat / "labels.tsv").write_text("path\tlabel\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    (flat / "labels.jsonl").write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows))
    pq.write_table(pa.table({"path": [p for p, _ in rows], "label": [c for _, c in rows]}), flat / "labels.parquet")
    splits = {ext: scan_table(flat / f"labels.{ext}", check_images=False) for ext in ("csv", "tsv", "jsonl", "parquet")}
    expected = table_rows(flat)
    for ext, split in splits.items():
        assert named(split, split.train) | named(split, split.val) == expected, ext
        assert (split.train, split.val, split.class_names) == (splits["csv"].train, splits["csv"].val,
                                                               splits["csv"].class_names), ext
    csv_split = splits["csv"]
    assert csv_split.class_names == ["class_0", "class_1", "class_2"] and csv_split.layout == "split"
    assert len(csv_split.val) == 6  # 20% of each class's 9 images, as for class folders


def test_split_column_other_column_names_and_given_classes(flat, tmp_path):
    rows = [line.split(",") for line in (flat / "labels.csv").read_text().splitlines()[1:]]
    table = write_csv(flat / "named.csv", [[c, p, "val" if i % 3 == 0 else "train"] for i, (p, c) in enumerate(rows)],
                      header="kind,file,subset")
    classes = tmp_path / "classes.txt"
    classes.write_text("class_2\nclass_1\nclass_0\n")
    columns = TableColumns(path="file", label="kind", split="subset")
    split = scan_table(table, columns=columns, classes=str(classes), check_images=False)
    assert split.layout == "column" and split.class_names == ["class_2", "class_1", "class_0"]
    assert sorted(os.path.relpath(p, flat) for p, _ in split.val) == sorted(p for i, (p, _) in enumerate(rows)
                                                                            if i % 3 == 0)
    assert named(split, split.train) | named(split, split.val) == table_rows(flat)
    with pytest.raises(UserError, match="has no train image of class 'unused'.*leave it out of data.classes"):
        scan_table(table, columns=columns, classes=["class_0", "class_1", "class_2", "unused"], check_images=False)
    with pytest.raises(UserError, match="named.csv' line 2: label 'class_0' is not in data.classes"):
        scan_table(table, columns=columns, classes=["class_1", "class_2"], check_images=False)


def test_absolute_paths_and_links_out_of_the_tree_need_allow_outside(flat, tmp_path):
    outside = tmp_path / "elsewhere"
    make_image_folder(outside, classes=2, train=3, val=0, split=False)
    rows = [[str(p), p.parent.name] for p in sorted(outside.rglob("*.png"))]
    (tmp_path / "here").mkdir()
    table = write_csv(tmp_path / "here" / "t.csv", rows)
    with pytest.raises(UserError, match=r"t\.csv' line 2: path '.*' leads outside the table's folder.*"
                                        r"data\.allow_outside=true"):
        scan_table(table, check_images=False)
    split = scan_table(table, allow_outside=True, check_images=False)
    assert all(p == label for p, label in [(Path(p).parent.name, split.class_names[c]) for p, c in split.train])
    assert split.to_record()["files"]["train"][0][0].startswith(str(outside))  # absolute in split.json
    (tmp_path / "here" / "link").symlink_to(outside / "class_0")  # a link inside that leads out is outside too
    linked = write_csv(tmp_path / "here" / "l.csv", [["link/0.png", "a"], ["link/1.png", "b"]])
    with pytest.raises(UserError, match="line 2: path 'link/0.png' leads outside"):
        scan_table(linked, check_images=False)


# ------------------------------------------------------------ bad tables: one line naming the file, the row and the fix
BAD_TABLES = {
    "no_label_column": ("path,class\nimages/class_0/0.png,class_0\n",
                        [r"line 1 \(the header\) has no column 'label'", "data.columns.label=NAME"]),
    "empty_label": ("path,label\nimages/class_0/0.png,class_0\nimages/class_0/1.png,\n",
                    ["line 3: the label cell is empty"]),
    "wrong_cells": ("path,label\nimages/class_0/0.png,class_0,extra\n", ["line 2 has 3 cells where the header has 2"]),
    "bad_split": ("path,label,split\nimages/class_0/0.png,class_0,holdout\n",
                  ["line 2: split 'holdout' is not one of train, val, test"]),
    "conflicting": ("path,label\nimages/class_0/0.png,class_0\nimages/class_1/0.png,class_1\n"
                    "./images/class_0/0.png,class_1\n", ["line 4: './images/class_0/0.png' is named again with "
                                                         "different labels \\(first at line 2"]),
    "escapes": ("path,label\nimages/class_0/0.png,class_0\n../../etc/passwd,class_1\n",
                ["line 3: path '../../etc/passwd' leads outside the table's folder", "data.allow_outside"]),
    "missing_image": ("path,label\nimages/class_0/0.png,class_0\nimages/class_0/nope.png,class_1\n",
                      ["line 3: image 'images/class_0/nope.png' does not exist", "data.skip_bad_images=true"]),
    "empty": ("path,label\n", ["has no rows"]),
    "lone_class": ("path,label\nimages/class_0/0.png,class_0\nimages/class_0/1.png,class_0\nimages/class_1/0.png,"
                   "class_1\n", ["class 'class_1' has 1 image, too few to split by data.val_split=0.2: add images to "
                                 "it or give table '.*lone_class.csv' a split column with train and val rows$"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_a_bad_table_is_one_user_error_naming_file_row_and_fix(flat, case):
    text, expected = BAD_TABLES[case]
    table = flat / f"{case}.csv"
    table.write_text(text)
    with pytest.raises(UserError) as raised:
        scan_table(table, check_images=False)
    message = str(raised.value)
    assert "\n" not in message and str(table) in message, message
    for part in expected:
        assert re.search(part, message), (part, message)


def test_missing_images_can_be_skipped_and_are_listed(flat, tmp_path):
    rows = [line.split(",") for line in (flat / "labels.csv").read_text().splitlines()[1:]]
    table = write_csv(flat / "gaps.csv", rows + [["images/class_0/gone.png", "class_0"]])
    with pytest.warns(UserWarning, match=r"skipping 1 rows whose image does not exist \(lines 29; first: "
                                         r"'images/class_0/gone.png'\)"):
        split = scan_table(table, skip_bad_images=True, check_images=False)
    assert split.skipped == [str(flat / "images/class_0/gone.png")]
    assert named(split, split.train) | named(split, split.val) == table_rows(flat)
    assert split.to_record()["skipped"] == ["images/class_0/gone.png"]


def test_bounded_reading_refuses_a_huge_cell_and_a_non_table(flat):
    huge = flat / "huge.csv"
    huge.write_text("path,label\n\"" + "x" * (1 << 18) + "\",a\n")
    with pytest.raises(UserError, match=r"huge\.csv' line 2: field larger than field limit"):
        scan_table(huge, check_images=False)
    with pytest.raises(UserError, match=r"extension must be one of \.csv, \.tsv, \.jsonl"):
        scan_table(flat / "images" / "class_0" / "0.png", check_images=False)
    jsonl = flat / "bad.jsonl"
    jsonl.write_text('{"path": "images/class_0/0.png", "label": "class_0"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad\.jsonl' line 2 is not a JSON object"):
        scan_table(jsonl, check_images=False)


# ------------------------------------------------------------ k folds
@pytest.mark.parametrize("folds", [3, 5])
def test_folds_are_disjoint_cover_the_pool_and_are_stratified(flat, folds):
    expected = table_rows(flat)
    splits = [scan_table(flat / "labels.csv", folds=folds, fold=i, seed=7, check_images=False) for i in range(folds)]
    vals = [set(p for p, _ in s.val) for s in splits]
    for i, split in enumerate(splits):
        assert split.layout == "folds" and (split.folds, split.fold) == (folds, i)
        assert set(p for p, _ in split.train) == set(expected) - vals[i]  # train: every other fold
        assert named(split, split.train) | named(split, split.val) == expected
        counts = split.class_counts("val")
        assert max(counts) - min(counts) <= 1, counts  # 9 images per class dealt into the folds
    assert sum(len(v) for v in vals) == len(expected) and set().union(*vals) == set(expected)  # disjoint, cover
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1, sizes
    again = scan_table(flat / "labels.csv", folds=folds, fold=0, seed=7, check_images=False)
    other = scan_table(flat / "labels.csv", folds=folds, fold=0, seed=8, check_images=False)
    assert again.val == splits[0].val and other.val != splits[0].val  # seeded by data.split_seed


def test_multilabel_folds_by_iterative_stratification_are_disjoint_and_balanced():
    import random

    from finetune.data.splits import assign_multilabel_folds

    rng = random.Random(0)
    label_sets = [tuple(sorted(rng.sample(range(6), rng.randint(0, 3)))) for _ in range(300)]
    assigned = assign_multilabel_folds(label_sets, [0.2] * 5, seed=3)
    assert len(assigned) == 300 and set(assigned) == set(range(5))
    sizes = [assigned.count(j) for j in range(5)]
    assert max(sizes) - min(sizes) <= 2, sizes
    for label in range(6):
        per_fold = [sum(1 for s, j in zip(label_sets, assigned) if label in s and j == f) for f in range(5)]
        assert max(per_fold) - min(per_fold) <= 2, (label, per_fold)  # each label spread evenly
    assert assign_multilabel_folds(label_sets, [0.2] * 5, seed=3) == assigned


# ------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_fold_of_a_table_trains_records_its_split_and_evaluate_reproduces_it(flat, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "data=table", f"data.file={flat / 'labels.csv'}", "data.folds=3", "data.fold=2",
                      "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fold 2 of data.folds=3 validated" in result.stdout
    record = json.loads((run_dir / "split.json").read_text())
    expected = scan_table(flat / "labels.csv", folds=3, fold=2, check_images=False)
    assert (record["layout"], record["folds"], record["fold"], record["source"]) == ("folds", 3, 2,
                                                                                     str(flat / "labels.csv"))
    assert record["files"]["val"] == [[os.path.relpath(p, flat), label] for p, label in expected.val]
    assert record["files"]["train"] == [[os.path.relpath(p, flat), label] for p, label in expected.train]
    best = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    evaluation = subprocess.run([sys.executable, "-m", "finetune.evaluate", f"ckpt={run_dir}", "progress_bar=false",
                                 f"out={tmp_path / 'eval'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == len(expected.val) and metrics["split_source"] == "split.json"
    assert metrics["acc1"] == best["val/acc1"] and metrics["loss"] == pytest.approx(best["val/loss"], abs=1e-6)


@pytest.mark.slow
def test_bad_tables_and_settings_on_the_command_line(flat, tmp_path):
    (flat / "cli_escape.csv").write_text("path,label\nimages/class_0/0.png,class_0\n../x.png,class_1\n")
    base = [*TINY, "trainer.max_epochs=1"]
    cases = {  # each its own run dir: started in the same second, they would share Hydra's dated one
        "escape": [*base, "data=table", f"data.file={flat / 'cli_escape.csv'}"],
        "no_file": [*base, "data=table"],
        "fold_range": [*base, "data=table", f"data.file={flat / 'labels.csv'}", "data.folds=3", "data.fold=3"],
    }
    results = run_together({name: [*args, f"hydra.run.dir={tmp_path / name}"] for name, args in cases.items()},
                           module="finetune", cwd=tmp_path)
    assert_one_line_errors(results, {
        "escape": ["cli_escape.csv' line 3: path '../x.png' leads outside", "data.allow_outside=true"],
        "no_file": ["data=table needs data.file="],
        "fold_range": ["data.fold must be an integer in 0 .. 2", "'3'"],
    })


@pytest.mark.parametrize("overrides, expected", [
    (["data=table", "data.file=t.csv", "data.fold=1"], "data.fold=1 needs data.folds=K"),
    (["data=table", "data.file=t.csv", "data.folds=4"], "data.folds=4 needs data.fold=i"),
    (["data=table", "data.file=t.csv", "data.folds=1", "data.fold=0"], "data.folds must be an integer of at least 2"),
    (["data=custom", "data.root=/x", "data.file=t.csv"], "add data=table"),
    (["data=table", "data.file=t.csv", "data.root=/x"], "drop data.root"),
])
def test_table_and_fold_settings_that_make_no_sense_are_refused(overrides, expected):
    from conftest import compose_config

    from finetune.config import check_config, check_overrides_take_effect

    with pytest.raises(UserError, match=re.escape(expected)):
        cfg = compose_config(overrides)
        check_overrides_take_effect(cfg, overrides)
        check_config(cfg)


@pytest.mark.slow
def test_a_cross_validation_sweep_summarises_mean_and_std_per_configuration(flat, tmp_path):
    sweep = tmp_path / "cv"
    result = run_cli(["-m", *TINY, "data=table", f"data.file={flat / 'labels.csv'}", "data.folds=3",
                      "data.fold=range(3)", "optim.lr=1e-3,3e-4", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {}
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        lr = "0.001" if "optim.lr=0.001" in overrides else "0.0003"
        split = json.loads((job / "split.json").read_text())
        best = json.loads((job / "summary.json").read_text())["best"]["value"]
        jobs.setdefault(lr, []).append((split["fold"], {p for p, _ in split["files"]["val"]},
                                        {p for p, _ in split["files"]["train"]}, best, int(job.name)))
    everything = set(os.path.relpath(p, flat) for p in table_rows(flat))
    for folds in jobs.values():  # each configuration: three disjoint val folds covering the table
        assert sorted(f for f, *_ in folds) == [0, 1, 2]
        vals = [v for _, v, *_ in folds]
        assert set().union(*vals) == everything and sum(map(len, vals)) == len(everything)
        assert all(t == everything - v for _, v, t, *_ in folds)
    with open(sweep / "sweep_folds.csv", newline="") as f:
        rows = list(__import__("csv").DictReader(f))
    assert [set(r) for r in rows] == [{"optim.lr", "folds", "mean", "std", "jobs"}] * 2
    for row in rows:
        bests = [b for *_, b, _ in jobs[row["optim.lr"]]]
        mean = sum(bests) / 3
        assert row["folds"] == "3" and float(row["mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(row["std"]) == pytest.approx((sum((b - mean) ** 2 for b in bests) / 3) ** 0.5, abs=1e-12)
        assert sorted(map(int, row["jobs"].split())) == sorted(j for *_, j in jobs[row["optim.lr"]])
    assert float(rows[0]["mean"]) >= float(rows[1]["mean"])  # ranked by the mean (val/acc1: higher first)
    assert "cross-validation: 2 configuration(s), mean and std over folds" in result.stdout
    written = (sweep / "sweep_folds.csv").read_text()
    (sweep / "sweep_folds.csv").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "finetune.sweep", str(sweep)], capture_output=True, text=True,
                             timeout=120)
    assert rebuilt.returncode == 0 and (sweep / "sweep_folds.csv").read_text() == written
