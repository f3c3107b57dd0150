"""Single-file checkpoints (``export/single_file.py``): the file of a tiny SD 1.x / SDXL pipeline, read
back by diffusers' own ``from_single_file`` with a config-only folder (no weights there, so every weight
must come from the file), gives the same weights and images; FLUX.1's transformer at FLUX.1's width (the
only width diffusers' reader splits); a real full fine-tune run and ``lora merge --single-file`` write it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from diffusion_lab.testing.tiny import build, tiny_sdxl_pipeline, tiny_text_encoder, tiny_unet
from diffusion_lab.export import single_file

PROMPT = "a red cat"


def _images(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images


def _config_only(folder: Path, out: Path) -> Path:
    """A copy of a pipeline folder without its weights: from_single_file then fails on any weight the file lacks."""
    return Path(shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))


def _round_trip(pipe, folder: Path, tmp_path: Path, components: tuple[str, ...]):
    """Write ``pipe``'s single file, read it back with ``from_single_file``; check every component's
    weights are equal and every tensor of the file is consumed (as many numbers in the file as in the
    loaded components: an unread key would add some). Returns the pipeline read back."""
    path = single_file.save(pipe, tmp_path / single_file.SINGLE_FILE)
    back = type(pipe).from_single_file(str(path), config=str(_config_only(folder, tmp_path / "config")), local_files_only=True)
    loaded = 0
    for name in components:
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        loaded += sum(t.numel() for t in theirs.values())
    assert sum(t.numel() for t in load_file(str(path)).values()) == loaded
    return back


def test_sd_single_file_reads_back_in_diffusers(tmp_path):
    folder = build(tmp_path / "tiny_sd", "sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    back = _round_trip(pipe, folder, tmp_path, ("unet", "vae", "text_encoder"))
    keys = load_file(str(tmp_path / single_file.SINGLE_FILE)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys  # how A1111 / diffusers spot SD 1.x's CLIP
    np.testing.assert_allclose(_images(back), _images(pipe), atol=1e-6)


def test_sd2_single_file_holds_open_clip_and_reads_back(tmp_path):
    """SD 2.x (a 1024-wide text encoder, as diffusers tells v2 from v1): the text encoder under
    ``cond_stage_model.model.`` in OpenCLIP's names, read back by diffusers' OpenCLIP reader."""
    p = StableDiffusionPipeline.from_pretrained(build(tmp_path / "tiny_sd", "sd"))
    te = tiny_text_encoder(1024, num_hidden_layers=1, num_attention_heads=16)
    unet = tiny_unet(16, cross_attention_dim=1024, use_linear_projection=True)
    StableDiffusionPipeline(**{**p.components, "text_encoder": te, "unet": unet}).save_pretrained(tmp_path / "tiny_sd2")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny_sd2")
    back = _round_trip(pipe, tmp_path / "tiny_sd2", tmp_path, ("unet", "vae", "text_encoder"))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in load_file(str(tmp_path / single_file.SINGLE_FILE))
    np.testing.assert_allclose(_images(back), _images(pipe), atol=1e-6)


def _sdxl(folder: Path) -> Path:
    """Tiny SDXL with encoders of different widths (32, 48): diffusers' reader tells SDXL's two CLIPs apart
    by width (768 vs 1280 in the real one), so the family's tiny pipeline (both 32) cannot be read back."""
    p = tiny_sdxl_pipeline()
    te2 = tiny_text_encoder(48, with_projection=True, seed=1)
    unet = tiny_unet(16, cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48)
    components = {**p.components, "text_encoder_2": te2, "unet": unet}
    StableDiffusionXLPipeline(**components).save_pretrained(folder)
    return folder


def test_sdxl_single_file_reads_back_in_diffusers(tmp_path):
    folder = _sdxl(tmp_path / "tiny_sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    back = _round_trip(pipe, folder, tmp_path, ("unet", "vae", "text_encoder", "text_encoder_2"))
    keys = load_file(str(tmp_path / single_file.SINGLE_FILE)).keys()
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "conditioner.embedders.1.model.positional_embedding" in keys and "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    np.testing.assert_allclose(_images(back), _images(pipe), atol=1e-6)


def test_no_layout_writes_nothing_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch, caplog):
    import safetensors.torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    path = tmp_path / single_file.SINGLE_FILE
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    assert single_file.save(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), path) is None and not path.exists()
    pipe = StableDiffusionPipeline.from_pretrained(build(tmp_path / "tiny_sd", "sd"))
    single_file.save(pipe, path)
    before = path.read_bytes()

    def disk_full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        single_file.save(pipe, path)
    monkeypatch.undo()
    pipe.unet.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))  # a module with no original name
    assert single_file.save(pipe, path) is None and "extra" in caplog.text
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("on", [True, False])
def test_full_finetune_run_writes_the_single_file(on, tmp_path):
    """A real 2-step full fine-tune (experiment=sd_finetune_tiny): <run>/model.safetensors beside
    <run>/pipeline, read back with the run's pipeline folder as config, gives the pipeline's images;
    ``callbacks.export.single_file=false``: no file."""
    from diffusion_lab.train import train
    from tests.conftest import compose_cfg

    base = build(tmp_path / "tiny_sd", "sd")
    out = tmp_path / "run"
    steps = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.batch_size=2", "model.preview_steps=2"]
    grid = ["callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_images=1", "callbacks.model_checkpoint.every_n_train_steps=2"]
    train(compose_cfg("train", ["experiment=sd_finetune_tiny", f"model.pretrained={base}", f"callbacks.export.single_file={str(on).lower()}", *steps, *grid], out))
    assert (out / "pipeline" / "model_index.json").is_file() and (out / single_file.SINGLE_FILE).is_file() == on
    if not on:
        return
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    back = StableDiffusionPipeline.from_single_file(str(out / single_file.SINGLE_FILE), config=str(out / "pipeline"), local_files_only=True)
    assert not all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), StableDiffusionPipeline.from_pretrained(base).unet.parameters()))
    np.testing.assert_allclose(_images(back), _images(pipe), atol=1e-6)


