"""The demo set: deterministic, cached once, written atomically, read like any folder."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune.data.demo as demo
from finetune.data import SHAPES, ensure_demo_dataset, scan_image_folder
from finetune.errors import UserError

SMALL = {"train_per_class": 3, "val_per_class": 2, "image_size": 48}


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = ensure_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    second = ensure_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    assert first.name == second.name
    files = read_tree(first)
    assert len([f for f in files if f.endswith(".png")]) == 6 * (3 + 2)
    assert files == read_tree(second)


def test_different_seed_gives_different_images(tmp_path):
    first = read_tree(ensure_demo_dataset(tmp_path, seed=0, **SMALL))
    second = read_tree(ensure_demo_dataset(tmp_path, seed=1, **SMALL))
    pngs = [f for f in first if f.endswith(".png")]
    assert pngs == [f for f in second if f.endswith(".png")]
    assert all(first[f] != second[f] for f in pngs)


def test_second_call_reuses_the_cached_set(tmp_path, monkeypatch):
    root = ensure_demo_dataset(tmp_path, **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    monkeypatch.setattr(demo, "_write_dataset", lambda *a: pytest.fail("regenerated a cached set"))
    assert ensure_demo_dataset(tmp_path, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_parameters_are_part_of_the_cache_key(tmp_path):
    assert ensure_demo_dataset(tmp_path, **SMALL) != ensure_demo_dataset(tmp_path, **{**SMALL, "image_size": 40})


def test_default_set_has_at_least_five_shape_classes_read_like_a_user_folder(tmp_path):
    root = ensure_demo_dataset(tmp_path, train_per_class=2, val_per_class=1)
    split = scan_image_folder(root)
    assert split.layout == "train_val"
    assert split.class_names == sorted(SHAPES[:6])
    assert split.class_counts("train") == [2] * 6 and split.class_counts("val") == [1] * 6
    with Image.open(split.train[0][0]) as image:
        assert image.mode == "RGB" and image.size == (128, 128)


def test_fill_colour_does_not_give_away_the_class(tmp_path):
    """Mean image colour per class is nearly the same; the shape's outline is the signal."""
    root = ensure_demo_dataset(tmp_path, train_per_class=30, val_per_class=1, image_size=32)
    means = [
        np.mean([np.asarray(Image.open(p), dtype=np.float32).mean((0, 1)) for p in (root / "train" / c).iterdir()], 0)
        for c in SHAPES[:6]
    ]
    assert np.ptp(np.stack(means), axis=0).max() < 40  # of 255


def test_killed_generation_leaves_no_set_behind(tmp_path, monkeypatch):
    calls = 0

    def failing_draw(*args):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(demo, "draw_sample", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    root = ensure_demo_dataset(tmp_path, **SMALL)
    assert len(list(root.rglob("*.png"))) == 30


def test_stale_temp_folder_of_a_hard_kill_is_ignored(tmp_path):
    root = ensure_demo_dataset(tmp_path / "ref", **SMALL)
    stale = tmp_path / "cache" / f".{root.name}.tmp-999-dead"
    (stale / "train" / "circle").mkdir(parents=True)
    (stale / "train" / "circle" / "0000.png").write_bytes(b"half")
    fresh = ensure_demo_dataset(tmp_path / "cache", **SMALL)
    assert read_tree(fresh) == read_tree(root)


def test_set_finished_by_another_run_meanwhile_is_used(tmp_path, monkeypatch):
    real_write = demo._write_dataset

    def racing_write(temp: Path, params: dict) -> None:
        final = temp.parent / temp.name[1:].split(".tmp-")[0]
        real_write(final, params)  # the other run publishes first
        (final / "winner").write_text("other run")
        real_write(temp, params)

    monkeypatch.setattr(demo, "_write_dataset", racing_write)
    root = ensure_demo_dataset(tmp_path, **SMALL)
    assert (root / "winner").read_text() == "other run"
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_concurrent_calls_agree(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_dataset(tmp_path, **SMALL))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert len(list(results[0].rglob("*.png"))) == 30
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [({"num_classes": 1}, "'1'"), ({"num_classes": 99}, "'99'"), ({"train_per_class": 0}, "'0'"), ({"image_size": 8}, "'8'")],
)
def test_bad_parameters_name_the_value(tmp_path, kwargs, quoted):
    with pytest.raises(UserError, match=quoted):
        ensure_demo_dataset(tmp_path, **kwargs)


def test_unwritable_cache_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"demo cache dir '{blocker}'"):
        ensure_demo_dataset(blocker, **SMALL)
