"""FLUX.2 [klein] (``model=latent_flux2``) on a tiny random ``Flux2KleinPipeline`` built offline: the
conditioner, codec and backbone call against the pipeline's own ``encode_prompt`` / ``_encode_vae_image`` /
transformer call, a fine-tune whose export plain diffusers loads and samples like the module, LoRA files
``load_lora_weights`` reads, a folder diffusers itself wrote, the GPU recipe run for a step on CPU, and a
folder of another family refused."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.components.mmdit import check_family
from diffusion_lab.families.flux2 import Flux2, Flux2Codec, Flux2TextConditioner
from diffusion_lab.testing import flux2 as tiny
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import captioned_folder, losses

PROMPTS = ["a handwritten digit seven", "", "a red dog with a big tail on a white background " * 4]
PROMPT = PROMPTS[0]
MAX_LENGTH = 32  # experiment=flux2_finetune_tiny's text_encoder.max_sequence_length: the pipeline is called with it
GUIDANCE = 4.0  # klein base: classifier-free guidance, neg + s (pos - neg) in the pipeline and in the shared sampler
# experiment=flux2_finetune_tiny shrunk to 4 steps as the SD tests shrink theirs, quiet
FAST = [o for o in SD_FAST if not o.startswith("experiment=")]
QUIET = ["callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``python -m diffusion_lab.tiny_sd DIR --kind flux2``: ``tiny_pipeline().save_pretrained(DIR)``."""
    out = tmp_path_factory.mktemp("tiny") / "tiny_flux2"
    tiny.tiny_pipeline(32, seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pipe(folder):
    return Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)


def sample(pipe, steps=2, **kw):
    return pipe(prompt="a handwritten digit seven", height=32, width=32, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


# ---- phase 1: the tiny pipeline and the parts, against the pipeline's own code ------------------------
def test_tiny_pipeline_round_trips_offline_and_samples(folder, pipe):
    """The folder is a few MB, loads in plain diffusers offline (both entry points) with the real tokenizer
    class and Qwen3's chat format, and samples 32x32 with the pipeline's default call."""
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 3e6, size
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    generic = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(generic) is Flux2KleinPipeline and type(generic.tokenizer).__name__ == "Qwen2Tokenizer"
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert pipe.tokenizer.tokenize("a handwritten digit seven") == ["a", "Ġhandwritten", "Ġdigit", "Ġseven"]  # one token per word
    images = sample(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, sample(generic))


def test_conditioner_is_exactly_encode_prompt_at_a_fixed_length(pipe):
    """atol 0 against ``Flux2KleinPipeline.encode_prompt``; every caption is padded to ``max_sequence_length``
    (the pipeline pads to it too, and its transformer takes no text mask), so one caption encoded alone
    equals its row of a batch and cond/uncond states concatenate as they are."""
    cond = Flux2TextConditioner(pipe.tokenizer, pipe.text_encoder, max_sequence_length=64)
    states = cond(PROMPTS)
    assert set(states) == {"encoder_hidden_states"} and states["encoder_hidden_states"].shape == (3, 64, 48)
    assert cond.hidden_size == pipe.transformer.config.joint_attention_dim and cond.frozen
    ref, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=64)
    torch.testing.assert_close(states["encoder_hidden_states"], ref, atol=0, rtol=0)
    torch.testing.assert_close(cond(PROMPTS[:1])["encoder_hidden_states"], ref[:1], atol=1e-6, rtol=0)
    assert text_ids.shape == (3, 64, 4)
    default = Flux2TextConditioner(pipe.tokenizer, pipe.text_encoder)  # the pipeline's defaults: 512 tokens, layers 9, 18, 27
    torch.testing.assert_close(default(PROMPTS[:2])["encoder_hidden_states"], pipe.encode_prompt(PROMPTS[:2])[0], atol=0, rtol=0)


def test_conditioner_checks_layers_and_chat_template(pipe):
    from diffusion_lab.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"text_encoder.out_layers=\[9, 18, 40\] are not hidden states of a 27-layer"):
        Flux2TextConditioner(pipe.tokenizer, pipe.text_encoder, out_layers=(9, 18, 40))


