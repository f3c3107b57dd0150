"""The digits latent stack: VAE stage -> text-to-image LDM -> LoRA, each a few steps of the real
experiment configs; the small-vocabulary tokenizer; the scaling factor's way from stage 1 into
the latent model and the exported pipeline."""

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from hydra.utils import instantiate
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion_lab.components.vae import VAECodec
from diffusion_lab.testing.vocab import caption_words, save_text_model, vocab_text_encoder, vocab_tokenizer
from diffusion_lab.metrics.digits import real_digits
from diffusion_lab.train import train
from diffusion_lab.utils.errors import DiffusionLabError

from tests.conftest import compose_cfg

# a few steps of each stage, small batches, no progress bar, few preview steps
FAST = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]
# latent stages: no latent cache (it would encode every image for two steps; test_latent covers it)
LATENT = ["model.cache=false", "model.preview_steps=2", "callbacks.sample_grid.num_images=2"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Runs experiment=vae_digits then experiment=ldm_digits (2 steps each) into one stack dir."""
    root = tmp_path_factory.mktemp("stack")
    vae_cfg = compose_cfg("train", ["experiment=vae_digits", f"stack_dir={root}", "model.scale_batches=4", *FAST], root / "vae_run")
    _, vae_objects = train(vae_cfg)
    ldm_cfg = compose_cfg("train", ["experiment=ldm_digits", f"stack_dir={root}", *FAST, *LATENT], root / "ldm_run")
    _, ldm_objects = train(ldm_cfg)
    return {"root": root, "vae": vae_objects["model"], "ldm": ldm_objects["model"]}


def test_vocab_tokenizer_round_trips(tmp_path):
    words = caption_words(["a handwritten digit {name}"], extra=["inverted"])
    assert words[:3] == ["a", "handwritten", "digit"] and "seven" in words and words[-1] == "inverted"
    tok = vocab_tokenizer(words, model_max_length=16)
    tokens = tok.convert_ids_to_tokens(tok("a handwritten digit seven inverted").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "inverted</w>", "<|endoftext|>"]
    encoder = vocab_text_encoder(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    out = save_text_model(tok, encoder, tmp_path / "text")
    tok2 = CLIPTokenizer.from_pretrained(out / "tokenizer")
    encoder2 = CLIPTextModel.from_pretrained(out / "text_encoder")
    text = ["a handwritten digit nine", "Zebra ten"]  # unseen words fall back to byte tokens
    ids = tok(text, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ids, tok2(text, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids)
    assert tok2.decode(tok2(text[1]).input_ids, skip_special_tokens=True) == "zebra ten"  # CLIP lower-cases
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids).last_hidden_state, encoder2(ids).last_hidden_state)
    assert encoder2.config.vocab_size == len(tok2) and tok2.model_max_length == 16


def test_autoencoder_module_learns_to_reconstruct(tmp_path):
    """A dozen AdamW steps on one batch of real digits cut the reconstruction error."""
    module = instantiate(compose_cfg("train", ["experiment=vae_digits"], tmp_path).model)
    x = real_digits("train", 16)[0][:8].repeat(1, 3, 1, 1)
    opt = module.optimizer_factory(params=module.parameters())
    torch.manual_seed(0)
    with torch.no_grad():
        before = module.losses(x, sample=False)["rec_loss"].item()
    for _ in range(12):
        loss = module.losses(x, sample=True)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = module.losses(x, sample=False)["rec_loss"].item()
    assert after < 0.7 * before, (before, after)


def test_vae_stage_exports_the_measured_scaling_factor(stack):
    vae = AutoencoderKL.from_pretrained(stack["root"] / "vae")
    factor = vae.config.scaling_factor
    assert factor != 1.0 and factor == stack["vae"].vae.config.scaling_factor
    # the factor makes the latents of held-out real digits unit-variance, through the latent model's codec
    images = real_digits("heldout", 16)[0].repeat(1, 3, 1, 1)
    z = VAECodec(vae, sample_posterior=True).encode(images)
    assert z.shape[1:] == (4, 8, 8)
    assert abs(z.std().item() - 1.0) < 0.05, z.std().item()


def test_latent_stage_reads_the_factor_and_exports_a_pipeline(stack):
    factor = AutoencoderKL.from_pretrained(stack["root"] / "vae").config.scaling_factor
    assert stack["ldm"].codec.scaling_factor == factor
    pipe = StableDiffusionPipeline.from_pretrained(stack["root"] / "pipeline")
    assert pipe.vae.config.scaling_factor == factor
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert len(pipe.tokenizer.tokenize("a handwritten digit seven inverted")) == 5
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a handwritten digit seven"], num_inference_steps=2, guidance_scale=3.0, output_type="pt").images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_lora_stage_trains_on_the_exported_pipeline(stack, tmp_path):
    cfg = compose_cfg("train", ["experiment=ldm_digits_lora", f"stack_dir={stack['root']}", *FAST, *LATENT], tmp_path / "run")
    dm = instantiate(cfg.data.datamodule)
    captions = {dm.dataset[i]["caption"] for i in (0, len(dm.dataset) - 1)}
    assert captions == {"a handwritten digit zero", f"a handwritten digit eight {cfg.data.trigger}"}
    _, objects = train(cfg)
    assert objects["model"].codec.scaling_factor == stack["ldm"].codec.scaling_factor
    pipe = StableDiffusionPipeline.from_pretrained(stack["root"] / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(stack["root"] / "lora")
    kw = dict(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert pipe([f"a handwritten digit seven {cfg.data.trigger}"], **kw).images.shape == (1, 3, 16, 16)


def test_latent_stage_without_the_vae_stage_says_what_to_run(tmp_path):
    cfg = compose_cfg("train", ["experiment=ldm_digits", f"stack_dir={tmp_path / 'empty'}"], tmp_path / "run")
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.model)
    e = excinfo.value
    while e is not None and not isinstance(e, DiffusionLabError):
        e = e.__cause__
    assert e is not None and "vae.vae.pretrained" in str(e) and "experiment=vae_digits" in str(e) and "empty/vae" in str(e)


def test_thick_concept_data_is_a_bolder_copy_of_the_digits():
    from diffusion_lab.data.digits import DigitsDataset

    plain, thick = DigitsDataset(transform=None), DigitsDataset(transform=None, thicken=True)
    assert (thick.labels == plain.labels).all()
    # grey dilation: never less ink anywhere, clearly more in total
    assert (thick.images >= plain.images).all() and thick.images.mean() > 1.4 * plain.images.mean()


def test_autoencoder_with_the_diffusion_callbacks_names_them_and_the_fix(tmp_path):
    """model=autoencoder with the default callbacks (UNet EMA, sample grid, noising strip): a
    ConfigError before training that lists the keys, not an AttributeError from inside fit."""
    cfg = compose_cfg("train", ["model=autoencoder", "data=digits_captioned", "data.resolution=16", *FAST], tmp_path)
    with pytest.raises(DiffusionLabError) as e:
        train(cfg)
    message = str(e.value)
    assert all(f"callbacks.{k}" in message for k in ("ema", "sample_grid", "noising_strip")) and "callbacks=autoencoder" in message
    assert not (tmp_path / "checkpoints").exists()
