"""data=hf data.streaming=true (issue 23): a Hugging Face dataset's Parquet files, written here with `datasets`
from tiny generated images (nothing downloaded), read as shards from a local folder and from a real S3 server
on 127.0.0.1; exact epochs, a run killed mid-epoch and resumed bit-identical, and bad datasets in one line."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import compose_config, make_image_folder, s3_client
from finetune.errors import UserError
from test_checkpoint import assert_same_result
from test_stream import SIGNAL_AT, run_all

datasets = pytest.importorskip("datasets")

from finetune.data.hf_stream import scan_hf_stream, split_files  # noqa: E402 - after the importorskip

CLASSES = ["class_0", "class_1", "class_2"]
BUCKET = "hf-stream-bucket"


def write_split(files: list[Path], target: Path, *, split: str, parts: int, label_feature=None,
                labels: list | None = None, layout: str = "data/{split}-{k:05d}-of-{n:05d}.parquet") -> None:
    """``files`` as ``parts`` Parquet files of a dataset with embedded image bytes, named as the Hub names them."""
    label_feature = label_feature or datasets.ClassLabel(names=CLASSES)
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                                    "label": labels if labels is not None else [f.parent.name for f in files]},
                                   features=features)
    for k in range(parts):
        path = target / layout.format(split=split, k=k, n=parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.shard(parts, k, contiguous=True).to_parquet(str(path))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    root = make_image_folder(tmp_path_factory.mktemp("hfs") / "images", train=8)  # 24 train, 9 val images
    return {s: sorted((root / s).rglob("*.png")) for s in ("train", "val")}


@pytest.fixture(scope="module")
def parquet(images, tmp_path_factory) -> Path:
    """train in 4 files of 6 rows, validation in one, as ``data/train-00000-of-00004.parquet``."""
    root = tmp_path_factory.mktemp("parquet")
    write_split(images["train"], root, split="train", parts=4)
    write_split(images["val"], root, split="validation", parts=1)
    return root


# ------------------------------------------------------------------ reading the files
@pytest.mark.parametrize("layout", ["data/{split}-{k:05d}-of-{n:05d}.parquet", "{split}-{k}.parquet",
                                    "{split}/part-{k}.parquet"])
def test_the_splits_are_found_by_the_hubs_naming_rules(images, tmp_path, layout):
    write_split(images["train"], tmp_path, split="train", parts=2, layout=layout)
    write_split(images["val"], tmp_path, split="validation", parts=1, layout=layout)
    files = split_files(str(tmp_path), None)
    assert sorted(files) == ["train", "validation"]
    assert [Path(f).name for f in files["train"]] == [Path(layout.format(split="train", k=k, n=2)).name for k in (0, 1)]


def test_shards_hold_the_file_counts_classes_and_every_image_with_its_label(parquet, images):
    split = scan_hf_stream(str(parquet), image_column="image", label_column="label")
    assert split.class_names == CLASSES and split.layout == "hf-stream"
    assert [s.samples for s in split.train] == [6, 6, 6, 6] and [s.samples for s in split.val] == [9]
    assert split.class_counts("train") == [8, 8, 8] and split.class_counts("val") == [3, 3, 3]
    rows = [r for shard in split.train for r in split.rows(shard, lambda i: True)]
    assert [(image, CLASSES[label]) for image, label, _ in rows] == [(f.read_bytes(), f.parent.name)
                                                                      for f in images["train"]]
    skipped = list(split.rows(split.train[0], lambda i: i == 2))
    assert skipped[:2] == [None, None] and skipped[2][0] == images["train"][2].read_bytes()
    assert rows[7][2] == f"{split.train[1].url}:row 1"


def test_a_plain_string_label_column_gives_its_sorted_values(images, tmp_path):
    names = {"class_0": "zebra", "class_1": "ant", "class_2": "moth"}
    for split, files in (("train", images["train"]), ("validation", images["val"])):
        write_split(files, tmp_path, split=split, parts=1, label_feature=datasets.Value("string"),
                    labels=[names[f.parent.name] for f in files])
    split = scan_hf_stream(str(tmp_path), image_column="image", label_column="label")
    assert split.class_names == ["ant", "moth", "zebra"]
    image, label, _ = next(split.rows(split.train[0], lambda i: True))
    assert split.class_names[label] == names[images["train"][0].parent.name]


def bad_dataset(kind: str, images: dict, root: Path) -> Path:
    if kind == "missing":
        return root
    root.mkdir()
    if kind == "one_split":
        write_split(images["train"], root, split="train", parts=1)
    elif kind == "unlabelled":
        write_split(images["train"], root, split="train", parts=1,
                    labels=[-1 if i == 4 else CLASSES.index(f.parent.name) for i, f in enumerate(images["train"])])
        write_split(images["val"], root, split="validation", parts=1)
    elif kind == "no_column":
        write_split(images["train"], root, split="train", parts=1)
        write_split(images["val"], root, split="validation", parts=1)
    elif kind == "not_parquet":
        (root / "data").mkdir()
        (root / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
        write_split(images["val"], root, split="validation", parts=1)
    elif kind == "empty":
        (root / "notes.txt").write_text("no data here\n")
    return root


@pytest.mark.parametrize("kind, column, expected", [
    ("one_split", "label", "has one split ('train'): data.streaming=true reads the splits as they are stored"),
    ("unlabelled", "label", "train-00000-of-00001.parquet' row 4: label -1 is not a class"),
    ("no_column", "labels", "has no column 'labels' (columns: 'image', 'label'): name yours with data.label_column"),
    ("not_parquet", "label", "train-00000-of-00001.parquet' is not a readable Parquet file"),
    ("empty", "label", "holds no Parquet data files"),
    ("missing", "label", "missing' does not exist: data.streaming=true reads a folder of a dataset's data files"),
])
def test_a_bad_dataset_is_one_line_naming_the_file(images, tmp_path, kind, column, expected):
    root = bad_dataset(kind, images, tmp_path / kind)
    with pytest.raises(UserError) as err:
        scan_hf_stream(str(root), image_column="image", label_column=column)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_an_image_cell_holding_only_a_file_name_is_refused_where_it_is_read(images, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    for split, files in (("train", images["train"]), ("validation", images["val"])):
        ds = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": [f.parent.name for f in files]},
                                        features=features)
        ds.to_parquet(str(tmp_path / f"{split}-0.parquet"))  # paths, not bytes: to_parquet does not embed
    split = scan_hf_stream(str(tmp_path), image_column="image", label_column="label")
    with pytest.raises(UserError, match=re.escape(f"'{split.train[0].url}:row 0' holds no image bytes, only a file "
                                                  "name")):
        next(split.rows(split.train[0], lambda i: True))


@pytest.mark.parametrize("overrides, expected", [
    (["data.shuffle_buffer=8"], "data.shuffle_buffer is set but has no effect with data.streaming=false"),
    (["+data.storage_options.anon=true"], "data.storage_options is set but has no effect with data.streaming=false"),
])
def test_stream_settings_without_streaming_are_refused(parquet, tmp_path, overrides, expected):
    from finetune.builders import build_split

    cfg = compose_config(["data=hf", f"data.path={parquet}", *overrides])
    with pytest.raises(UserError, match=re.escape(expected)):
        build_split(cfg.data, run_dir=tmp_path, write=False)


def test_a_written_out_secret_in_data_storage_options_is_refused():
    from finetune.config import check_config

    cfg = compose_config(["data=hf", "data.path=s3://b/ds", "data.streaming=true",
                          "+data.storage_options.secret=abc"])
    with pytest.raises(UserError, match=re.escape("data.storage_options.secret is written out")):
        check_config(cfg)


# ------------------------------------------------------------------ end to end
def stream_args(path: str, run: Path) -> list[str]:
    return ["model=resnet18", "model.name=test_resnet", "model.pretrained=false", "data=hf", f"data.path={path}",
            "data.streaming=true", "data.img_size=32", "data.batch_size=4", "data.num_workers=2",
            "data.shuffle_buffer=8", "trainer.max_epochs=2", "logger.progress_bar=false",
            "checkpoint.every_n_steps=4", f"hydra.run.dir={run}"]


@pytest.fixture(scope="module")
def s3(parquet, s3_server):
    """The Parquet files at s3://hf-stream-bucket/ds/ on the module's S3 server."""
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    for path in parquet.rglob("*.parquet"):
        client.put_object(Bucket=BUCKET, Key=f"ds/{path.relative_to(parquet).as_posix()}", Body=path.read_bytes())
    return s3_server


