"""Backbones from timm or torchvision, with a new head for this data set.

``build_model`` returns the network plus a ``BackboneSpec``: where its classifier
and first convolution live and how its inputs must be preprocessed. Library
weights (``model.pretrained=true``) are located as a local file first, so they go
through the same accounted-for loading as any other weights, and an unreachable
hub fails within seconds instead of retrying for a minute.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shlex
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
import torchvision
from torch import nn

from finetune.errors import UserError
from finetune.heads import build_mlp_head

PROBE_TIMEOUT_S = 3.0
SOURCES = ("timm", "torchvision")  # model.source
HEADS = ("linear", "mlp", "features")  # head.name: the library's classifier, an MLP, or none (embeddings)


@dataclass
class BackboneSpec:
    """What the rest of the run needs to know about a built model."""

    name: str
    source: str  # timm | torchvision
    num_classes: int
    in_chans: int
    classifier: str  # dotted module path of the final layer
    first_conv: str  # dotted module path of the input convolution
    data_config: dict[str, Any] = field(default_factory=dict)  # the library's data config (before data.img_size)
    head: dict[str, Any] = field(default_factory=dict)  # head settings used to build it
    architecture: str = ""  # what rebuilds it with no hub or folder: timm's registry entry (resnet50), or the name
    model_args: dict[str, Any] = field(default_factory=dict)  # with the architecture: a hub config's model arguments


def build_model(*, name: str, source: str, num_classes: int, in_chans: int = 3,
                input_size: int = 224, pool: str | None = None, dropout: float = 0.0,
                drop_path_rate: float = 0.0, head: str = "linear", hidden: Sequence[int] = (),
                activation: str = "relu", norm: str | None = None,
                model_args: dict[str, Any] | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Create the backbone with a freshly initialised ``num_classes`` head.

    ``head``: ``linear`` (the library's classifier), ``mlp`` (``hidden`` sizes, ``activation``,
    ``norm``, ``dropout`` between layers, in place of the classifier, same module path) or
    ``features`` (no classifier: the model returns pooled embeddings; ``num_classes`` is ignored).
    ``model_args``: a timm registry architecture built with these arguments (what a weights file of an
    ``hf-hub:`` model records, so that rebuilding it reads no hub and no folder).

    >>> model, spec = build_model(name="test_resnet", source="timm", num_classes=3)
    >>> spec.classifier, model(torch.zeros(1, 3, 64, 64)).shape
    ('fc', torch.Size([1, 3]))
    """
    settings = {"pool": pool, "dropout": dropout}
    if head != "linear":  # only non-default heads are recorded, so older weights files still rebuild
        settings |= {"head": head, "hidden": list(hidden), "activation": activation, "norm": norm}
    builder = BUILDERS[source]
    model, classifier, first_conv, rebuild = builder(name, num_classes, in_chans, settings, drop_path_rate,
                                                     model_args)
    num_classes = _replace_head(model, classifier, head, num_classes, settings)
    data_config = resolve_data_config(model, source=source, in_chans=in_chans, input_size=input_size)
    spec = BackboneSpec(name=name, source=source, num_classes=num_classes, in_chans=in_chans,
                        classifier=classifier, first_conv=first_conv, data_config=data_config, head=settings,
                        **rebuild)
    return model, spec


def _build_timm(name: str, num_classes: int, in_chans: int, head: dict, drop_path_rate: float,
                model_args: dict[str, Any] | None = None) -> tuple[nn.Module, str, str, dict[str, Any]]:
    timm_name = resolve_timm_name(name)
    if model_args is not None:  # a weights file's record: its registry architecture, no hub or folder read
        timm_name = TimmName(name, timm_name.architecture, model_args=dict(model_args))
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": head["dropout"]}
    if head["pool"]:
        kwargs["global_pool"] = head["pool"]
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        model = timm.create_model(timm_name.create_name, pretrained=False, pretrained_cfg=timm_name.pretrained_cfg,
                                  **(timm_name.model_args | kwargs))
    except TypeError as err:  # e.g. a model without global_pool / drop_path_rate
        raise UserError(f"timm model '{name}' does not accept these head settings {kwargs}: {err}") from None
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier") or _find_classifier(model, num_classes)
    if isinstance(classifier, (list, tuple)):  # distilled models have two heads
        classifier = classifier[0]
    first_conv = cfg.get("first_conv") or _find_first_conv(model)
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0]
    return model, classifier, first_conv, {"architecture": timm_name.architecture,
                                           "model_args": dict(timm_name.model_args)}


