"""Z-Image (``families/z_image.py``) on a tiny random ``ZImagePipeline`` built offline
(``testing/z_image.py``): the pipeline round-trips through save_pretrained, the conditioner is the
pipeline's ``encode_prompt`` padded to a fixed length, the family's backbone call on padded states + mask
is the pipeline's own call on its per-prompt lists; full and LoRA fits (the real configs, shrunk) export
what plain diffusers loads and samples like the module's own sampler; a folder with other dims, the GPU
recipe for a step on CPU, and folders of other families."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, ZImagePipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.testing import tiny
from diffusion_lab.families.z_image import ZImage, ZImageTextConditioner
from diffusion_lab.testing.z_image import tiny_pipeline
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import captioned_folder, losses

PROMPT = "a handwritten digit seven"
PROMPTS = [PROMPT, "", "a red dragon with wings and a long tail " * 12]  # "" and one truncated at MAX_LENGTH
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length
GUIDANCE = 3.0  # ZImagePipeline's guidance_scale s: pos + s (pos - neg), the family's guide too
W = GUIDANCE  # the module is called with the pipeline's number

FAST = [o for o in SD_FAST if not o.startswith("experiment=")]  # 4 steps, as the SD tests shrink theirs
QUIET = ["callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``tiny_pipeline().save_pretrained(DIR)``: what ``python -m diffusion_lab.tiny_sd DIR --kind z_image`` writes."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_z_image"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return ZImagePipeline.from_pretrained(folder, local_files_only=True)


def sample(pipe, steps=2, guidance_scale=GUIDANCE, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, height=32, width=32, output_type="np", generator=g, max_sequence_length=MAX_LENGTH, **kw).images


# ---- the tiny pipeline -----------------------------------------------------------------------------
def test_tiny_pipeline_round_trips_offline_and_samples(folder, pipe):
    from transformers import Qwen2Tokenizer, Qwen3Model

    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 4e6, size
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer) and isinstance(pipe.text_encoder, Qwen3Model)
    image = sample(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    generic = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(generic) is ZImagePipeline
    np.testing.assert_array_equal(sample(generic), image)
    np.testing.assert_array_equal(sample(tiny_pipeline()), image)  # the builder is seeded: the folder is its output
    built = tiny.build(folder.parent / "built", kind="z_image")  # python -m diffusion_lab.tiny_sd DIR --kind z_image
    np.testing.assert_array_equal(sample(ZImagePipeline.from_pretrained(built, local_files_only=True)), image)


def test_tiny_tokenizer_is_qwen3s_layout(pipe):
    tok = pipe.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    no_think = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tokens = tok.tokenize(text)
    assert tokens[:2] == ["<|im_start|>", "user"] and "<|im_end|>" in tokens and "Ġhandwritten" in tokens  # one token a word
    assert (tok.pad_token, tok.eos_token, tok.padding_side) == ("<|endoftext|>", "<|im_end|>", "right")
    assert tok.decode(tok(text).input_ids) == text


# ---- conditioning ------------------------------------------------------------------------------------
def test_conditioner_is_encode_prompt_padded_with_its_mask(pipe):
    conditioner = ZImageTextConditioner(pipe.tokenizer, pipe.text_encoder, max_sequence_length=MAX_LENGTH)
    assert conditioner.frozen
    with torch.no_grad():
        states = conditioner(PROMPTS)
        expected, negative = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=True, max_sequence_length=MAX_LENGTH)
    hidden, mask = states["encoder_hidden_states"], states["encoder_attention_mask"]
    assert hidden.shape == (3, MAX_LENGTH, 32) and mask.dtype == torch.bool and mask.shape == (3, MAX_LENGTH)
    assert [int(m.sum()) for m in mask] == [len(e) for e in expected] and mask[2].all()  # the long one is truncated
    for h, m, e in zip(hidden, mask, expected):
        torch.testing.assert_close(h[m], e, rtol=0, atol=0)
        assert h[~m].abs().max() == 0 if (~m).any() else True
    torch.testing.assert_close(hidden[1][mask[1]], negative[0], rtol=0, atol=0)  # "" is the pipeline's negative prompt


def test_forward_on_padded_states_is_the_pipelines_transformer_call(pipe):
    """The family's call (fixed-length states + mask, stacked latents, sigma x 1000) equals the pipeline's
    own (lists of [C, 1, h, w] latents and per-prompt states, (1000 - t) / 1000, negated), batched cond and
    uncond halves included. Exact: the same per-caption tensors reach the transformer."""
    conditioner = ZImageTextConditioner(pipe.tokenizer, pipe.text_encoder, max_sequence_length=MAX_LENGTH)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 16, 16, 16, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0])
    with torch.no_grad():
        states = conditioner(PROMPTS)
        ours = ZImage().forward(pipe.transformer, x_t, t, **states)
        embeds, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH)
        out = pipe.transformer(list(x_t.unsqueeze(2).unbind(0)), (1000 - t) / 1000, embeds, return_dict=False)[0]
        theirs = -torch.stack([o.float() for o in out]).squeeze(2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # one caption alone gives its row of the batch (the padding and the mask change nothing)
    with torch.no_grad():
        alone = ZImage().forward(pipe.transformer, x_t[:1], t[:1], **{k: v[:1] for k, v in states.items()})
    torch.testing.assert_close(alone, ours[:1], rtol=1e-5, atol=1e-6)


# ---- training through the real configs ---------------------------------------------------------------
def fit(out, *overrides):
    cfg = compose_cfg("train", ["experiment=z_image_finetune_tiny", *FAST, *overrides], out)
    return train(cfg)[1]


def own_sampler(objects, steps=2):
    """The module's own sampler (EMA weights, as exported) at the pipeline's guidance, as numpy images."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=W)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