@pytest.mark.slow
def test_from_s3_and_killed_and_resumed_a_stream_trains_bit_identical_to_a_local_straight_run(parquet, s3, tmp_path):
    """Three runs at once: straight from the local files, straight from S3 (endpoint and keys given by
    data.storage_options, the keys from the environment by ${oc.env:...}), and one SIGKILLed after update 6
    of 12 (last save at step 4), then resumed."""
    options = ["+data.storage_options.key=${oc.env:TEAM_KEY}", "+data.storage_options.secret=${oc.env:TEAM_SECRET}",
               f"+data.storage_options.endpoint_url={s3['AWS_ENDPOINT_URL']}"]
    runs = {"local": (stream_args(str(parquet), tmp_path / "local"), {}),
            "s3": (stream_args(f"s3://{BUCKET}/ds", tmp_path / "s3") + options,
                   {"TEAM_KEY": s3["AWS_ACCESS_KEY_ID"], "TEAM_SECRET": s3["AWS_SECRET_ACCESS_KEY"]}),
            "killed": (stream_args(str(parquet), tmp_path / "killed"),
                       {"FT_SIGNAL_AT": "0:6:SIGKILL", "PYTHONPATH": SIGNAL_AT})}
    results = run_all(runs, cwd=tmp_path)
    for name in ("local", "s3"):
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    assert results["killed"].returncode == -signal.SIGKILL, results["killed"].stderr[-3000:]
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt",
                      weights_only=True)["train_state"]["batches_seen"] == 4
    resumed = run_all({"resumed": (stream_args(str(parquet), tmp_path / "killed") + ["resume=auto"], {})},
                      cwd=tmp_path)["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_result(tmp_path / "s3", tmp_path / "local")
    assert_same_result(tmp_path / "killed", tmp_path / "local")
    split = json.loads((tmp_path / "s3" / "split.json").read_text())
    assert split["layout"] == "hf-stream" and split["shards"]["train"][0] == [
        f"s3://{BUCKET}/ds/data/train-00000-of-00004.parquet", 6]
    for path in (p for p in (tmp_path / "s3").rglob("*") if p.is_file()):
        content = path.read_bytes()
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            assert s3[name].encode() not in content, f"{name} written into {path}"