def test_lora_merge_writes_the_single_file(tmp_path):
    from diffusion_lab.lora import main
    from tests.test_lora_tools import _trained_lora

    base = build(tmp_path / "tiny_sd", "sd")
    lora = _trained_lora(base, tmp_path / "lora", seed=0)
    main(["merge", str(base), str(tmp_path / "merged"), "--lora", str(lora), "--single-file", str(tmp_path / "merged.safetensors")])
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    back = StableDiffusionPipeline.from_single_file(str(tmp_path / "merged.safetensors"), config=str(tmp_path / "merged"), local_files_only=True)
    np.testing.assert_allclose(_images(back), _images(merged), atol=1e-6)


@pytest.mark.slow
def test_flux_transformer_single_file_at_flux_width(tmp_path):
    """FLUX.1's transformer (1 double + 1 single block at FLUX.1's width 3072, ~530M parameters: diffusers'
    reader splits linear1 at that width) -> BFL-named file -> FluxTransformer2DModel.from_single_file:
    the reader pops every key it reads, so an empty dict afterwards means every key was consumed."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval()
    folder = tmp_path / "flux"
    model.save_config(folder / "transformer")
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
    state = single_file.single_file_state(pipe)
    assert "double_blocks.0.img_attn.qkv.weight" in state and "single_blocks.0.linear1.weight" in state and "final_layer.adaLN_modulation.1.bias" in state
    back = FluxTransformer2DModel.from_single_file(state, config=str(folder), subfolder="transformer", local_files_only=True)
    assert state == {}
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sd3_transformer_single_file_reads_back_in_diffusers(tmp_path):
    """SD3.5's layout (QK norms, a dual-attention first block, a last block whose context only modulates):
    SAI-named file -> SD3Transformer2DModel.from_single_file pops every key and gives equal weights."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffusion_lab.testing.tiny_mmdit import tiny_sd3_transformer

    model = tiny_sd3_transformer().eval()
    model.save_config(tmp_path / "sd3" / "transformer")
    pipe = StableDiffusion3Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=model)
    state = single_file.single_file_state(pipe)
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in state and "joint_blocks.1.context_block.adaLN_modulation.1.weight" in state
    back = SD3Transformer2DModel.from_single_file(state, config=str(tmp_path / "sd3"), subfolder="transformer", local_files_only=True)
    assert state == {}
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _real_size(kind: str):
    """SD 1.5 / SDXL base / FLUX.1-dev at their real sizes (shapes only: build under init_empty_weights)."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind == "flux":
        return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=FluxTransformer2DModel(guidance_embeds=True))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    if kind == "sd":
        return StableDiffusionPipeline(vae, clip_l, None, UNet2DConditionModel(cross_attention_dim=768), None, None, None, requires_safety_checker=False)
    if kind == "sd2":
        clip_h = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"))
        unet = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        return StableDiffusionPipeline(vae, clip_h, None, unet, None, None, None, requires_safety_checker=False)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280))
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    return StableDiffusionXLPipeline(vae, clip_l, clip_g, None, None, unet, None)


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl", "flux"])
def test_real_size_files_are_what_diffusers_detects_and_reads(kind):
    """At the real models' sizes (on the meta device): diffusers' own detection names the file's model
    (what ``from_single_file`` without ``config`` goes by) and its readers map the file back onto
    exactly the models' keys."""
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils as sfu

    with init_empty_weights():
        pipe = _real_size(kind)
    state = single_file.single_file_state(pipe)
    assert sfu.infer_diffusers_model_type(state) == {"sd": "v1", "sd2": "v2", "sdxl": "xl_base", "flux": "flux-dev"}[kind]
    if kind == "flux":
        read = sfu.convert_flux_transformer_checkpoint_to_diffusers(state)
        assert state == {} and read.keys() == pipe.transformer.state_dict().keys()
        return
    assert sfu.CHECKPOINT_KEY_NAMES[{"sd": "v1", "sd2": "open_clip", "sdxl": "clip_sdxl"}[kind]] in state
    assert sfu.convert_ldm_unet_checkpoint(state, pipe.unet.config).keys() == pipe.unet.state_dict().keys()
    assert sfu.convert_ldm_vae_checkpoint(state, pipe.vae.config).keys() == pipe.vae.state_dict().keys()
    if kind == "sd2":
        read = sfu.convert_open_clip_checkpoint(pipe.text_encoder, state, "cond_stage_model.model.")
    else:
        read = sfu.convert_ldm_clip_checkpoint(state)
    assert {k.removeprefix("text_model.") for k in read} == pipe.text_encoder.state_dict().keys()
    if kind == "sdxl":
        assert sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, state, "conditioner.embedders.1.model.").keys() == pipe.text_encoder_2.state_dict().keys()
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind == "sdxl" else ())
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for n in parts for t in getattr(pipe, n).state_dict().values())  # no unread key
