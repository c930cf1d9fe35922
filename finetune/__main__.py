"""``python -m finetune [overrides]``: the Hydra application."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from finetune.cli import exit_on_user_error
from finetune.config import CONFIG_DIR, CONFIG_PACKAGE, in_a_sweep, register_schema, split_override
from finetune.errors import RunPruned, UserError, describe_error, message_of
from finetune.signals import TrainingInterrupted


register_schema()


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def train(cfg: DictConfig) -> float | None:
    """Run one fine-tune; returns the best monitored value (what a Hydra sweeper optimises)."""
    from finetune.run import run

    from finetune.distributed import current

    rank = current().rank  # under torchrun, messages of the processes other than rank 0 say which they are
    tag = f"[rank {rank}] " if rank else ""
    try:  # one job of a sweep records its error and the sweep goes on: the error is the job's, not the command's
        final = run(cfg) if in_a_sweep() else exit_on_user_error(lambda: run(cfg), tag=tag)
    except TrainingInterrupted as err:  # SIGTERM/SIGINT/SIGUSR2: last.ckpt saved, summary says interrupted
        print(f"{tag}interrupted: {err}; continue with: {resume_command(cfg)}", file=sys.stderr)
        if err.signum == signal.SIGUSR2:
            hand_over_to_requeue(err.signum)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:  # a second SIGINT: aborted at once
        print(f"{tag}aborted: {err}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - a sweep's job: recorded below; anything else keeps its traceback
        if not in_a_sweep() or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # One job of a sweep: its summary.json says how it ended; the other jobs go on, and the
        # sweep's exit status reports failures once its summary is written (finetune.sweep).
        print(f"job {'pruned' if isinstance(err, RunPruned) else 'failed'}: {job_error_line(err)}", file=sys.stderr)
        return None
    return final.get("best/value")


def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run (the run dir quoted for Hydra and the shell)."""
    from hydra.core.hydra_config import HydraConfig

    from finetune.cli import command, override

    return command("finetune", override("resume", HydraConfig.get().runtime.output_dir))


def hand_over_to_requeue(signum: int) -> None:
    """After a SIGUSR2 stop has saved: the handler that was there before the run's own (submitit's,
    in a SLURM job it launched) gets the signal, and requeues the job; nothing happens without one."""
    handler = signal.getsignal(signum)
    if not callable(handler):
        return
    try:
        handler(signum, None)
    except Exception as err:  # noqa: BLE001 - submitit's own error when it will not requeue (too many timeouts)
        print(f"not requeued: {describe_error(err)}", file=sys.stderr)


def job_error_line(err: BaseException) -> str:
    """The one line that says why a job ended: a user error's message, else the exception's type and first line."""
    return message_of(err) if isinstance(err, UserError) else describe_error(err)


def main() -> None:
    sys.argv[1:] = exit_on_user_error(lambda: expand_resume_args(sys.argv[1:]))
    exit_on_user_error(lambda: check_command_line(sys.argv[1:]))
    if refusal := fresh_run_refusal(sys.argv[1:]):
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(2)
    from finetune.distributed import close

    try:
        train()
    finally:
        close()  # under torchrun: leave the process group
    from finetune.sweep import sweep_failed

    if sweep_failed():
        sys.exit(1)


# ------------------------------------------------------------ the command line, before Hydra reads it
def check_command_line(args: list[str]) -> None:
    """Refuse, in one line with the fix, what Hydra would answer with a usage dump, a search-path list or
    a hint that leads on ("use +lr=0.01", which then adds a key nothing reads): argparse-style
    ``--key value``, a key the schema does not have, and a config option that does not exist."""
    from finetune.config import is_known_key, literal_secret, unknown_key_message

    hydra_flags, valued = _hydra_flags()
    own_configs = any(a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--config-path", "-cp"))
                      for a in args)
    for i, arg in enumerate(args):
        if arg.startswith("--") and arg.split("=", 1)[0] not in hydra_flags:
            raise UserError(dashed_message(arg, args[i + 1] if i + 1 < len(args) else None))
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")) or (i and args[i - 1] in valued):
            continue
        key, value = split_override(arg)
        if key.startswith(("hydra.", "hydra/")):
            continue
        if refusal := literal_secret(key, value):  # before Hydra records the command line in .hydra/
            raise UserError(refusal)
        if key in config_groups():
            if not own_configs:
                check_options(key, value, given=arg)
        elif not is_known_key(key):
            raise UserError(unknown_key_message(key, given=arg))


def _hydra_flags() -> tuple[set[str], set[str]]:
    """Hydra's own command-line flags, and those of them that take a value (``--cfg job``)."""
    from hydra._internal.utils import get_args_parser

    actions = get_args_parser()._actions
    return ({flag for a in actions for flag in a.option_strings},
            {flag for a in actions if a.nargs in (None, "?") for flag in a.option_strings})


def dashed_message(arg: str, following: str | None) -> str:
    """What to type instead of an argparse-style ``--key value`` / ``--key=value``.

    >>> dashed_message("--lr", "0.01")
    "'--lr 0.01' is argparse style; finetune takes Hydra overrides: write optim.lr=0.01 (key=value, no dashes)"
    """
    from finetune.config import closest_keys, is_known_key

    name, _, value = arg[2:].partition("=")
    given = arg
    if not value and following is not None and not following.startswith("-") and "=" not in following:
        value, given = following, f"{arg} {following}"
    name = name.replace("-", "_")
    key = name if is_known_key(name) else next(iter(closest_keys(name)), None)
    hint = f"write {key}={value or 'VALUE'}" if key else "write key=value with a key from python -m finetune --cfg job"
    return f"'{given}' is argparse style; finetune takes Hydra overrides: {hint} (key=value, no dashes)"