def _build_torchvision(name: str, num_classes: int, in_chans: int, head: dict, drop_path_rate: float,
                       model_args: dict[str, Any] | None = None) -> tuple[nn.Module, str, str, dict[str, Any]]:
    check_model_name(name, "torchvision")
    if head["pool"] or drop_path_rate:
        raise UserError(f"head.pool and model.drop_path_rate are timm-only settings; torchvision '{name}' "
                        "keeps its own pooling: leave them at their defaults")
    # torchvision's builders take num_classes when no weights are given: the generic
    # way to get the right head without knowing each architecture's layout.
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    classifier = _find_classifier(model, num_classes)
    if head["dropout"]:
        parent, leaf = _split_path(model, classifier)
        setattr(parent, leaf, nn.Sequential(nn.Dropout(head["dropout"]), getattr(parent, leaf)))
        classifier = f"{classifier}.1"
    first_conv = _find_first_conv(model)
    if in_chans != 3:
        _replace_first_conv(model, first_conv, in_chans)
    return model, classifier, first_conv, {"architecture": name, "model_args": {}}


def _replace_head(model: nn.Module, classifier: str, head: str, num_classes: int, settings: dict) -> int:
    """Swap the library's classifier for an MLP or nothing; returns the output width's class count."""
    if head == "linear":
        return num_classes
    if head not in HEADS:
        raise UserError(f"head.name '{head}' is not known: use {', '.join(HEADS)}")
    parent, leaf = _split_path(model, classifier)
    old = getattr(parent, leaf)
    if not isinstance(old, nn.Linear):
        raise UserError(f"head={head} replaces a Linear classifier, but '{classifier}' is {type(old).__name__}")
    if head == "features":
        setattr(parent, leaf, nn.Identity())
        return 0
    setattr(parent, leaf, build_mlp_head(old.in_features, num_classes, hidden=settings["hidden"],
                                         activation=settings["activation"], norm=settings["norm"],
                                         dropout=settings["dropout"]))
    return num_classes


def _find_classifier(model: nn.Module, num_classes: int) -> str:
    """The last Linear/Conv2d whose output is the class count."""
    found = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    if not found:
        raise UserError(f"cannot find the classifier of this model (no layer with {num_classes} outputs)")
    return found[-1]


def _find_first_conv(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _split_path(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), leaf


def _replace_first_conv(model: nn.Module, path: str, in_chans: int) -> None:
    parent, leaf = _split_path(model, path)
    old: nn.Conv2d = getattr(parent, leaf)
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None, old.padding_mode)
    setattr(parent, leaf, new)


def check_model_name(name: str, source: str) -> None:
    """Unknown names fail with the closest known names (and the other library, if it knows it).

    timm takes what ``timm.create_model`` takes: an architecture (``resnet50``), one of its pretrained
    tags (``resnet50.a1_in1k``) or a Hugging Face Hub repo (``hf-hub:timm/resnet50.a1_in1k``, see
    `resolve_timm_name`).

    >>> check_model_name("test_resnet.r160_in1k", "timm")
    >>> check_model_name("test_resnet.r160_in1j", "timm")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    finetune.errors.UserError: model.name 'test_resnet.r160_in1j': ... did you mean: test_resnet.r160_in1k?
    """
    if source == "timm":
        resolve_timm_name(name)
        return
    _check_library_name(name, name, source)


def _check_library_name(name: str, architecture: str, source: str) -> None:
    """``architecture`` (``name`` without its timm tag) is one of ``source``'s models."""
    known = timm.list_models() if source == "timm" else torchvision.models.list_models()
    if architecture in known:
        return
    other = "torchvision" if source == "timm" else "timm"
    other_known = (torchvision.models.list_models() if source == "timm"
                   else timm.list_models() + timm.list_models(pretrained=True))
    if name in other_known:
        raise UserError(f"model.name '{name}' is a {other} model, not a {source} one: add model.source={other}")
    candidates = timm.list_models(pretrained=True) if name != architecture else known  # tagged: tagged ones
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}?" if close else f"list them with {source}'s list_models()"
    raise UserError(f"model.name '{name}' is not a {source} model; {hint}")


