"""The EMA callback: ``device=cpu`` keeps the numbers of the default, ``foreach`` too, and with
``adapter=lora`` the EMA follows the LoRA weights only and is what the LoRA export holds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import EMACallback, ema_parameters, ema_weights
from diffusion_lab.testing import tiny
from diffusion_lab.components.adapters import lora_state_dict
from diffusion_lab.inference.checkpoints import load_module
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import TINY, compose_cfg


class SecondEMA(EMACallback):
    """A second EMA in the same run (its own checkpoint key), to compare settings on one trajectory."""

    @property
    def state_key(self) -> str:
        return "ema_second"


QUIET = ["callbacks.sample_grid=null", "callbacks.noising_strip=null", "trainer.max_steps=6", "trainer.val_check_interval=6", "callbacks.model_checkpoint.every_n_train_steps=6"]


def _second(**kw) -> list[str]:
    base = ["+callbacks.second._target_=tests.test_ema.SecondEMA", "+callbacks.second.decay=0.9", "+callbacks.second.use_ema_warmup=false"]
    return base + [f"+callbacks.second.{k}={v}" for k, v in kw.items()]


def _emas(objects) -> tuple[EMACallback, EMACallback]:
    cbs = objects["trainer"].callbacks
    return next(c for c in cbs if type(c) is EMACallback), next(c for c in cbs if type(c) is SecondEMA)


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
def test_ema_on_cpu_keeps_the_numbers_of_the_default(accelerator, tmp_path):
    """Two EMAs of one training run, the default one beside the weights and one with
    device=cpu (and foreach): the same numbers; the cpu one lives in host memory. On a GPU the
    cpu EMA is updated from copies of the weights (``ema_step``)."""
    overrides = [*TINY, *QUIET, f"trainer.accelerator={accelerator}", "callbacks.ema.decay=0.9", "callbacks.ema.use_ema_warmup=false"]
    cfg = compose_cfg("train", overrides + _second(device="cpu", foreach="true"), tmp_path / "run")
    _, objects = train(cfg)
    default, on_cpu = _emas(objects)
    assert on_cpu.device == "cpu" and all(s.device.type == "cpu" for s in on_cpu.ema.shadow_params)
    assert all(s.device == p.device for s, p in zip(default.ema.shadow_params, ema_parameters(objects["model"])))
    assert default.ema.optimization_step == on_cpu.ema.optimization_step == 6
    for a, b in zip(default.ema.shadow_params, on_cpu.ema.shadow_params):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)
    raw = ema_parameters(objects["model"])
    assert any(not torch.allclose(s, p.detach().cpu()) for s, p in zip(on_cpu.ema.shadow_params, raw))  # an average, not a copy
    # the checkpoint holds the EMA, and resuming puts it back where device= says
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for a, b in zip(saved["callbacks"]["ema_second"]["shadow_params"], on_cpu.ema.shadow_params):
        torch.testing.assert_close(a.cpu(), b)


def test_ema_device_is_checked():
    with pytest.raises(ConfigError, match="callbacks.ema.device"):
        EMACallback(device="cuda:1")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    pipeline = tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sd")
    out = tmp_path_factory.mktemp("lora_ema") / "run"
    cfg = compose_cfg("train", [
        "experiment=sd_finetune_tiny", f"model.pretrained={pipeline}", "adapter=lora", "adapter.train_text_encoder=true",
        "model.optimizer.lr=1e-2", "trainer.max_steps=5", "trainer.val_check_interval=5", "trainer.limit_val_batches=1",
        "data.batch_size=4", "model.preview_steps=2", "callbacks.sample_grid=null", "callbacks.noising_strip=null",
        "callbacks.model_checkpoint.every_n_train_steps=5", "callbacks.ema.decay=0.5", "callbacks.ema.use_ema_warmup=false",
        "callbacks.ema.device=cpu",
    ], out)
    _, objects = train(cfg)
    return out, objects


def test_lora_ema_follows_the_lora_weights_only(lora_run):
    _, objects = lora_run
    module = objects["model"]
    ema = next(c for c in objects["trainer"].callbacks if type(c) is EMACallback)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any(n.startswith("backbone.") for n in names) and any(n.startswith("conditioner.") for n in names)  # UNet and text encoder LoRA
    assert len(ema.ema.shadow_params) == len(names)
    assert sum(s.numel() for s in ema.ema.shadow_params) < 0.2 * sum(p.numel() for p in module.parameters())
    # it changed with training (LoRA B starts at zero) and is an average, not the last weights
    lora_b = [s for n, s in zip(names, ema.ema.shadow_params) if "lora_B" in n]
    assert all(s.abs().max() > 0 for s in lora_b)
    assert any(not torch.allclose(s, p.detach().cpu()) for s, p in zip(ema.ema.shadow_params, ema_parameters(module)))


def test_lora_export_and_checkpoint_hold_the_ema_weights(lora_run):
    out, objects = lora_run
    module = objects["model"]
    exported = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    def lora(m):  # copies: lora_state_dict's tensors are the live parameters
        return {k: v.detach().clone() for k, v in lora_state_dict(m).items()}

    raw_unet, raw_text = lora(module.base_backbone), lora(module.conditioner.encoders[0])
    with ema_weights(objects["trainer"], module):
        ema_unet, ema_text = lora(module.base_backbone), lora(module.conditioner.encoders[0])
    for prefix, ema_sd, raw_sd in (("unet.", ema_unet, raw_unet), ("text_encoder.", ema_text, raw_text)):
        assert all(torch.equal(exported[prefix + k], v.cpu()) for k, v in ema_sd.items()), prefix
        assert any(not torch.equal(exported[prefix + k], v.cpu()) for k, v in raw_sd.items()), prefix
    # load_module(use_ema=True) puts the same EMA LoRA weights back
    rebuilt = load_module(str(out / "checkpoints" / "last.ckpt"), use_ema=True)
    assert all(torch.equal(lora_state_dict(rebuilt.base_backbone)[k], v.cpu()) for k, v in ema_unet.items())
    assert all(torch.equal(lora_state_dict(rebuilt.conditioner.encoders[0])[k], v.cpu()) for k, v in ema_text.items())
