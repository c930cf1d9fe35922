"""``adapter=lora`` (issue 26): merged weights are base + scaling * B @ A and load with no peft; the training
state keeps the adapter apart (exact resume); the adapter alone for sharing; what makes no sense is refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, assert_one_line_errors, compose_config, make_image_folder, run_together
from finetune import builders
from finetune.checkpoint import load_model, load_training_state
from finetune.ckpt import main as ckpt_main
from finetune.errors import UserError
from finetune.optim import build_param_groups
from finetune.run import run

R, ALPHA = 4, 8.0
NO_PEFT = "import sys; sys.modules['peft'] = None  # any import of peft now raises ImportError\n"


def vit_overrides(root: Path, *, epochs: int = 2) -> list[str]:
    """timm's test_vit (random init) on 32 px images with LoRA of rank 4."""
    return ["model=vit_small_patch16_224", "model.name=test_vit", "model.pretrained=false", "data=custom",
            f"data.root={root}", "data.img_size=32", "data.batch_size=4", "data.num_workers=0",
            f"trainer.max_epochs={epochs}", "logger.progress_bar=false", "adapter=lora", f"adapter.r={R}",
            f"adapter.alpha={ALPHA}"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A finished 2-epoch LoRA run; its checkpoints dir."""
    base = tmp_path_factory.mktemp("lora")
    run(compose_config(vit_overrides(make_image_folder(base / "images"))), run_dir=base / "run")
    return base / "run" / "checkpoints"


def built(*overrides: str):
    cfg = compose_config(["model=vit_small_patch16_224", "model.name=test_vit", "model.pretrained=false",
                          "adapter=lora", f"adapter.r={R}", f"adapter.alpha={ALPHA}", *overrides])
    model, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=3)
    return cfg, model, spec


def test_the_merged_weights_are_base_plus_scaled_b_a(lora_run):
    """last.safetensors (merged) against last.ckpt (base and adapter apart), computed here by hand."""
    state = load_training_state(lora_run / "last.ckpt")["model"]
    merged = load_file(lora_run / "last.safetensors")
    plain_keys = timm.create_model("test_vit", num_classes=3).state_dict().keys()
    assert sorted(merged) == sorted(plain_keys)  # the plain model's keys, nothing of the adapter
    layers = [k.removesuffix(".lora_A.default.weight") for k in state if k.endswith(".lora_A.default.weight")]
    assert len(layers) == 24  # qkv, proj, fc1, fc2 of 6 blocks (the family's default targets)
    for layer in layers:
        a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
        assert a.shape[0] == R and b.abs().sum() > 0  # B starts at zero: it trained
        expected = state[f"{layer}.base_layer.weight"] + (ALPHA / R) * (b @ a)
        torch.testing.assert_close(merged[f"{layer}.weight"], expected, rtol=0, atol=1e-6, msg=layer)
        assert torch.equal(merged[f"{layer}.bias"], state[f"{layer}.base_layer.bias"])
    untouched = [k for k in merged if not any(k.startswith(f"{layer}.") for layer in layers)]
    assert "head.weight" in untouched and "patch_embed.proj.weight" in untouched
    for key in untouched:
        assert torch.equal(merged[key], state[key]), key


def test_the_head_trains_and_the_base_weights_stay(lora_run):
    """Between the two epochs' training states the head changed; every base weight stayed."""
    state = load_training_state(lora_run / "last.ckpt")["model"]
    first = load_training_state(lora_run / "epoch001-step000005.ckpt")["model"]
    assert not torch.equal(state["head.weight"], first["head.weight"])
    base = [k for k in state if ".base_layer." in k or k.startswith(("blocks.0.norm1", "patch_embed", "pos_embed"))]
    assert base and all(torch.equal(state[k], first[k]) for k in base)


def test_the_weights_load_in_plain_timm_and_load_model_without_peft(lora_run):
    """In a process where peft cannot be imported: timm's own model loads last.safetensors strictly, and
    load_model rebuilds it; both give the LoRA model's outputs."""
    model_state = load_training_state(lora_run / "last.ckpt")["model"]
    cfg, model, spec = built()
    builders.build_adapter(cfg, model, spec)
    model.load_state_dict(model_state)
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 32, 32)
    expected = model.eval()(inputs).detach()
    script = NO_PEFT + textwrap.dedent(f"""
        import json, sys, timm, torch
        from safetensors.torch import load_file
        from finetune import load_model
        try:
            import peft
        except ImportError:
            pass
        else:
            raise SystemExit("peft was importable")
        plain = timm.create_model("test_vit", num_classes=3)
        plain.load_state_dict(load_file({str(lora_run / 'last.safetensors')!r}))  # strict
        loaded, meta = load_model({str(lora_run / 'last.safetensors')!r})
        inputs = torch.load(sys.argv[1])
        print(json.dumps([plain.eval()(inputs).tolist(), loaded(inputs).tolist(),
                          any(m.startswith("peft") and sys.modules[m] for m in sys.modules)]))
    """)
    torch.save(inputs, lora_run.parent / "inputs.pt")
    result = subprocess.run([sys.executable, "-c", script, str(lora_run.parent / "inputs.pt")], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, loaded, peft_imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert not peft_imported
    for outputs in (plain, loaded):
        torch.testing.assert_close(torch.tensor(outputs), expected, rtol=0, atol=1e-4)


def test_the_training_state_is_refused_by_load_model_naming_the_merged_file(lora_run):
    with pytest.raises(UserError) as err:
        load_model(lora_run / "last.ckpt")
    assert "last.safetensors" in str(err.value) and "adapter=lora" in str(err.value)


def test_the_adapter_alone_is_written_and_peft_puts_it_back(lora_run, tmp_path, capsys):
    """``python -m finetune.ckpt adapter``: peft's key names and settings; with the base weights, peft's own
    loader and merge give the run's merged weights."""
    import peft

    assert ckpt_main(["adapter", str(lora_run / "last.ckpt"), str(tmp_path / "adapter.safetensors")]) == 0
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "adapter.safetensors")
    assert len(tensors) == 48 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    state = load_training_state(lora_run / "last.ckpt")["model"]
    model = timm.create_model("test_vit", num_classes=3)
    model.load_state_dict({k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k})
    config = peft.LoraConfig(r=int(meta["r"]), lora_alpha=float(meta["alpha"]),
                             target_modules=json.loads(meta["target_modules"]))
    peft.inject_adapter_in_model(config, model)
    assert not peft.set_peft_model_state_dict(model, tensors).unexpected_keys
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
    merged = load_file(lora_run / "last.safetensors")
    for key, value in merged.items():
        ours = model.state_dict()[key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
                                  if f"{key.rsplit('.', 1)[0]}.base_layer.weight" in model.state_dict() else key]
        torch.testing.assert_close(ours, value, rtol=0, atol=1e-6, msg=key)


