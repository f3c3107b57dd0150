"""Sana on a tiny random SanaPipeline (diffusion_lab/testing/sana.py, built offline): the pipeline round-trips
through save_pretrained; the conditioner is SanaPipeline.encode_prompt (atol 0) at a fixed length the
transformer ignores through its mask; the DC-AE codec is the pipeline's encode/decode."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, SanaPipeline

from diffusion_lab.families.sana import DCAECodec, SanaTextConditioner
from diffusion_lab.testing import sana as tiny_sana

PROMPT = "a handwritten digit seven"
CAPTIONS = [PROMPT, "A Handwritten digit zero  ", "a photo of a cartoon dragon with wings and a tail"]
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length (the pipeline's default is 300)


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
