"""The DiT backbone (backbone=dit_*): composes, trains (pixel and latent), guides through its own
null label, and exports a DiTPipeline that plain diffusers samples to the project's own images."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel
from hydra.utils import instantiate

from diffusion_lab.components.backbones import DIT_PIPELINE_NULL_CLASS, dit_transformer
from diffusion_lab.components.conditioning import ClassLabels
from diffusion_lab.export import export
from diffusion_lab.inference.generate import load_pixel_model
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import TINY, compose_cfg

# a DiT small enough for seconds on CPU (the configs' 4 x 184 wide one trains in experiments/backbones)
SMALL_DIT = ["backbone.num_layers=1", "backbone.num_attention_heads=2", "backbone.attention_head_dim=8"]
# conftest's TINY run (4 steps, CSV logger, small grids) with the small DiT instead of backbone=tiny
FAST = [*(o for o in TINY if not o.startswith("backbone=")), *SMALL_DIT, "trainer.max_steps=2"]
# the latent DiT on the tiny random AutoencoderKL (RGB in, 4 latent channels, down-sampling 2)
LATENT = ["experiment=dit_digits_latent", "vae=tiny", "data.resolution=8"]


def test_brief_command_composes_with_null_class(tmp_path):
    cfg = compose_cfg("train", ["model=pixel_ddpm", "backbone=dit_digits", "conditioning=class_labels", "data.resolution=8"], tmp_path)
    module = instantiate(cfg.model)
    assert isinstance(module.base_backbone, DiTTransformer2DModel)
    assert module.conditioner.num_classes == 10 and module.conditioner.null_class == DIT_PIPELINE_NULL_CLASS
    # the DiT's label table has DiTPipeline's layout: rows 0..999 and the null row 1000
    table = module.base_backbone.transformer_blocks[0].norm1.emb.class_embedder
    assert table.num_classes == DIT_PIPELINE_NULL_CLASS and table.embedding_table.num_embeddings == DIT_PIPELINE_NULL_CLASS + 1
    # used parameters match the demo UNet with class embeddings within 5%
    unet_cfg = compose_cfg("train", ["experiment=ddpm_digits", "conditioning=class_labels", "backbone.num_class_embeds=10"], tmp_path / "u")
    unet_params = sum(p.numel() for p in instantiate(unet_cfg.model.backbone).parameters())
    unused = len(module.base_backbone.transformer_blocks) * (DIT_PIPELINE_NULL_CLASS - 10) * module.base_backbone.inner_dim
    dit_params = sum(p.numel() for p in module.base_backbone.parameters()) - unused
    assert abs(dit_params / unet_params - 1) < 0.05, (dit_params, unet_params)


def test_unet_class_labels_have_no_unconditional_branch(tmp_path):
    """A UNet2DModel's class embedding has no null row: the conditioner gives no uncond, so sampling
    is unguided (guidance_scale has no effect) instead of indexing past the table."""
    cfg = compose_cfg("train", ["experiment=ddpm_digits", "conditioning=class_labels", "backbone.num_class_embeds=10"], tmp_path)
    conditioner = instantiate(cfg.conditioning)
    assert conditioner.null_class is None
    cond, uncond = conditioner.sampling(None, 4, "cpu")
    assert cond["class_labels"].tolist() == [0, 1, 2, 3] and uncond is None


def test_cfg_uses_the_null_label_and_changes_samples(tmp_path):
    cfg = compose_cfg("train", ["experiment=dit_digits", *SMALL_DIT], tmp_path)
    module = instantiate(cfg.model)
    cond, uncond = module.sampling_conditioning({"label": torch.tensor([3, 7])}, 2)
    assert cond["class_labels"].tolist() == [3, 7] and uncond["class_labels"].tolist() == [1000, 1000]
    # the null row must differ from a class row for guidance to do anything: perturb it as training would
    with torch.no_grad():
        for block in module.base_backbone.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight[1000].normal_()
            block.norm1.linear.weight.normal_(std=0.02)  # adaLN-Zero starts at zero: give the labels a path
        module.base_backbone.proj_out_2.weight.normal_(std=0.02)
    kw = dict(n=2, num_inference_steps=4, cond_batch={"label": torch.tensor([3, 7])})
    plain = module.generate(generator=torch.Generator().manual_seed(0), **kw)
    again = module.generate(generator=torch.Generator().manual_seed(0), **kw)
    guided = module.generate(generator=torch.Generator().manual_seed(0), guidance_scale=3.0, **kw)
    torch.testing.assert_close(plain, again)
    assert (guided - plain).abs().max() > 1e-3


def test_dit_training_drops_labels_to_the_null_row(tmp_path):
    """What CFG relies on: in train mode diffusers' DiT replaces ~10% of labels by row null_class."""
    net = dit_transformer(10, sample_size=4, patch_size=2, in_channels=1, num_layers=1, num_attention_heads=1, attention_head_dim=8)
    embedder = net.transformer_blocks[0].norm1.emb.class_embedder
    labels = torch.full((4000,), 3)
    torch.manual_seed(0)
    dropped = embedder.token_drop(labels)
    assert set(dropped.unique().tolist()) == {3, 1000}
    assert 0.07 < (dropped == 1000).float().mean() < 0.13
    net.eval()
    torch.testing.assert_close(embedder(labels[:8]), embedder.embedding_table.weight[[3] * 8])


