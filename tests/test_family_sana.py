"""Sana on a tiny random SanaPipeline (diffusion_lab/testing/sana.py, built offline): the pipeline round-trips
through save_pretrained; the conditioner is SanaPipeline.encode_prompt (atol 0) at a fixed length the
transformer ignores through its mask; the DC-AE codec is the pipeline's encode/decode; experiment=sana_finetune_tiny
(full and LoRA) exports what plain diffusers loads and samples like the module's own sampler; the GPU recipe
runs a step on CPU; a folder of another family and the refused methods are ConfigErrors."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, SanaPipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.families.sana import DCAECodec, SanaTextConditioner
from diffusion_lab.testing import sana as tiny_sana
from diffusion_lab.train import train
from tests.conftest import compose_cfg
from tests.family_checks import assert_exported_like_the_module
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import captioned_folder, losses

PROMPT = "a handwritten digit seven"
CAPTIONS = [PROMPT, "A Handwritten digit zero  ", "a photo of a cartoon dragon with wings and a tail"]
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length (the pipeline's default is 300)
GUIDANCE = 4.5  # SanaPipeline's default classifier-free guidance
FAST = [o for o in SD_FAST if not o.startswith("experiment=")]  # experiment=sana_finetune_tiny shrunk to 4 steps
QUIET = ["callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sana.tiny_pipeline()


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    """``tiny_pipeline().save_pretrained`` (what ``python -m diffusion_lab.tiny_sd DIR --kind sana`` writes)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny_sana"
    pipe.save_pretrained(out)
    return str(out)


def sample(p, steps=2, **kw):
    g = torch.Generator().manual_seed(0)
    return p(PROMPT, num_inference_steps=steps, height=32, width=32, output_type="np", generator=g, use_resolution_binning=False, **kw).images


def test_tiny_pipeline_round_trips_offline(pipe, folder):
    """Both loaders read the folder offline (real Gemma tokenizer class, DC-AE, DPM-Solver on flow sigmas)
    and sample the same 32x32 image as the pipeline in memory."""
    want = sample(pipe)
    assert want.shape == (1, 32, 32, 3) and np.isfinite(want).all()
    for cls in (SanaPipeline, DiffusionPipeline):
        loaded = cls.from_pretrained(folder, local_files_only=True)
        assert type(loaded) is SanaPipeline and type(loaded.tokenizer).__name__ == "GemmaTokenizer"
        np.testing.assert_allclose(sample(loaded), want, atol=1e-6)
    assert pipe.tokenizer(PROMPT).input_ids == [2] + [pipe.tokenizer.convert_tokens_to_ids(t) for t in ["a", "▁handwritten", "▁digit", "▁seven"]]


@pytest.mark.parametrize("instruction", ["pipeline", None])
def test_conditioner_is_encode_prompt(pipe, instruction):
    """States and mask == ``encode_prompt`` (atol 0) at any ``max_sequence_length``, with the pipeline's default
    complex human instruction or none; "" is the pipeline's negative prompt (no instruction), alone or mixed."""
    for m in (MAX_LENGTH, 300):
        cond = SanaTextConditioner(pipe.tokenizer, pipe.text_encoder, max_sequence_length=m, complex_human_instruction=instruction)
        out = cond(CAPTIONS)
        pe, pm, ne, nm = pipe.encode_prompt(CAPTIONS, negative_prompt="", max_sequence_length=m, complex_human_instruction=cond.complex_human_instruction)
        assert out["encoder_hidden_states"].shape == (3, m, 32) and out["encoder_hidden_states"].dtype == torch.float32
        torch.testing.assert_close(out["encoder_hidden_states"], pe.float(), atol=0, rtol=0)
        assert torch.equal(out["encoder_attention_mask"], pm)
        mixed = cond(["", PROMPT])
        torch.testing.assert_close(mixed["encoder_hidden_states"][0], ne[0].float(), atol=0, rtol=0)
        torch.testing.assert_close(mixed["encoder_hidden_states"][1], pe[0].float(), atol=0, rtol=0)
        assert torch.equal(mixed["encoder_attention_mask"], torch.stack([nm[0], pm[0]]))
    assert len(SanaTextConditioner(pipe.tokenizer, pipe.text_encoder).complex_human_instruction) == 8


