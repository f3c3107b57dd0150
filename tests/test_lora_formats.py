"""LoRA export formats (``callbacks.export.lora_format=diffusers|kohya|both``) and their refusals before
training (``export/kohya.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lab.testing import tiny, tiny_mmdit
from diffusion_lab.components.adapters import KOHYA_FILE, add_lora, lora_config
from diffusion_lab.export.kohya import save_lora_files
from diffusion_lab.export.lora_tools import LORA_FILE
from diffusion_lab.families.sd import StableDiffusion
from diffusion_lab.utils.errors import ConfigError

ATOL = 1e-5  # images in [0, 1]: float32 rounding of the factor rescaling only


def images(pipe) -> np.ndarray:
    return pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32).images


@pytest.mark.parametrize(("lora_format", "files"), [("diffusers", {LORA_FILE}), ("kohya", {KOHYA_FILE}), ("both", {LORA_FILE, KOHYA_FILE})])
def test_lora_format_writes_the_files_asked_for(lora_format, files, tmp_path):
    """Each format writes its files only; the kohya-only file alone gives the diffusers file's images."""
    trained = tiny.tiny_sd_pipeline()
    add_lora(trained.unet, lora_config(rank=4, alpha=8, init=False))
    save_lora_files(StableDiffusion(), str(tmp_path), trained.unet, {}, lora_format)
    assert {p.name for p in tmp_path.iterdir()} == files
    pipe = tiny.tiny_sd_pipeline()
    pipe.load_lora_weights(tmp_path, weight_name=next(iter(files)) if len(files) == 1 else LORA_FILE)
    want = images(trained)
    assert np.abs(want - images(tiny.tiny_sd_pipeline())).max() > 1e-3  # the LoRA changes the images
    np.testing.assert_allclose(images(pipe), want, atol=ATOL, rtol=0)


def _train(tmp_path, *overrides):
    from diffusion_lab.train import train
    from tests.conftest import compose_cfg
    from tests.test_latent_train import FAST

    fast = [o for o in FAST if not o.startswith("experiment=")]
    cfg = compose_cfg("train", [*overrides, *fast, "callbacks.sample_grid=null"], tmp_path / "run")
    return train(cfg)


@pytest.mark.parametrize(
    ("kind", "overrides", "match"),
    [
        ("sd3", ["experiment=sd3_finetune_tiny", "adapter=lora"], r"callbacks\.export\.lora_format=kohya .*model=latent_sd3"),
        ("sd", ["experiment=sd_finetune_tiny", "adapter=dora"], r"callbacks\.export\.lora_format=kohya .*DoRA"),
        ("sd", ["experiment=sd_finetune_tiny", "adapter=lokr"], r"callbacks\.export\.lora_format=kohya with adapter=lokr"),
    ],
)
def test_kohya_format_that_cannot_be_written_is_refused_before_training(kind, overrides, match, tmp_path):
    folder = tiny.build(tmp_path / "tiny", kind=kind)
    with pytest.raises(ConfigError, match=match):
        _train(tmp_path, *overrides, f"model.pretrained={folder}", "callbacks.export.lora_format=kohya")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


def test_unknown_lora_format_is_refused(tmp_path):
    folder = tiny.build(tmp_path / "tiny", kind="sd")
    with pytest.raises(ConfigError, match=r"callbacks\.export\.lora_format='safetensors' is not one of diffusers, kohya, both"):
        _train(tmp_path, "experiment=sd_finetune_tiny", "adapter=lora", f"model.pretrained={folder}", "callbacks.export.lora_format=safetensors")