@dataclass(frozen=True)
class TimmName:
    """A timm ``model.name`` resolved: what ``timm.create_model`` builds it from, and where its weights are."""

    name: str  # as given
    architecture: str  # the registry entry: resnet50
    tag: str | None = None  # a registry name's pretrained tag (a1_in1k); None: timm's default one
    hub_id: str | None = None  # hf-hub names: the repository (REPO[@REVISION])
    folder: Path | None = None  # local-dir names: the folder with config.json and the weights
    pretrained_cfg: dict[str, Any] | None = None  # hub and local-dir names: their config.json's
    model_args: dict[str, Any] = field(default_factory=dict)  # hub and local-dir names: their config.json's

    @property
    def create_name(self) -> str:
        """The name ``timm.create_model`` is given (with ``pretrained_cfg`` and ``model_args``)."""
        return self.architecture if self.pretrained_cfg is not None else self.name


def resolve_timm_name(name: str) -> TimmName:
    """Check and take apart any name ``timm.create_model`` accepts.

    A registry name is an architecture with an optional pretrained tag (``resnet50``,
    ``resnet50.a1_in1k``); a tag that architecture does not have fails with its tags. An
    ``hf-hub:REPO[@REVISION]`` name builds the architecture its repository's ``config.json`` names,
    with that file's pretrained config and model arguments: read from the Hugging Face cache, or
    downloaded when the hub answers (offline, an uncached one fails at once, naming the
    ``python -m finetune.weights fetch`` command that caches it). A ``local-dir:FOLDER`` name reads
    ``FOLDER/config.json``.

    >>> found = resolve_timm_name("test_resnet.r160_in1k")
    >>> found.architecture, found.tag
    ('test_resnet', 'r160_in1k')

    Raises:
        UserError: The name, tag or repository is unknown, or the hub config is not to be had.
    """
    try:
        prefix, model_id = timm.models.parse_model_name(name)
    except (ValueError, AssertionError) as err:  # 'timm/resnet50' without hf-hub:, an unknown prefix
        raise UserError(f"model.name '{name}': {err}") from None
    if prefix in (None, "timm"):  # timm before 1.0.20 answers 'timm' for registry names
        architecture, tag = timm.models.split_model_name_tag(model_id)
        _check_library_name(model_id, architecture, "timm")
        if tag and model_id not in timm.list_models(pretrained=True):
            tags = {t.partition(".")[2]: t for t in timm.list_pretrained(f"{architecture}.*")}
            close = [tags[t] for t in difflib.get_close_matches(tag, tags, n=5, cutoff=0.6)]
            hint = (f"did you mean: {', '.join(close)}?" if close
                    else f"its tags: {', '.join(tags.values()) or 'none'}")
            raise UserError(f"model.name '{name}': timm has no pretrained tag '{tag}' for '{architecture}'; {hint}")
        return TimmName(name, architecture, tag=tag or None)
    if prefix == "hf-hub":
        config_file = _hub_file(name, model_id, ["config.json"], config=True)
        return _from_config(name, config_file, hub_id=model_id, pretrained_cfg={"hf_hub_id": model_id,
                                                                                "source": "hf-hub"})
    folder = Path(model_id).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"model.name '{name}': '{folder / 'config.json'}' does not exist (a local-dir: model is "
                        "a folder with timm's config.json and model.safetensors or pytorch_model.bin)")
    return _from_config(name, folder / "config.json", folder=folder, pretrained_cfg={"file": str(folder),
                                                                                      "source": "local-dir"})


def _from_config(name: str, config_file: Path, *, pretrained_cfg: dict[str, Any], **where: Any) -> TimmName:
    """The architecture, pretrained config and model arguments in a timm ``config.json`` (as timm reads it)."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "pretrained_cfg" not in config:  # timm's older, flat layout
            config = {"architecture": config.pop("architecture"), "pretrained_cfg": config}
        architecture, saved, model_args = config["architecture"], config["pretrained_cfg"], config.get("model_args")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"model.name '{name}': '{config_file}' is not a timm model config ({err!r})") from None
    if not isinstance(architecture, str) or architecture not in timm.list_models():
        raise UserError(f"model.name '{name}': its config names the architecture '{architecture}', which timm "
                        f"{timm.__version__} does not have: upgrade timm, or check the repository")
    fields = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}  # a newer timm's extra keys dropped
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(saved).items() if k in fields}  # as timm's
    cfg |= pretrained_cfg
    if "num_classes" in config:  # as timm does: the base config's class count wins
        cfg["num_classes"] = config["num_classes"]
    return TimmName(name, architecture, pretrained_cfg=cfg, model_args=dict(model_args or {}), **where)


def resolve_data_config(model: nn.Module, *, source: str, in_chans: int, input_size: int) -> dict[str, Any]:
    """timm's pretrained data config (mean, std, interpolation, crop), sized to ``input_size``."""
    if source == "timm":
        cfg = dict(timm.data.resolve_data_config({}, model=model))
    else:  # torchvision classification weights: ImageNet statistics, bilinear, resize 256 -> crop 224
        cfg = dict(timm.data.resolve_data_config({"interpolation": "bilinear", "crop_pct": 0.875}))
    cfg["input_size"] = (in_chans, input_size, input_size)
    if in_chans != 3:  # one mean/std per channel: grey = average, more = cycle RGB
        mean, std = cfg["mean"], cfg["std"]
        pick = (lambda v: (sum(v) / 3,)) if in_chans == 1 else (lambda v: tuple(v[i % 3] for i in range(in_chans)))
        cfg["mean"], cfg["std"] = pick(mean), pick(std)
    return cfg


