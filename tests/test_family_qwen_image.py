"""Qwen-Image on a tiny random QwenImagePipeline (diffusion_lab/testing/qwen_image.py): the offline tokenizer
and the pipeline's own save/load, the conditioner against the pipeline's encode_prompt, fixed padding + mask
against the pipeline's unpadded states, the codec against the pipeline's VAE arithmetic, full and LoRA fits
whose exports plain diffusers loads and samples like the module, a folder of another family, the GPU recipe."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.families.qwen_image import (
    DROP_IDX,
    PROMPT_TEMPLATE,
    QwenImage,
    pack,
    unpack,
)
from diffusion_lab.testing import qwen_image as tiny_qwen
from diffusion_lab.train import train
from tests.conftest import compose_cfg
from tests.family_checks import assert_exported_like_the_module
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import captioned_folder, losses

PROMPT = "a handwritten digit seven"
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length: the pipeline is called with it
FAST = [o for o in SD_FAST if not o.startswith("experiment=")]
QUIET = ["callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny pipeline written by QwenImagePipeline's own save_pretrained (``tiny_sd --kind qwen_image``)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_qwen_image"
    tiny_qwen.tiny_pipeline().save_pretrained(path)
    return str(path)


def fit(out, *overrides):
    cfg = compose_cfg("train", ["experiment=qwen_image_finetune_tiny", *FAST, *overrides], out)
    return train(cfg)[1]


def build_module(tmp_path, pretrained, *overrides):
    cfg = compose_cfg("train", ["model=latent_qwen_image", f"model.pretrained={pretrained}", "data=digits_captioned", "data.resolution=32", *overrides], tmp_path)
    return instantiate(cfg.model)


def generate(pipe, steps=3, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, height=32, width=32, output_type="np", generator=g, max_sequence_length=MAX_LENGTH, **kw).images


def own_sampler(objects, steps=3, guidance_scale=1.0):
    """The module's own sampler (EMA weights, as exported), as the pipeline's numpy images."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=guidance_scale)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def full_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, fit(out, f"model.pretrained={folder}")


@pytest.fixture(scope="module")
def lora_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, fit(out, f"model.pretrained={folder}", "adapter=lora", "model.optimizer.lr=1e-2")  # 4 steps: a visible change


# ---- the tiny pipeline, offline --------------------------------------------------------------------------
def test_tiny_pipeline_round_trips_offline_with_a_real_qwen_tokenizer(folder):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(f"{folder}/tokenizer")
    ids = tok(PROMPT_TEMPLATE.format(PROMPT)).input_ids
    # every template word is one learned token: the system prefix is DROP_IDX = 34 tokens, as QwenImagePipeline assumes
    assert tok.convert_ids_to_tokens(ids)[DROP_IDX - 1 : DROP_IDX + 4] == ["Ċ", "a", "Ġhandwritten", "Ġdigit", "Ġseven"]
    assert tok.decode(ids) == PROMPT_TEMPLATE.format(PROMPT) and tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]
    for cls in (QwenImagePipeline, DiffusionPipeline):
        pipe = cls.from_pretrained(folder, local_files_only=True)
        assert type(pipe) is QwenImagePipeline and pipe.prompt_template_encode == PROMPT_TEMPLATE and pipe.prompt_template_encode_start_idx == DROP_IDX
        image = generate(pipe, steps=2)
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    size = sum(f.stat().st_size for f in __import__("pathlib").Path(folder).rglob("*") if f.is_file())
    assert size < 4e6  # a few MB


