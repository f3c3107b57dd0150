"""Fine-tune a tiny random Stable Diffusion pipeline (the real configs, shrunk), export, reload in
plain diffusers, sample from the exports."""

import csv

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffusion_lab.testing import tiny
from diffusion_lab.components.adapters import KOHYA_FILE
from diffusion_lab.export import build_pipeline
from diffusion_lab.sample import run as run_sample
from diffusion_lab.train import train
from tests.conftest import compose_cfg

# experiment=sd_finetune_tiny, shrunk to 4 steps
FAST = [
    "experiment=sd_finetune_tiny",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "model.preview_steps=2",
    "callbacks.sample_grid.every_n_steps=4",
    "callbacks.sample_grid.num_images=2",
    "callbacks.model_checkpoint.every_n_train_steps=4",
]
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sd"))


def fit(out, *overrides):
    cfg = compose_cfg("train", FAST + list(overrides), out)
    _, objects = train(cfg)
    return cfg, objects


def generate(pipe, steps=3, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, height=32, width=32, output_type="np", generator=g, **kw).images


def losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="module")
def full_run(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    cfg, objects = fit(out, f"model.pretrained={tiny_pipeline}")
    return out, objects


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg, objects = fit(
        out,
        f"model.pretrained={tiny_pipeline}",
        "adapter=lora",
        "adapter.alpha=8",  # alpha != rank: exports must carry the scale
        "adapter.train_text_encoder=true",
        "adapter.export_fused=true",
        "model.optimizer.lr=1e-2",
    )
    return out, objects


def test_full_finetune_exports_a_pipeline_plain_diffusers_loads(full_run, tiny_pipeline):
    out, objects = full_run
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    assert (out / "samples" / "step_000004.png").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.safety_checker is None
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    changed = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters())]
    assert any(changed)
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert not np.allclose(image, generate(base))


