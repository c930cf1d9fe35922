"""data=hf: Hugging Face datasets built here with `datasets` from tiny generated images (nothing downloaded):
a save_to_disk DatasetDict (train + validation, ClassLabel), single-split Parquet files (string and integer
labels), a dataset name in a local cache; their splits and classes, bad inputs, and a run killed mid-epoch
and resumed bit-identical to a straight one."""

from __future__ import annotations

import io
import json
import os
import re
import signal
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import compose_config, make_image_folder, run_cli, tiny_overrides
from PIL import Image

from finetune.data.hf import scan_hf
from finetune.errors import UserError

datasets = pytest.importorskip("datasets")
CLASSES = ["class_0", "class_1", "class_2"]
OFFLINE_KEYS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def image_dataset(files: list[Path], labels: list, label_feature) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": label_feature, "note": datasets.Value("float32")})
    return datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": labels,
                                       "note": [0.5] * len(files)}, features=features)


def cache_as_downloaded(cache: Path, name: str, parquet: Path) -> None:
    """What ``load_dataset(name)`` leaves in the cache after a download: `datasets`' Parquet builder
    writes the Arrow files, which then sit at ``CACHE/OWNER___NAME/default/VERSION/HASH``."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, short = name.split("/")
    builder = Parquet(cache_dir=str(cache / "build"), dataset_name=short, data_files={"train": str(parquet)},
                      hash="0")
    builder.download_and_prepare()
    target = cache / f"{owner}___{short}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    Path(builder.cache_dir).rename(target / "0")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The datasets (DatasetDict dir, Parquet files, a cached name) and a cache of this module's own; the
    process's datasets cache and offline switches are put back afterwards."""
    base = tmp_path_factory.mktemp("hf")
    root = make_image_folder(base / "images", train=8)  # 24 train, 9 val images
    files = {s: sorted((root / s).rglob("*.png")) for s in ("train", "val")}
    class_label = datasets.ClassLabel(names=CLASSES)
    splits = {s: image_dataset(f, [p.parent.name for p in f], class_label) for s, f in (("train", files["train"]),
                                                                                      ("validation", files["val"]))}
    datasets.DatasetDict(splits).save_to_disk(str(base / "dict"))
    every = files["train"] + files["val"]
    named = image_dataset(every, [p.parent.name for p in every], datasets.Value("string"))
    named.to_parquet(str(base / "named.parquet"))
    image_dataset(every, [[10, 2, 7][int(p.parent.name[-1])] for p in every],
                  datasets.Value("int64")).to_parquet(str(base / "ids.parquet"))
    saved = {k: os.environ.get(k) for k in (*OFFLINE_KEYS, "HF_HOME")}
    flags = {(module, name): getattr(module, name) for module, name in (
        (datasets.config, "HF_DATASETS_CACHE"), (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"), (huggingface_hub.constants, "HF_HUB_OFFLINE"))}
    datasets.config.HF_DATASETS_CACHE = str(base / "home" / "datasets")
    os.environ["HF_HOME"] = str(base / "home")
    cache_as_downloaded(base / "home" / "datasets", "someone/shapes", base / "named.parquet")
    yield {"base": base, "root": root, "files": files}
    for (module, name), value in flags.items():
        setattr(module, name, value)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def pixels(source) -> np.ndarray:
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def test_a_dataset_dict_keeps_its_splits_and_class_label_and_reads_the_stored_images(hf):
    split = scan_hf(str(hf["base"] / "dict"))
    assert (split.layout, split.class_names) == ("column", CLASSES)
    assert [key for key, _ in split.train] == [f"train/{i}" for i in range(24)]
    assert [split.class_names[label] for _, label in split.val] == [p.parent.name for p in hf["files"]["val"]]
    for key, path in (("train/5", hf["files"]["train"][5]), ("validation/7", hf["files"]["val"][7])):
        assert np.array_equal(pixels(split.images.open(key)), pixels(path))
    assert split.to_record()["files"]["val"][0] == ["validation/0", 0]


def test_one_split_is_split_by_seed_and_plain_columns_give_sorted_classes(hf):
    named = scan_hf(str(hf["base"] / "named.parquet"), val_split=0.2, seed=3)
    again = scan_hf(str(hf["base"] / "named.parquet"), val_split=0.2, seed=3)
    other = scan_hf(str(hf["base"] / "named.parquet"), val_split=0.2, seed=4)
    assert (named.layout, named.class_names) == ("split", CLASSES)
    assert (named.train, named.val) == (again.train, again.val) and named.val != other.val
    keys = [k for k, _ in named.train + named.val]
    assert sorted(keys) == sorted(f"train/{i}" for i in range(33)) and len(set(keys)) == 33
    assert named.class_counts("val") == [2, 2, 2]  # round(11 * 0.2) of each class, as for class folders
    ids = scan_hf(str(hf["base"] / "ids.parquet"))
    assert ids.class_names == ["2", "7", "10"]  # integers in numeric order
    first = hf["files"]["train"][0]  # row 0: class_0, id 10
    assert dict(ids.train + ids.val)["train/0"] == ids.class_names.index("10") and first.parent.name == "class_0"


def test_a_name_is_read_from_the_local_cache_only(hf):
    split = scan_hf("someone/shapes")
    assert split.class_names == CLASSES and len(split.train) + len(split.val) == 33
    assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE is True


@pytest.mark.parametrize("case, expected", [
    ({"path": "{base}/nowhere"}, "data.path '{base}/nowhere' does not exist"),
    ({"path": "nobody/missing"}, "data.path 'nobody/missing' is neither a path on disk nor a dataset in the local "
                                 "Hugging Face cache"),
    ({"label_column": "labels"}, "has no column 'labels' (columns: 'image', 'label', 'note'): name yours with "
                                 "data.label_column=NAME"),
    ({"label_column": "note"}, "data.label_column 'note' of dataset '{base}/dict' holds Value('float32'"),
    ({"image_column": "label"}, "data.image_column 'label' of dataset '{base}/dict' holds ClassLabel("),
])
def test_bad_input_is_one_user_error_naming_it(hf, case, expected):
    base = str(hf["base"])
    args = {"path": f"{base}/dict"} | {k: v.format(base=base) for k, v in case.items()}
    with pytest.raises(UserError, match=re.escape(expected.format(base=base))):
        scan_hf(args.pop("path"), **args)


def test_one_split_with_a_class_of_one_image_says_to_add_a_validation_split(hf, tmp_path):
    """A single split is split by seed: a class of one image cannot be, and the way out for a dataset is a
    validation split (not the class folders of a folder data set)."""
    files = hf["files"]["train"]
    lone = [f for f in files if f.parent.name != "class_2"] + [next(f for f in files if f.parent.name == "class_2")]
    image_dataset(lone, [p.parent.name for p in lone], datasets.Value("string")).to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(UserError) as err:
        scan_hf(str(tmp_path / "one.parquet"), val_split=0.2)
    assert str(err.value) == ("class 'class_2' has 1 image, too few to split by data.val_split=0.2: add images to it "
                              "or give the dataset a 'validation' or 'val' or 'test' split")


def test_an_unreadable_image_names_its_split_row_and_dataset(hf):
    from finetune.data import ImageDataset

    good = hf["files"]["train"][0].read_bytes()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    rows = {"image": [{"bytes": good, "path": None}] * 3 + [{"bytes": b"not an image", "path": None}],
            "label": ["a", "a", "b", "b"]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(hf["base"] / "bad.parquet"))
    split = scan_hf(str(hf["base"] / "bad.parquet"), val_split=0.5)
    dataset = ImageDataset(split.train + split.val, images=split.images)
    assert np.array_equal(np.asarray(dataset[[k for k, _ in dataset.samples].index("train/0")][0]), pixels(
        hf["files"]["train"][0]))
    with pytest.raises(UserError, match=re.escape("cannot read image 'train/3' (")) as err:
        dataset[[k for k, _ in dataset.samples].index("train/3")]
    assert str(err.value).endswith(f"fix or drop that row of dataset '{hf['base'] / 'bad.parquet'}'")


def test_a_row_naming_a_file_is_read_only_inside_the_datasets_folder(hf, tmp_path):
    """A dataset from someone else is data: a cell naming a file (no bytes) may not reach out of its folder."""
    from finetune.data import ImageDataset

    folder = tmp_path / "paths"
    folder.mkdir()
    inside = folder / "inside.png"
    inside.write_bytes(hf["files"]["train"][0].read_bytes())
    outside = tmp_path / "outside.png"
    outside.write_bytes(hf["files"]["train"][1].read_bytes())
    (folder / "link.png").symlink_to(outside)
    cells = [str(inside), str(inside), str(outside), str(folder / "link.png")]
    table = datasets.Dataset.from_dict({"image": cells, "label": ["a", "b", "a", "b"]}).with_format("arrow")[:]
    split = scan_hf_table(table, folder / "t.arrow")
    dataset = ImageDataset(split.train + split.val, images=split.images)
    index = [k for k, _ in dataset.samples].index
    assert np.array_equal(np.asarray(dataset[index("train/0")][0]), pixels(inside))
    for row in (2, 3):
        with pytest.raises(UserError, match=re.escape(f"cannot read image 'train/{row}' (")) as err:
            dataset[index(f"train/{row}")]
        assert "outside the dataset's folder" in str(err.value) and "\n" not in str(err.value)


def scan_hf_table(table, path: Path):
    """scan_hf of an Arrow file holding ``table`` with its image column as paths only (no bytes embedded)."""
    import pyarrow as pa

    paths = table.column("image").to_pylist()
    image = pa.array([{"bytes": None, "path": p} for p in paths], type=pa.struct([("bytes", pa.binary()),
                                                                                  ("path", pa.string())]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    arrow = pa.table({"image": image, "label": table.column("label")})
    datasets.Dataset(arrow, info=datasets.DatasetInfo(features=features)).to_parquet(str(path.with_suffix(".parquet")))
    split = scan_hf(str(path.with_suffix(".parquet")), val_split=0.5)
    assert split.images.splits["train"][0]["image"]["bytes"] is None  # the file holds the path, not the image
    return split


@pytest.mark.parametrize("overrides, expected", [
    (["data.streaming=true"], "dict' is a dataset save_to_disk wrote (Arrow files), not Parquet files: read it from "
                              "disk with data.streaming=false"),
    (["data.path=null"], "data=hf needs data.path"),
])
def test_a_dataset_dict_to_stream_and_no_path_are_refused_by_the_builder(hf, tmp_path, overrides, expected):
    from finetune.builders import build_split

    cfg = compose_config(["data=hf", f"data.path={hf['base'] / 'dict'}", *overrides])
    with pytest.raises(UserError, match=re.escape(expected)):
        build_split(cfg.data, run_dir=tmp_path, write=False)


@pytest.mark.parametrize("overrides, expected", [
    (["data=custom", "data.root=/x", "data.path=/y"], "data.path is set but has no effect with data.name=custom"),
    (["data=hf", "data.path=/y", "data.root=/x"], "data.root is set but has no effect with data.name=hf"),
    (["data=hf", "data.path=/y", "task=multilabel"], "task=multilabel needs several labels per image"),
])
def test_settings_data_hf_ignores_are_refused(overrides, expected):
    from finetune.config import check_config, check_overrides_take_effect

    with pytest.raises(UserError, match=re.escape(expected)):
        cfg = compose_config(overrides)
        check_overrides_take_effect(cfg, overrides)
        check_config(cfg)


def test_evaluate_takes_the_rows_a_seed_split_run_validated_on_from_its_split_json(hf, tmp_path):
    from finetune.evaluate import TrainingRun, choose_images

    path = hf["base"] / "named.parquet"
    split = scan_hf(str(path), val_split=0.2, seed=3)
    (tmp_path / "split.json").write_text(json.dumps(split.to_record()))
    cfg = compose_config(["data=hf", f"data.path={path}", "data.val_split=0.5"])  # another split by seed
    images = choose_images(cfg.data, TrainingRun(tmp_path), split="val")
    assert (images.samples, images.source, images.class_names) == (split.val, "split.json", CLASSES)
    assert pixels(images.images.open(split.val[0][0])) is not None
    record = split.to_record()
    record["files"]["val"][0][0] = "train/99"
    (tmp_path / "split.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=re.escape("names rows the dataset at data.path") + ".*'train/99'"):
        choose_images(cfg.data, TrainingRun(tmp_path), split="val")


def test_evaluate_refuses_a_streamed_dataset_in_one_line(hf):
    from finetune.evaluate import choose_images

    cfg = compose_config(["data=hf", f"data.path={hf['base'] / 'dict'}", "data.streaming=true"])
    with pytest.raises(UserError, match="finetune.evaluate reads a Hugging Face dataset on disk, not streamed"):
        choose_images(cfg.data, None, split="val")


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_bit_identical_to_a_straight_one(hf, tmp_path):
    """Straight: 2 epochs of 6 updates in the main process. Killed (SIGKILL after update 3, mid-epoch 1, the
    last save at update 2) with two loader workers, then resumed: the same weights and optimizer state."""
    from test_checkpoint import assert_same_result
    from test_evaluate import best_epoch_metrics

    args = [a for a in tiny_overrides(hf["root"]) if not a.startswith("data")]
    args += ["data=hf", f"data.path={hf['base'] / 'dict'}", "data.img_size=32", "data.batch_size=4",
             "checkpoint.every_n_steps=2"]
    env = {"HF_HOME": str(hf["base"] / "home")}
    ref = run_cli([*args, "data.num_workers=0", f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    closing = (ref.stdout + ref.stderr).split("next:")[1]
    assert "finetune.predict" in closing and f"finetune.evaluate ckpt={tmp_path / 'ref'}\n" in closing, closing
    evaluated = run_cli(["ckpt=" + str(tmp_path / "ref"), "progress_bar=false", f"out={tmp_path / 'eval'}"],
                        cwd=tmp_path, env=env, module="finetune.evaluate")  # the command offered: the run's data
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    best = best_epoch_metrics(tmp_path / "ref")
    assert (metrics["acc1"], metrics["loss"], metrics["num_images"]) == (best["val/acc1"], best["val/loss"], 9)
    out = tmp_path / "run"
    killed = run_cli([*args, "data.num_workers=2", f"hydra.run.dir={out}"], cwd=tmp_path,
                     env=env | {"FT_SIGNAL_AT": "0:3:SIGKILL", "PYTHONPATH": str(Path(__file__).parent / "signal_at")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]
    assert state["global_step"] == 2  # the resume starts mid-epoch, from this save
    resumed = run_cli([*args, "data.num_workers=2", "resume=auto", f"hydra.run.dir={out}"], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_result(out, tmp_path / "ref")
    missing = run_cli([*args, "data.path=nobody/missing"], cwd=tmp_path, env=env)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr[-3000:]
    assert lines[0].startswith("error: data.path 'nobody/missing' is neither a path on disk nor a dataset")
