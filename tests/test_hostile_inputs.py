"""Run directories someone else made (issue 10): names in a manifest or a training state that point
out of the directory, an overrides.yaml with injected flags, and two processes on one run dir. Then
(issue 20) run dirs, sweep dirs and prediction inputs as an attacker would make them: links planted
where the project writes, YAML that expands without bound, summaries of the wrong shape, printed
commands that would run code when pasted, CSV cells that start formulas, and globs through loops.

Each case ends in one clear line (exit 2 from the CLI) and touches nothing outside the run dir: a
sentinel file beside it must survive. The weights-file corpus is in ``test_hostile_weights.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import compose_config, make_image_folder, run_bounded, run_cli, tiny_overrides
from finetune.checkpoint import Manifest, load_training_state, save_training_state
from finetune.confine import confined
from finetune.errors import UserError
from finetune.run import run
from test_cli import assert_clean_error


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 2-epoch run with top-k files, written in-process by the real CLI config."""
    base = tmp_path_factory.mktemp("hostile")
    overrides = tiny_overrides(make_image_folder(base / "images"), epochs=2) + ["checkpoint.save_top_k=2",
                                                                               "checkpoint.keep_last_k=2"]
    result = run_cli(overrides + [f"hydra.run.dir={base / 'ref'}"], cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "ref", overrides


def victim_beside(run_dir: Path) -> Path:
    """A file next to the run dir's checkpoints/ that nothing may read, link or delete."""
    victim = run_dir / "victim.ckpt"
    victim.write_text("sentinel")
    return victim


def edit_manifest(run_dir: Path, edit) -> None:
    path = run_dir / "checkpoints" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_confined_refuses_what_leaves_the_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "outside.ckpt").write_text("x")
    (tmp_path / "d" / "link.ckpt").symlink_to(tmp_path / "outside.ckpt")
    assert confined(tmp_path / "d", "last.ckpt", named_in="m.json") == tmp_path / "d" / "last.ckpt"
    for name, says in [("../x.ckpt", "outside"), ("/etc/passwd", "outside"), ("a/../../x", "outside"),
                       ("C:\\x.ckpt", "outside"), ("link.ckpt", "a link out of"), (7, "not a file name"),
                       (None, "not a file name"), ("", "not a file name")]:
        with pytest.raises(UserError, match=says) as err:
            confined(tmp_path / "d", name, named_in="m.json")
        assert "m.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["../victim.ckpt", "ABSOLUTE", "link.ckpt"])
def test_a_manifest_naming_a_file_outside_is_refused_and_nothing_is_deleted(finished, tmp_path, entry):
    """Today's code deleted '../victim.ckpt' while pruning periodic states on resume=auto."""
    ref, overrides = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    victim = victim_beside(out)
    (out / "checkpoints" / "link.ckpt").symlink_to(victim)
    name = str(victim) if entry == "ABSOLUTE" else entry
    edit_manifest(out, lambda m: m["files"].__setitem__(name, {**m["files"]["last.ckpt"], "kind": "periodic",
                                                                "step": 0, "epoch": 0}))
    result = run_cli(overrides + ["trainer.max_epochs=3", "resume=auto", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert_clean_error(result, f"'{out / 'checkpoints' / 'manifest.json'}' names", "refused")
    assert victim.read_text() == "sentinel"


@pytest.mark.parametrize("bad", [{"files": []}, {"files": {"last.ckpt": {"bytes": "1", "epoch": 0, "step": 0}}},
                                 {"files": {}, "best": ["x"]}, {"files": {}, "best": "../best.safetensors"}])
def test_a_malformed_manifest_is_one_clear_line(finished, tmp_path, bad):
    ref, _ = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    (out / "checkpoints" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="manifest.json") as err:
        Manifest(out / "checkpoints" / "manifest.json")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["../victim.ckpt", "/tmp/elsewhere.safetensors", 42])
def test_a_training_state_whose_top_k_names_leave_the_directory_is_refused(finished, tmp_path, name):
    """The policy state inside last.ckpt names top-k files that a resume links, keeps or deletes."""
    ref, overrides = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    victim = victim_beside(out)
    state_path = out / "checkpoints" / "last.ckpt"
    state = load_training_state(state_path)
    state["checkpoint_policy"]["top_k"][0]["name"] = name
    facts = save_training_state(state_path, state)
    manifest = Manifest(out / "checkpoints" / "manifest.json")
    manifest.files["last.ckpt"] |= facts.entry()
    manifest.save()
    for resume in (str(state_path), "auto"):  # into a new run dir, and in place
        with pytest.raises(UserError, match=r"last\.ckpt' (names|holds)") as err:
            run(compose_config(overrides + ["trainer.max_epochs=3", f"resume={resume}"]),
                run_dir=out if resume == "auto" else tmp_path / "elsewhere")
        assert "\n" not in str(err.value)
    assert victim.read_text() == "sentinel"


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["--info=plugins", "-m", "hydra/launcher=basic", "--config-dir=/tmp",
                                   "hydra.run.dir=/tmp/elsewhere", "not an override", "SCALAR"])