def test_an_adapter_of_a_run_without_one_is_one_line(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")
    overrides = [o for o in vit_overrides(root, epochs=1) if not o.startswith("adapter")]
    run(compose_config(overrides), run_dir=tmp_path / "run")
    code = ckpt_main(["adapter", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "a.safetensors")])
    assert code == 2 and "holds no LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()


def test_lora_trains_its_adapters_and_the_head_only():
    cfg, model, spec = built()
    adapter = builders.build_adapter(cfg, model, spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("head.")}
    assert {"head.weight", "head.bias"} <= trainable and len(adapter.layers) == 24
    assert not any(".lora_" in n for n, p in model.named_parameters() if not p.requires_grad)


def test_a_convnext_gets_its_pointwise_layers_and_its_head_fc_trains_in_full():
    cfg, model, spec = built("model=convnext_tiny", "model.name=test_convnext")
    adapter = builders.build_adapter(cfg, model, spec)
    assert spec.classifier == "head.fc" and adapter.layers
    assert all(re.fullmatch(r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]", layer) for layer in adapter.layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.fc.weight", "head.fc.bias"} <= trainable and not any(n.endswith("base_layer.weight") for n in trainable)


def test_targets_are_regexes_of_linear_layers_outside_the_head():
    cfg, model, spec = built(r"adapter.targets=['blocks\.[45]\..*qkv',head]")  # quoted: Hydra's grammar
    adapter = builders.build_adapter(cfg, model, spec)
    assert adapter.layers == ("blocks.4.attn.qkv", "blocks.5.attn.qkv")  # 'head' is never a target


@pytest.mark.parametrize(("overrides", "expected"), [
    (["adapter.targets=[nothing_like_this]"], "match no Linear layer of 'test_vit'"),
    (["adapter.targets=['(']"], "is not a valid regular expression"),
    (["model=resnet18", "model.name=test_resnet"], "no default adapter.targets for 'test_resnet'"),
])
def test_targets_that_cannot_work_are_one_line(overrides, expected):
    cfg, model, spec = built(*overrides)
    with pytest.raises(UserError) as err:
        builders.build_adapter(cfg, model, spec)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_layer_decay_scales_each_adapter_as_its_block():
    cfg, model, spec = built()
    builders.build_adapter(cfg, model, spec)
    groups = build_param_groups(model, head="head", weight_decay=0.05, layer_decay=0.5)
    scale = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    for block in range(6):
        assert scale[f"blocks.{block}.attn.qkv.lora_A.default.weight"] == scale[f"blocks.{block}.norm1.weight"]
    assert scale["blocks.0.mlp.fc1.lora_B.default.weight"] < scale["blocks.5.mlp.fc1.lora_B.default.weight"]