@pytest.mark.parametrize(("kind", "adapter"), [("sd", "lora"), ("qwen_image", "lora"), ("z_image", "lokr")])
def test_trained_run_with_kohya_format_exports_the_kohya_file_only(kind, adapter, tmp_path):
    """Through the real configs and the export callback: 4 steps, then the kohya (LoRA) or LyCORIS (LoKr) file alone."""
    folder = tiny.build(tmp_path / "tiny", kind=kind)
    _train(tmp_path, f"experiment={kind}_finetune_tiny", f"adapter={adapter}", f"model.pretrained={folder}", "callbacks.export.lora_format=kohya")
    (lora_dir,) = {p.parent for p in (tmp_path / "run").rglob(KOHYA_FILE)}
    assert {p.name for p in lora_dir.iterdir()} - {"fused"} == {KOHYA_FILE}  # fused/: adapter.export_fused (LoKr's default)


# ---- kohya files of the families beyond SD / SDXL / FLUX.1, read back by diffusers' own readers -------
def _family(kind: str):
    from diffusion_lab.families.chroma import Chroma
    from diffusion_lab.families.flux2 import Flux2
    from diffusion_lab.families.flux_kontext import FluxKontext
    from diffusion_lab.families.qwen_image import QwenImage
    from diffusion_lab.families.z_image import ZImage

    return {"qwen_image": QwenImage, "z_image": ZImage, "chroma": Chroma, "flux2": Flux2, "flux_kontext": FluxKontext}[kind]()


# every linear of the attention blocks each reader names at the tiny widths (FLUX.1-style readers: the double
# blocks only, whose reader takes any width; a single block's linear1 only at FLUX.1's, tests/test_kohya.py)
FLUX1_DOUBLE = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)"
TARGETS = {
    "qwen_image": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|img_mlp\.net\.0\.proj|img_mlp\.net\.2|txt_mlp\.net\.0\.proj|txt_mlp\.net\.2|img_mod\.1|txt_mod\.1)",
    "z_image": r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))",
    "chroma": FLUX1_DOUBLE,
    "flux_kontext": FLUX1_DOUBLE,
    "flux2": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)",
}


@pytest.mark.parametrize("kind", TARGETS)
def test_kohya_file_of_each_family_loads_in_diffusers_like_the_diffusers_file(kind, tmp_path):
    """Random LoRA (alpha != rank) on every attention-block linear a reader names: diffusers' reader maps
    every key of ``lora_kohya.safetensors`` back onto the trained layer, images equal the diffusers file's."""
    import importlib

    from peft import LoraConfig

    from tests.test_kohya import check_same_updates

    build = importlib.import_module(f"diffusion_lab.testing.{kind}").tiny_pipeline
    trained = build()
    add_lora(trained.transformer, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS[kind]))
    with torch.no_grad():  # big enough to move the tiny images visibly
        for name, p in trained.transformer.named_parameters():
            if "lora_B" in name:
                p.mul_(5.0)
    save_lora_files(_family(kind), str(tmp_path), trained.transformer, {}, "both")
    from safetensors.torch import load_file

    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / KOHYA_FILE))
    from_diffusers, from_kohya = build(), build()
    from_diffusers.load_lora_weights(tmp_path)
    from_kohya.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    check_same_updates(trained.transformer, from_diffusers.transformer)
    check_same_updates(trained.transformer, from_kohya.transformer)
    run = _family_images(kind)
    base, want, a, b = run(build()), run(trained), run(from_diffusers), run(from_kohya)
    assert np.abs(want - base).max() > 1e-3
    np.testing.assert_allclose(a, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)


def _family_images(kind: str):
    """``pipe -> [N, H, W, 3]`` numpy images: the family's tiny pipeline at 32 px, 2 steps, text length 32."""
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "max_sequence_length": 32}
    if kind == "flux_kontext":  # an edit pipeline: a reference image, at the tiny size (no resize to 1024^2)
        source = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        kw.update(image=source, max_area=32 * 32, _auto_resize=False)
    return lambda pipe: pipe(prompt="a photo", generator=torch.Generator().manual_seed(0), **kw).images