# ---- conditioner, padding, codec: the pipeline's own arithmetic -------------------------------------------
def test_conditioner_matches_the_pipeline_encode_prompt(folder, tmp_path):
    module = build_module(tmp_path, folder, f"text_encoder.max_sequence_length={MAX_LENGTH}")
    pipe = QwenImagePipeline.from_pretrained(folder)
    prompts = [PROMPT, "", "a red dragon with wings and a long tail " * 6]  # the last is cut at 32 tokens
    with torch.no_grad():
        states = module.text_states(prompts)
        expected, mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=MAX_LENGTH)
    assert states["encoder_hidden_states"].shape == (3, MAX_LENGTH, 32) and states["encoder_hidden_states_mask"].shape == (3, MAX_LENGTH)
    lengths = mask.sum(1).tolist()
    assert lengths == [4 + 5, 5, MAX_LENGTH] and states["encoder_hidden_states_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):  # the pipeline's states on its own (batch-longest) padding, exactly; zeros after
        torch.testing.assert_close(states["encoder_hidden_states"][i, :n], expected[i, :n], rtol=0, atol=0)
        assert n == MAX_LENGTH or states["encoder_hidden_states"][i, n:].abs().max() == 0
    # one caption alone gives the same states as in a longer batch (the causal encoder never attends to the padding;
    # float32 matmuls over other shapes round differently: atol 1e-6)
    torch.testing.assert_close(module.text_states([PROMPT])["encoder_hidden_states"][0], states["encoder_hidden_states"][0], rtol=0, atol=1e-6)
    assert module.conditioner.frozen and not any(p.requires_grad for p in module.conditioner.parameters())


def test_fixed_padding_and_mask_give_the_pipeline_transformer_output(folder, tmp_path):
    """The transformer on states padded to max_sequence_length with the mask == on each caption's unpadded states
    (what the pipeline passes for one prompt: mask None when all ones); tolerance 1e-6 (float32 reductions over
    different lengths)."""
    module = build_module(tmp_path, folder, f"text_encoder.max_sequence_length={MAX_LENGTH}")
    pipe = QwenImagePipeline.from_pretrained(folder)
    prompts = [PROMPT, "", "a small blue bird"]
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 500.0, 100.0])
    with torch.no_grad():
        padded = module.denoise(x, t, **module.text_states(prompts))
        for i, prompt in enumerate(prompts):
            states, mask = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=MAX_LENGTH)
            assert mask is None  # one prompt: all ones, the pipeline drops it
            out = pipe.transformer(hidden_states=pack(x[i : i + 1]), timestep=t[i : i + 1] / 1000, encoder_hidden_states=states, encoder_hidden_states_mask=None, img_shapes=[[(1, 4, 4)]]).sample
            torch.testing.assert_close(padded[i : i + 1], unpack(out, 8, 8), rtol=0, atol=1e-6)


def test_codec_is_the_pipeline_vae_arithmetic_on_one_frame(folder, tmp_path):
    module = build_module(tmp_path, folder)
    codec, vae = module.codec, QwenImagePipeline.from_pretrained(folder).vae
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(images, sample=False)
    mean, std = (torch.tensor(vae.config[k]).view(1, 4, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():
        expected = (vae.encode(images[:, :, None]).latent_dist.mode() - mean) / std  # QwenImageEditPipeline._encode_vae_image
        decoded = vae.decode(expected / (1.0 / std) + mean).sample[:, :, 0]  # QwenImagePipeline.__call__'s decode
    assert z.shape == (2, 4, 8, 8) and codec.downsample_factor == 4 and codec.latent_channels == 4
    torch.testing.assert_close(z, expected[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(z), decoded, rtol=0, atol=0)


def test_guide_is_the_pipeline_true_cfg_with_norm_rescale():
    """``QwenImage.guide`` on unpacked predictions == ``__call__``'s combination on packed tokens."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c, u = pack(cond), pack(uncond)
    comb = u + 4.0 * (c - u)
    expected = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    torch.testing.assert_close(QwenImage().guide(cond, uncond, 4.0), unpack(expected, 8, 8), rtol=0, atol=0)


# ---- full fine-tune and LoRA: exports in plain diffusers ---------------------------------------------------
def test_full_finetune_exports_a_pipeline_plain_diffusers_loads(full_run, folder):
    """The tiny folder (written by QwenImagePipeline.save_pretrained) fine-tunes; the export loads in plain
    diffusers and samples like the module's own sampler (same seed, no guidance; tolerance 1e-5)."""
    out, objects = full_run
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    assert (out / "samples" / "step_000004.png").exists()
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    base = QwenImagePipeline.from_pretrained(folder)
    assert type(pipe) is QwenImagePipeline and dict(pipe.scheduler.config) == dict(base.scheduler.config)
    assert_exported_like_the_module(pipe, base, generate, own_sampler(objects))


def test_lora_changes_the_output_and_loads_with_load_lora_weights(lora_run, folder):
    out, objects = lora_run
    module = objects["model"]
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("backbone.") for n in trainable)
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"} and not (out / "pipeline").exists()
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "up.weight" in k)  # B starts at zero: it trained
    base = QwenImagePipeline.from_pretrained(folder)
    before = generate(base)
    base.load_lora_weights(out / "lora")
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-5)


def test_a_text_encoder_lora_is_refused_naming_the_key(folder, tmp_path):
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, folder, "adapter=lora", "adapter.train_text_encoder=true")
    assert "adapter.train_text_encoder=true" in str(user_error(excinfo)) and "QwenImageLoraLoaderMixin" in str(user_error(excinfo))


# ---- wrong family, other process --------------------------------------------------------------------------
def test_a_folder_of_another_family_is_a_config_error_naming_it(folder, tmp_path):
    from diffusion_lab.testing import tiny

    flux = tiny.build(tmp_path / "tiny_flux", kind="flux")
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, str(flux))
    message = str(user_error(excinfo))
    assert f"model.pretrained='{flux}' is a FluxPipeline folder" in message and "model=latent_qwen_image trains a QwenImagePipeline" in message
    assert re.search(r"use model=latent_flux\b", message) and "--kind qwen_image" in message and "\n" not in message
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, folder, "process=vp")
    assert "process=vp cannot be used with model=latent_qwen_image" in str(user_error(excinfo))


