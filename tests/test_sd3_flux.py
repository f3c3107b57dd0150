"""SD3 and Flux training on tiny random pipelines (the real configs, shrunk): the conditioners against
the pipelines' own encode_prompt, full and LoRA fits, exports reloaded in plain diffusers and compared
with the module's own sampler, caching, wrong-family folders, pipeline folders diffusers itself wrote,
and the GPU recipes run for a step on CPU."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.testing import tiny, tiny_mmdit
from diffusion_lab.components.mmdit import load_flow_scheduler
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import captioned_folder, losses

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPT = "a handwritten digit seven"
MAX_LENGTH = 32  # the tiny recipes' text_encoder.max_sequence_length: the pipelines are called with it
GUIDANCE = 3.0  # SD3: classifier-free guidance; Flux: the embedded (distilled) guidance

# experiment=<family>_finetune_tiny, shrunk to 4 steps as the SD tests shrink theirs
FAST = [o for o in SD_FAST if not o.startswith("experiment=")]
QUIET = ["callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random SD3 and Flux pipeline folders (``python -m diffusion_lab.tiny_sd DIR --kind sd3|flux``)."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(tiny.build(root / f"tiny_{kind}", kind=kind)) for kind in PIPELINES}


def fit(out, kind, *overrides):
    cfg = compose_cfg("train", [f"experiment={kind}_finetune_tiny", *FAST, *overrides], out)
    _, objects = train(cfg)
    return objects


def generate(pipe, steps=3, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=32, width=32, output_type="np", generator=g, max_sequence_length=MAX_LENGTH, **kw).images


def own_sampler(objects, steps=3):
    """The module's own sampler (EMA weights, as exported), as a pipeline's numpy images."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=GUIDANCE)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


def build_module(tmp_path, kind, pretrained, *overrides):
    cfg = compose_cfg("train", [f"model=latent_{kind}", f"model.pretrained={pretrained}", "data=digits_captioned", "data.resolution=32", *overrides], tmp_path)
    return instantiate(cfg.model)


@pytest.fixture(scope="module")
def full_runs(folders, tmp_path_factory):
    runs = {}
    for kind in PIPELINES:
        out = tmp_path_factory.mktemp(f"full_{kind}") / "run"
        runs[kind] = out, fit(out, kind, f"model.pretrained={folders[kind]}")
    return runs


@pytest.fixture(scope="module")
def lora_runs(folders, tmp_path_factory):
    runs = {}
    for kind in PIPELINES:
        out = tmp_path_factory.mktemp(f"lora_{kind}") / "run"
        runs[kind] = out, fit(
            out,
            kind,
            f"model.pretrained={folders[kind]}",
            "adapter=lora",
            "adapter.alpha=8",  # alpha != rank: the export must carry the scale
            "adapter.train_text_encoder=true",  # a LoRA on the CLIP encoder(s) too
            "adapter.export_fused=true",
            "model.optimizer.lr=1e-2",
        )
    return runs


# ---- conditioning: exactly the pipelines' encode_prompt -------------------------------------------
@pytest.mark.parametrize("kind", PIPELINES)
def test_conditioner_matches_the_pipeline_encode_prompt(kind, folders, tmp_path):
    module = build_module(tmp_path, kind, folders[kind], f"text_encoder.max_sequence_length={MAX_LENGTH}")
    pipe = PIPELINES[kind].from_pretrained(folders[kind])
    prompts = [PROMPT, "", "a red dragon with wings and a long tail " * 12]  # the last is truncated (CLIP 77, T5 32 tokens)
    with torch.no_grad():
        states = module.text_states(prompts)
        if kind == "sd3":
            expected, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH)
            assert states["encoder_hidden_states"].shape == (3, 77 + MAX_LENGTH, 96) and states["pooled_projections"].shape == (3, 64)
            # the CLIP states (32 + 32) are zero-padded to T5's 96
            assert states["encoder_hidden_states"][:, :77, 64:].abs().max() == 0
        else:
            expected, pooled, _ = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=MAX_LENGTH)
            assert states["encoder_hidden_states"].shape == (3, MAX_LENGTH, 64) and states["pooled_projections"].shape == (3, 32)
    torch.testing.assert_close(states["encoder_hidden_states"], expected, rtol=0, atol=0)
    torch.testing.assert_close(states["pooled_projections"], pooled, rtol=0, atol=0)
    assert module.conditioner.frozen and not any(p.requires_grad for p in module.conditioner.parameters())


