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

from diffusion_lab.families.flux2 import Flux2, Flux2Codec, Flux2TextConditioner
from diffusion_lab.testing import flux2 as tiny

PROMPTS = ["a handwritten digit seven", "", "a red dog with a big tail on a white background " * 4]


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
