"""Pure remapping: wrappers, prefixes, rules, presets, structural alignment."""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.weights.remap import align_by_structure, apply_rules, remap_keys, strip_wrappers

TARGET = {"conv.weight": (8, 3, 3, 3), "bn.weight": (8,), "bn.bias": (8,), "fc.weight": (4, 8), "fc.bias": (4,)}


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module."])
def test_ddp_and_compile_wrappers_are_stripped_in_any_order(wrapper: str) -> None:
    result = remap_keys({f"{wrapper}{k}": s for k, s in TARGET.items()}, TARGET)
    assert result.mapping == {f"{wrapper}{k}": k for k in TARGET}
    assert result.stripped == {wrapper: len(TARGET)}


def test_orig_mod_inside_a_name_is_stripped() -> None:
    assert strip_wrappers("model._orig_mod.backbone.fc.weight") == ("model.backbone.fc.weight", "_orig_mod.")


@pytest.mark.parametrize("prefix", ["model.", "backbone.", "encoder.", "model.backbone.", "model.module.backbone."])
def test_fit_prefixes_are_stripped_only_where_keys_then_fit(prefix: str) -> None:
    source = {f"{prefix}{k}": s for k, s in TARGET.items()} | {"model.head_aux.weight": (2, 2)}
    result = remap_keys(source, TARGET)
    assert set(result.mapping.values()) == set(TARGET)
    assert "model.head_aux.weight" not in result.mapping


def test_real_names_that_look_like_wrappers_are_kept() -> None:
    target = {"model.conv.weight": (2,), "conv.weight": (3,)}
    result = remap_keys({"model.conv.weight": (2,), "conv.weight": (3,)}, target)
    assert result.mapping == {"model.conv.weight": "model.conv.weight", "conv.weight": "conv.weight"}


def test_rules_select_strip_rename_drop_add() -> None:
    rules = {"select": "net", "strip_prefix": ["features."], "rename": [[r"^norm\.", "bn."]], "drop": [r"^aux\."], "add_prefix": ""}
    source = {"net.features.conv.weight": (8, 3, 3, 3), "net.norm.weight": (8,), "net.aux.w": (1,), "other.x": (1,)}
    result = remap_keys(source, TARGET, rules)
    assert result.mapping == {"net.features.conv.weight": "conv.weight", "net.norm.weight": "bn.weight"}
    assert result.dropped == ["net.aux.w", "other.x"]
    assert apply_rules("a.b", {"add_prefix": "x."}) == "x.a.b"


def test_rules_landing_two_sources_on_one_target_fail() -> None:
    with pytest.raises(UserError, match="'a.weight' and 'b.weight' both map to 'fc.weight'"):
        remap_keys({"a.weight": (4, 8), "b.weight": (4, 8)}, TARGET, {"rename": [[r"^[ab]\.", "fc."]]})


def test_bad_rules_and_unknown_remap_are_named() -> None:
    with pytest.raises(UserError, match=r"unknown remap rule\(s\) \['renmae'\]"):
        remap_keys({}, TARGET, {"renmae": []})
    with pytest.raises(UserError, match="remap rule regex '\\(' is invalid"):
        remap_keys({"a": (1,)}, TARGET, {"rename": [["(", "x"]]})
    with pytest.raises(UserError, match="unknown model.remap 'lukemelas'.*efficientnet_pytorch"):
        remap_keys({}, TARGET, "lukemelas")


def test_none_uses_names_as_they_are() -> None:
    assert remap_keys({"module.fc.weight": (4, 8), "fc.bias": (4,)}, TARGET, "none").mapping == {"fc.bias": "fc.bias"}


def test_auto_detects_the_efficientnet_pytorch_convention() -> None:
    target = {"blocks.0.0.conv_dw.weight": (4, 1, 3, 3), "conv_stem.weight": (4, 3, 3, 3)}
    result = remap_keys({"module._blocks.0._depthwise_conv.weight": (4, 1, 3, 3), "_conv_stem.weight": (4, 3, 3, 3)}, target)
    assert result.method == "efficientnet_pytorch"
    assert result.mapping["module._blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"


def test_alignment_by_order_and_shape() -> None:
    source = {"f.0.weight": (8, 3, 3, 3), "f.1.weight": (8,), "f.1.bias": (8,), "h.weight": (1000, 8), "h.bias": (1000,)}
    assert align_by_structure(source, TARGET, heads=["fc"]) == dict(zip(source, TARGET))


def test_alignment_allows_reshape_and_first_conv_channels() -> None:
    source = {"stem.weight": (8, 3, 3, 3), "scale.gamma": (8, 1, 1)}
    target = {"conv.weight": (8, 1, 3, 3), "block.gamma": (8,)}
    assert align_by_structure(source, target, first_conv="conv") == dict(zip(source, target))


def test_alignment_refuses_ambiguity() -> None:
    source = {"a.weight": (8,), "b.weight": (8,), "c.weight": (8,)}
    target = {"x.weight": (8,), "y.weight": (8,)}
    with pytest.raises(UserError, match="ambiguous"):
        align_by_structure(source, target)


def test_alignment_that_does_not_fit_places_nothing() -> None:
    assert align_by_structure({"a.weight": (3,)}, {"x.weight": (4,)}) == {}
