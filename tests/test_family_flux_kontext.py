"""FLUX.1 Kontext on a tiny random FluxKontextPipeline (diffusion_lab/testing/flux_kontext.py): the offline
folder round trip, the reference latents against the pipeline's prepare_latents, the family's backbone call
(reference tokens appended, target tokens kept) against the pipeline's, full and LoRA fits on a folder of edit
pairs whose exports plain diffusers loads and samples like the module, the GPU recipe for a step on CPU, and a
folder of another family."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxKontextPipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.testing import tiny
from diffusion_lab.components.text_mmdit import FluxTextConditioner
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.families.flux_kontext import FluxKontext
from diffusion_lab.testing import flux_kontext
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import losses

PROMPT = "a handwritten digit seven"
MAX_LENGTH = 32  # the tiny recipe's text_encoder.max_sequence_length: the pipeline is called with it
GUIDANCE = 3.0  # the embedded guidance
FAST = [o for o in SD_FAST if not o.startswith("experiment=")]  # experiment=flux_kontext_finetune_tiny, 4 steps
QUIET = ["callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


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
    return pipe(image=(source + 1) / 2, prompt=PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=32, width=32, max_area=32 * 32, _auto_resize=False,
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


# ---- training on edit pairs: exports in plain diffusers -------------------------------------------------
def paired_folder(root):
    """16 edit pairs (diffusers imagefolder): each target digit ``file_name`` with its colour-inverted
    ``source_image`` and a caption; the sources are no training images themselves."""
    from PIL import Image, ImageOps
    from sklearn.datasets import load_digits

    from diffusion_lab.data.digits import DIGIT_NAMES

    digits = load_digits()
    (root / "sources").mkdir(parents=True)
    rows = []
    for i in range(16):
        image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((40, 40)).convert("RGB")
        image.save(root / f"img_{i:02d}.png")
        ImageOps.invert(image).save(root / "sources" / f"img_{i:02d}.png")
        rows.append({"file_name": f"img_{i:02d}.png", "source_image": f"sources/img_{i:02d}.png", "text": f"a handwritten digit {DIGIT_NAMES[digits.target[i]]}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data=image_folder", f"data.root={root}", "data.caption_column=text", "data.paired_images={source_image:source_pixel_values}", "data.resolution=32",
            "data.batch_size=4", "data.val_fraction=0.25", "data.num_workers=0", "data.control=null", "model.family.source_key=source_pixel_values"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return paired_folder(tmp_path_factory.mktemp("pairs") / "pairs")


def fit(out, *overrides):
    cfg = compose_cfg("train", ["experiment=flux_kontext_finetune_tiny", *FAST, *overrides], out)
    _, objects = train(cfg)
    return objects


def own_sampler(objects, source, steps=2):
    """The module's own sampler (EMA weights, as exported) on ``source``, as a pipeline's numpy images."""
    module, g = objects["model"], torch.Generator().manual_seed(0)
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT], "source_pixel_values": source}, guidance_scale=GUIDANCE)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


def test_full_finetune_on_pairs_exports_a_pipeline_plain_diffusers_loads(folder, pairs, tmp_path):
    """The folder is the pipeline's own save_pretrained; 4 steps on the pairs (previews take the training
    sources); the export, given the source, samples like the module's sampler to atol 1e-5."""
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", *pairs, "callbacks.sample_grid.num_images=2")
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4 and (out / "samples" / "step_000004.png").exists()
    assert "source_pixel_values" in objects["datamodule"].sample_batch(2)
    pipe, base = DiffusionPipeline.from_pretrained(out / "pipeline"), FluxKontextPipeline.from_pretrained(folder)
    assert type(pipe) is FluxKontextPipeline and dict(pipe.scheduler.config) == dict(base.scheduler.config)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), base.transformer.parameters()))
    for name in ("text_encoder", "text_encoder_2", "vae"):  # frozen parts exported unchanged
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).parameters(), getattr(base, name).parameters())), name
    source = source_images()
    image = generate(pipe, source)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and np.abs(image - generate(base, source)).max() > 1e-3
    np.testing.assert_allclose(image, own_sampler(objects, source), atol=1e-5)