def test_fixed_length_states_give_the_pipelines_transformer_output(pipe):
    """The transformer on the conditioner's 32-token states + mask == on the pipeline's own 300-token states
    (what SanaPipeline.__call__ passes by default): padding is masked out (max abs diff < 1e-5)."""
    ours = SanaTextConditioner(pipe.tokenizer, pipe.text_encoder, max_sequence_length=MAX_LENGTH)(CAPTIONS)
    chi = tiny_sana.complex_human_instruction()
    pe, pm, _, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, complex_human_instruction=chi)
    assert pe.shape[1] == 300
    x, t = torch.randn(3, 32, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 500.0, 10.0])
    with torch.no_grad():
        want = pipe.transformer(x, encoder_hidden_states=pe, encoder_attention_mask=pm, timestep=t, return_dict=False)[0]
        got = pipe.transformer(x, encoder_hidden_states=ours["encoder_hidden_states"], encoder_attention_mask=ours["encoder_attention_mask"], timestep=t, return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dc_ae_codec_is_the_pipelines(pipe):
    """Deterministic latents ``E(x) * scaling_factor`` (no posterior), decoded as the pipeline decodes."""
    codec = DCAECodec(pipe.vae)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, 32, 8, 8) and codec.downsample_factor == 4 and codec.latent_channels == 32
    with torch.no_grad():
        torch.testing.assert_close(z, pipe.vae.encode(images).latent * 0.41407, atol=0, rtol=0)
        torch.testing.assert_close(codec.decode(z), pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample, atol=0, rtol=0)
    torch.testing.assert_close(codec.encode(images, sample=True), z, atol=0, rtol=0)


# ---- the family in the real configs ---------------------------------------------------------------------
def fit(out, *overrides):
    cfg = compose_cfg("train", ["experiment=sana_finetune_tiny", *FAST, *overrides], out)
    return train(cfg)[1]


def build_module(tmp_path, pretrained, *overrides):
    cfg = compose_cfg("train", ["experiment=sana_finetune_tiny", f"model.pretrained={pretrained}", *overrides], tmp_path / "composed")
    return instantiate(cfg.model)


def generate(p, steps=3):
    """The exported pipeline as a user calls it (the tiny recipe's text length; no aspect-ratio bins at 8x8 latents)."""
    g = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, height=32, width=32, output_type="np", generator=g)
    return p(PROMPT, max_sequence_length=MAX_LENGTH, use_resolution_binning=False, **kw).images


def own_sampler(objects, steps=3):
    """The module's own sampler (EMA weights, as exported), as numpy images like the pipeline's."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=GUIDANCE)
    return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def full_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, fit(out, f"model.pretrained={folder}")


def test_module_text_states_are_encode_prompt(folder, tmp_path):
    """(a) ``model=latent_sana``'s text states == ``encode_prompt`` with the pipeline's default instruction at
    the recipe's fixed length (atol 0); "" == its negative prompt; a long caption is truncated alike."""
    module = build_module(tmp_path, folder)
    pipe = SanaPipeline.from_pretrained(folder)
    prompts = [PROMPT, "a red dragon with wings and a long tail " * 12]
    with torch.no_grad():
        states = module.text_states(prompts + [""])
        pe, pm, ne, nm = pipe.encode_prompt(prompts, max_sequence_length=MAX_LENGTH, complex_human_instruction=tiny_sana.complex_human_instruction())
    assert set(states) == {"encoder_hidden_states", "encoder_attention_mask"} and states["encoder_hidden_states"].shape == (3, MAX_LENGTH, 32)
    torch.testing.assert_close(states["encoder_hidden_states"][:2], pe, rtol=0, atol=0)
    torch.testing.assert_close(states["encoder_hidden_states"][2], ne[0], rtol=0, atol=0)
    assert torch.equal(states["encoder_attention_mask"], torch.cat([pm, nm[:1]])) and pm[1].all()  # truncated: no padding left
    assert module.conditioner.frozen and not any(p.requires_grad for p in module.conditioner.parameters())


