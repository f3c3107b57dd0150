"""FLUX.1 Kontext on a tiny random FluxKontextPipeline (diffusion_lab/testing/flux_kontext.py): the offline
folder round trip, the reference latents against the pipeline's prepare_latents, the family's backbone call
(reference tokens appended, target tokens kept) against the pipeline's."""

import numpy as np
import pytest
import torch
from types import SimpleNamespace
from diffusers import DiffusionPipeline, FluxKontextPipeline

from diffusion_lab.components.text_mmdit import FluxTextConditioner
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.families.flux_kontext import FluxKontext
from diffusion_lab.testing import flux_kontext
from diffusion_lab.utils.errors import ConfigError

PROMPT = "a handwritten digit seven"
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length: the pipeline is called with it


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``python -m diffusion_lab.tiny_sd DIR --kind flux_kontext``: the pipeline's own save_pretrained."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_flux_kontext"
    flux_kontext.tiny_pipeline(32).save_pretrained(path)
    return str(path)


def source_images(n=1, seed=0):
    """``[n, 3, 32, 32]`` in [-1, 1], as a batch's ``source_pixel_values``."""
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generate(pipe, source, steps=2, **kw):
    """The pipeline at the tiny size: ``max_area`` = 32^2 (else it rescales to 1024^2) and no resize of the
    reference to Kontext's preferred resolutions; the reference as the pipeline takes it, in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    return pipe(image=(source + 1) / 2, prompt=PROMPT, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32, max_area=32 * 32, _auto_resize=False,
                output_type="np", generator=g, max_sequence_length=MAX_LENGTH, **kw).images


def test_tiny_pipeline_round_trips_offline(folder):
    size = sum(p.stat().st_size for p in __import__("pathlib").Path(folder).rglob("*") if p.is_file())
    assert size < 4e6
    a, b = FluxKontextPipeline.from_pretrained(folder, local_files_only=True), DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(b) is FluxKontextPipeline and a.transformer.config.guidance_embeds
    image = generate(a, source_images())
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, generate(b, source_images()))
    assert np.abs(image - generate(a, source_images(seed=1))).max() > 1e-4  # the reference image conditions it


def test_reference_latents_and_backbone_call_are_the_pipeline_s(folder):
    """``conditioning`` == ``prepare_latents``'s image latents (posterior mode, shift and scale) and
    ``FluxKontext.forward`` == the transformer call of ``FluxKontextPipeline.__call__``, both at atol 0."""
    pipe = FluxKontextPipeline.from_pretrained(folder)
    conditioner = FluxTextConditioner(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, max_sequence_length=MAX_LENGTH)
    family = FluxKontext(guidance=1.0)
    module = SimpleNamespace(codec=VAECodec(pipe.vae), device=torch.device("cpu"), base_backbone=pipe.transformer)
    prompts, source = [PROMPT, ""], source_images(2)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        states = family.text_states(conditioner, prompts)
        cond = family.conditioning(module, {"source_pixel_values": source}, 2, sampling=False)
        assert set(cond) == {"guidance", "reference_latents"} and cond["guidance"].tolist() == [1.0, 1.0]
        ours = family.forward(pipe.transformer, x, t, **states, **cond)

        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=MAX_LENGTH)
        tokens, reference, ids, reference_ids = pipe.prepare_latents(source, 2, 16, 32, 32, torch.float32, "cpu", None, pipe._pack_latents(x, 2, 16, 16, 16))
        theirs = pipe.transformer(hidden_states=torch.cat([tokens, reference], 1), timestep=t / 1000, guidance=torch.ones(2), pooled_projections=pooled,
                                  encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=torch.cat([ids, reference_ids]), return_dict=False)[0]
    torch.testing.assert_close(states["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(states["pooled_projections"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(pipe._pack_latents(cond["reference_latents"], 2, 16, 16, 16), reference, rtol=0, atol=0)
    assert (reference_ids[:, 0] == 1).all() and (ids[:, 0] == 0).all()
    torch.testing.assert_close(ours, pipe._unpack_latents(theirs[:, : tokens.shape[1]], 32, 32, pipe.vae_scale_factor), rtol=0, atol=0)


def test_a_batch_without_source_images_is_a_config_error(folder):
    pipe = FluxKontextPipeline.from_pretrained(folder)
    module = SimpleNamespace(codec=VAECodec(pipe.vae), device=torch.device("cpu"), base_backbone=pipe.transformer)
    with pytest.raises(ConfigError, match=r"no 'source_pixel_values' .*data.paired_images='\{source_image: source_pixel_values\}'"):
        FluxKontext().conditioning(module, {"caption": [PROMPT]}, 1, sampling=False)