def test_sd3_without_t5_conditions_on_zeros_as_the_pipeline_does(folders, tmp_path):
    module = build_module(tmp_path, "sd3", folders["sd3"], "text_encoder=sd3_no_t5", f"text_encoder.max_sequence_length={MAX_LENGTH}")
    assert module.conditioner.text_encoder_3 is None and len(module.conditioner.encoders) == 2
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3"], text_encoder_3=None, tokenizer_3=None)  # diffusers' SD3 docs
    with torch.no_grad():
        states = module.text_states([PROMPT])
        expected, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH)
    torch.testing.assert_close(states["encoder_hidden_states"], expected, rtol=0, atol=0)
    assert states["encoder_hidden_states"][:, 77:].abs().max() == 0  # zeros [1, 32, joint_attention_dim = 96] for T5
    torch.testing.assert_close(states["pooled_projections"], pooled, rtol=0, atol=0)


@pytest.mark.parametrize("kind", PIPELINES)
def test_backbone_from_its_own_config_and_process_checks(kind, folders, tmp_path):
    """backbone=<kind>_tiny builds the folder's transformer from its own config (the factory the
    folder was saved from); a process other than flow matching is a ConfigError naming both keys."""
    module = build_module(tmp_path, kind, folders[kind], f"backbone={kind}_tiny")
    saved = PIPELINES[kind].from_pretrained(folders[kind]).transformer
    layout = lambda m: json.loads(json.dumps({k: v for k, v in m.config.items() if not k.startswith("_")}))  # noqa: E731 (tuples as lists)
    assert layout(module.base_backbone) == layout(saved)
    assert all(torch.equal(a, b) for a, b in zip(module.base_backbone.parameters(), saved.parameters()))  # the same seeded factory
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, kind, folders[kind], "process=vp")
    assert f"process=vp cannot be used with model=latent_{kind}" in str(user_error(excinfo))


def test_t5_tokenizer_is_a_real_offline_t5_tokenizer(folders):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(f"{folders['flux']}/tokenizer_2")
    ids = tok([PROMPT, "Zebra!"], padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert all(len(i) == MAX_LENGTH for i in ids) and ids[0][ids[0].index(1) + 1 :] == [0] * (MAX_LENGTH - ids[0].index(1) - 1)
    assert tok.unk_token_id not in ids[0] and tok.decode(ids[0], skip_special_tokens=True) == PROMPT  # learned pieces, round trip
    assert len(tok.tokenize("handwritten")) < len("handwritten")  # merged pieces, not characters


# ---- full fine-tune and LoRA: exports in plain diffusers -------------------------------------------
@pytest.mark.parametrize("kind", PIPELINES)
def test_full_finetune_exports_a_pipeline_plain_diffusers_loads(kind, full_runs, folders):
    out, objects = full_runs[kind]
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    assert (out / "samples" / "step_000004.png").exists()
    pipe = PIPELINES[kind].from_pretrained(out / "pipeline")
    base = PIPELINES[kind].from_pretrained(folders[kind])
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and dict(pipe.scheduler.config) == dict(base.scheduler.config)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), base.transformer.parameters()))
    encoders = ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if kind == "sd3" else ())
    for name in (*encoders, "vae"):  # frozen parts exported unchanged
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).parameters(), getattr(base, name).parameters())), name
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert np.abs(image - generate(base)).max() > 1e-3
    # the export samples like the module's own sampler: same text states, schedule (Flux: shifted per size), guidance
    np.testing.assert_allclose(image, own_sampler(objects), atol=1e-5)