def test_freeze_until_freezes_early_adapters_and_its_schedule_never_thaws_base_weights():
    cfg, model, spec = built("freeze=until", "freeze.until=blocks.2", "+freeze.schedule={1: blocks.2}",
                             "trainer.max_epochs=3")
    builders.build_adapter(cfg, model, spec)
    controller = builders.build_freeze(cfg, model, spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "blocks.2.")) for n in trainable)
    assert "blocks.3.attn.qkv.lora_A.default.weight" in trainable
    controller.unfreeze(1)
    thawed = {n for n, p in model.named_parameters() if p.requires_grad} - trainable
    assert thawed and all(n.startswith("blocks.2.") and ".lora_" in n for n in thawed)


def test_settings_that_make_no_sense_are_refused_in_one_line(tmp_path):
    root = make_image_folder(tmp_path / "images")
    lora = vit_overrides(root, epochs=1)
    plain = [o for o in lora if not o.startswith("adapter")]
    results = run_together({
        "head_only": [*lora, "freeze=head_only", f"hydra.run.dir={tmp_path / 'a'}"],
        "rank_without_lora": [*plain, "adapter.r=4", f"hydra.run.dir={tmp_path / 'b'}"],
        "rank_zero": [*lora, "adapter.r=0", f"hydra.run.dir={tmp_path / 'c'}"],
    }, module="finetune", cwd=tmp_path)
    assert_one_line_errors(results, {
        "head_only": ["freeze=head_only with adapter=lora freezes every LoRA weight", "drop adapter=lora"],
        "rank_without_lora": ["adapter.r is set but has no effect with adapter.name=none", "add adapter=lora"],
        "rank_zero": ["adapter.r must be a positive rank, got '0'"],
    })


def test_lora_without_peft_is_one_line_naming_the_extra(tmp_path):
    root = make_image_folder(tmp_path / "images")
    script = NO_PEFT + "import runpy; sys.argv[0] = 'finetune'; runpy.run_module('finetune', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", script, *vit_overrides(root, epochs=1),
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == ("error: adapter=lora needs the peft package, which is not installed: "
                                     "pip install 'finetune[lora]'")


@pytest.mark.slow
def test_killed_and_resumed_ends_bit_identical(tmp_path):
    """The real CLI, killed at random moments and resumed with resume=auto, ends with the files of the
    uninterrupted run: the adapter, the base weights, the merged weights, bit for bit."""
    from test_resume_cli import kill_and_resume

    root = make_image_folder(tmp_path / "images", train=8)  # 24 images: 6 updates per epoch
    kill_and_resume(tmp_path, vit_overrides(root, epochs=3) + ["checkpoint.every_n_steps=2", "adapter.dropout=0.1"],
                    epochs=3, updates=6, seed=5, after_save=0.6)
    ref = load_training_state(tmp_path / "ref" / "checkpoints" / "last.ckpt")["model"]
    out = load_training_state(tmp_path / "run" / "checkpoints" / "last.ckpt")["model"]
    assert any(".lora_B." in k for k in out) and out.keys() == ref.keys()
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_with_ema_the_weights_file_holds_the_merged_average():
    """trainer.ema: the EMA copy carries the adapter too, and what a weights file gets is it merged."""
    from timm.utils import ModelEmaV3

    from finetune.checkpoint import TrainingParts

    cfg, model, spec = built()
    adapter = builders.build_adapter(cfg, model, spec)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    ema.update(model)
    parts = TrainingParts(model, torch.optim.SGD(model.parameters(), lr=0.1), ema=ema, adapter=adapter)
    deployed = parts.deploy_model().state_dict()
    ema_state = ema.module.state_dict()
    a, b = ema_state["blocks.1.mlp.fc1.lora_A.default.weight"], ema_state["blocks.1.mlp.fc1.lora_B.default.weight"]
    assert b.abs().sum() > 0 and not torch.equal(b, model.state_dict()["blocks.1.mlp.fc1.lora_B.default.weight"])
    expected = ema_state["blocks.1.mlp.fc1.base_layer.weight"] + (ALPHA / R) * (b @ a)
    torch.testing.assert_close(deployed["blocks.1.mlp.fc1.weight"], expected, rtol=0, atol=1e-6)
    assert not any(".lora_" in k or ".base_layer." in k for k in deployed)
    assert any(".lora_B." in k for k in model.state_dict())  # the trained model itself stays unmerged


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same model and adapter both times
        cfg, model, spec = built(f"trainer.grad_checkpointing={str(checkpointing).lower()}")
        builders.set_grad_checkpointing(cfg.trainer, model, spec)
        builders.build_adapter(cfg, model, spec)
        assert model.grad_checkpointing == checkpointing
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_()
        torch.manual_seed(1)
        inputs, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        torch.nn.functional.cross_entropy(model.train()(inputs), target).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".lora_A." in k for k in grads[0])
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=0, atol=1e-6, msg=key)
