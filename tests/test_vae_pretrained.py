"""model=autoencoder_pretrained: the VAE of a pipeline folder, whichever class its model_index.json names, trains
with the real trainer and exports the latent normalisation its family's codec reads: held-out digits encoded
through that codec come out at std ~1 (and mean ~0 where the class has a shift) (a wrong normalisation is off by the VAE's own std, 0.2-2 here)."""

import json

import pytest
import torch

from diffusion_lab.components.pretrained import from_pretrained
from diffusion_lab.metrics.digits import real_digits
from diffusion_lab.train import train

from tests.conftest import compose_cfg


def _kl16():
    from diffusion_lab.testing.tiny import tiny_vae

    return tiny_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611)


def _qwen():
    from diffusion_lab.testing.qwen_image import tiny_qwen_vae

    return tiny_qwen_vae()


def _dc():
    from diffusion_lab.testing.sana import tiny_dc_ae

    return tiny_dc_ae()


def _flux2():
    from diffusion_lab.testing.flux2 import tiny_vae

    return tiny_vae(sample_size=16)


def _codec(vae):
    from diffusion_lab.components.vae import VAECodec
    from diffusion_lab.families.flux2 import Flux2Codec
    from diffusion_lab.families.qwen_image import QwenImageCodec
    from diffusion_lab.families.sana import DCAECodec

    name = type(vae).__name__
    if name == "AutoencoderDC":
        return DCAECodec(vae)
    codec = {"AutoencoderKLQwenImage": QwenImageCodec, "AutoencoderKLFlux2": Flux2Codec}.get(name, VAECodec)
    return codec(vae, sample_posterior=True)


@pytest.mark.parametrize("build", [_kl16, _qwen, _dc, _flux2], ids=["kl16_shift", "qwen_image", "dc_ae", "flux2"])
def test_a_pipelines_vae_trains_and_exports_its_normalisation(build, tmp_path):
    vae = build()
    name = type(vae).__name__
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", "vae": ["diffusers", name]}))
    overrides = ["experiment=vae_digits", "model=autoencoder_pretrained", f"model.vae.pretrained={tmp_path / 'pipe'}", f"stack_dir={tmp_path / 'stack'}",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=8", "model.scale_batches=8", "callbacks.model_checkpoint.every_n_train_steps=2"]
    _, objects = train(compose_cfg("train", overrides, tmp_path / "run"))
    assert type(objects["model"].vae).__name__ == name  # the class model_index.json names, not the configured AutoencoderKL
    exported = from_pretrained(f"diffusers.{name}", str(tmp_path / "stack"), subfolder="vae")
    images = real_digits("train", 16)[0][:512].repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    z = _codec(exported).encode(images)
    assert abs(z.std().item() - 1.0) < 0.1, (name, z.std().item())
    if name != "AutoencoderDC":  # DC-AE, as SD's VAE, has a scaling factor only: its latents keep their mean
        assert abs(z.mean().item()) < 0.1, (name, z.mean().item())
