"""load_pretrained: correct by function across libraries and wrappers; heads, channels, strictness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.testing import assert_close

from conftest_weights import single_thread  # noqa: F401  (autouse fixture)
from conftest_weights import TinyNet, outputs, randomize
from finetune.errors import UserError
from finetune.weights import LoadError, LoadReport, load_pretrained


def _wrap(state: dict[str, torch.Tensor], form: str) -> object:
    """The ways users hand us a state dict."""
    forms = {
        "plain": lambda: state,
        "ddp": lambda: {f"module.{k}": v for k, v in state.items()},
        "compiled_ddp": lambda: {f"module._orig_mod.{k}": v for k, v in state.items()},
        "lightning": lambda: {"epoch": 1, "state_dict": {f"model.backbone.{k}": v for k, v in state.items()}},
    }
    return forms[form]()


@pytest.fixture(scope="module")
def torchvision_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: randomize(torchvision.models.get_model(name, weights=None)) for name in ("resnet18", "efficientnet_b0")}


@pytest.mark.parametrize("form", ["plain", "ddp", "compiled_ddp", "lightning"])
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_torchvision_into_timm_gives_equal_outputs(tmp_path: Path, torchvision_models, name: str, form: str) -> None:
    source = torchvision_models[name]
    torch.save(_wrap(source.state_dict(), form), tmp_path / "w.pth")
    model = timm.create_model(name)
    report = load_pretrained(model, tmp_path / "w.pth")
    assert_close(outputs(model), outputs(source))
    assert report.loaded_fraction == 1.0 and not report.missing and not report.unexpected
    stripped = report.sources[0]["stripped"]
    expected = {"plain": set(), "ddp": {"module."}, "compiled_ddp": {"module._orig_mod."}, "lightning": {"model.backbone."}}[form]
    if name == "efficientnet_b0" and form == "lightning":
        expected = set()  # no name fits even after stripping: structural alignment placed them all
    assert set(stripped) == expected


def test_structural_alignment_reports_what_it_aligned(tmp_path: Path, torchvision_models) -> None:
    torch.save(torchvision_models["efficientnet_b0"].state_dict(), tmp_path / "w.pth")
    report = load_pretrained(timm.create_model("efficientnet_b0"), tmp_path / "w.pth")
    assert report.remapped["[0] features.0.0.weight"] == "conv_stem.weight"
    assert report.remapped["[0] classifier.1.weight"] == "classifier.weight"
    assert len(report.sources[0]["aligned"]) == 360


@pytest.mark.parametrize("num_classes", [5, 0])
def test_new_head_dropped_and_reported_with_both_shapes(tmp_path: Path, torchvision_models, num_classes: int) -> None:
    source = torchvision_models["resnet18"]
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = timm.create_model("resnet18", num_classes=num_classes)
    report = load_pretrained(model, tmp_path / "w.pth")
    features = lambda m: m.eval().forward_head(m.forward_features(torch.ones(1, 3, 64, 64)), pre_logits=True)  # noqa: E731
    source_features = torch.nn.Sequential(*list(source.children())[:-1])(torch.ones(1, 3, 64, 64)).flatten(1)
    assert_close(features(model).detach(), source_features.detach())
    if num_classes:
        assert {(h["key"], h["source_shape"], h["target_shape"]) for h in report.head} == {
            ("fc.weight", (1000, 512), (5, 512)), ("fc.bias", (1000,), (5,))}
    else:  # no classifier at all: the checkpoint's fc is unexpected, and said so
        assert sorted(report.unexpected) == ["[0] fc.bias", "[0] fc.weight"]


def test_torchvision_target_uses_its_own_head_path(tmp_path: Path, torchvision_models) -> None:
    torch.save(torchvision_models["efficientnet_b0"].state_dict(), tmp_path / "w.pth")
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=3)
    report = load_pretrained(model, tmp_path / "w.pth", classifier="classifier.1", first_conv="features.0.0")
    assert [h["key"] for h in report.head] == ["classifier.1.weight", "classifier.1.bias"]


def test_other_shape_mismatch_is_an_error_unless_allowed(tmp_path: Path) -> None:
    source = TinyNet()
    state = source.state_dict()
    state["bn1.weight"] = torch.ones(9)
    torch.save(state, tmp_path / "w.pth")
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadError, match=r"shape mismatch: 'bn1.weight' \(9,\).*\(8,\).*allow_mismatch") as info:
        load_pretrained(model, tmp_path / "w.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    assert info.value.report.problems
    report = load_pretrained(model, tmp_path / "w.pth", allow_mismatch=["bn1.weight"])
    assert report.mismatched[0]["key"] == "bn1.weight"


@pytest.mark.parametrize("in_chans", [1, 4])
def test_first_conv_adapted_to_in_chans_from_a_torchvision_source(tmp_path: Path, torchvision_models, in_chans: int) -> None:
    source = torchvision_models["resnet18"]
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "w.pth")
    model = timm.create_model("resnet18", in_chans=in_chans, num_classes=2)
    report = load_pretrained(model, tmp_path / "w.pth", in_chans=in_chans)
    expected = timm.models.adapt_input_conv(in_chans, source.conv1.weight.detach())
    assert_close(model.conv1.weight.detach(), expected)
    assert report.adapted[0]["source_shape"] == (64, 3, 7, 7) and report.adapted[0]["target_shape"] == (64, in_chans, 7, 7)


def test_in_chans_disagreeing_with_the_model_is_refused(tmp_path: Path) -> None:
    torch.save(TinyNet().state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match="model.in_chans=1 but the model's first conv 'conv_stem' takes 3 channels"):
        load_pretrained(TinyNet(), tmp_path / "w.pth", in_chans=1, first_conv="conv_stem")


def test_missing_tensors_are_listed_or_allowed(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    del state["bn1.weight"], state["bn1.bias"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(LoadError, match=r"2 model tensor\(s\) got no weights.*'bn1.weight', 'bn1.bias'.*allow_missing"):
        load_pretrained(TinyNet(), tmp_path / "w.pth")
    report = load_pretrained(TinyNet(), tmp_path / "w.pth", allow_missing=[r"^bn1\.(weight|bias)$"])
    assert sorted(report.missing) == ["bn1.bias", "bn1.weight"]
    report = load_pretrained(TinyNet(), tmp_path / "w.pth", allow_missing=["bn1.*"])  # a regex, searched
    assert 0.5 < report.loaded_fraction < 1.0


def test_weights_of_another_architecture_say_so(tmp_path: Path, torchvision_models) -> None:
    torch.save(torchvision_models["resnet18"].state_dict(), tmp_path / "w.pth")
    with pytest.raises(LoadError, match="look like weights for another architecture") as info:
        load_pretrained(timm.create_model("efficientnet_b0"), tmp_path / "w.pth")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_are_cast_and_reported(tmp_path: Path, dtype: torch.dtype) -> None:
    source = randomize(TinyNet())
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    model = TinyNet()
    report = load_pretrained(model, tmp_path / "w.safetensors")
    name = str(dtype).removeprefix("torch.")
    assert report.cast == {f"{name}->float32": 8}
    assert model.conv_stem.weight.dtype == torch.float32
    assert_close(model.conv_stem.weight.detach(), state["conv_stem.weight"].float())


def test_several_sources_later_override_earlier(tmp_path: Path) -> None:
    first, second = randomize(TinyNet(), seed=1), randomize(TinyNet(num_classes=7), seed=2)
    torch.save(first.state_dict(), tmp_path / "a.pth")
    torch.save({"encoder": second.state_dict()}, tmp_path / "b.pth")  # nested dict -> 'encoder.*' names
    model = TinyNet(num_classes=7)
    sources = OmegaConf.create([{"path": str(tmp_path / "a.pth")}, {"path": str(tmp_path / "b.pth"), "select": "encoder", "prefix": "classifier", "remap": {"select": "classifier"}}])
    report = load_pretrained(model, sources)
    assert torch.equal(model.conv_stem.weight, first.conv_stem.weight)
    assert torch.equal(model.classifier.weight, second.classifier.weight)
    assert report.loaded["classifier.weight"] == "[1] classifier.weight"
    assert report.loaded["conv_stem.weight"] == "[0] conv_stem.weight"
    assert report.head == []  # the first source's 4-class head was replaced by the second's


def test_target_prefix_loads_into_one_submodule(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.extra = TinyNet(), torch.nn.Linear(2, 2)

    source = randomize(TinyNet())
    torch.save(source.state_dict(), tmp_path / "a.pth")
    model = Wrapper()
    report = load_pretrained(model, [{"path": str(tmp_path / "a.pth"), "prefix": "backbone"}], allow_missing=["^extra\\."], classifier="backbone.classifier")
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)
    assert report.missing == ["extra.weight", "extra.bias"]


def test_auto_adds_a_target_side_wrapper_prefix(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyNet()

    source = randomize(TinyNet())
    torch.save(source.state_dict(), tmp_path / "a.pth")
    model = Wrapper()
    report = load_pretrained(model, tmp_path / "a.pth", classifier="model.classifier")
    assert torch.equal(model.model.conv_stem.weight, source.conv_stem.weight)
    assert report.sources[0]["added"] == {"model.": 9}


def test_two_source_keys_on_one_target_is_an_error(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    state["module.conv_stem.weight"] = state["conv_stem.weight"].clone()
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match="both map to 'conv_stem.weight'"):
        load_pretrained(TinyNet(), tmp_path / "w.pth")


def test_report_serialises_and_prints(tmp_path: Path) -> None:
    torch.save(TinyNet().state_dict(), tmp_path / "w.pth")
    report = load_pretrained(TinyNet(num_classes=2), tmp_path / "w.pth")
    report.write_json(tmp_path / "load_report.json")
    data = json.loads((tmp_path / "load_report.json").read_text())
    assert data["head"][0] == {"key": "classifier.weight", "source_shape": [4, 8], "target_shape": [2, 8]}
    assert data == report.to_dict() and isinstance(report, LoadReport)
    table = report.format_table()
    assert "head reinit" in table and "backbone parameters loaded: 100.0%" in table


def test_dry_run_copies_nothing_and_raises_nothing(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    del state["bn1.weight"]
    torch.save(state, tmp_path / "w.pth")
    model = TinyNet()
    before = model.conv_stem.weight.detach().clone()
    report = load_pretrained(model, tmp_path / "w.pth", dry_run=True)
    assert report.problems and torch.equal(model.conv_stem.weight, before)


def test_torchvision_convnext_and_mobilenet_into_timm(tmp_path: Path) -> None:
    pairs = [("convnext_tiny", "convnext_tiny", {}), ("mobilenet_v3_large", "mobilenetv3_large_100", {"bn_eps": 1e-3})]
    for tv_name, timm_name, kwargs in pairs:
        source = randomize(torchvision.models.get_model(tv_name, weights=None))
        torch.save(source.state_dict(), tmp_path / f"{tv_name}.pth")
        model = timm.create_model(timm_name, **kwargs)
        report = load_pretrained(model, tmp_path / f"{tv_name}.pth")
        assert report.reshaped  # layer scale (C,1,1)->(C,), linear->1x1 conv
        assert_close(outputs(model), outputs(source), rtol=1e-4, atol=1e-4)


def test_torchvision_vit_into_timm_by_preset(tmp_path: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    source = randomize(TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10))
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=10)
    report = load_pretrained(model, tmp_path / "vit.pth")
    assert report.sources[0]["method"] == "torchvision_vit"
    assert_close(outputs(model, size=32), outputs(source, size=32), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_full_size_torchvision_vit_b_16_into_timm_vit_base(tmp_path: Path) -> None:
    source = randomize(torchvision.models.vit_b_16(weights=None)).eval()
    torch.save(source.state_dict(), tmp_path / "vit_b_16.pth")
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    report = load_pretrained(model, tmp_path / "vit_b_16.pth")
    assert report.sources[0]["method"] == "torchvision_vit"
    assert_close(outputs(model, size=224), outputs(source, size=224), rtol=1e-4, atol=1e-4)


def test_remap_rules_from_omegaconf(tmp_path: Path) -> None:
    source = randomize(TinyNet())
    torch.save({f"net.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pth")
    model = TinyNet()
    report = load_pretrained(model, tmp_path / "w.pth", remap=OmegaConf.create({"rename": [["^net\\.", ""]]}))
    assert report.sources[0]["method"] == "rules"
    assert torch.equal(model.bn1.running_var, source.bn1.running_var)
