"""SDXL base training on a tiny random SDXL pipeline (the real configs, shrunk): the dual text
conditioner against diffusers' own encode_prompt, full and LoRA fits, exports reloaded in plain
diffusers and compared with the module's own sampler, caching, time ids, config errors."""

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.testing import tiny
from diffusion_lab.components.checks import check_sdxl_parts
from diffusion_lab.data.caching import cache_latents
from diffusion_lab.sample import run as run_sample
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import captioned_folder, losses

# experiment=sdxl_finetune_tiny, shrunk to 4 steps as the SD 1.x tests shrink theirs
FAST = ["experiment=sdxl_finetune_tiny", *(o for o in SD_FAST if not o.startswith("experiment="))]
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sdxl", kind="sdxl"))


def fit(out, *overrides):
    cfg = compose_cfg("train", FAST + list(overrides), out)
    _, objects = train(cfg)
    return objects


def generate(pipe, steps=3):
    """Guidance 3 with no negative prompt: the unconditional half is zeros (force_zeros_for_empty_prompt)."""
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32, output_type="np", generator=g).images


def own_sampler(objects, steps=3):
    """The module's own sampler (EMA weights, as exported), as a pipeline's numpy images."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=3.0)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


def build_module(tmp_path, tiny_sdxl, *overrides):
    return instantiate(compose_cfg("train", ["model=latent_sdxl", f"model.pretrained={tiny_sdxl}", "data=digits_captioned", *overrides], tmp_path).model)


@pytest.fixture(scope="module")
def full_run(tiny_sdxl, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, fit(out, f"model.pretrained={tiny_sdxl}")


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    objects = fit(
        out,
        f"model.pretrained={tiny_sdxl}",
        "adapter=lora",
        "adapter.alpha=8",  # alpha != rank: the export must carry the scale
        "adapter.train_text_encoder=true",  # a LoRA on both text encoders
        "adapter.export_fused=true",
        "model.optimizer.lr=1e-2",
    )
    return out, objects


def test_dual_conditioner_matches_the_sdxl_pipeline_encode_prompt(tiny_sdxl, tmp_path):
    conditioner = instantiate(compose_cfg("train", ["model=latent_sdxl", f"model.pretrained={tiny_sdxl}"], tmp_path).text_encoder)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    prompts = [PROMPT, "", "a red dragon with wings and a long tail " * 12]  # the last one is truncated to 77 tokens
    with torch.no_grad():
        states, pooled = conditioner(prompts)
        expected_states, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert states.shape == (3, 77, 64) and pooled.shape == (3, 32)
    torch.testing.assert_close(states, expected_states, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)
    assert conditioner.frozen and conditioner.hidden_size == pipe.unet.config.cross_attention_dim


def test_full_finetune_exports_an_sdxl_pipeline_plain_diffusers_loads(full_run, tiny_sdxl):
    out, objects = full_run
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    assert (out / "samples" / "step_000004.png").exists()
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters()))
    for name in ("text_encoder", "text_encoder_2", "vae"):  # frozen parts exported unchanged
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).parameters(), getattr(base, name).parameters()))
    assert pipe.config.force_zeros_for_empty_prompt
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert np.abs(image - generate(base)).max() > 1e-3
    # the export samples like the module's own sampler: same text states, time ids and guidance
    np.testing.assert_allclose(image, own_sampler(objects), atol=1e-4)


def test_lora_on_unet_and_both_text_encoders_loads_in_diffusers(lora_run, tiny_sdxl):
    out, objects = lora_run
    module = objects["model"]
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[1] for n in trainable if n.startswith("conditioner.")} == {"text_encoder", "text_encoder_2"}
    lora_dir = out / "lora"
    assert not (out / "pipeline").exists()
    weights = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    # B ("up") starts at zero: the LoRA of the UNet and of both encoders trained
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert any(v.abs().max() > 0 for k, v in weights.items() if k.startswith(part + ".") and k.endswith("up.weight")), part
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = generate(base)
    base.load_lora_weights(lora_dir)
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-4)
    # the fused pipeline is the base with the same LoRA merged in
    np.testing.assert_allclose(generate(StableDiffusionXLPipeline.from_pretrained(lora_dir / "fused")), with_lora, atol=1e-4)


def test_sample_from_an_sdxl_checkpoint(full_run, tmp_path):
    out, _ = full_run
    cfg = compose_cfg("sample", ["device=cpu", "num_inference_steps=2", "num_images=1", "batch_size=1", "height=32", "width=32",
                                 f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"prompt={PROMPT}"], tmp_path / "s")
    assert run_sample(cfg).exists() and (tmp_path / "s" / "000000.png").exists()


def test_cache_gives_the_same_loss_curve(tiny_sdxl, tmp_path):
    """Center crops, no flips: cached posteriors and cached (hidden, pooled) states give the same losses."""
    quiet = ["callbacks.sample_grid=null", "callbacks.ema=null", "trainer.max_steps=3", "model.caption_dropout=0.5", f"model.pretrained={tiny_sdxl}"]
    quiet += captioned_folder(tmp_path / "images", "imagefolder")
    curves = {}
    for cache in (False, True):
        out = tmp_path / f"cache_{cache}"
        objects = fit(out, *quiet, f"model.cache={cache}")
        curves[cache] = losses(out)
        train_set = objects["datamodule"].train_set
        assert type(train_set).__name__ == ("CachedLatentDataset" if cache else "Subset")
    # the folder records each image's size and crop (SDXL's time ids): the cache carries them along
    assert set(train_set[0]) == {"latent_moments", "caption", "encoder_hidden_states", "text_embeds", "original_size", "crop_top_left"}
    assert len(curves[True]) == 3
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-4)


def time_ids(module, n, batch=None):
    """The SDXL family's time ids of a training batch (``families/sdxl.py``)."""
    return module.family.conditioning(module, batch or {}, n, sampling=False)["time_ids"]