@pytest.mark.parametrize("kind", PIPELINES)
def test_lora_changes_the_output_and_loads_with_load_lora_weights(kind, lora_runs, folders):
    out, objects = lora_runs[kind]
    module = objects["model"]
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    clips = {"text_encoder", "text_encoder_2"} if kind == "sd3" else {"text_encoder"}  # no LoRA on T5: the loaders have no slot
    assert {n.split(".")[1] for n in trainable if n.startswith("conditioner.")} == clips
    lora_dir = out / "lora"
    assert not (out / "pipeline").exists()
    weights = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer", *clips}
    for part in ("transformer", *clips):  # B ("up") starts at zero: every LoRA trained
        assert any(v.abs().max() > 0 for k, v in weights.items() if k.startswith(part + ".") and ("lora_B" in k or "up.weight" in k)), part
    base = PIPELINES[kind].from_pretrained(folders[kind])
    before = generate(base)
    base.load_lora_weights(lora_dir)
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-5)
    # the fused pipeline is the base with the same LoRA merged in
    np.testing.assert_allclose(generate(PIPELINES[kind].from_pretrained(lora_dir / "fused")), with_lora, atol=1e-5)


# ---- caching ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [pytest.param("sd3", marks=pytest.mark.slow), "flux"])
def test_cache_gives_the_same_loss_curve_in_ram_and_on_disk(kind, folders, tmp_path):
    """Center crops, no flips: cached posteriors and cached text states (pooled + T5), held in RAM or
    memory-mapped from files (``model.cache_text_dir``), give the same losses as no cache."""
    quiet = [*QUIET, "callbacks.ema=null", "trainer.max_steps=3", "model.caption_dropout=0.5", f"model.pretrained={folders[kind]}"]
    quiet += captioned_folder(tmp_path / "images", "imagefolder")
    curves, disk = {}, tmp_path / "text_cache"
    for cache, extra in (("none", ["model.cache=false"]), ("ram", ["model.cache=true"]), ("disk", ["model.cache=true", f"model.cache_text_dir={disk}"])):
        out = tmp_path / f"cache_{cache}"
        objects = fit(out, kind, *quiet, *extra)
        curves[cache] = losses(out)
        train_set = objects["datamodule"].train_set
        assert type(train_set).__name__ == ("Subset" if cache == "none" else "CachedLatentDataset")
    assert set(train_set[0]) == {"latent_moments", "caption", "encoder_hidden_states", "pooled_projections"}
    t5 = train_set.states["encoder_hidden_states"]  # 12 train captions x [L, D], in a file of exactly that size
    assert (disk / "train_set.rank0" / "encoder_hidden_states.bin").stat().st_size == t5.numel() * t5.element_size()
    assert len(curves["ram"]) == 3
    np.testing.assert_allclose(curves["ram"], curves["none"], rtol=1e-4)
    np.testing.assert_allclose(curves["disk"], curves["ram"], rtol=0, atol=0)


# ---- wrong family and foreign folders ---------------------------------------------------------------
def test_a_folder_of_another_family_is_a_config_error_naming_it(folders, tmp_path):
    sd1 = tiny.build(tmp_path / "tiny_sd")
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, "flux", str(sd1))
    message = str(user_error(excinfo))
    assert f"model.pretrained='{sd1}' is a StableDiffusionPipeline folder" in message and "model=latent_flux trains a FluxPipeline" in message
    assert re.search(r"use model=latent_sd\b", message) and "--kind flux" in message and "\n" not in message
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, "sd3", folders["flux"])
    message = str(user_error(excinfo))
    assert "is a FluxPipeline folder" in message and "model=latent_sd3 trains a StableDiffusion3Pipeline" in message and "use model=latent_flux" in message
    # the flow-matching schedule of a folder that saved another scheduler (whichever part Hydra builds first)
    with pytest.raises(ConfigError, match=r"saved scheduler is a PNDMScheduler.*use model=latent_sd \(process=vp_pretrained\)"):
        load_flow_scheduler(str(sd1))


