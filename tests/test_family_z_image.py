"""Z-Image (``families/z_image.py``) on a tiny random ``ZImagePipeline`` built offline
(``testing/z_image.py``): the pipeline round-trips through save_pretrained, the conditioner is the
pipeline's ``encode_prompt`` padded to a fixed length, and the family's backbone call on padded states +
mask is the pipeline's own call on its per-prompt lists."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, ZImagePipeline

from diffusion_lab.families.z_image import ZImage, ZImageTextConditioner
from diffusion_lab.testing.z_image import tiny_pipeline

PROMPT = "a handwritten digit seven"
PROMPTS = [PROMPT, "", "a red dragon with wings and a long tail " * 12]  # "" and one truncated at MAX_LENGTH
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``tiny_pipeline().save_pretrained(DIR)``: what ``python -m diffusion_lab.tiny_sd DIR --kind z_image`` writes."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_z_image"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return ZImagePipeline.from_pretrained(folder, local_files_only=True)


def sample(pipe, steps=2, guidance_scale=3.0, **kw):
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