def test_lora_changes_the_output_and_loads_with_load_lora_weights(folder, pairs, tmp_path):
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", *pairs, *QUIET, "adapter=lora")
    trainable = [n for n, p in objects["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("backbone.") for n in trainable)
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"} and not (out / "pipeline").exists()
    base, source = FluxKontextPipeline.from_pretrained(folder), source_images()
    before = generate(base, source)
    base.load_lora_weights(out / "lora")
    with_lora = generate(base, source)
    assert np.abs(with_lora - before).max() > 1e-3
    np.testing.assert_allclose(with_lora, own_sampler(objects, source), atol=1e-5)


def test_the_tiny_recipe_on_digits_edits_edge_maps_into_digits(folder, tmp_path):
    """experiment=flux_kontext_finetune_tiny as shipped: data=digits_captioned, each digit's source its edge map
    (data.control=edges); previews take the first training sources."""
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_images=2")
    assert objects["model"].family.source_key == "conditioning_pixel_values" and np.isfinite(losses(out)).all()
    batch = objects["datamodule"].sample_batch(2)
    assert set(batch["conditioning_pixel_values"].unique().tolist()) <= {-1.0, 1.0}  # binary edge maps in [-1, 1]
    assert (out / "samples" / "step_000002.png").exists()


def test_gpu_lora_recipe_runs_a_step_on_the_tiny_pipeline(folder, pairs, tmp_path):
    """experiment=flux_kontext_lora's settings (cache carrying the sources, bf16 frozen transformer and
    encoders, bf16-mixed, checkpointing, LoRA) on CPU; torch's AdamW stands in for 8-bit AdamW (CUDA)."""
    recipe = compose_cfg("train", ["experiment=flux_kontext_lora", "data.root=/data/pairs"], tmp_path / "composed")
    assert recipe.model.pretrained == "black-forest-labs/FLUX.1-Kontext-dev" and recipe.data.resolution == 1024 and recipe.model.family.guidance == 1.0
    assert recipe.data.paired_images == {"source_image": "source_pixel_values"} and recipe.model.optimizer._target_ == "diffusion_lab.components.optim.adamw_8bit"
    data = [o for o in pairs if not o.startswith(("data=", "data.paired_images", "data.caption_column", "data.control"))]
    cfg = compose_cfg("train", ["experiment=flux_kontext_lora", f"model.pretrained={folder}", "model.local_files_only=true", *data,
                                "optimizer@model.optimizer=adamw", "model.optimizer.lr=1e-4", "trainer=cpu", "debug=fast", "logger=csv", *QUIET], tmp_path / "run")
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    assert {p.dtype for e in module.conditioner.encoders for p in e.parameters()} == {torch.bfloat16}
    train_set = objects["datamodule"].train_set
    assert type(train_set).__name__ == "CachedLatentDataset" and "source_pixel_values" in train_set[0]
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_a_folder_of_another_family_is_a_config_error_naming_it(tmp_path):
    """A Chroma folder is refused naming model=latent_chroma; a FLUX.1 folder is accepted (Kontext's parts)."""
    import diffusion_lab.families.chroma  # noqa: F401 (registers model=latent_chroma in mmdit.FAMILY_PIPELINES, for the hint)

    chroma = tiny.build(tmp_path / "tiny_chroma", kind="chroma")
    cfg = compose_cfg("train", ["model=latent_flux_kontext", f"model.pretrained={chroma}", "data=digits_captioned", "data.resolution=32"], tmp_path)
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.model)
    message = str(user_error(excinfo))
    assert f"model.pretrained='{chroma}' is a ChromaPipeline folder" in message and "model=latent_flux_kontext trains a FluxKontextPipeline or FluxPipeline" in message
    assert "use model=latent_chroma" in message and "--kind flux_kontext" in message
    flux = tiny.build(tmp_path / "tiny_flux", kind="flux")
    cfg = compose_cfg("train", ["model=latent_flux_kontext", f"model.pretrained={flux}", "data=digits_captioned", "data.resolution=32"], tmp_path)
    assert type(instantiate(cfg.model).family) is FluxKontext


def test_controlnet_is_refused(folder, tmp_path):
    cfg = compose_cfg("train", ["experiment=flux_kontext_finetune_tiny", f"model.pretrained={folder}", "controlnet=from_backbone"], tmp_path)
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.model)
    assert re.search(r"controlnet=from_backbone cannot be used with model=latent_flux_kontext: diffusers \S+ has no ControlNet pipeline for FluxKontextPipeline", str(user_error(excinfo)))


@pytest.mark.slow
def test_an_edit_model_from_a_flux_folder_exports_a_kontext_pipeline(pairs, tmp_path):
    """Kontext from FLUX.1's weights (a FluxPipeline folder diffusers wrote): 2 steps on the pairs; the export
    is a FluxKontextPipeline that samples like the module (atol 1e-5)."""
    flux = tiny.build(tmp_path / "tiny_flux", kind="flux")
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={flux}", *pairs, *QUIET, "trainer.max_steps=2")
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe) is FluxKontextPipeline and np.isfinite(losses(out)).all()
    source = source_images()
    np.testing.assert_allclose(generate(pipe, source), own_sampler(objects, source), atol=1e-5)