def _diffusers_written(path, kind):
    """A pipeline saved by diffusers' own ``save_pretrained`` with other tiny dims than the project's:
    SD3 without T5 (4 latent channels, VAE factor 4); Flux in schnell's layout (no guidance embedding)."""
    vae = tiny.tiny_vae(latent_channels=4, block_out_channels=(16, 16, 32), seed=3, scaling_factor=0.5, shift_factor=0.1)
    if kind == "sd3":
        pipe = tiny_mmdit.tiny_sd3_pipeline(t5=False)
        pipe = StableDiffusion3Pipeline(**{**pipe.components, "vae": vae, "transformer": tiny_mmdit.tiny_sd3_transformer(sample_size=8, in_channels=4, joint_attention_dim=48, seed=3)})
    else:
        pipe = tiny_mmdit.tiny_flux_pipeline(guidance_embeds=False)
        pipe = FluxPipeline(**{**pipe.components, "vae": vae, "transformer": tiny_mmdit.tiny_flux_transformer(in_channels=16, guidance_embeds=False, seed=3)})
    pipe.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", PIPELINES)
def test_a_pipeline_folder_diffusers_itself_wrote(kind, tmp_path):
    foreign = _diffusers_written(tmp_path / "foreign", kind)
    extra = ["text_encoder=sd3_no_t5"] if kind == "sd3" else []
    out = tmp_path / "run"
    objects = fit(out, kind, f"model.pretrained={foreign}", *extra, "trainer.max_steps=2", *QUIET, *captioned_folder(tmp_path / "kohya", "kohya"))
    assert np.isfinite(losses(out)).all() and objects["model"].latent_shape(1) == (1, 4, 8, 8)
    if kind == "sd3":  # trained without T5: exported without it, loaded as diffusers' SD3 docs load a T5-less pipeline
        assert json.loads((out / "pipeline" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
        pipe = StableDiffusion3Pipeline.from_pretrained(out / "pipeline", text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = FluxPipeline.from_pretrained(out / "pipeline")
        assert not pipe.transformer.config.guidance_embeds
    np.testing.assert_allclose(generate(pipe), own_sampler(objects), atol=1e-5)


# ---- the GPU recipes, one step on CPU ---------------------------------------------------------------
@pytest.mark.parametrize("kind", [pytest.param("sd3", marks=pytest.mark.slow), "flux"])
def test_gpu_lora_recipe_runs_a_step_on_the_tiny_pipeline(kind, folders, tmp_path):
    """experiment=<kind>_lora's settings (cache, bf16 frozen transformer and encoders, bf16-mixed,
    checkpointing, LoRA) on CPU; 8-bit AdamW needs bitsandbytes + CUDA, so torch's AdamW stands in."""
    recipe = compose_cfg("train", [f"experiment={kind}_lora"], tmp_path / "composed")
    assert recipe.model.optimizer._target_ == "diffusion_lab.components.optim.adamw_8bit" and recipe.data.resolution == 1024
    cfg = compose_cfg("train", [f"experiment={kind}_lora", f"model.pretrained={folders[kind]}", *captioned_folder(tmp_path / "images", "imagefolder"),
                                "optimizer@model.optimizer=adamw", "model.optimizer.lr=1e-4", "trainer=cpu", "debug=fast", "logger=csv", *QUIET], tmp_path / "run")
    assert cfg.adapter.rank == 16 and cfg.model.cache and cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for e in module.conditioner.encoders for p in e.parameters()} == {torch.bfloat16}
    assert type(objects["datamodule"].train_set).__name__ == "CachedLatentDataset"
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "run" / "text_cache" / "train_set.rank0" / "encoder_hidden_states.bin").exists()  # T5 states on disk


def test_parts_load_with_the_class_the_folder_model_index_names(folders, tmp_path):
    """As DiffusionPipeline.from_pretrained: a folder whose tokenizer was saved as another class than the config's
    (a generic PreTrainedTokenizerFast where text_encoder=sd3_pretrained says CLIPTokenizer) loads with the folder's class."""
    import shutil

    folder = tmp_path / "sd3"
    shutil.copytree(folders["sd3"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index))
    module = build_module(tmp_path, "sd3", str(folder), f"text_encoder.max_sequence_length={MAX_LENGTH}")
    assert type(module.conditioner.tokenizer).__name__ != "CLIPTokenizer"  # transformers 5 names the generic class TokenizersBackend
    reference = build_module(tmp_path / "ref", "sd3", folders["sd3"], f"text_encoder.max_sequence_length={MAX_LENGTH}")
    with torch.no_grad():
        torch.testing.assert_close(module.text_states([PROMPT])["encoder_hidden_states"], reference.text_states([PROMPT])["encoder_hidden_states"])