def test_resume_run_dir_refuses_an_overrides_file_with_injected_entries(finished, tmp_path, entry):
    """Today's code replayed '--info=plugins': it printed Hydra's plugin list and exited 0."""
    ref, _ = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    saved = out / ".hydra" / "overrides.yaml"
    recorded = yaml.safe_load(saved.read_text())
    saved.write_text(yaml.safe_dump(entry if entry == "SCALAR" else [entry] + recorded))
    result = run_cli([f"resume={out}", "trainer.max_epochs=3"], cwd=tmp_path)
    assert_clean_error(result, f"'{saved}' holds", "refused to replay it")
    assert "plugin" not in result.stdout.lower()
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2  # nothing ran


@pytest.mark.slow
def test_the_recorded_overrides_of_a_real_run_replay(finished, tmp_path):
    """The check passes every override the CLI itself records (groups, dotted keys, + groups)."""
    ref, _ = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    saved = out / ".hydra" / "overrides.yaml"
    saved.write_text(yaml.safe_dump(yaml.safe_load(saved.read_text()) + ["++trainer.ema=false", "+experiment=example"]))
    result = run_cli([f"resume={out}", "trainer.max_epochs=3", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_epochs: 3" in result.stdout


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    manifest = run_dir / "checkpoints" / "manifest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not manifest.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the first run ended before the test could start a second one"


@pytest.mark.slow
def test_a_second_process_on_a_run_dir_in_use_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path):
    root = make_image_folder(tmp_path / "images", train=8)
    out = tmp_path / "run"
    args = tiny_overrides(root, epochs=100) + ["checkpoint.every_n_steps=1", f"hydra.run.dir={out}"]
    with (tmp_path / "first.txt").open("wb") as console:
        first = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=tmp_path, stdout=console,
                                 stderr=subprocess.STDOUT)
    try:
        wait_for_training(out, first)
        result = run_cli(args[:-1] + ["resume=auto", f"hydra.run.dir={out}"], cwd=tmp_path)
        assert_clean_error(result, f"run dir '{out}' is in use by pid {first.pid}")
        assert first.poll() is None  # the first run goes on, its files untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / "checkpoints" / ".lock").read_text().strip() == str(first.pid)  # left behind by the kill
    done = json.loads((out / "checkpoints" / "manifest.json").read_text())["files"]["last.ckpt"]["epoch"]
    result = run_cli([a for a in args if not a.startswith("trainer.max_epochs")] +
                     [f"trainer.max_epochs={done + 1}", "resume=auto"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


class WritesAMarker:
    """A pickle that, if ever unpickled with code allowed, creates ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_a_pickled_payload_as_a_training_state_runs_nothing(finished, tmp_path, caplog):
    """A last.ckpt that carries code: resume=FILE.ckpt refuses it in one line; resume=auto skips it
    (it fails its manifest check) and continues from the previous valid state. Nothing runs."""
    import torch

    ref, overrides = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    marker = tmp_path / "pwned"
    state_path = out / "checkpoints" / "last.ckpt"
    torch.save({"format": "finetune.train_state/1", "payload": WritesAMarker(marker)}, state_path)
    (tmp_path / "loose").mkdir()
    shutil.copy(state_path, tmp_path / "loose" / "last.ckpt")  # a file with no manifest entry to check it against
    with pytest.raises(UserError, match="cannot be read") as err:
        run(compose_config(overrides + ["trainer.max_epochs=3", f"resume={tmp_path / 'loose' / 'last.ckpt'}"]),
            run_dir=tmp_path / "elsewhere")
    assert "\n" not in str(err.value)
    run(compose_config(overrides + ["trainer.max_epochs=3", "resume=auto"]), run_dir=out)
    assert re.search(r"last\.ckpt' is (corrupt|truncated)", caplog.text) and "falling back to the previous" in caplog.text
    assert not marker.exists()


# ============================================================ issue 20: run dirs, sweep dirs and inputs as data
# A run dir or sweep dir from someone else, with links planted where the project writes, files that
# expand without bound, and text that would run as code when a printed command is pasted. Each case
# asserts on a sentinel outside the directory; the hangs run in a subprocess bounded in time and memory.
SENTINEL = "sentinel: must never change\n"


def hostile_copy(finished: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run, and a victim file outside it that nothing may write."""
    ref, _ = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    victim = tmp_path / "victim" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text(SENTINEL)
    return out, victim


def plant(out: Path, name: str, target: Path) -> Path:
    """``out/name`` becomes a link to ``target`` (whatever was there goes)."""
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    path.symlink_to(target)
    return path


def victim_dir_unchanged(victim: Path) -> None:
    assert victim.read_text() == SENTINEL
    assert sorted(p.name for p in victim.parent.iterdir()) == [victim.name], list(victim.parent.iterdir())


# Where a resumed run writes, and what must happen to a link planted there: refused before anything is
# written (appended or locked files, directories, what Hydra writes by name), or replaced (files written whole).
RESUME_LINKS = {
    "train.log": "refused", "metrics.jsonl": "refused", "checkpoints/.lock": "refused",
    "split.json": "replaced", "summary.json": "replaced", "lr_find.json": "replaced",
    "checkpoints": "refused-dir", "tb": "refused-dir", "tb/events.out.tfevents.1.host.1.0": "refused",
}


@pytest.mark.parametrize("name", list(RESUME_LINKS))
def test_resume_never_writes_through_a_planted_link(finished, tmp_path, name):
    """Today's code appended train.log and metrics.jsonl into the victim, truncated it to a pid through
    checkpoints/.lock, wrote split.json over it, and wrote checkpoints and events into a linked directory."""
    out, victim = hostile_copy(finished, tmp_path)
    _, overrides = finished
    if RESUME_LINKS[name] == "refused-dir":
        shutil.copytree(out / name, victim.parent / "copy")  # the victim dir looks like the real thing
        plant(out, name, victim.parent)
    else:
        plant(out, name, victim)
    before = sorted(str(p.relative_to(victim.parent)) for p in victim.parent.rglob("*"))
    cfg = compose_config(overrides + ["trainer.max_epochs=3", "resume=auto", "optim.lr=auto",
                                      "resume_allow_config_change=true"])
    if RESUME_LINKS[name] == "replaced":
        run(cfg, run_dir=out)
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    else:
        with pytest.raises(UserError, match="link") as err:
            run(cfg, run_dir=out)
        assert "\n" not in str(err.value) and name.split("/")[0] in str(err.value)
    assert victim.read_text() == SENTINEL
    assert sorted(str(p.relative_to(victim.parent)) for p in victim.parent.rglob("*")) == before


def test_lr_find_replaces_links_where_it_writes(finished, tmp_path):
    """`python -m finetune.lr_find` into someone else's run dir: its files replace planted links."""
    from finetune.run import find_lr

    out, victim = hostile_copy(finished, tmp_path)
    _, overrides = finished
    for name in ("lr_find.json", "lr_find.png"):
        plant(out, name, victim)
    find_lr(compose_config(overrides), run_dir=out)
    assert victim.read_text() == SENTINEL
    assert not (out / "lr_find.png").is_symlink() and (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_a_hard_link_to_a_file_elsewhere_is_not_appended_to(finished, tmp_path):
    """A planted hard link is not a link by name: the append goes to a copy of its own."""
    out, victim = hostile_copy(finished, tmp_path)
    _, overrides = finished
    for name in ("train.log", "metrics.jsonl"):
        (out / name).unlink()
        os.link(victim, out / name)
    run(compose_config(overrides + ["trainer.max_epochs=3", "resume=auto"]), run_dir=out)
    assert victim.read_text() == SENTINEL
    assert "epoch 3/3" in (out / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", [".hydra/resume/config.yaml", ".hydra/resume/overrides.yaml", ".hydra/resume"])
def test_resume_run_dir_refuses_links_where_hydra_writes(finished, tmp_path, name):
    """Hydra writes .hydra/resume/*.yaml by name before any of the run's code: today it wrote the victim."""
    out, victim = hostile_copy(finished, tmp_path)
    plant(out, name, victim.parent if name == ".hydra/resume" else victim)
    result = run_cli([f"resume={out}", "trainer.max_epochs=3"], cwd=tmp_path)
    assert_clean_error(result, f"'{out / name}'", "refused to write")
    victim_dir_unchanged(victim)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2  # nothing ran


def test_export_into_a_linked_export_dir_is_refused(finished, tmp_path):
    """Today export wrote its file through RUN_DIR/export -> the victim's directory, over the victim's model."""
    from finetune.export import export

    out, victim = hostile_copy(finished, tmp_path)
    (victim.parent / "best.safetensors").write_text(SENTINEL)
    plant(out, "export", victim.parent)
    with pytest.raises(UserError, match="outside") as err:
        export(out, "safetensors")
    assert "\n" not in str(err.value)
    assert (victim.parent / "best.safetensors").read_text() == SENTINEL
    assert export(out, "safetensors", out=tmp_path / "mine.safetensors").path.is_file()  # named by the user: fine


# ------------------------------------------------------------ sweep dirs
def hostile_sweep(finished: tuple[Path, list[str]], tmp_path: Path, jobs: int = 2) -> Path:
    """A sweep dir of ``jobs`` copies of the finished run, as ``python -m finetune -m`` leaves it."""
    ref, _ = finished
    sweep = tmp_path / "sweep"
    for job in range(jobs):
        shutil.copytree(ref, sweep / str(job))
        hydra = yaml.safe_load((sweep / str(job) / ".hydra" / "hydra.yaml").read_text())
        hydra["hydra"]["job"]["num"] = job
        hydra["hydra"]["overrides"]["task"] = [f"optim.lr={0.01 * (job + 1)}"]
        (sweep / str(job) / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    return sweep


def sweep_rebuild(sweep: Path, capsys) -> str:
    from finetune.sweep import main as sweep_main

    assert sweep_main([str(sweep)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["sweep_summary.csv"])
def test_the_sweep_summary_never_writes_through_a_link(finished, tmp_path, capsys, name):
    """Today `python -m finetune.sweep` wrote sweep_summary.csv over the file the link named (a .bashrc)."""
    sweep = hostile_sweep(finished, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text(SENTINEL)
    (sweep / name).symlink_to(victim)
    sweep_rebuild(sweep, capsys)
    assert victim.read_text() == SENTINEL
    assert not (sweep / name).is_symlink() and "job" in (sweep / name).read_text()


@pytest.mark.parametrize("summary", [{"status": ["x"]}, {"status": "completed", "best": [1]},
                                     {"status": "completed", "lr_find": {"lr": "abc"}},
                                     {"status": "completed", "lr_find": {"lr": 1e-3, "freeze": ["x"]}},
                                     {"status": "completed", "best": {"value": "NaN-ish"}},
                                     {"status": "completed", "epochs": "many"}, ["not", "a", "table"],
                                     {"status": "completed", "best": {"metric": {"x": 1}, "value": 0.5}}])
def test_a_malformed_job_summary_is_listed_unreadable_and_the_rest_summarised(finished, tmp_path, capsys, summary):
    """Today each of these raised a traceback, and one bad job stopped the whole rebuild."""
    sweep = hostile_sweep(finished, tmp_path)
    (sweep / "1" / "summary.json").write_text(json.dumps(summary))
    out = sweep_rebuild(sweep, capsys)
    assert re.search(r"^job 1 unreadable: '.*summary\.json' (has|says) ", out, re.M), out
    assert "1 completed, 1 unreadable" in out and re.search(r"^best: job 0, val/acc1", out, re.M), out
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert sorted(r["status"] for r in rows) == ["completed", "unreadable"]


def test_a_yaml_alias_bomb_in_a_jobs_hydra_yaml_is_unreadable_quickly(finished, tmp_path):
    """Today a 500-byte hydra.yaml of nested aliases ran `python -m finetune.sweep` out of memory."""
    sweep = hostile_sweep(finished, tmp_path)
    (sweep / "1" / ".hydra" / "hydra.yaml").write_text(alias_bomb("hydra"))
    result = run_bounded(["-m", "finetune.sweep", str(sweep)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert re.search(r"^job -?1 unreadable: .*alias", result.stdout, re.M), result.stdout
    assert "best: job 0" in result.stdout


def alias_bomb(top: str, levels: int = 12) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9^levels strings once copied out."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines + [f"{top}: {{job: {{num: *a{levels - 1}}}, overrides: {{task: *a{levels - 1}}}}}"]) + "\n"


def test_a_reproduce_line_never_runs_what_a_job_override_holds(finished, tmp_path, capsys):
    """Today `reproduce:` printed `optim.lr=0.001;touch${IFS}FILE` unquoted, and pasting it ran touch."""
    sweep = hostile_sweep(finished, tmp_path)
    marker = tmp_path / "pasted"
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    summary["best"]["value"] = 0.99  # job 0 is the best: its overrides are the reproduce line
    (sweep / "0" / "summary.json").write_text(json.dumps(summary))
    for override in (f"optim.lr=0.001;touch${{IFS}}{marker}", f"data.root=$(touch {marker})", f"x=`touch {marker}`"):
        path = sweep / "0" / ".hydra" / "hydra.yaml"
        hydra = yaml.safe_load(path.read_text())
        hydra["hydra"]["overrides"]["task"] = [override]
        path.write_text(yaml.safe_dump(hydra))
        line = next(x for x in sweep_rebuild(sweep, capsys).splitlines() if x.startswith("reproduce: "))
        pasted = subprocess.run(["bash", "-c", "python() { printf '%s\\n' \"$@\"; }; " + as_python(line.removeprefix("reproduce: "))],
                                capture_output=True, text=True, cwd=tmp_path)
        assert pasted.returncode == 0 and pasted.stdout.splitlines() == ["-m", "finetune", override], pasted
        assert not marker.exists()


def as_python(command: str) -> str:
    """A printed command with its interpreter (this one, by its path) replaced by ``python``, a shell function
    the paste tests define to print the arguments it gets."""
    interpreter = shlex.quote(sys.executable)
    assert command.startswith(interpreter + " "), command
    return "python" + command.removeprefix(interpreter)


def test_every_command_the_closing_block_prints_pastes_as_one_word_per_argument(tmp_path):
    """A run dir and data root named to break out of the shell (and out of Hydra's parser): each printed
    command gives back exactly its arguments, and Hydra reads the values back unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from finetune.summary import closing_block

    marker = tmp_path / "pasted"
    run_dir, root = f"/runs/a,b;touch {marker}", f"/data/$(touch {marker})/it's ${{oc.env:HOME}}"
    block = closing_block({"status": "interrupted", "run_dir": run_dir, "best": {"metric": "val/acc1", "value": 0.5,
                                                                                "epoch": 1},
                           "paths": {"best.safetensors": "w", "last.ckpt": "s"}}, data_root=root)
    commands = [line.strip() for line in block.splitlines() if line.strip().startswith(shlex.quote(sys.executable))]
    assert len(commands) == 4
    parser = OverridesParser.create()
    for line in commands:
        pasted = subprocess.run(["bash", "-c", "python() { printf '%s\\0' \"$@\"; }; " + as_python(line)],
                                capture_output=True, text=True, cwd=tmp_path)
        args = pasted.stdout.split("\0")[:-1]
        values = {o.key_or_group: OmegaConf.create({"v": o.value()}).v  # as the config will hold it
                  for o in parser.parse_overrides([a for a in args[2:] if "=" in a])}
        assert values.get("resume", values.get("ckpt")) == run_dir, (line, values)
        assert values.get("data.root", root) == root, (line, values)
    assert not marker.exists()


# ------------------------------------------------------------ prediction inputs
def test_a_glob_through_two_loops_lists_each_image_once_quickly(finished, tmp_path):
    """Today `photos/**/*.png` with two `x -> .` links grew towards 2^40 matches."""
    ref, _ = finished
    photos = tmp_path / "photos"
    make_image_folder(photos, classes=2, train=2, val=0, split=False)
    (photos / "x").symlink_to(".")
    (photos / "class_0" / "y").symlink_to("..")
    (photos / "fifo.png").parent.mkdir(exist_ok=True)
    os.mkfifo(photos / "fifo.png")  # a FIFO named like an image: opening it would block forever
    result = run_bounded(["-m", "finetune.predict", f"ckpt={ref}", f"inputs={photos}/**/*.png", "num_workers=0",
                          "progress_bar=false", f"hydra.run.dir={tmp_path / 'pred'}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert sorted(Path(r["path"]).relative_to(photos).as_posix() for r in rows) == [
        "class_0/0.png", "class_0/1.png", "class_1/0.png", "class_1/1.png"]


def test_csv_cells_from_others_never_start_a_formula(tmp_path):
    """Class names, file names and errors someone else chose get a leading ' when they would start a
    spreadsheet formula; numbers stay numbers."""
    import torch

    from finetune.evaluate import Outputs, misclassified_csv
    from finetune.metrics import EvalResult  # noqa: F401  (Outputs' type)
    from finetune.predict import predictions_csv

    rows = [{"path": "=HYPERLINK(\"http://x\")", "label": "+cmd|' /C calc'!A0", "prob": 0.5, "top2": "-2+3",
             "prob2": 0.25, "top3": "@SUM(1)", "prob3": 0.25}, {"path": "\tx", "label": "-0.5", "prob": 1.0,
                                                                   "top2": "cat", "prob2": 0.0, "top3": "\rx",
                                                                   "prob3": 0.0}]
    cells = [c for row in csv.reader(io.StringIO(predictions_csv(rows))) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and c != "-0.5")], cells
    assert "'=HYPERLINK(\"http://x\")" in cells and "-0.5" in cells and "0.500000" in cells
    outputs = Outputs(result=None, predicted=torch.tensor([1]), confidence=torch.tensor([0.75]),
                      targets=torch.tensor([0]))
    text = misclassified_csv(outputs, [("=cmd", 0)], ["@a", "=b"])
    assert list(csv.reader(io.StringIO(text)))[1] == ["'=cmd", "'@a", "'=b", "0.750000"]


def test_sweep_summary_csv_cells_never_start_a_formula(finished, tmp_path, capsys):
    sweep = hostile_sweep(finished, tmp_path)
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    summary |= {"status": "failed", "error": "=HYPERLINK(\"http://evil\",\"x\")"}
    (sweep / "1" / "summary.json").write_text(json.dumps(summary))
    sweep_rebuild(sweep, capsys)
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["error"] for r in rows if r["status"] == "failed"] == ["'=HYPERLINK(\"http://evil\",\"x\")"]


# ------------------------------------------------------------ foreign configs: bounded, never resolved
def with_saved_config(out: Path, config_yaml: str) -> None:
    """Replace the config recorded in the run's last.ckpt (its manifest entry rewritten to match)."""
    state_path = out / "checkpoints" / "last.ckpt"
    state = load_training_state(state_path)
    state["config_yaml"] = config_yaml
    facts = save_training_state(state_path, state)
    manifest = Manifest(out / "checkpoints" / "manifest.json")
    manifest.files["last.ckpt"] |= facts.entry()
    manifest.save()


@pytest.mark.slow
def test_a_yaml_alias_bomb_in_a_training_state_is_refused_within_seconds(finished, tmp_path):
    """Today resume spent over 10 min at 4 GB expanding a 500-byte config_yaml, and SIGTERM did not stop it."""
    out, _ = hostile_copy(finished, tmp_path)
    _, overrides = finished
    with_saved_config(out, alias_bomb("trainer"))
    result = run_bounded(["-m", "finetune", *overrides, "trainer.max_epochs=3", "resume=auto",
                          f"hydra.run.dir={out}"], cwd=tmp_path, timeout=180)
    assert result.returncode is not None, "killed at the time limit"
    assert_clean_error(result, "last.ckpt (config_yaml)", "alias")


def test_an_interpolation_in_a_saved_config_never_prints_the_environment(finished, tmp_path, monkeypatch, caplog):
    """Today resume resolved ${oc.env:...} from the training state's config and printed it in its diff."""
    out, _ = hostile_copy(finished, tmp_path)
    _, overrides = finished
    saved = yaml.safe_load(load_training_state(out / "checkpoints" / "last.ckpt")["config_yaml"])
    saved["model"]["name"] = "${oc.env:FT_TEST_SECRET}"
    with_saved_config(out, yaml.safe_dump(saved))
    monkeypatch.setenv("FT_TEST_SECRET", "hunter2-secret")
    with pytest.raises(UserError, match=r"model\.name: '\$\{oc\.env:FT_TEST_SECRET\}'") as err:
        run(compose_config(overrides + ["trainer.max_epochs=3", "resume=auto"]), run_dir=out)
    assert "hunter2" not in str(err.value) + caplog.text


@pytest.mark.slow
def test_evaluate_takes_only_where_the_images_are_from_a_foreign_config(finished, tmp_path):
    """Today evaluate generated the demo set at the data.cache_dir a foreign run's config named, in the
    sizes it named (244 MB). Now: under this user's cache, within the demo's bounds; an alias bomb in
    the config is one line."""
    out, _ = hostile_copy(finished, tmp_path)
    config_path = out / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    attacker = tmp_path / "attacker-chosen"
    config["data"] |= {"name": "demo", "root": None, "cache_dir": str(attacker),
                       "demo": {"num_classes": 2, "train_per_class": 2, "val_per_class": 2, "image_size": 32, "seed": 0}}
    config_path.write_text(yaml.safe_dump(config))
    mine = tmp_path / "my-cache"
    result = run_bounded(["-m", "finetune.evaluate", f"ckpt={out}", f"data.cache_dir={mine}", "progress_bar=false",
                          f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path, timeout=180)
    assert not attacker.exists()
    assert list(mine.glob("demo-*/train/circle/*.png")), result.stderr[-2000:]
    config["data"]["demo"] |= {"train_per_class": 1_000_000}
    config_path.write_text(yaml.safe_dump(config))
    result = run_bounded(["-m", "finetune.evaluate", f"ckpt={out}", f"data.cache_dir={mine}", "progress_bar=false",
                          f"hydra.run.dir={tmp_path / 'eval2'}"], cwd=tmp_path, timeout=180)
    assert_clean_error(result, "demo set", "pixels")
    config_path.write_text(alias_bomb("data"))
    result = run_bounded(["-m", "finetune.evaluate", f"ckpt={out}", "progress_bar=false",
                          f"hydra.run.dir={tmp_path / 'eval3'}"], cwd=tmp_path, timeout=180)
    assert_clean_error(result, "config.yaml", "alias")
    assert not attacker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multirun.yaml", "sweep_summary.csv", "sweep_summary.jsonl", "0",
                                  "0/.hydra/config.yaml", "1/train.log"])
def test_a_sweep_into_an_existing_sweep_dir_refuses_planted_links(finished, tmp_path, name):
    """Hydra writes multirun.yaml and each job's .hydra/ by name, the sweep appends its jsonl: today a
    `-m` sweep into someone else's sweep dir wrote through each of these links."""
    _, overrides = finished
    sweep = hostile_sweep(finished, tmp_path)
    victim = tmp_path / "victim" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text(SENTINEL)
    if name == "0":
        shutil.copytree(sweep / "0", victim.parent / "copy")
    plant(sweep, name, victim.parent if name == "0" else victim)
    result = run_cli(["-m", *overrides, "trainer.max_epochs=1", "optim.lr=0.01,0.02", f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path)
    assert_clean_error(result, f"'{sweep / name}'", "refused to write")
    assert victim.read_text() == SENTINEL and sorted(p.name for p in victim.parent.iterdir()) == (
        ["copy", "victim.txt"] if name == "0" else ["victim.txt"])


def test_load_model_of_a_run_dir_reads_nothing_a_planted_link_points_at(finished, tmp_path):
    """`finetune.load_model(RUN_DIR)` takes the best weights its manifest names: a link out of the run dir
    (to a file or a FIFO that would block the read) is refused in one line."""
    import finetune

    out, victim = hostile_copy(finished, tmp_path)
    best = json.loads((out / "checkpoints" / "manifest.json").read_text())["best"]
    (out / "checkpoints" / best).unlink()
    (out / "checkpoints" / best).symlink_to(victim)
    with pytest.raises(UserError, match="a link out of") as err:
        finetune.load_model(out)
    assert "\n" not in str(err.value)
    (out / "checkpoints" / best).unlink()
    os.mkfifo(out / "checkpoints" / best)
    with pytest.raises(UserError) as err:
        finetune.load_model(out)
    assert "\n" not in str(err.value) and best in str(err.value)