def build_module(tmp_path, pretrained, *overrides):
    cfg = compose_cfg("train", ["model=latent_z_image", f"model.pretrained={pretrained}", "data=digits_captioned", "data.resolution=32", *overrides], tmp_path)
    return instantiate(cfg.model)


def test_module_text_states_and_checks(folder, pipe, tmp_path):
    """model=latent_z_image builds the conditioner from text_encoder=z_image_pretrained; its states are
    encode_prompt's; process=vp, a LoRA on Qwen3 (no slot in the pipeline's LoRA loader) and a ControlNet
    beside a LoRA are ConfigErrors."""
    module = build_module(tmp_path, folder, f"text_encoder.max_sequence_length={MAX_LENGTH}")
    with torch.no_grad():
        states = module.text_states(PROMPTS)
        expected, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH)
    for h, m, e in zip(states["encoder_hidden_states"], states["encoder_attention_mask"], expected):
        torch.testing.assert_close(h[m], e, rtol=0, atol=0)
    assert module.conditioner.frozen and module.family.supports("lora") is None and module.family.supports("textual_inversion")
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, folder, "process=vp")
    assert "process=vp cannot be used with model=latent_z_image" in str(user_error(excinfo))
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, folder, "adapter=lora", "adapter.train_text_encoder=true")
    assert "adapter.train_text_encoder=true" in str(user_error(excinfo)) and "ZImageLoraLoaderMixin" in str(user_error(excinfo))
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, folder, "controlnet=from_backbone", "adapter=lora")
    assert "controlnet=from_backbone trains only the ControlNet" in str(user_error(excinfo))


def test_full_finetune_exports_a_pipeline_plain_diffusers_loads(folder, pipe, tmp_path):
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", *captioned_folder(tmp_path / "images", "imagefolder"))  # metadata.jsonl captions
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    assert (out / "samples" / "step_000004.png").exists()
    exported = DiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert type(exported) is ZImagePipeline and dict(exported.scheduler.config) == dict(pipe.scheduler.config)
    assert any(not torch.equal(a, b) for a, b in zip(exported.transformer.parameters(), pipe.transformer.parameters()))
    for name in ("text_encoder", "vae"):  # frozen parts exported unchanged
        assert all(torch.equal(a, b) for a, b in zip(getattr(exported, name).parameters(), getattr(pipe, name).parameters())), name
    image = sample(exported)
    assert np.abs(image - sample(pipe)).max() > 1e-3
    # the export samples like the module's own sampler: same text states, sigmas, CFG (w = s + 1)
    np.testing.assert_allclose(image, own_sampler(objects), atol=1e-5)