def config_groups() -> dict[str, list[str]]:
    """The app's config groups and their options (``conf/<group>/<option>.yaml``)."""
    root = Path(CONFIG_DIR)
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in root.iterdir()
            if d.is_dir() and d.name != "hydra" and not d.name.startswith(("_", "."))}


def check_options(group: str, value: str, *, given: str) -> None:
    """Each option a ``group=option`` (or a sweep ``group=a,b``) names exists, else one line with the
    closest options; a list (``logger=[tensorboard,csv]``) names several."""
    if "(" in value:  # choice(...), glob(...): Hydra checks what it expands to
        return
    options = config_groups()[group]
    for option in (v.strip(" []") for v in value.split(",")):
        if option in options or option in ("null", ""):
            continue
        close = difflib.get_close_matches(option, options, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(f'{group}={c}' for c in close)}? " if close else ""
        more = ("; model.name= takes any timm or torchvision architecture on top of one of them, e.g. "
                f"model=resnet50 model.name={option}") if group == "model" else ""
        raise UserError(f"'{given}': {group} has no option '{option}': {hint}options: {', '.join(options)}{more}")


def fresh_run_refusal(args: list[str]) -> str | None:
    """A fresh run aimed at a directory holding a run's checkpoints is refused here, before
    Hydra writes its ``.hydra/`` files there (which ``resume=RUN_DIR`` replays); ``run``
    refuses it again for other entry points."""
    from finetune.rundir import occupied_run_dir

    given = overrides_by_key(args)
    if given.get("resume", "null") not in ("", "null") or "hydra.run.dir" not in given:
        return None
    return occupied_run_dir(Path(given["hydra.run.dir"]).expanduser())


def overrides_by_key(args: list[str]) -> dict[str, str]:
    """The ``key=value`` overrides among command-line ``args``, by key (``+``/``~`` prefixes dropped)."""
    return {override_key(a): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}


def override_key(override: str) -> str:
    """``+data.root=DIR`` -> ``data.root``."""
    return split_override(override)[0]


def expand_resume_args(args: list[str]) -> list[str]:
    """Turn ``resume=RUN_DIR`` into that run's saved overrides plus ``hydra.run.dir=RUN_DIR``.

    Hydra picks the run directory before any of our code runs, so the rewrite happens
    here, before Hydra parses the command line: the overrides recorded in
    ``RUN_DIR/.hydra/overrides.yaml`` come first, the ones typed now after them (they win;
    ``run`` then refuses those that change the experiment), and the run continues in
    ``RUN_DIR``. A resume into a directory that already has ``.hydra/`` writes Hydra's files
    for this launch to ``.hydra/resume/``, so the record of how the run was started (what
    ``resume=RUN_DIR`` replays) is never overwritten, not even by a refused resume.
    ``resume.allow_config_change=X`` is accepted for ``resume_allow_config_change=X``.
    """
    args = [re.sub(r"^resume\.allow_config_change=", "resume_allow_config_change=", a) for a in args]
    given = overrides_by_key(args)
    target = given.get("resume", "")
    if target in ("", "null"):
        return args
    run_dir = Path(given["hydra.run.dir"] if target == "auto" and "hydra.run.dir" in given else target).expanduser()
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    extra = [] if "hydra.output_subdir" in given or not saved_file.exists() else ["hydra.output_subdir=.hydra/resume"]
    if target == "auto" or not run_dir.is_dir():
        return extra + args
    saved = saved_overrides(saved_file) if saved_file.exists() else []
    replay = [o for o in saved if override_key(o) not in given and not override_key(o).startswith(("resume", "hydra."))]
    placed = [] if "hydra.run.dir" in given else [f"hydra.run.dir={run_dir.resolve()}"]
    return replay + placed + extra + args  # flags such as --cfg job stay last, where Hydra's parser wants them


# What a recorded override may look like: [+|++]key=value or ~key[=value], key a dotted config path
# or a group (``model=resnet18``, ``data.root=DIR``, ``+experiment=NAME``). Nothing that starts with "-".
_KEY = r"[A-Za-z_][\w-]*([./][\w-]+)*"
OVERRIDE = re.compile(rf"^((\+{{1,2}})?{_KEY}=|~{_KEY}(=|$))")


def saved_overrides(path: Path) -> list[str]:
    """The overrides recorded in a run's ``.hydra/overrides.yaml``, checked before they are replayed.

    The file is someone else's data when the run dir is: only well-formed overrides of this app's
    own config (its top-level keys and groups) pass; anything else (a flag such as ``--info``, a
    ``hydra/...`` group, a scalar instead of a list) refuses the file, naming the entry.
    """
    from finetune.config import Config

    from finetune.cli import printable
    from finetune.files import read_yaml_data

    try:
        saved = read_yaml_data(path)
    except UserError as err:
        raise UserError(f"{message_of(err)}; resume with resume=auto hydra.run.dir=RUN_DIR and the overrides "
                        "typed again") from None
    if saved is None:
        return []
    known = {f.name for f in dataclasses.fields(Config)} | {"experiment"}
    for entry in saved if isinstance(saved, list) else [saved]:
        if not isinstance(saved, list) or not isinstance(entry, str) or not OVERRIDE.match(entry) \
                or re.split(r"[./=]", override_key(entry))[0] not in known or "${" in entry:
            raise UserError(f"'{path}' holds {printable(repr(entry), 120)}, which is not an override of this app's "
                            "config (or is an interpolation, which would read this machine's settings): refused to "
                            "replay it; resume with resume=auto hydra.run.dir=RUN_DIR and the overrides typed again")
    return saved


if __name__ == "__main__":
    main()
