"""``python -m diffusion_lab.lora merge|extract`` on the tiny SD 1.x pipeline: merged folders give the
images of the base with the LoRAs loaded; extracted LoRAs reproduce a full fine-tune at full rank, get
closer with rank, and load with diffusers' ``load_lora_weights``; bad inputs fail naming the file."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from diffusion_lab.components.adapters import KOHYA_FILE, add_lora, lora_config
from diffusion_lab.export.kohya import save_lora_files
from diffusion_lab.testing.tiny import build
from diffusion_lab.export import lora_tools
from diffusion_lab.families.sd import StableDiffusion
from diffusion_lab.lora import main
from diffusion_lab.utils.errors import ConfigError


def _pipe(path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)


def _images(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def _unet_out(pipe) -> torch.Tensor:
    """The backbone's prediction on fixed inputs [1, 4, 16, 16] (the cheapest exact comparison)."""
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=c).sample


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("base") / "sd", "sd")


def _trained_lora(base: Path, out: Path, seed: int, targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in")) -> Path:
    """A LoRA on the tiny UNet with random, non-zero A and B (as after training), written by the SD
    family's own export (diffusers' files + the kohya file)."""
    unet = _pipe(base).unet
    torch.manual_seed(seed)
    add_lora(unet, lora_config(rank=4, alpha=8, target_modules=targets, init=False))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.mul_(2.0)  # big enough to move the images visibly
    save_lora_files(StableDiffusion(), str(out), unet, {})
    return out


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("loras")
    return _trained_lora(base, d / "a", 1), _trained_lora(base, d / "b", 2, targets=("to_q", "to_v", "ff.net.2"))


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory) -> Path:
    """A 'full fine-tune' that moved every Linear / 1x1 conv weight of the UNet (what a LoRA can carry)."""
    pipe = _pipe(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in pipe.unet.modules():
            if lora_tools._adaptable(m):
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))
    out = tmp_path_factory.mktemp("tuned") / "sd"
    pipe.save_pretrained(out)
    return out


def test_merge_equals_loaded_loras(base, loras, tmp_path):
    a, b = loras
    main(["merge", str(base), str(tmp_path / "merged"), "--lora", f"{a}:0.7", "--lora", str(b / lora_tools.LORA_FILE)])
    ref = _pipe(base)
    plain = _images(ref)
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, 1.0])
    merged = _pipe(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())  # a plain UNet, no LoRA layers
    got, want = _images(merged), _images(ref)
    assert np.abs(want - plain).max() > 0.1  # the LoRAs change the images ...
    # ... and the merged folder gives the same ones, up to fp32 rounding of W + s B A (measured 4e-4;
    # diffusers' own in-memory fuse_lora moves the UNet output by the same 1e-4 as the saved folder)
    np.testing.assert_allclose(got, want, atol=2e-3)
    ref.fuse_lora(adapter_names=["a", "b"])
    torch.testing.assert_close(_unet_out(merged), _unet_out(ref), atol=1e-6, rtol=0)


def test_merge_kohya_file_equals_diffusers_file(base, loras, tmp_path):
    """The SD export's kohya / A1111 file merges (through diffusers' converter) to the same weights."""
    a, _ = loras
    lora_tools.merge(str(base), [(str(a / KOHYA_FILE), 1.0)], str(tmp_path / "kohya"))
    lora_tools.merge(str(base), [(str(a), 1.0)], str(tmp_path / "diffusers"))
    torch.testing.assert_close(_unet_out(_pipe(tmp_path / "kohya")), _unet_out(_pipe(tmp_path / "diffusers")), atol=1e-5, rtol=0)


def test_extract_full_rank_reproduces_finetune(base, tuned, tmp_path):
    summary = lora_tools.extract(str(base), str(tuned), str(tmp_path / "full"), energy=1.0)
    assert summary["covered"] == pytest.approx(1.0) and summary["layers"] == 63
    pipe, want = _pipe(base), _unet_out(_pipe(tuned))
    before = (_unet_out(pipe) - want).abs().max()
    pipe.load_lora_weights(str(tmp_path / "full"))
    assert before > 0.5
    torch.testing.assert_close(_unet_out(pipe), want, atol=1e-4, rtol=0)


