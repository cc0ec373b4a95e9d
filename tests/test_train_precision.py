"""``train.precision=auto`` and the CPU's bf16 path: auto picks bf16 only where the hardware
multiplies bf16 natively; the towers' eager attention computes what the fused kernel does;
the trainer attends eagerly only inside its own encode (an evaluation afterwards is unchanged)."""

from __future__ import annotations

import pytest
import torch

from tests.test_train_scale_options import PairSet, batch, collate, small_config, tiny_dual_encoder
from topoclip.devices import native_bf16, resolve_precision
from topoclip.engine import ContrastiveTask, TrainingSettings
from topoclip.engine.trainer import Trainer
from topoclip.recipes.common import build_loss


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, amx, avx512_bf16, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) == (want == "bf16")
    assert resolve_precision("auto", cpu) == want
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_eager_attention_equals_the_fused_kernel(tmp_path):
    model = tiny_dual_encoder(small_config(tmp_path))
    images, ids, mask = batch(0)
    with torch.no_grad():
        fused = model(images, ids, mask)
        model.image.set_eager_attention(True)
        model.text.set_eager_attention(True)
        eager = model(images, ids, mask)
    assert not model.image.model.blocks[0].attn.fused_attn
    assert model.text.model.config._attn_implementation == "eager"
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    model.image.set_eager_attention(False)
    assert model.image.model.blocks[0].attn.fused_attn


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_bf16_cpu_step_attends_eagerly_only_while_it_encodes(tmp_path, checkpointing):
    cfg = small_config(tmp_path, "train.precision=bf16", f"train.grad_checkpointing={str(checkpointing).lower()}")
    model = tiny_dual_encoder(cfg)
    seen = []
    model.image.model.blocks[0].attn.register_forward_hook(lambda module, *a: seen.append(module.fused_attn))
    trainer = Trainer(ContrastiveTask(model, build_loss(cfg, model.topology)), PairSet(), collate,
                      TrainingSettings.of(cfg), tmp_path, device="cpu")
    images, ids, mask = batch(1)
    metrics = trainer.train_step({"images": images, "input_ids": ids, "attention_mask": mask})
    assert trainer.precision == "bf16" and torch.isfinite(torch.tensor(metrics["loss"]))
    assert seen and not any(seen)  # eager in the step's forward (and its recomputation)
    # Outside the step the towers are as built, unless checkpointing's recomputation needs them eager.
    assert model.image.model.blocks[0].attn.fused_attn is (not checkpointing)