def test_backbone_from_its_own_config_is_the_saved_one(folder, tmp_path):
    module = build_module(tmp_path, folder, "backbone=qwen_image_tiny")
    saved = QwenImagePipeline.from_pretrained(folder).transformer
    layout = lambda m: json.loads(json.dumps({k: v for k, v in m.config.items() if not k.startswith("_")}))
    assert layout(module.base_backbone) == layout(saved)
    assert all(torch.equal(a, b) for a, b in zip(module.base_backbone.parameters(), saved.parameters()))


def test_a_pipeline_folder_diffusers_itself_wrote_with_the_real_vae_layout(tmp_path):
    """QwenImagePipeline.save_pretrained of other dims than the tiny recipe's: the real VAE layout (16 channels
    with Qwen-Image's latent statistics, 8x down-sampling: 4 levels) and a 16-wide Qwen2.5-VL; trains from a kohya
    folder and samples like its export."""
    tokenizer = tiny_qwen.tiny_qwen_tokenizer()
    QwenImagePipeline(
        transformer=tiny_qwen.tiny_qwen_transformer(z_dim=16, joint_attention_dim=16, seed=3),
        scheduler=tiny_qwen.qwen_scheduler(),
        vae=tiny_qwen.tiny_qwen_vae(z_dim=16, dim_mult=(1, 2, 4, 4), seed=3),
        text_encoder=tiny_qwen.tiny_qwen_text_encoder(tokenizer, hidden_size=16, seed=3),
        tokenizer=tokenizer,
    ).save_pretrained(tmp_path / "foreign")
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={tmp_path / 'foreign'}", "trainer.max_steps=2", *QUIET, *captioned_folder(tmp_path / "kohya", "kohya"))
    assert np.isfinite(losses(out)).all() and objects["model"].latent_shape(1) == (1, 16, 4, 4)
    np.testing.assert_allclose(generate(QwenImagePipeline.from_pretrained(out / "pipeline")), own_sampler(objects), atol=1e-5)


@pytest.mark.slow
def test_dreambooth_trains_qwen_image_with_its_own_class_images(folder, tmp_path):
    """DreamBooth (model.prior_loss_weight) is a method of any family: class images from Qwen-Image's own sampler,
    instance + prior losses, a QwenImagePipeline export."""
    fast = ["trainer.max_steps=2", *QUIET, "data.num_class_images=2", "data.max_instances=2", "data.batch_size=4", "data.class_steps=2"]
    overrides = ["experiment=dreambooth_tiny", "model=latent_qwen_image", f"model.pretrained={folder}", f"text_encoder.max_sequence_length={MAX_LENGTH}", f"data.class_dir={tmp_path / 'class'}", *fast]
    _, objects = train(compose_cfg("train", overrides, tmp_path / "run"))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert {"train/instance_loss", "train/prior_loss"} <= set(objects["trainer"].callback_metrics)
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")) is QwenImagePipeline


# ---- the GPU recipe, one step on CPU ----------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_lora_recipe_runs_a_step_on_the_tiny_pipeline(folder, tmp_path):
    """experiment=qwen_image_lora's settings (cache, bf16 frozen transformer and encoder, bf16-mixed, checkpointing,
    LoRA) on CPU; 8-bit AdamW needs bitsandbytes + CUDA, so torch's AdamW stands in."""
    recipe = compose_cfg("train", ["experiment=qwen_image_lora"], tmp_path / "composed")
    assert recipe.model.pretrained == "Qwen/Qwen-Image" and recipe.data.resolution == 1024
    assert recipe.model.optimizer._target_ == "diffusion_lab.components.optim.adamw_8bit"
    cfg = compose_cfg("train", ["experiment=qwen_image_lora", f"model.pretrained={folder}", "model.local_files_only=true", *captioned_folder(tmp_path / "images", "imagefolder"),
                                "optimizer@model.optimizer=adamw", "trainer=cpu", "debug=fast", "logger=csv", "data.resolution=32", *QUIET], tmp_path / "run")
    assert cfg.model.cache and cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for p in module.conditioner.text_encoder.parameters()} == {torch.bfloat16}
    assert type(objects["datamodule"].train_set).__name__ == "CachedLatentDataset"
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "run" / "text_cache" / "train_set.rank0" / "encoder_hidden_states_mask.bin").exists()


def test_the_module_guides_as_the_pipeline_does(full_run):
    """Previews use the family's guide: the module at guidance 4 samples what QwenImagePipeline's true CFG 4
    against "" does (norm-rescaled per token), not plain classifier-free guidance."""
    from diffusers import DiffusionPipeline

    out, objects = full_run
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    np.testing.assert_allclose(generate(pipe, negative_prompt="", true_cfg_scale=4.0), own_sampler(objects, guidance_scale=4.0), atol=1e-5)