def test_time_ids_default_to_the_resolution_follow_the_data_and_reach_the_unet(tiny_sdxl, tmp_path):
    module = build_module(tmp_path, tiny_sdxl).eval()
    assert time_ids(module, 2).tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    recorded = {"original_size": torch.tensor([[40, 48], [32, 32]]), "crop_top_left": torch.tensor([[4, 8], [0, 0]])}
    assert time_ids(module, 2, recorded).tolist() == [[40.0, 48.0, 4.0, 8.0, 32.0, 32.0], [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    # the cache carries what the data recorded
    items = [{"pixel_values": torch.rand(3, 32, 32) * 2 - 1, "caption": PROMPT, **{k: v[i] for k, v in recorded.items()}} for i in range(2)]
    cached = cache_latents(items, module.codec.moments, module.text_states, "cpu", batch_size=2, keep=module.cached_batch_keys)
    torch.testing.assert_close(torch.stack([cached[i]["crop_top_left"] for i in range(2)]), recorded["crop_top_left"])
    # time ids and pooled embedding reach the UNet (added_cond_kwargs)
    cond = module.conditioning({"caption": [PROMPT] * 2, "pixel_values": torch.zeros(2, 3, 32, 32)}, train=False)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
    with torch.no_grad():
        out = module.denoise(x, t, **cond)
        assert not torch.allclose(out, module.denoise(x, t, **{**cond, "time_ids": time_ids(module, 2, recorded)}))
        assert not torch.allclose(out, module.denoise(x, t, **{**cond, "text_embeds": torch.zeros_like(cond["text_embeds"])}))
    assert module.family.force_zeros_for_empty_prompt and "conditioner" not in module.hparams


def test_an_sd1_folder_or_unet_is_a_config_error(tiny_sdxl, tmp_path):
    sd1 = tiny.build(tmp_path / "tiny_sd")
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, str(sd1))
    message = str(user_error(excinfo))
    assert f"model.pretrained='{sd1}'" in message and "text_encoder_2/" in message and re.search(r"model=latent_sd\b", message)
    # an SD UNet (no added text/time conditioning) with SDXL's text encoders
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, tiny_sdxl, "backbone=sd_tiny", "backbone.cross_attention_dim=64")
    message = str(user_error(excinfo))
    assert "backbone has addition_embed_type=None" in message and "6 time ids" in message and re.search(r"model=latent_sd\b", message)
    # the SDXL refiner's UNet: 5 time ids (aesthetic score) x 8 + pooled 32 = 72, not 6 x 8 + 32 = 80
    refiner = tiny.tiny_sdxl_pipeline(refiner=True).unet
    with pytest.raises(ConfigError, match=r"projection_class_embeddings_input_dim=72.*\(8\) = 80"):
        check_sdxl_parts(refiner, build_module(tmp_path, tiny_sdxl).conditioner)


def test_sdxl_lora_recipe_runs_fast_dev_run_with_the_tiny_pipeline(tiny_sdxl, tmp_path):
    """The GPU recipe's settings (cache, bf16 frozen UNet and encoders, bf16-mixed, checkpointing, LoRA) on CPU."""
    quiet = ["callbacks.progress_bar=null", "callbacks.noising_strip=null", "callbacks.sample_grid=null"]
    cfg = compose_cfg("train", ["experiment=sdxl_lora", f"model.pretrained={tiny_sdxl}", *captioned_folder(tmp_path / "images", "imagefolder"),
                                "trainer=cpu", "debug=fast", "logger=csv", *quiet], tmp_path / "run")
    assert cfg.adapter.rank == 16 and cfg.model.cache and cfg.trainer.precision == "bf16-mixed" and cfg.model.optimizer.lr == 1e-4
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for p in module.conditioner.text_encoder_2.parameters()} == {torch.bfloat16}
    assert type(objects["datamodule"].train_set).__name__ == "CachedLatentDataset"
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