def test_extract_error_decreases_with_rank(base, tuned, tmp_path):
    want = _unet_out(_pipe(tuned))
    errors = [float((_unet_out(_pipe(base)) - want).norm())]
    for rank in (2, 8, 24):
        main(["extract", str(base), str(tuned), str(tmp_path / f"r{rank}"), "--rank", str(rank)])
        pipe = _pipe(base)
        pipe.load_lora_weights(str(tmp_path / f"r{rank}"))  # diffusers reads the file as written
        errors.append(float((_unet_out(pipe) - want).norm()))
    assert all(e1 < e0 for e0, e1 in pairwise(errors)), errors


def test_low_rank_is_truncated_svd():
    torch.manual_seed(0)
    delta = torch.randn(48, 32, dtype=torch.float64)
    S = torch.linalg.svdvals(delta)
    up, down = lora_tools.low_rank(delta, rank=5)
    assert up.shape == (48, 5) and down.shape == (5, 32)
    # Eckart-Young: the residual of the best rank-5 approximation is the tail of the spectrum
    assert float((delta - (up @ down).double()).norm()) == pytest.approx(float(S[5:].norm()), rel=1e-5)
    up, _ = lora_tools.low_rank(delta, energy=0.9)
    share = torch.cumsum(S**2, 0) / (S**2).sum()
    r = up.shape[1]
    assert share[r - 1] >= 0.9 > share[r - 2]  # the smallest rank keeping 90%


def test_bad_inputs_name_the_file(base, loras, tuned, tmp_path):
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ConfigError, match=r"diffusion_pytorch_model\.safetensors: not a LoRA"):
        lora_tools.merge(str(base), [(str(unet_file), 1.0)], str(tmp_path / "m"))
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    with pytest.raises(ConfigError, match=r"notes\.safetensors: not a safetensors file"):
        lora_tools.merge(str(base), [(str(text), 1.0)], str(tmp_path / "m"))
    # another family: a FLUX-style transformer LoRA matches no layer of the SD pipeline
    flux = tmp_path / "flux_lora.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32), "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4)}, str(flux))
    with pytest.raises(ConfigError, match=r"flux_lora\.safetensors: a LoRA for another family or base"):
        lora_tools.merge(str(base), [(str(flux), 1.0)], str(tmp_path / "m"))
    # another base: the same layer names, other shapes (a UNet 2x as wide)
    wide = build(tmp_path / "wide", "sd")
    pipe = _pipe(wide)
    from diffusion_lab.testing.tiny import tiny_unet

    pipe.unet = tiny_unet(block_out_channels=(64, 128))
    add_lora(pipe.unet, lora_config(rank=4, init=False))
    StableDiffusion().save_lora(str(tmp_path / "wide_lora"), pipe.unet, {})
    with pytest.raises(ConfigError, match=r"wide_lora/pytorch_lora_weights\.safetensors: a LoRA for another family or base"):
        lora_tools.merge(str(base), [(str(tmp_path / "wide_lora"), 1.0)], str(tmp_path / "m"))
    with pytest.raises(ConfigError, match=r"--rank 33 is above the size of .* at most 32"):
        lora_tools.extract(str(base), str(tuned), str(tmp_path / "x"), rank=33)
    with pytest.raises(ConfigError, match=r"wide_lora: not a diffusers pipeline folder"):
        lora_tools.extract(str(base), str(tmp_path / "wide_lora"), str(tmp_path / "x"), rank=4)
    with pytest.raises(SystemExit, match=r"^error: .*diffusion_pytorch_model\.safetensors: not a LoRA"):  # the CLI: the paragraph, no traceback
        main(["merge", str(base), str(tmp_path / "m"), "--lora", str(unet_file)])
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()  # nothing half-written


