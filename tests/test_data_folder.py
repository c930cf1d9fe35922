"""Scanning an image folder: both layouts, the seeded stratified split, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data import scan_image_folder
from finetune.errors import UserError


def write_image(path: Path, colour: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (colour, 40, 90)).save(path, format=fmt)
    return path


def make_classes(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, count in counts.items():
        for i in range(count):
            write_image(root / name / f"{i:03d}{ext}", colour=i)
    return root


def expect_user_error(root, *fragments: str, **kwargs) -> UserError:
    with pytest.raises(UserError) as info:
        scan_image_folder(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_train_val_layout_uses_the_given_folders(tmp_path):
    make_classes(tmp_path / "train", {"cats": 3, "dogs": 2})
    make_classes(tmp_path / "val", {"cats": 1, "dogs": 1})
    (tmp_path / "README.txt").write_text("ignored")
    split = scan_image_folder(tmp_path)
    assert split.layout == "train_val" and split.val_split is None
    assert split.class_names == ["cats", "dogs"]
    assert split.class_counts("train") == [3, 2] and split.class_counts("val") == [1, 1]
    assert all(Path(p).parent.parent.name == "train" for p, _ in split.train)
    assert {(Path(p).parent.name, label) for p, label in split.val} == {("cats", 0), ("dogs", 1)}


def test_flat_layout_is_split_stratified_and_deterministically(tmp_path):
    make_classes(tmp_path, {"a": 10, "b": 20, "c": 5})
    split = scan_image_folder(tmp_path, val_split=0.2, seed=7)
    assert split.layout == "split" and split.val_split == 0.2
    assert split.class_counts("val") == [2, 4, 1] and split.class_counts("train") == [8, 16, 4]
    train, val = {p for p, _ in split.train}, {p for p, _ in split.val}
    assert not train & val and len(train | val) == 35
    assert scan_image_folder(tmp_path, val_split=0.2, seed=7) == split
    assert {p for p, _ in scan_image_folder(tmp_path, val_split=0.2, seed=8).val} != val


def test_split_does_not_depend_on_other_classes(tmp_path):
    make_classes(tmp_path / "one", {"a": 10, "b": 10})
    make_classes(tmp_path / "two", {"a": 10, "b": 10, "c": 4})
    val_a = lambda root: [Path(p).name for p, label in scan_image_folder(root, seed=1).val if label == 0]
    assert val_a(tmp_path / "one") == val_a(tmp_path / "two")


def test_every_class_keeps_an_image_on_each_side(tmp_path):
    make_classes(tmp_path, {"a": 2, "b": 3})
    split = scan_image_folder(tmp_path, val_split=0.9)
    assert split.class_counts("train") == [1, 1] and split.class_counts("val") == [1, 2]


def test_file_selection_extensions_hidden_and_nested(tmp_path):
    make_classes(tmp_path, {"a": 2, "b": 2})
    write_image(tmp_path / "a" / "UPPER.JPG", fmt="JPEG")
    write_image(tmp_path / "a" / "nested" / "deep.webp")
    write_image(tmp_path / "a" / ".hidden.png")
    write_image(tmp_path / "a" / ".cache" / "x.png")
    write_image(tmp_path / ".thumbs" / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    split = scan_image_folder(tmp_path, val_split=0.5)
    names = sorted(Path(p).name for p, label in split.train + split.val if label == 0)
    assert names == ["000.png", "001.png", "UPPER.JPG", "deep.webp"]
    assert split.class_names == ["a", "b"]


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_classes(tmp_path / "photos", {"a": 2, "b": 2})
    split = scan_image_folder("~/photos")
    assert split.root == str(tmp_path / "photos")


def test_record_is_json_with_relative_files(tmp_path):
    make_classes(tmp_path, {"a": 5, "b": 5})
    split = scan_image_folder(tmp_path, val_split=0.4, seed=3)
    record = json.loads(json.dumps(split.to_record()))
    assert record["layout"] == "split" and record["seed"] == 3 and record["val_split"] == 0.4
    assert record["class_names"] == ["a", "b"]
    assert record["counts"] == {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}}
    assert sorted(record["files"]["val"]) == sorted([Path(p).relative_to(tmp_path).as_posix(), l] for p, l in split.val)
    assert record["skipped"] == []


def test_missing_root(tmp_path):
    expect_user_error(tmp_path / "nope", f"'{tmp_path / 'nope'}'", "does not exist")


def test_root_is_a_file(tmp_path):
    expect_user_error(write_image(tmp_path / "x.png"), "x.png'", "not a folder")


def test_empty_root(tmp_path):
    expect_user_error(tmp_path, f"'{tmp_path}'", "has no class folders", "DIR/<class>/<image>")


def test_single_class(tmp_path):
    make_classes(tmp_path, {"cats": 3})
    expect_user_error(tmp_path, "needs at least 2 classes, found 1: 'cats'")


def test_class_without_images(tmp_path):
    make_classes(tmp_path, {"cats": 3, "dogs": 0})
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "readme.txt").write_text("no images here")
    expect_user_error(tmp_path, f"'{tmp_path / 'dogs'}'", "has no images")


def test_train_and_val_with_different_classes(tmp_path):
    make_classes(tmp_path / "train", {"cats": 2, "dogs": 2})
    make_classes(tmp_path / "val", {"cats": 1, "birds": 1})
    expect_user_error(tmp_path, "only in train: 'dogs'", "only in val: 'birds'")


def test_train_without_val(tmp_path):
    make_classes(tmp_path / "train", {"cats": 2, "dogs": 2})
    expect_user_error(tmp_path, "'train/' but no 'val/'")


@pytest.mark.parametrize("val_split", [0, 1, 1.5, -0.2, "0.2"])
def test_bad_val_split(tmp_path, val_split):
    make_classes(tmp_path, {"a": 4, "b": 4})
    expect_user_error(tmp_path, "data.val_split", f"'{val_split}'", val_split=val_split)


def test_val_split_is_not_checked_when_folders_are_given(tmp_path):
    make_classes(tmp_path / "train", {"a": 1, "b": 1})
    make_classes(tmp_path / "val", {"a": 1, "b": 1})
    assert scan_image_folder(tmp_path, val_split=0).layout == "train_val"


def test_class_too_small_to_split(tmp_path):
    make_classes(tmp_path, {"a": 4, "tiny": 1})
    expect_user_error(tmp_path, "class 'tiny' has 1 image", "data.val_split=0.2")


def write_bad_images(root: Path) -> list[str]:
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("this is not a jpeg")
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(root / "b" / "whole.png")
    (root / "b" / "truncated.png").write_bytes((root / "b" / "whole.png").read_bytes()[:1500])
    (root / "b" / "whole.png").unlink()
    return ["a/empty.png", "a/text.jpg", "b/truncated.png"]


def test_unreadable_images_are_listed(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    bad = write_bad_images(tmp_path)
    expect_user_error(tmp_path, "3 unreadable image(s)", *[f"'{b}'" for b in bad], "data.skip_bad_images=true")


def test_many_unreadable_images_are_counted(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    for i in range(8):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"junk")
    error = expect_user_error(tmp_path, "8 unreadable image(s)", "and 3 more")
    assert str(error).count("a/bad") == 5


def test_skip_bad_images_drops_them_with_a_warning(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    bad = write_bad_images(tmp_path)
    with pytest.warns(UserWarning, match="skipping 3 unreadable image") as record:
        split = scan_image_folder(tmp_path, skip_bad_images=True, val_split=0.5)
    assert all(b in str(record[0].message) for b in bad)
    assert sorted(split.to_record()["skipped"]) == bad
    assert split.class_counts("train") + split.class_counts("val") == [1, 1, 2, 2]
    assert not {str(tmp_path / b) for b in bad} & {p for p, _ in split.train + split.val}


def test_class_left_empty_by_skipping_is_an_error(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 0})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.png").write_bytes(b"junk")
    with pytest.warns(UserWarning):
        expect_user_error(tmp_path, f"'{tmp_path / 'b'}' has no images", "1 unreadable images skipped", skip_bad_images=True)


def test_check_images_false_trusts_the_files(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    write_bad_images(tmp_path)
    split = scan_image_folder(tmp_path, check_images=False, val_split=0.5)
    assert len(split.train) + len(split.val) == 9