# ---- adapter.init_from: a LoRA run that starts from a LoRA file -------------------------------------------
@pytest.fixture(scope="module")
def sd_lora_run(tmp_path_factory):
    """The tiny SD pipeline and a 4-step LoRA run on it (lr 1e-2, alpha != rank, text encoder too), exported
    in both formats."""
    tmp = tmp_path_factory.mktemp("init_from")
    folder = tiny.build(tmp / "tiny", kind="sd")
    _train(tmp, "experiment=sd_finetune_tiny", "adapter=lora", "adapter.alpha=8", "adapter.train_text_encoder=true", "model.optimizer.lr=1e-2", f"model.pretrained={folder}")
    (lora_dir,) = {p.parent for p in (tmp / "run").rglob(KOHYA_FILE)}
    return folder, lora_dir


def _module(tmp_path, folder, *overrides):
    """The SD LoRA module the config builds (a ConfigError unwrapped from hydra's InstantiationException)."""
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["experiment=sd_finetune_tiny", "adapter=lora", "adapter.alpha=8", "adapter.train_text_encoder=true", f"model.pretrained={folder}", *overrides], tmp_path)
    try:
        return instantiate(cfg.model)
    except Exception as e:
        while e.__cause__ is not None and not isinstance(e, ConfigError):
            e = e.__cause__
        raise e


