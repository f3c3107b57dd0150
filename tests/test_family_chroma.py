"""Chroma on a tiny random ChromaPipeline (diffusion_lab/testing/chroma.py): the offline folder round trip,
the conditioner against ChromaPipeline.encode_prompt, the family's backbone call against the pipeline's."""

import numpy as np
import pytest
import torch
from diffusers import ChromaPipeline, DiffusionPipeline

from diffusion_lab.components.vae import VAECodec
from diffusion_lab.families.chroma import Chroma, ChromaTextConditioner
from diffusion_lab.testing import chroma
from diffusion_lab.utils.errors import ConfigError

PROMPT = "a handwritten digit seven"
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length: the pipeline is called with it


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``python -m diffusion_lab.tiny_sd DIR --kind chroma``: the pipeline's own save_pretrained."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_chroma"
    chroma.tiny_pipeline(32).save_pretrained(path)
    return str(path)


def generate(pipe, steps=2, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32, output_type="np", generator=g, max_sequence_length=MAX_LENGTH, **kw).images


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