def test_full_finetune_exports_a_pipeline_plain_diffusers_loads(full_run, folder):
    """(b) 4 steps of experiment=sana_finetune_tiny: ``<run>/pipeline`` loads in ``DiffusionPipeline`` with
    Sana's DPM-Solver++ flow scheduler and samples what the module's own sampler does (atol 1e-5)."""
    out, objects = full_run
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    base = SanaPipeline.from_pretrained(folder)
    assert type(pipe) is SanaPipeline and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == base.scheduler.config.flow_shift == 3.0
    assert_exported_like_the_module(pipe, base, generate, own_sampler(objects))


def test_lora_is_written_by_save_lora_weights_and_loads_with_load_lora_weights(folder, tmp_path):
    """(c) adapter=lora: ``<run>/lora`` holds transformer LoRA weights (SanaLoraLoaderMixin has no text-encoder
    slot); ``load_lora_weights`` on the base changes its output to the module's own (atol 1e-5)."""
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", "adapter=lora", "adapter.alpha=8", "model.optimizer.lr=1e-2", *QUIET)
    assert np.isfinite(losses(out)).all() and not (out / "pipeline").exists()
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"} and any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "up.weight" in k)
    base = SanaPipeline.from_pretrained(folder)
    before = generate(base)
    base.load_lora_weights(out / "lora")
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-5)
    with pytest.raises(Exception) as excinfo:  # Gemma has no LoRA slot in SanaPipeline's loader
        build_module(tmp_path, folder, "adapter=lora", "adapter.train_text_encoder=true")
    assert "SanaLoraLoaderMixin" in str(user_error(excinfo))


def test_a_pipeline_folder_diffusers_itself_wrote_trains(tmp_path):
    """(d) ``SanaPipeline(...).save_pretrained`` with other dims and diffusers' own test layout (FlowMatchEuler
    scheduler with shift 7, 2x DC-AE of conv/interpolate blocks, 8 latent channels, Gemma width 16) trains on a
    kohya-captioned folder and exports what samples like the module."""
    gemma = tiny_sana.tiny_gemma2(hidden_size=16, num_hidden_layers=1, seed=3)
    vae = tiny_sana.tiny_dc_ae(
        seed=3, latent_channels=8, encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), downsample_block_type="conv", upsample_block_type="interpolate",
    )
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_sana.tiny_sana_transformer(sample_size=16, in_channels=8, caption_channels=16, seed=3)
    SanaPipeline(tokenizer=tiny_sana.tiny_gemma_tokenizer(), text_encoder=gemma, vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0)).save_pretrained(tmp_path / "foreign")
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={tmp_path / 'foreign'}", "trainer.max_steps=2", *QUIET, *captioned_folder(tmp_path / "kohya", "kohya"))
    module = objects["model"]
    assert np.isfinite(losses(out)).all() and module.latent_shape(1) == (1, 8, 16, 16) and module.process.scheduler.config.shift == 7.0
    np.testing.assert_allclose(generate(SanaPipeline.from_pretrained(out / "pipeline")), own_sampler(objects), atol=1e-5)


def test_gpu_lora_recipe_runs_a_step_on_the_tiny_pipeline(folder, tmp_path):
    """(e) experiment=sana_lora's settings (cache, bf16 frozen transformer and Gemma, bf16-mixed, checkpointing,
    LoRA on q/k/v) on CPU; 8-bit AdamW needs bitsandbytes + CUDA, so torch's AdamW stands in."""
    recipe = compose_cfg("train", ["experiment=sana_lora"], tmp_path / "composed")
    assert recipe.model.pretrained == "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers" and recipe.data.resolution == 1024
    assert recipe.model.optimizer._target_ == "diffusion_lab.components.optim.adamw_8bit" and recipe.text_encoder.max_sequence_length == 300
    cfg = compose_cfg("train", ["experiment=sana_lora", f"model.pretrained={folder}", "model.local_files_only=true", *captioned_folder(tmp_path / "images", "imagefolder"),
                                "optimizer@model.optimizer=adamw", "model.optimizer.lr=1e-4", "trainer=cpu", "debug=fast", "logger=csv", *QUIET], tmp_path / "run")
    assert cfg.adapter.rank == 4 and cfg.model.cache and cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for p in module.conditioner.text_encoder.parameters()} == {torch.bfloat16}
    assert type(objects["datamodule"].train_set).__name__ == "CachedLatentDataset"
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "run" / "text_cache" / "train_set.rank0" / "encoder_attention_mask.bin").exists()


