"""kohya / A1111 LoRA files of SDXL and FLUX.1 (``diffusion_lab/export/kohya.py``), read back by diffusers'
own non-diffusers converters: every key is consumed, every layer's update lands on the module it was
trained on, and the pipeline gives the images of the diffusers-format file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from diffusion_lab.testing import tiny, tiny_mmdit
from diffusion_lab.components.adapters import KOHYA_FILE, add_lora, lora_config
from diffusion_lab.export.kohya import save_lora_files
from diffusion_lab.export.kohya_layout import flux_kohya, lora_layers
from diffusion_lab.families.flux import Flux
from diffusion_lab.families.sdxl import StableDiffusionXL

ATOL = 1e-5  # images in [0, 1]: the kohya reader folds alpha / r into the factors, float32 rounding only


def updates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA layer's weight update ``scale * B @ A`` of the one adapter ``model`` carries."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and m.lora_A:
            (a,) = m.lora_A.keys()
            out[name] = m.scaling[a] * m.lora_B[a].weight.detach() @ m.lora_A[a].weight.detach()
    return out


def check_same_updates(trained: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """``loaded`` (a pipeline part after ``load_lora_weights``) carries ``trained``'s update on every trained
    layer, and any extra layer only with a zero update (fused kohya linears padded with zeros)."""
    want, got = updates(trained), updates(loaded)
    assert any(d.abs().max() > 0 for d in want.values())  # not a vacuous comparison
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for name, delta in got.items():
        torch.testing.assert_close(delta, want.get(name, torch.zeros_like(delta)), atol=1e-6, rtol=1e-5, msg=name)


def images(pipe, **kwargs) -> np.ndarray:
    return pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32, **kwargs).images


def test_sdxl_kohya_file_loads_in_diffusers_like_the_diffusers_file(tmp_path):
    """SDXL UNet (SGM block names) + both CLIP encoders (lora_te1 / lora_te2), alpha != rank, random B."""
    trained = tiny.tiny_sdxl_pipeline()
    add_lora(trained.unet, lora_config(rank=4, alpha=8, init=False))
    for te in (trained.text_encoder, trained.text_encoder_2):
        add_lora(te, lora_config(rank=2, alpha=1, init=False, target_modules=("q_proj", "k_proj", "v_proj", "out_proj")))
    save_lora_files(StableDiffusionXL(), str(tmp_path), trained.unet, {"text_encoder": trained.text_encoder, "text_encoder_2": trained.text_encoder_2})

    kohya = load_file(tmp_path / KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    # the tiny UNet: 1 layer per block, attention in down block 0, the mid block and up block 1
    blocks = {k.split("_transformer_blocks")[0] for k in kohya if k.startswith("lora_unet_") and "_transformer_blocks" in k}
    assert blocks == {"lora_unet_input_blocks_1_1", "lora_unet_middle_block_1", "lora_unet_output_blocks_2_1", "lora_unet_output_blocks_3_1"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert float(kohya["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha"]) == 8.0

    from_diffusers, from_kohya = tiny.tiny_sdxl_pipeline(), tiny.tiny_sdxl_pipeline()
    from_diffusers.load_lora_weights(tmp_path)
    # the converter raises on any key it leaves over, so loading at all means every key was consumed
    from_kohya.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        check_same_updates(getattr(trained, part), getattr(from_diffusers, part))
        check_same_updates(getattr(trained, part), getattr(from_kohya, part))
    base, want = images(tiny.tiny_sdxl_pipeline()), images(trained)
    a, b = images(from_diffusers), images(from_kohya)
    assert np.abs(want - base).max() > 1e-3  # the LoRA changes the images
    np.testing.assert_allclose(a, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)


# FLUX.1 layers diffusers' kohya reader takes at any width: the double blocks' every linear and the single
# blocks' linear2 / modulation (a single block's fused linear1 is checked at FLUX.1's width below)
FLUX_TARGETS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(proj_out|norm\.linear)"
)


def test_flux_kohya_file_loads_in_diffusers_like_the_diffusers_file(tmp_path):
    """FLUX.1 transformer in BFL names (q, k, v fused into one qkv LoRA) + the CLIP encoder (lora_te1)."""
    trained = tiny_mmdit.tiny_flux_pipeline()
    add_lora(trained.transformer, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=FLUX_TARGETS))
    add_lora(trained.text_encoder, lora_config(rank=2, alpha=2, init=False, target_modules=("q_proj", "k_proj", "v_proj", "out_proj")))
    save_lora_files(Flux(), str(tmp_path), trained.transformer, {"text_encoder": trained.text_encoder})

    kohya = load_file(tmp_path / KOHYA_FILE)
    names = {k.split(".")[0] for k in kohya}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_0_linear2"} <= names
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # 3 x rank 4
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 24.0  # scale 8 / 4 kept
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0") for n in names)

    # the FLUX reader only warns about keys it leaves over: count what it returns
    from diffusers import FluxPipeline

    read = FluxPipeline.lora_state_dict(str(tmp_path), weight_name=KOHYA_FILE)
    trained_layers = len(lora_layers(trained.transformer)) + len(lora_layers(trained.text_encoder))
    assert len(read) == 2 * trained_layers

    from_diffusers, from_kohya = tiny_mmdit.tiny_flux_pipeline(), tiny_mmdit.tiny_flux_pipeline()
    from_diffusers.load_lora_weights(tmp_path)
    from_kohya.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    for part in ("transformer", "text_encoder"):
        check_same_updates(getattr(trained, part), getattr(from_diffusers, part))
        check_same_updates(getattr(trained, part), getattr(from_kohya, part))
    base, want = images(tiny_mmdit.tiny_flux_pipeline()), images(trained)
    a, b = images(from_diffusers), images(from_kohya)
    assert np.abs(want - base).max() > 1e-3
    np.testing.assert_allclose(a, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)


def test_flux_single_block_linear1_at_flux1_width():
    """A single block's q, k, v (no LoRA on proj_mlp) -> one ``linear1`` LoRA, which diffusers' reader
    (its widths fixed to FLUX.1's 3 x 3072 + 12288) splits back into the same updates, proj_mlp zero."""
    g = torch.Generator().manual_seed(0)
    layers = {f"single_transformer_blocks.0.attn.{n}": (torch.randn(4, 3072, generator=g), torch.randn(3072, 4, generator=g), s) for n, s in (("to_q", 2.0), ("to_k", 2.0), ("to_v", 0.5))}
    kohya = flux_kohya(layers, lambda path: {"single_transformer_blocks.0.proj_mlp": 12288}[path])
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)

    from diffusers import FluxPipeline

    read = FluxPipeline.lora_state_dict(dict(kohya))
    assert len(read) == 8  # A and B of to_q, to_k, to_v, proj_mlp
    for path, (down, up, scale) in layers.items():
        got = read[f"transformer.{path}.lora_B.weight"] @ read[f"transformer.{path}.lora_A.weight"]
        torch.testing.assert_close(got, scale * up @ down, atol=1e-4, rtol=1e-5)
    assert read["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"].abs().max() == 0