def locate_library_weights(name: str, source: str) -> Path:
    """Path of the library's own pretrained file: from its cache, else downloaded if the hub answers.

    Raises:
        UserError: Within seconds, when the file is not cached and the hub is unreachable.
    """
    locate = {"timm": _locate_timm_weights, "torchvision": _locate_torchvision_weights}[source]
    return locate(name)


def _offline_error(name: str, source: str, where: str, *, config: bool = False) -> UserError:
    fetch = shlex.join(["python", "-m", "finetune.weights", "fetch", name] +
                       (["--source", source] if source != "timm" else []))
    if config:  # an hf-hub: name: the architecture is in the repository's config.json
        return UserError(
            f"model.name '{name}' names its architecture in config.json on {where}, which is not reachable and "
            f"not cached: on a machine with internet run `{fetch}` and copy the cache folder it prints to this one")
    return UserError(
        f"model.pretrained=true needs {source}'s weights for '{name}' from {where}, which is not reachable "
        f"and not cached: on a machine with internet run `{fetch}` and copy the cache folder it prints to "
        "this one, or give a weights file with model.weights=PATH (model.pretrained=false would train from "
        "random weights: no transfer learning)")


def _locate_timm_weights(name: str) -> Path:
    """The file of exactly the weights ``name`` picks: its tag's repository (timm's default tag when
    untagged), an ``hf-hub:`` repository, or a ``local-dir:`` folder."""
    timm_name = resolve_timm_name(name)
    default_files = ["model.safetensors", "pytorch_model.bin"]
    if timm_name.folder is not None:
        for filename in default_files:
            if (timm_name.folder / filename).is_file():
                return timm_name.folder / filename
        raise UserError(f"model.name '{name}': '{timm_name.folder}' has no model.safetensors or pytorch_model.bin")
    if timm_name.hub_id is not None:
        filename = timm_name.pretrained_cfg.get("hf_hub_filename")
        return _hub_file(name, timm_name.hub_id, [filename] if filename else default_files)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"timm has no pretrained weights for '{name}': set model.pretrained=false "
                        "or give model.weights=PATH")
    return _hub_file(name, cfg.hf_hub_id, [cfg.hf_hub_filename] if cfg.hf_hub_filename else default_files)


def _hub_file(name: str, hub_id: str, filenames: list[str], *, config: bool = False) -> Path:
    """The first of ``filenames`` in Hugging Face Hub repository ``hub_id`` (``REPO[@REVISION]``): from the
    cache, else downloaded when the hub answers within seconds.

    Raises:
        UserError: Not cached and the hub unreachable (naming the command that caches it), or the
            repository, revision or files do not exist.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, _, revision = hub_id.partition("@")
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None, local_files_only=True))
        except EntryNotFoundError:  # not in the local cache: try the next name, then the hub
            continue
    if not hub_reachable("huggingface.co"):
        raise _offline_error(name, "timm", f"the Hugging Face Hub ({hub_id})", config=config)
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None))
        except EntryNotFoundError:  # the repository has the next name instead
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:  # gated repositories included
            raise UserError(f"model.name '{name}': the Hugging Face Hub has no repository or revision "
                            f"'{hub_id}' open to this machine ({type(err).__name__})") from None
    raise UserError(f"model.name '{name}': the Hugging Face Hub repository '{hub_id}' has none of {filenames}")


def _locate_torchvision_weights(name: str) -> Path:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if path.exists():
        return path
    if not hub_reachable("download.pytorch.org"):
        raise _offline_error(name, "torchvision", weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(weights.url, str(path))
    return path


def hub_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connect with a hard deadline (name resolution included), never a hang.

    ``HF_HUB_OFFLINE=1`` (the Hugging Face convention) means offline without asking.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # The socket timeout does not bound name resolution; waiting on a daemon thread does.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


BUILDERS = {"timm": _build_timm, "torchvision": _build_torchvision}  # model.source -> builder
