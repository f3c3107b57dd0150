"""Chroma on a tiny random ChromaPipeline (diffusion_lab/testing/chroma.py): the offline folder round trip,
the conditioner against ChromaPipeline.encode_prompt, the family's backbone call against the pipeline's, full
and LoRA fits whose exports plain diffusers loads and samples like the module, the GPU recipe for a step on
CPU, and a folder of another family."""

import re

import numpy as np
import pytest
import torch
from diffusers import ChromaPipeline, DiffusionPipeline
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.testing import tiny
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.families.chroma import Chroma, ChromaTextConditioner
from diffusion_lab.testing import chroma
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.family_checks import assert_exported_like_the_module
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import captioned_folder, losses

PROMPT = "a handwritten digit seven"
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length: the pipeline is called with it
GUIDANCE = 3.0  # real classifier-free guidance against "" (ChromaPipeline's negative prompt default)
FAST = [o for o in SD_FAST if not o.startswith("experiment=")]  # experiment=chroma_finetune_tiny, 4 steps
QUIET = ["callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``python -m diffusion_lab.tiny_sd DIR --kind chroma``: the pipeline's own save_pretrained."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_chroma"
    chroma.tiny_pipeline(32).save_pretrained(path)
    return str(path)


def generate(pipe, steps=2, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=32, width=32, output_type="np", generator=g, max_sequence_length=MAX_LENGTH, **kw).images


def test_tiny_pipeline_round_trips_offline(folder):
    size = sum(p.stat().st_size for p in __import__("pathlib").Path(folder).rglob("*") if p.is_file())
    assert size < 4e6
    a, b = ChromaPipeline.from_pretrained(folder, local_files_only=True), DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(b) is ChromaPipeline and type(a.tokenizer).__name__.startswith("T5Tokenizer")
    image = generate(a)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, generate(b))


def test_conditioner_is_encode_prompt_and_the_backbone_call_is_the_pipeline_s(folder):
    """States and mask at atol 0 (the pipeline pads to max_sequence_length too); Chroma.forward == the
    transformer call of ChromaPipeline.__call__ (mask extended over the image tokens) at atol 0."""
    pipe = ChromaPipeline.from_pretrained(folder)
    conditioner = ChromaTextConditioner(pipe.tokenizer, pipe.text_encoder, max_sequence_length=MAX_LENGTH)
    family = Chroma()
    prompts = [PROMPT, "", "a red dragon with wings and a long tail " * 12]  # the last is truncated to 32 tokens
    with torch.no_grad():
        states = family.text_states(conditioner, prompts)
        embeds, text_ids, mask, *_ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH)
    assert set(states) == set(family.text_keys) and states["encoder_hidden_states"].shape == (3, MAX_LENGTH, 64)
    torch.testing.assert_close(states["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(states["attention_mask"], mask, rtol=0, atol=0)
    n_tokens = pipe.tokenizer(prompts[0]).input_ids.__len__()  # caption + </s>
    assert states["attention_mask"][0].sum() == n_tokens + 1 and states["attention_mask"][2].sum() == MAX_LENGTH  # + one padding token
    assert conditioner.frozen and not any(p.requires_grad for p in conditioner.parameters())

    x = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 500.0, 100.0])
    with torch.no_grad():
        ours = family.forward(pipe.transformer, x, t, **states)
        tokens = pipe._pack_latents(x, 3, 16, 16, 16)
        image_ids = pipe._prepare_latent_image_ids(3, 8, 8, "cpu", torch.float32)
        full_mask = pipe._prepare_attention_mask(3, tokens.shape[1], torch.float32, mask)
        theirs = pipe.transformer(hidden_states=tokens, timestep=t / 1000, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, attention_mask=full_mask, return_dict=False)[0]
    torch.testing.assert_close(ours, pipe._unpack_latents(theirs, 32, 32, pipe.vae_scale_factor), rtol=0, atol=0)


def test_parts_check_names_the_keys(folder):
    pipe = ChromaPipeline.from_pretrained(folder)
    conditioner = ChromaTextConditioner(pipe.tokenizer, pipe.text_encoder, max_sequence_length=MAX_LENGTH)
    Chroma().check_parts(pipe.transformer, VAECodec(pipe.vae), conditioner, 32, 3)
    with pytest.raises(ConfigError, match=r"data.resolution=34 is not divisible by 4"):
        Chroma().check_parts(pipe.transformer, VAECodec(pipe.vae), conditioner, 34, 3)
    wide = chroma.tiny_transformer(joint_attention_dim=96)
    with pytest.raises(ConfigError, match=r"backbone.joint_attention_dim=96.* does not match the text_encoder states width 64"):
        Chroma().check_parts(wide, VAECodec(pipe.vae), conditioner, 32, 3)


# ---- training: exports in plain diffusers -----------------------------------------------------------
def fit(out, *overrides):
    cfg = compose_cfg("train", ["experiment=chroma_finetune_tiny", *FAST, *overrides], out)
    _, objects = train(cfg)
    return objects