def test_dora_writes_no_kohya_file(tmp_path):
    """DoRA: diffusers files only (no reader here checks a kohya ``dora_scale``)."""
    pipe = tiny.tiny_sdxl_pipeline()
    add_lora(pipe.unet, lora_config(rank=2, init=False, variant="dora"))
    save_lora_files(StableDiffusionXL(), str(tmp_path), pipe.unet, {})
    assert not (tmp_path / KOHYA_FILE).exists()
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()


# ---- through the real configs: a few LoRA steps, then the run's own export ----------------------------
DOUBLE_BLOCK = "['transformer_blocks.0.attn.to_q','transformer_blocks.0.attn.to_k','transformer_blocks.0.attn.to_v','transformer_blocks.0.attn.to_out.0','transformer_blocks.0.attn.add_q_proj','transformer_blocks.0.attn.add_k_proj','transformer_blocks.0.attn.add_v_proj','transformer_blocks.0.attn.to_add_out']"
RUNS = {
    "sdxl": (["experiment=sdxl_finetune_tiny"], "StableDiffusionXLPipeline"),
    # the double block only: diffusers' reader takes a single block's linear1 at FLUX.1's width only
    "flux": (["experiment=flux_finetune_tiny", f"adapter.target_modules={DOUBLE_BLOCK}", "text_encoder.max_sequence_length=32"], "FluxPipeline"),
}


@pytest.mark.parametrize("kind", RUNS)
def test_trained_lora_run_exports_a_kohya_file_diffusers_reads(kind, tmp_path):
    """``adapter=lora`` trained 4 steps (alpha != rank, CLIP encoders too): the export's kohya file gives the
    images of its diffusers file."""
    import diffusers

    from diffusion_lab.train import train
    from tests.conftest import compose_cfg
    from tests.test_latent_train import FAST

    folder = tiny.build(tmp_path / "tiny", kind=kind)
    overrides, pipeline = RUNS[kind]
    fast = [o for o in FAST if not o.startswith("experiment=")]
    cfg = compose_cfg("train", [*overrides, *fast, f"model.pretrained={folder}", "adapter=lora", "adapter.alpha=8", "adapter.train_text_encoder=true",
                                "model.optimizer.lr=1e-2", "callbacks.sample_grid=null"], tmp_path / "run")
    train(cfg)
    lora_dir = next((tmp_path / "run").rglob(KOHYA_FILE)).parent
    cls = getattr(diffusers, pipeline)
    from_diffusers, from_kohya, base = (cls.from_pretrained(folder) for _ in range(3))
    from_diffusers.load_lora_weights(lora_dir)
    from_kohya.load_lora_weights(lora_dir, weight_name=KOHYA_FILE)
    extra = {"max_sequence_length": 32} if kind == "flux" else {}
    a, b = images(from_diffusers, **extra), images(from_kohya, **extra)
    assert np.abs(a - images(base, **extra)).max() > 1e-4  # 4 steps at lr 1e-2 moved the images
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)
    parts = ("unet", "text_encoder", "text_encoder_2") if kind == "sdxl" else ("transformer", "text_encoder")
    for part in parts:  # every trained layer lands where it was trained (a layer with no gradient yet stays 0)
        check_same_updates(getattr(from_diffusers, part), getattr(from_kohya, part))