@pytest.mark.parametrize("weight_name", [LORA_FILE, KOHYA_FILE])
def test_init_from_a_runs_lora_gives_its_images_at_step_0(weight_name, sd_lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion_lab.export.pipelines import build_pipeline

    folder, lora_dir = sd_lora_run
    module = _module(tmp_path, folder, f"adapter.init_from={lora_dir / weight_name}")
    want = StableDiffusionPipeline.from_pretrained(folder)
    base = images(want)
    want.load_lora_weights(lora_dir)
    want = images(want)
    assert np.abs(want - base).max() > 1e-3  # the run's LoRA moved the images
    np.testing.assert_allclose(images(build_pipeline(module)), want, atol=ATOL, rtol=0)
    assert all(p.requires_grad for n, p in module.base_backbone.named_parameters() if "lora_" in n)  # it trains on
    assert not any("init" in n for n, _ in module.base_backbone.named_parameters())  # the scratch adapter is gone


def test_init_from_refuses_another_family_a_non_lora_and_another_rank(sd_lora_run, tmp_path):
    from diffusion_lab.families.sdxl import StableDiffusionXL

    folder, lora_dir = sd_lora_run
    sdxl = tiny.tiny_sdxl_pipeline()
    add_lora(sdxl.unet, lora_config(rank=4, alpha=8, init=False))
    save_lora_files(StableDiffusionXL(), str(tmp_path / "sdxl"), sdxl.unet, {}, "both")
    for wrong in (tmp_path / "sdxl" / LORA_FILE, tmp_path / "sdxl" / KOHYA_FILE, folder / "unet" / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(ConfigError, match=f"adapter.init_from={wrong}"):
            _module(tmp_path, folder, f"adapter.init_from={wrong}")
    with pytest.raises(ConfigError, match=r"has rank 4 at .* but adapter.rank=8; set adapter.rank=4"):
        _module(tmp_path, folder, f"adapter.init_from={lora_dir / LORA_FILE}", "adapter.rank=8")


# ---- LoKr in LyCORIS keys, where diffusers reads them back (FLUX.2 [klein], Z-Image) ---------------------
@pytest.mark.parametrize("rank", [2, 4])  # 2: peft stores the second factor as w2_a @ w2_b (alpha / r applies); 4: full factors
@pytest.mark.parametrize("kind", ["flux2", "z_image"])
def test_lokr_lycoris_file_loads_in_diffusers_like_the_trained_lokr(kind, rank, tmp_path):
    import importlib

    from safetensors.torch import load_file

    from diffusion_lab.export.lycoris import save_lycoris

    build = importlib.import_module(f"diffusion_lab.testing.{kind}").tiny_pipeline
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    trained = build()
    add_lora(trained.transformer, lora_config(rank=rank, alpha=8, variant="lokr", target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every factor non-zero (peft starts one at zero)
        for name, p in trained.transformer.named_parameters():
            if "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    assert save_lycoris(_family(kind).pipeline_class, str(tmp_path), trained.transformer) is not None
    keys = load_file(tmp_path / KOHYA_FILE)
    assert any(k.endswith(".lokr_w2_a" if rank == 2 else ".lokr_w2") for k in keys) and not any(k.endswith(".alpha") for k in keys)
    loaded = build()
    loaded.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    run = _family_images(kind)
    base, want, got = run(build()), run(trained), run(loaded)
    assert np.abs(want - base).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_init_from_a_dora_file_keeps_its_magnitudes_and_refuses_a_lora_run(tmp_path):
    """A DoRA file (diffusers' layout, magnitude vectors included) continued by adapter=dora gives its images;
    adapter=lora on it is refused (the magnitudes would be lost)."""
    from diffusion_lab.export.pipelines import build_pipeline

    folder = tiny.build(tmp_path / "tiny", kind="sd")
    trained = tiny.tiny_sd_pipeline()
    add_lora(trained.unet, lora_config(rank=4, alpha=8, init=False, variant="dora"))
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)  # magnitudes away from the base weight's norms
    save_lora_files(StableDiffusion(), str(tmp_path / "dora"), trained.unet, {}, "diffusers")
    file = tmp_path / "dora" / LORA_FILE
    module = _module(tmp_path, folder, "adapter=dora", "adapter.train_text_encoder=false", f"adapter.init_from={file}")
    want = images(trained)
    assert np.abs(want - images(tiny.tiny_sd_pipeline())).max() > 1e-3
    np.testing.assert_allclose(images(build_pipeline(module)), want, atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match=r"is a DoRA file but the run trains adapter=lora; use adapter=dora"):
        _module(tmp_path, folder, "adapter.train_text_encoder=false", f"adapter.init_from={file}")


@pytest.mark.parametrize("kind", ["sdxl", "flux", "qwen_image", "flux2"])
def test_init_lora_from_a_kohya_file_of_each_family(kind, tmp_path):
    """``init_lora_from`` through the family's own pipeline loader: a fresh LoRA (B = 0) set from another
    LoRA's kohya file gives that LoRA's images (SDXL's SGM names, FLUX's fused qkv split back, ...)."""
    import importlib

    from peft import LoraConfig

    from diffusion_lab.components.adapters import init_lora_from
    from diffusion_lab.families.flux import Flux
    from diffusion_lab.families.sdxl import StableDiffusionXL
    from tests.test_kohya import FLUX_TARGETS

    if kind in ("sdxl", "flux"):
        build = {"sdxl": tiny.tiny_sdxl_pipeline, "flux": tiny_mmdit.tiny_flux_pipeline}[kind]
        family = {"sdxl": StableDiffusionXL, "flux": Flux}[kind]()
        run = (lambda pipe: images(pipe)) if kind == "sdxl" else _family_images("chroma")  # chroma's call = FLUX.1's
    else:
        build, family, run = importlib.import_module(f"diffusion_lab.testing.{kind}").tiny_pipeline, _family(kind), _family_images(kind)
    name = family.backbone_name
    targets = {"flux": FLUX_TARGETS, "qwen_image": TARGETS["qwen_image"], "flux2": TARGETS["flux2"]}.get(kind, ["to_q", "to_k", "to_v", "to_out.0"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    trained = build()
    add_lora(getattr(trained, name), LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=targets))  # another alpha than the run's
    save_lora_files(family, str(tmp_path), getattr(trained, name), {}, "kohya")
    fresh = build()
    add_lora(getattr(fresh, name), config)
    before = run(fresh)
    assert init_lora_from(str(tmp_path / KOHYA_FILE), fresh, {name: getattr(fresh, name)}) > 0
    want = run(trained)
    assert np.abs(want - before).max() > 1e-3
    np.testing.assert_allclose(run(fresh), want, atol=ATOL, rtol=0)