def test_bad_dit_configs_are_config_errors():
    with pytest.raises(ConfigError, match="num_class_embeds=1200"):
        dit_transformer(1200, sample_size=8)
    with pytest.raises(ConfigError, match="patch_size=3"):
        dit_transformer(10, sample_size=8, patch_size=3)
    with pytest.raises(ConfigError, match="num_class_embeds"):
        ClassLabels(None)


def test_pixel_fast_dev_run_and_export(tmp_path):
    cfg = compose_cfg("train", ["experiment=dit_digits", *FAST], tmp_path / "run")
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 2
    assert torch.isfinite(objs["trainer"].callback_metrics["train/loss"])
    pipe_dir = Path(cfg.paths.output_dir) / "pipeline"
    assert (pipe_dir / "transformer" / "config.json").exists() and not (pipe_dir / "vae").exists()
    # plain diffusers loads the pixel DiT's parts (DiTPipeline itself always decodes through a VAE)
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, vae=None)
    assert type(pipe).__name__ == "DiTPipeline" and pipe.labels == {str(i): i for i in range(10)}
    # diffusion_lab.sample's loader samples it (labels 0..9 in turn) with the saved scheduler
    model = load_pixel_model(str(pipe_dir), local_files_only=True)
    assert model.num_classes == 10 and model.sample_shape == (1, 8, 8)
    images = model.generate(3, 3, 2, seed=0, progress=False)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1


def test_latent_fast_dev_run(tmp_path):
    cfg = compose_cfg("train", [*LATENT, *FAST, "debug=fast"], tmp_path / "run")
    _, objs = train(cfg)
    module = objs["model"]
    assert objs["trainer"].global_step == 1
    assert torch.isfinite(objs["trainer"].callback_metrics["train/loss"])
    assert module.latent_shape(2) == (2, 4, 4, 4)  # 8 px RGB -> 4x4x4 latents -> 4 tokens
    assert module.generate(2, 2).shape == (2, 3, 8, 8)


def test_latent_export_gives_the_projects_images_in_plain_diffusers(tmp_path):
    """DiTPipeline.from_pretrained(export)(class_labels, guidance_scale, generator) == the module's
    own sampler for the same seed, guided and unguided; run with diffusion_lab unimportable."""
    cfg = compose_cfg("train", [*LATENT, *SMALL_DIT], tmp_path / "run")
    module = instantiate(cfg.model).eval()
    with torch.no_grad():  # a non-trivial network: adaLN-Zero and the output layer start at zero
        for block in module.base_backbone.transformer_blocks:
            block.norm1.linear.weight.normal_(std=0.05)
            block.norm1.emb.class_embedder.embedding_table.weight[1000].normal_()
        module.base_backbone.proj_out_2.weight.normal_(std=0.05)
    out_dir = tmp_path / "pipeline"
    export(module, str(out_dir))
    labels, steps = [3, 7], 4
    ours = {}
    for w in (1.0, 2.5):
        x = module.generate(2, steps, generator=torch.Generator().manual_seed(11), cond_batch={"label": torch.tensor(labels)}, guidance_scale=w)
        ours[w] = (x + 1) / 2
    code = (
        "import sys, torch; sys.modules['diffusion_lab'] = None\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(out_dir)!r})\n"
        "out = {}\n"
        "for w in (1.0, 2.5):\n"
        f"    out[w] = pipe(class_labels={labels}, guidance_scale=w, num_inference_steps={steps}, generator=torch.Generator().manual_seed(11), output_type='pt').images\n"
        f"torch.save(out, {str(tmp_path / 'plain.pt')!r})\n"
        "print(type(pipe).__name__, type(pipe.scheduler).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DiTPipeline DPMSolverMultistepScheduler" in res.stdout
    plain = torch.load(tmp_path / "plain.pt")
    for w in (1.0, 2.5):
        torch.testing.assert_close(plain[w], ours[w], atol=1e-4, rtol=0)
    assert (ours[2.5] - ours[1.0]).abs().max() > 1e-3  # guidance did something in both