# ---- real runs: a LoRA and a full fine-tune trained by experiment=sd_finetune_tiny ----------------
def _fit(out: Path, base: Path, *overrides: str) -> None:
    from diffusion_lab.train import train
    from tests.conftest import compose_cfg

    fast = ["debug=fast", "callbacks.progress_bar=null", "callbacks.sample_grid=null", "callbacks.ema=null", "data.batch_size=4", "model.preview_steps=2"]
    train(compose_cfg("train", ["experiment=sd_finetune_tiny", f"model.pretrained={base}", "model.optimizer.lr=0.05", *overrides, *fast], out))


def test_trained_runs_merge_and_extract(base, tmp_path):
    """The LoRA a run exports merges to the images of the base with it loaded; the LoRA extracted from
    a full fine-tune loads and moves the backbone's output towards the fine-tune's."""
    _fit(tmp_path / "lora_run", base, "adapter=lora", "adapter.target_modules=[to_q,to_k,to_v,to_out.0,proj_in,proj_out]")
    lora = tmp_path / "lora_run" / "lora"
    main(["merge", str(base), str(tmp_path / "merged"), "--lora", str(lora)])
    ref = _pipe(base)
    plain = _images(ref)
    ref.load_lora_weights(str(lora))
    want = _images(ref)
    assert np.abs(want - plain).max() > 1e-3
    np.testing.assert_allclose(_images(_pipe(tmp_path / "merged")), want, atol=2e-3)

    _fit(tmp_path / "full_run", base)
    tuned = tmp_path / "full_run" / "pipeline"
    summary = lora_tools.extract(str(base), str(tuned), str(tmp_path / "extracted"), energy=0.9)
    assert 0 < summary["covered"] < 1  # 3x3 convs, norms and biases moved too: no LoRA of Linear layers holds them
    pipe, goal = _pipe(base), _unet_out(_pipe(tuned))
    before = float((_unet_out(pipe) - goal).norm())
    pipe.load_lora_weights(str(tmp_path / "extracted"))
    assert float((_unet_out(pipe) - goal).norm()) < before


# ---- the other families: the tools know no family, only the pipeline's backbone and LoRA loader ------
@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_merge_and_extract_other_families(kind, tmp_path):
    from diffusers import DiffusionPipeline

    from diffusion_lab.components.adapters import lora_state_dict

    def load(path):
        return DiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)

    def images(pipe):
        extra = {"max_sequence_length": 32} if kind == "flux" else {}
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np", **extra).images

    base = build(tmp_path / "base", kind)
    pipe = load(base)
    name = lora_tools.backbone_name(pipe)
    backbone = getattr(pipe, name)
    torch.manual_seed(0)
    add_lora(backbone, lora_config(rank=4, target_modules=("to_q", "to_k", "to_v"), init=False))
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)  # big enough to move the images visibly
    type(pipe).save_lora_weights(str(tmp_path / "lora"), **{f"{name}_lora_layers": lora_state_dict(backbone)})
    # merge: the fused folder gives the images of the base with the LoRA loaded at weight 0.8
    lora_tools.merge(str(base), [(str(tmp_path / "lora"), 0.8)], str(tmp_path / "merged"))
    ref = load(base)
    plain = images(ref)
    ref.load_lora_weights(str(tmp_path / "lora"), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.8])
    want = images(ref)
    assert np.abs(want - plain).max() > 1e-2
    np.testing.assert_allclose(images(load(tmp_path / "merged")), want, atol=1e-4)  # measured 2e-6 (SDXL), 4e-7 (FLUX)
    # extract at full rank from the merged folder (a 'fine-tune' of the base): the same images again
    summary = lora_tools.extract(str(base), str(tmp_path / "merged"), str(tmp_path / "extracted"), energy=1.0)
    assert summary["covered"] == pytest.approx(1.0)
    back = load(base)
    back.load_lora_weights(str(tmp_path / "extracted"))
    np.testing.assert_allclose(images(back), images(load(tmp_path / "merged")), atol=1e-4)  # measured 2e-6, 5e-7