def test_another_familys_folder_and_refused_methods_are_config_errors(folder, tmp_path):
    """(f) a FLUX folder for model=latent_sana names what it is and the option that trains it; textual inversion
    is refused with the reason (ControlNet is not); resolutions the pipeline refuses are refused before training."""
    from diffusion_lab.testing import tiny

    flux = tiny.build(tmp_path / "tiny_flux", kind="flux")
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, str(flux))
    message = str(user_error(excinfo))
    assert f"model.pretrained='{flux}' is a FluxPipeline" in message and "use model=latent_flux" in message and "--kind sana" in message
    family = instantiate(compose_cfg("train", ["model=latent_sana"], tmp_path / "c").model.family)
    assert "Gemma" in family.supports("textual_inversion") and family.supports("controlnet") is None and family.supports("lora") is None
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, folder, "data.resolution=48")
    assert "data.resolution=48 is not divisible by 32" in str(user_error(excinfo))


@pytest.mark.slow
def test_cache_gives_the_same_loss_curve_in_ram_and_on_disk(folder, tmp_path):
    """Cached DC-AE latents and Gemma states + masks (int64 kept), in RAM or memory-mapped, give the losses of no
    cache exactly: the DC-AE is deterministic, and "" (caption dropout 0.5) is cached as the negative prompt."""
    quiet = [*QUIET, "callbacks.ema=null", "trainer.max_steps=3", "model.caption_dropout=0.5", f"model.pretrained={folder}"]
    quiet += captioned_folder(tmp_path / "images", "imagefolder")
    curves, disk = {}, tmp_path / "text_cache"
    for cache, extra in (("none", ["model.cache=false"]), ("ram", ["model.cache=true"]), ("disk", ["model.cache=true", f"model.cache_text_dir={disk}"])):
        objects = fit(tmp_path / f"cache_{cache}", *quiet, *extra)
        curves[cache] = losses(tmp_path / f"cache_{cache}")
    example = objects["datamodule"].train_set[0]
    assert set(example) == {"latent_moments", "caption", "encoder_hidden_states", "encoder_attention_mask"} and example["encoder_attention_mask"].dtype == torch.int64
    assert len(curves["none"]) == 3 and curves["ram"] == curves["none"] and curves["disk"] == curves["ram"]


@pytest.mark.slow
def test_gemma_fine_tuned_in_full_is_exported(folder, tmp_path):
    """text_encoder.trainable=true (with gradient checkpointing): Gemma 2 trains and ``<run>/pipeline`` holds it."""
    out = tmp_path / "run"
    fit(out, f"model.pretrained={folder}", "text_encoder.trainable=true", "model.gradient_checkpointing=true", "trainer.max_steps=2", *QUIET)
    pipe, base = SanaPipeline.from_pretrained(out / "pipeline"), SanaPipeline.from_pretrained(folder)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), base.text_encoder.parameters()))


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_trains_sana(folder, tmp_path):
    """DreamBooth is a method, not a family: experiment=dreambooth_tiny on model=latent_sana generates its class
    images with the Sana base (module sampler), trains with the prior loss and exports a SanaPipeline."""
    out = tmp_path / "run"
    cfg = compose_cfg("train", [
        "experiment=dreambooth_tiny", "model=latent_sana", f"model.pretrained={folder}",
        f"text_encoder.max_sequence_length={MAX_LENGTH}", "trainer.max_steps=3", "trainer.log_every_n_steps=1", "data.num_class_images=4", "data.max_instances=4",
        "data.batch_size=4", *QUIET], out)
    objects = train(cfg)[1]
    assert objects["model"].hparams.prior_loss_weight == 1.0 and len(list((out / "class_images").glob("*.png"))) == 4
    assert np.isfinite(losses(out)).all() and type(SanaPipeline.from_pretrained(out / "pipeline").transformer).__name__ == "SanaTransformer2DModel"