def test_lora_loads_with_load_lora_weights_and_changes_the_output(folder, pipe, tmp_path):
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", "adapter=lora", "adapter.alpha=8", "model.optimizer.lr=1e-2")  # alpha != rank: the scale travels
    trainable = [n for n, p in objects["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("backbone.") for n in trainable)
    assert not (out / "pipeline").exists()
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"} and any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "up.weight" in k)
    base = ZImagePipeline.from_pretrained(folder, local_files_only=True)
    before = sample(base)
    base.load_lora_weights(out / "lora")
    with_lora = sample(base)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-5)


@pytest.mark.slow
def test_cache_gives_the_same_loss_curve_in_ram_and_on_disk(folder, tmp_path):
    """Cached posteriors and cached Qwen3 states + masks (RAM, or memory-mapped files), with caption dropout
    swapping in the cached "" states and its mask, give the losses of no cache."""
    quiet = [*QUIET, "callbacks.ema=null", "trainer.max_steps=3", "model.caption_dropout=0.5", f"model.pretrained={folder}"]
    quiet += captioned_folder(tmp_path / "images", "imagefolder")
    curves, disk = {}, tmp_path / "text_cache"
    for cache, extra in (("none", ["model.cache=false"]), ("ram", ["model.cache=true"]), ("disk", ["model.cache=true", f"model.cache_text_dir={disk}"])):
        objects = fit(tmp_path / f"cache_{cache}", *quiet, *extra)
        curves[cache] = losses(tmp_path / f"cache_{cache}")
    train_set = objects["datamodule"].train_set
    assert set(train_set[0]) == {"latent_moments", "caption", "encoder_hidden_states", "encoder_attention_mask"}
    assert train_set.states["encoder_attention_mask"].dtype == torch.bool and len(curves["ram"]) == 3
    np.testing.assert_allclose(curves["ram"], curves["none"], rtol=1e-4)
    np.testing.assert_allclose(curves["disk"], curves["ram"], rtol=0, atol=0)


@pytest.mark.slow
def test_dreambooth_trains_z_image_with_its_own_class_images(folder, tmp_path):
    """DreamBooth (model.prior_loss_weight) is a method of any family: class images from Z-Image's own
    sampler, instance + prior losses, a ZImagePipeline export."""
    fast = ["trainer.max_steps=2", *QUIET, "data.num_class_images=2", "data.max_instances=2", "data.batch_size=4", "data.class_steps=2"]
    overrides = ["experiment=dreambooth_tiny", "model=latent_z_image", f"model.pretrained={folder}", f"text_encoder.max_sequence_length={MAX_LENGTH}", f"data.class_dir={tmp_path / 'class'}", *fast]
    _, objects = train(compose_cfg("train", overrides, tmp_path / "run"))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert {"train/instance_loss", "train/prior_loss"} <= set(objects["trainer"].callback_metrics)
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")) is ZImagePipeline


def test_a_pipeline_folder_diffusers_itself_wrote_with_other_dims(tmp_path):
    """ZImagePipeline.save_pretrained of other tiny dims than the project's: a 3-level VAE (factor 4) with
    4 latent channels, a 16-wide Qwen3; trains from a kohya folder and samples like its export."""
    from diffusion_lab.testing.tiny import tiny_vae
    from diffusion_lab.testing import z_image

    tokenizer = z_image.tiny_qwen_tokenizer()
    ZImagePipeline(
        transformer=z_image.tiny_transformer(cap_feat_dim=16, in_channels=4, seed=3),
        vae=tiny_vae(latent_channels=4, block_out_channels=(16, 16, 32), seed=3, scaling_factor=0.5, shift_factor=0.1),
        text_encoder=z_image.tiny_qwen3(tokenizer, hidden_size=16, seed=3),
        tokenizer=tokenizer,
        scheduler=z_image.scheduler(),
    ).save_pretrained(tmp_path / "foreign")
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={tmp_path / 'foreign'}", "trainer.max_steps=2", *QUIET, *captioned_folder(tmp_path / "kohya", "kohya"))
    assert np.isfinite(losses(out)).all() and objects["model"].latent_shape(1) == (1, 4, 8, 8)
    np.testing.assert_allclose(sample(ZImagePipeline.from_pretrained(out / "pipeline")), own_sampler(objects), atol=1e-5)


def test_gpu_lora_recipe_runs_a_step_on_the_tiny_pipeline(folder, tmp_path):
    """experiment=z_image_lora's settings (cache with Qwen3 states on disk, bf16 frozen transformer and
    encoder, bf16-mixed, checkpointing, LoRA) on CPU; 8-bit AdamW needs bitsandbytes + CUDA, so torch's AdamW stands in."""
    recipe = compose_cfg("train", ["experiment=z_image_lora"], tmp_path / "composed")
    assert recipe.model.pretrained == "Tongyi-MAI/Z-Image" and recipe.data.resolution == 1024 and recipe.text_encoder.max_sequence_length == 512
    assert recipe.model.optimizer._target_ == "diffusion_lab.components.optim.adamw_8bit" and recipe.callbacks.sample_grid.guidance_scale == 5.0
    cfg = compose_cfg("train", ["experiment=z_image_lora", f"model.pretrained={folder}", "model.local_files_only=true", *captioned_folder(tmp_path / "images", "imagefolder"),
                                "optimizer@model.optimizer=adamw", "model.optimizer.lr=1e-4", "trainer=cpu", "debug=fast", "logger=csv", *QUIET], tmp_path / "run")
    assert cfg.model.cache and cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for p in module.conditioner.text_encoder.parameters()} == {torch.bfloat16}
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    cache = tmp_path / "run" / "text_cache" / "train_set.rank0"
    assert (cache / "encoder_hidden_states.bin").exists() and (cache / "encoder_attention_mask.bin").exists()


def test_a_folder_of_another_family_is_a_config_error_naming_it(tmp_path):
    sd1 = tiny.build(tmp_path / "tiny_sd")
    with pytest.raises(Exception) as excinfo:
        build_module(tmp_path, str(sd1))
    message = str(user_error(excinfo))
    assert isinstance(user_error(excinfo), ConfigError) and "\n" not in message
    assert f"model.pretrained='{sd1}' is a StableDiffusionPipeline folder" in message and "model=latent_z_image trains a ZImagePipeline" in message
    assert "use model=latent_sd" in message and "--kind z_image" in message