def test_backbone_call_and_codec_are_the_pipeline_s(pipe):
    """``Flux2.forward`` on [N, C, h, w] == the pipeline's transformer call on packed tokens with its ids,
    unpacked with ``_unpack_latents_with_ids`` (atol 0); the codec's latents == ``_encode_vae_image`` (atol 0)
    and its decode == the pipeline's last lines (BN de-normalise, unpatchify, decode)."""
    family, codec = Flux2(), Flux2Codec(pipe.vae)
    states, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=32)
    x, t = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([990.0, 500.0, 7.0])
    ids = pipe._prepare_latent_ids(x)
    ref = pipe.transformer(hidden_states=pipe._pack_latents(x), timestep=t / 1000, guidance=None, encoder_hidden_states=states, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    torch.testing.assert_close(family.forward(pipe.transformer, x, t, states), pipe._unpack_latents_with_ids(ref, ids, 8, 8), atol=0, rtol=0)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, codec.latent_channels, 8, 8) and codec.downsample_factor == 4 and not codec.sample_posterior
    torch.testing.assert_close(z, pipe._encode_vae_image(images, generator=None), atol=0, rtol=0)
    bn = pipe.vae.bn
    raw = pipe._unpatchify_latents(z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps) + bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(codec.decode(z), pipe.vae.decode(raw).sample, atol=0, rtol=0)


# ---- phase 2: training through model=latent_flux2 ------------------------------------------------------
def fit(out, *overrides):
    cfg = compose_cfg("train", ["experiment=flux2_finetune_tiny", *FAST, *QUIET, *overrides], out)
    _, objects = train(cfg)
    return objects


def generate(pipe, steps=3, guidance=GUIDANCE):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, output_type="np", generator=g, max_sequence_length=MAX_LENGTH).images


def own_sampler(objects, steps=3, guidance=GUIDANCE):
    """The module's own sampler (EMA weights, as exported), as a pipeline's numpy images."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=guidance)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 captioned digits in a diffusers imagefolder (``metadata.jsonl``)."""
    return captioned_folder(tmp_path_factory.mktemp("data") / "images", "imagefolder")


def test_full_finetune_of_the_saved_folder_exports_a_pipeline_plain_diffusers_samples_like_the_module(folder, images, tmp_path):
    """``experiment=flux2_finetune_tiny`` (4 steps) on the folder ``save_pretrained`` wrote: the export loads in
    plain diffusers and gives the module's own images for the same seed (atol 1e-5; measured 8e-7 with CFG:
    the module batches cond/uncond, the pipeline runs them apart); frozen parts exported unchanged."""
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", *images)
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    assert type(objects["model"].codec) is Flux2Codec and objects["model"].latent_shape(1) == (1, 16, 8, 8)
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    pipe, base = DiffusionPipeline.from_pretrained(out / "pipeline"), Flux2KleinPipeline.from_pretrained(folder)
    assert type(pipe) is Flux2KleinPipeline and dict(pipe.scheduler.config) == dict(base.scheduler.config)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), base.transformer.parameters()))
    for name in ("text_encoder", "vae"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).parameters(), getattr(base, name).parameters())), name
    torch.testing.assert_close(pipe.vae.bn.running_var, base.vae.bn.running_var, atol=0, rtol=0)
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.abs(image - generate(base)).max() > 1e-3
    np.testing.assert_allclose(image, own_sampler(objects), atol=1e-5)
    np.testing.assert_allclose(generate(pipe, guidance=1.0), own_sampler(objects, guidance=1.0), atol=1e-6)  # no CFG


def test_lora_writes_files_load_lora_weights_reads_and_they_change_the_output(folder, images, tmp_path):
    """``adapter=lora`` (alpha != rank) with the GPU recipe's targets: ``Flux2KleinPipeline.save_lora_weights`` files
    that the base's ``load_lora_weights`` reads; the output changes and matches the module's sampler (atol 1e-5)."""
    recipe = compose_cfg("train", ["experiment=flux2_lora"], tmp_path / "composed")
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", *images, "adapter=lora", "adapter.alpha=8", "model.optimizer.lr=1e-2",
                  f"adapter.target_modules=[{','.join(recipe.adapter.target_modules)}]")
    trainable = [n for n, p in objects["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("backbone.") for n in trainable)
    assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj" in n for n in trainable) and any("single_transformer_blocks.0.attn.to_out" in n for n in trainable)
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"} and not (out / "pipeline").exists()
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    base = Flux2KleinPipeline.from_pretrained(folder)
    before = generate(base)
    base.load_lora_weights(out / "lora")
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-5)


def test_gpu_recipe_composes_and_runs_a_step_on_the_tiny_folder(folder, images, tmp_path):
    """experiment=flux2_lora's settings (hub id, 1024 px, cache on disk, bf16 frozen transformer and Qwen3,
    bf16-mixed, checkpointing, LoRA, 512 tokens) on CPU for one step; 8-bit AdamW needs bitsandbytes + CUDA,
    so torch's AdamW stands in."""
    recipe = compose_cfg("train", ["experiment=flux2_lora"], tmp_path / "composed")
    assert recipe.model.pretrained == "black-forest-labs/FLUX.2-klein-base-4B" and recipe.data.resolution == 1024
    assert recipe.model.optimizer._target_ == "diffusion_lab.components.optim.adamw_8bit" and recipe.text_encoder.max_sequence_length == 512
    assert list(recipe.text_encoder.out_layers) == [9, 18, 27] and recipe.callbacks.sample_grid.guidance_scale == 4.0
    cfg = compose_cfg("train", ["experiment=flux2_lora", f"model.pretrained={folder}", "model.local_files_only=true", *images,
                                "optimizer@model.optimizer=adamw", "model.optimizer.lr=1e-4", "trainer=cpu", "debug=fast", "logger=csv", *QUIET], tmp_path / "run")
    assert cfg.model.cache and cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for p in module.conditioner.text_encoder.parameters()} == {torch.bfloat16}
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "run" / "text_cache" / "train_set.rank0" / "encoder_hidden_states.bin").exists()