def own_sampler(objects, steps=2):
    """The module's own sampler (EMA weights, as exported), as a pipeline's numpy images."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=GUIDANCE)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


def test_full_finetune_exports_a_pipeline_plain_diffusers_loads(folder, tmp_path):
    """The folder is the pipeline's own save_pretrained; 4 steps; the export samples like the module's
    sampler (same T5 states and mask, schedule shifted per size, CFG against "") to atol 1e-5."""
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}")
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4 and (out / "samples" / "step_000004.png").exists()
    pipe, base = DiffusionPipeline.from_pretrained(out / "pipeline"), ChromaPipeline.from_pretrained(folder)
    assert type(pipe) is ChromaPipeline and dict(pipe.scheduler.config) == dict(base.scheduler.config)
    assert_exported_like_the_module(pipe, base, generate, own_sampler(objects))


def test_lora_changes_the_output_and_loads_with_load_lora_weights(folder, tmp_path):
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", "adapter=lora", "adapter.export_fused=true")
    module = objects["model"]
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("backbone.") for n in trainable)
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"} and not (out / "pipeline").exists()
    base = ChromaPipeline.from_pretrained(folder)
    before = generate(base)
    base.load_lora_weights(out / "lora")
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-5)
    np.testing.assert_allclose(generate(ChromaPipeline.from_pretrained(out / "lora" / "fused")), with_lora, atol=1e-5)


def test_gpu_lora_recipe_runs_a_step_on_the_tiny_pipeline(folder, tmp_path):
    """experiment=chroma_lora's settings (cache, bf16 frozen transformer and T5, bf16-mixed, checkpointing,
    LoRA) on CPU; 8-bit AdamW needs bitsandbytes + CUDA, so torch's AdamW stands in."""
    recipe = compose_cfg("train", ["experiment=chroma_lora"], tmp_path / "composed")
    assert recipe.model.pretrained == "lodestones/Chroma1-HD" and recipe.data.resolution == 1024 and recipe.text_encoder.max_sequence_length == 512
    assert recipe.model.optimizer._target_ == "diffusion_lab.components.optim.adamw_8bit" and recipe.callbacks.sample_grid.guidance_scale == 5.0
    cfg = compose_cfg("train", ["experiment=chroma_lora", f"model.pretrained={folder}", "model.local_files_only=true", *captioned_folder(tmp_path / "images", "imagefolder"),
                                "optimizer@model.optimizer=adamw", "model.optimizer.lr=1e-4", "trainer=cpu", "debug=fast", "logger=csv", *QUIET], tmp_path / "run")
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for p in module.conditioner.text_encoder.parameters()} == {torch.bfloat16}
    assert type(objects["datamodule"].train_set).__name__ == "CachedLatentDataset"
    assert set(objects["datamodule"].train_set[0]) >= {"encoder_hidden_states", "attention_mask"}  # the mask is cached with the states
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_a_folder_of_another_family_is_a_config_error_naming_it(tmp_path):
    flux = tiny.build(tmp_path / "tiny_flux", kind="flux")
    cfg = compose_cfg("train", ["model=latent_chroma", f"model.pretrained={flux}", "data=digits_captioned", "data.resolution=32"], tmp_path)
    with pytest.raises(Exception) as excinfo:
        __import__("hydra.utils").utils.instantiate(cfg.model)
    message = str(user_error(excinfo))
    assert f"model.pretrained='{flux}' is a FluxPipeline folder" in message and "model=latent_chroma trains a ChromaPipeline" in message
    assert "use model=latent_flux" in message and "--kind chroma" in message


@pytest.mark.parametrize("method", ["adapter.train_text_encoder=true", "controlnet=from_backbone"])
def test_methods_chroma_cannot_take_are_refused(method, folder, tmp_path):
    extra = ["adapter=lora"] if method.startswith("adapter") else []
    cfg = compose_cfg("train", ["experiment=chroma_finetune_tiny", f"model.pretrained={folder}", *extra, method], tmp_path)
    with pytest.raises(Exception) as excinfo:
        __import__("hydra.utils").utils.instantiate(cfg.model)
    expected = r"with model=latent_chroma: the text encoder is T5" if extra else r"cannot be used with model=latent_chroma: diffusers \S+ has no ControlNet pipeline for ChromaPipeline"
    assert re.search(expected, str(user_error(excinfo)))


@pytest.mark.slow
def test_a_pipeline_folder_with_other_dims_trains(tmp_path):
    """A ChromaPipeline saved by diffusers' save_pretrained with other tiny dims (4 latent channels, VAE factor 4,
    a 16-channel transformer): 2 steps, the export samples like the module (atol 1e-5)."""
    vae = tiny.tiny_vae(latent_channels=4, block_out_channels=(16, 16, 32), seed=3, scaling_factor=0.5, shift_factor=0.1)
    pipe = chroma.tiny_pipeline()
    ChromaPipeline(**{**pipe.components, "vae": vae, "transformer": chroma.tiny_transformer(in_channels=16, seed=3)}).save_pretrained(tmp_path / "foreign")
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={tmp_path / 'foreign'}", "trainer.max_steps=2", *QUIET)
    assert np.isfinite(losses(out)).all() and objects["model"].latent_shape(1) == (1, 4, 8, 8)
    np.testing.assert_allclose(generate(ChromaPipeline.from_pretrained(out / "pipeline")), own_sampler(objects), atol=1e-5)