def test_lora_exports_load_in_diffusers_fused_and_kohya(lora_run, tiny_pipeline):
    out, objects = lora_run
    lora_dir = out / "lora"
    assert not (out / "pipeline").exists()
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    before = generate(base)
    base.load_lora_weights(lora_dir)
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    # the fused pipeline is the base with the same LoRA merged in
    fused = StableDiffusionPipeline.from_pretrained(lora_dir / "fused")
    np.testing.assert_allclose(generate(fused), with_lora, atol=1e-4)
    # the in-training model (EMA weights were exported; compare to the module's own pipeline)
    module = objects["model"]
    from diffusion_lab.callbacks.ema import ema_weights

    with ema_weights(objects["trainer"], module):
        np.testing.assert_allclose(generate(build_pipeline(module)), with_lora, atol=1e-4)
    # kohya layout: webui key names, alpha = the training alpha, same images when diffusers loads it
    kohya = load_file(lora_dir / KOHYA_FILE)
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert any(k.startswith("lora_te1_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    other = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    other.load_lora_weights(lora_dir, weight_name=KOHYA_FILE)
    np.testing.assert_allclose(generate(other), with_lora, atol=1e-4)


def captioned_folder(root, convention):
    """16 digit images with captions: diffusers imagefolder (``metadata.jsonl``) or kohya (``.txt`` beside each)."""
    import json

    from sklearn.datasets import load_digits
    from PIL import Image

    from diffusion_lab.data.digits import DIGIT_NAMES

    digits = load_digits()
    root.mkdir(parents=True)
    rows = []
    for i in range(16):
        name, caption = f"img_{i:02d}.png", f"a handwritten digit {DIGIT_NAMES[digits.target[i]]}"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((40, 40)).convert("RGB").save(root / name)
        rows.append({"file_name": name, "text": caption})
        if convention == "kohya":
            (root / name).with_suffix(".txt").write_text(caption)
    if convention == "imagefolder":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data=image_folder", f"data.root={root}", "data.resolution=32", "data.batch_size=4", "data.val_fraction=0.25", "data.num_workers=0"]
    return data + (["data.caption_column=text"] if convention == "imagefolder" else ["data.caption_column=caption"])


def test_cache_gives_the_same_loss_curve(tiny_pipeline, tmp_path):
    """Center crops, no flips: the cached posterior is sampled from the same RNG stream."""
    quiet = ["callbacks.sample_grid=null", "callbacks.ema=null", "trainer.max_steps=3", "model.caption_dropout=0.5", f"model.pretrained={tiny_pipeline}"]
    quiet += captioned_folder(tmp_path / "images", "imagefolder")
    curves = {}
    for cache in (False, True):
        out = tmp_path / f"cache_{cache}"
        _, objects = fit(out, *quiet, f"model.cache={cache}")
        curves[cache] = losses(out)
        assert type(objects["datamodule"].train_set).__name__ == ("CachedLatentDataset" if cache else "Subset")
    assert len(curves[True]) == 3
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-4)


def _foreign_pipeline(path):
    """An SD pipeline saved by diffusers itself with other tiny dims: 8 latent channels, VAE
    down-sampling 4, text hidden 24, char-level tokenizer, DDIM with v-prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(1)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    )
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        latent_channels=8, norm_num_groups=8, layers_per_block=1, scaling_factor=0.3)
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction", clip_sample=False)
    StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return str(path)


def test_a_pipeline_folder_this_project_did_not_write(tmp_path):
    foreign = _foreign_pipeline(tmp_path / "foreign")
    out = tmp_path / "run"
    _, objects = fit(out, f"model.pretrained={foreign}", "trainer.max_steps=2", "callbacks.sample_grid=null", *captioned_folder(tmp_path / "kohya", "kohya"))
    module = objects["model"]
    assert module.process.prediction_type == "v_prediction" and module.codec.scaling_factor == 0.3
    assert module.latent_shape(1) == (1, 8, 8, 8)
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
    assert np.isfinite(generate(pipe)).all()


def test_sd_finetune_recipe_runs_fast_dev_run_with_the_tiny_pipeline(tiny_pipeline, tmp_path):
    cfg = compose_cfg("train", ["experiment=sd_finetune", f"model.pretrained={tiny_pipeline}", "data=digits_captioned",
                                "data.resolution=32", "data.num_workers=0", "trainer=cpu", "trainer.precision=32-true", "debug=fast", "logger=csv",
                                "callbacks.progress_bar=null"], tmp_path / "run")
    assert cfg.trainer.accumulate_grad_batches == 4 and cfg.model.optimizer.lr == 1e-5 and cfg.model.lr_scheduler.name == "constant"
    assert cfg.model.gradient_checkpointing and cfg.callbacks.ema is not None
    _, objects = train(cfg)
    assert objects["model"].base_backbone.is_gradient_checkpointing
    assert objects["trainer"].global_step == 1


# ---- sampling from the exports ---------------------------------------------------------------
def sample_cfg(tmp_path, *overrides):
    return compose_cfg("sample", ["device=cpu", "num_inference_steps=3", "num_images=2", "batch_size=2", "height=32", "width=32"] + list(overrides), tmp_path)


def test_sample_text_to_image_prompts_file_negative_prompt_scheduler_memory_savers(full_run, tmp_path):
    out, _ = full_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# digits\na handwritten digit one\n\na handwritten digit two\n")
    cfg = sample_cfg(tmp_path / "s", f"pipeline={out / 'pipeline'}", f"prompts_file={prompts}", "negative_prompt=blurry", "sampler=ddim",
                     "memory.attention_slicing=true", "memory.vae_slicing=true", "memory.vae_tiling=true")
    grid = run_sample(cfg)
    assert grid.exists() and (tmp_path / "s" / "000001.png").exists()
    assert (tmp_path / "s" / "prompts.txt").read_text().splitlines() == ["000000.png\ta handwritten digit one", "000001.png\ta handwritten digit two"]


def test_sample_lora_scale(lora_run, tiny_pipeline, tmp_path):
    from PIL import Image

    out, _ = lora_run
    pixels = {}
    for name, extra in {"base": [], "off": [f"lora={out / 'lora'}", "lora_scale=0.0"], "on": [f"lora={out / 'lora'}", "lora_scale=1.0"]}.items():
        run_sample(sample_cfg(tmp_path / name, f"pipeline={tiny_pipeline}", f"prompt={PROMPT}", *extra))
        pixels[name] = np.asarray(Image.open(tmp_path / name / "000000.png"), dtype=np.int16)
    assert np.abs(pixels["off"] - pixels["base"]).max() <= 1
    assert np.abs(pixels["on"] - pixels["base"]).max() > 1


def test_sample_from_a_latent_checkpoint(full_run, tmp_path):
    out, _ = full_run
    grid = run_sample(sample_cfg(tmp_path / "s", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"prompt={PROMPT}"))
    assert grid.exists()


def test_sample_needs_a_prompt_for_text_to_image(tiny_pipeline, tmp_path):
    from diffusion_lab.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="prompt="):
        run_sample(sample_cfg(tmp_path / "s", f"pipeline={tiny_pipeline}"))


def test_sdxl_base_refiner_recipe(tmp_path):
    from PIL import Image

    base = tiny.build(tmp_path / "xl", kind="sdxl")
    refiner = tiny.build(tmp_path / "xl_refiner", kind="sdxl-refiner")
    common = ["recipe=sdxl_refiner", f"pipeline={base}", "dtype=float32", f"prompt={PROMPT}", "num_inference_steps=4"]
    cfg = sample_cfg(tmp_path / "both", *common, f"refiner={refiner}")
    assert cfg.refiner_start == 0.8 and cfg.guidance_scale == 5.0 and cfg.height == 32
    run_sample(sample_cfg(tmp_path / "both", *common, f"refiner={refiner}", "refiner_start=0.5"))
    run_sample(sample_cfg(tmp_path / "base", *common, "refiner=null"))
    handed_over = np.asarray(Image.open(tmp_path / "both" / "000000.png"), dtype=np.int16)
    base_only = np.asarray(Image.open(tmp_path / "base" / "000000.png"), dtype=np.int16)
    assert handed_over.shape == base_only.shape == (32, 32, 3)
    assert np.abs(handed_over - base_only).max() > 0  # the refiner denoised the second half


def test_lora_on_a_bf16_base_trains_and_samples_under_bf16_mixed(tiny_pipeline, tmp_path):
    """Frozen parts held in bf16, trainable LoRA in fp32: trains under autocast, samples without it."""
    out = tmp_path / "run"
    _, objects = fit(out, f"model.pretrained={tiny_pipeline}", "adapter=lora", "adapter.base_dtype=bfloat16", "vae.dtype=bfloat16",
                     "text_encoder.dtype=bfloat16", "trainer.precision=bf16-mixed", "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=2")
    module = objects["model"]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert module.codec.vae.dtype == torch.bfloat16 and np.isfinite(losses(out)).all()
    assert (out / "samples" / "step_000002.png").exists() and (out / "lora" / "pytorch_lora_weights.safetensors").exists()