def build_module(tmp_path, pretrained, *overrides):
    cfg = compose_cfg("train", ["model=latent_flux2", f"model.pretrained={pretrained}", "data=digits_captioned", "data.resolution=32", *overrides], tmp_path)
    return instantiate(cfg.model)


def test_a_folder_of_another_family_and_unsupported_methods_are_config_errors(folder, tmp_path):
    """A FLUX.1 folder given to model=latent_flux2 names its class and the option that trains it; FLUX.2 [dev]
    is named as not covered; a text-encoder LoRA and a resolution off the 2x2-patch grid are refused by key."""
    from diffusion_lab.testing import tiny_mmdit as tiny_flux1

    flux1 = tmp_path / "tiny_flux"
    tiny_flux1.tiny_flux_pipeline().save_pretrained(flux1)
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path / "a", flux1)
    message = str(user_error(excinfo))
    assert f"model.pretrained='{flux1}' is a FluxPipeline folder" in message and "model=latent_flux2 trains a Flux2KleinPipeline" in message
    assert "use model=latent_flux " in message and "--kind flux2" in message and "\n" not in message
    dev = tmp_path / "flux2_dev"
    dev.mkdir()
    (dev / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    with pytest.raises(ConfigError, match=r"is a Flux2Pipeline folder \(FLUX.2 \[dev\]: a Mistral text encoder, not covered"):
        check_family(str(dev), "latent_flux2")
    with pytest.raises(Exception, match=r"adapter.train_text_encoder=true with model=latent_flux2: Flux2LoraLoaderMixin loads LoRA weights into the transformer only"):
        build_module(tmp_path / "b", folder, "adapter=lora", "adapter.train_text_encoder=true")
    with pytest.raises(Exception, match=r"data.resolution=34 is not divisible by 4 = vae down-sampling 2 x 2x2 patches; use e.g. data.resolution=32"):
        build_module(tmp_path / "c", folder, "data.resolution=34")


@pytest.mark.slow
def test_a_distilled_folder_with_other_dims_trains_and_exports_without_cfg(images, tmp_path):
    """A step-distilled klein saved by diffusers' own ``save_pretrained`` with other dims (8 VAE latent channels,
    VAE factor 4: 32 patchified channels, 2x2 tokens of 16 px): every size is read from the folder, and with
    ``model.family.is_distilled=true`` the export says so and both samplers skip CFG (guidance_scale ignored)."""
    vae = tiny.tiny_vae(latent_channels=8, block_out_channels=(16, 16, 32), seed=3)
    pipe = tiny.tiny_pipeline(is_distilled=True)
    pipe = Flux2KleinPipeline(**{**pipe.components, "vae": vae, "transformer": tiny.tiny_transformer(in_channels=32, seed=3)}, is_distilled=True)
    pipe.save_pretrained(tmp_path / "distilled")
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={tmp_path / 'distilled'}", "model.family.is_distilled=true", *images)
    assert np.isfinite(losses(out)).all() and objects["model"].latent_shape(1) == (1, 32, 4, 4)
    exported = Flux2KleinPipeline.from_pretrained(out / "pipeline")
    assert exported.config.is_distilled
    np.testing.assert_allclose(generate(exported), own_sampler(objects), atol=1e-6)
    np.testing.assert_allclose(generate(exported), generate(exported, guidance=1.0), atol=0)
