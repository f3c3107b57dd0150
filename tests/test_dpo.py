"""Diffusion-DPO (method=dpo): the loss against the paper's formula, one noise per pair, the
reference is the starting model (full copy / adapter off), a real run from a pretrained pixel
pipeline that exports, LoRA on a latent model, and bad preference folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel
from PIL import Image

from diffusion_lab.data.preference import LOSER_KEY, PreferenceFolder
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.diffusion.processes import FlowMatchingProcess, VPProcess
from diffusion_lab.methods.base import has_adapter
from diffusion_lab.methods.dpo import dpo_loss
from diffusion_lab.train import train
from diffusion_lab.utils.errors import DataError
from tests.conftest import compose_cfg


def test_dpo_loss_matches_the_papers_formula_by_hand():
    # pair 0: the policy lowered the winner's error by 0.1 more than the loser's (reference: no gap)
    # pair 1: it raised the winner's relative error by 0.2; pair 2: policy = reference
    err_w, err_l = torch.tensor([0.1, 0.3, 0.5]), torch.tensor([0.2, 0.1, 0.4])
    ref_w, ref_l = torch.tensor([0.15, 0.2, 0.5]), torch.tensor([0.15, 0.2, 0.4])
    terms = dpo_loss(err_w, err_l, ref_w, ref_l, beta=10.0)
    # -beta/2 * ((0.1 - 0.2) - 0) = 0.5 ; -5 * ((0.3 - 0.1) - 0) = -1 ; -5 * (0.1 - 0.1) = 0
    torch.testing.assert_close(terms.inside, torch.tensor([0.5, -1.0, 0.0]))
    # -log sigmoid(z) = log(1 + exp(-z))
    want = torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0)), math.log(2.0)])
    torch.testing.assert_close(terms.loss, want)


@pytest.mark.parametrize("make", [lambda: VPProcess(__import__("diffusers").DDPMScheduler()), lambda: FlowMatchingProcess(FlowMatchEulerDiscreteScheduler())])
def test_noised_pair_gives_each_pair_one_noise_and_level(make):
    process = make()
    torch.manual_seed(0)
    w, l = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    same = process.noised_pair(w, w)
    torch.testing.assert_close(same.x_t[:4], same.x_t[4:])  # same image -> the same noisy image
    torch.testing.assert_close(same.target[:4], same.target[4:])
    pair = process.noised_pair(w, l)
    assert torch.equal(pair.timestep[:4], pair.timestep[4:]) and len(pair.timestep.unique()) > 1  # shared, not one for all
    if isinstance(process, FlowMatchingProcess):  # x_t = (1 - s) x0 + s eps: the difference is the images' only
        s = pair.sigma[:4].view(-1, 1, 1, 1)
        torch.testing.assert_close(pair.x_t[:4] - pair.x_t[4:], (1 - s) * (w - l))


# ---- a tiny pretrained pixel pipeline and a preference folder --------------------------------------
def tiny_pipeline(out: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(out)
    return out


def preference_folder(root: Path, rows: list[dict] | None = None, n: int = 8) -> Path:
    """Pairs of a bright and a dark 8x8 square; the bright one preferred (label alternates sides)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, value in (("bright", 220), ("dark", 40)):
        Image.new("L", (8, 8), value).save(root / "img" / f"{name}.png")
    if rows is None:
        rows = [{"jpg_0": "img/bright.png", "jpg_1": "img/dark.png", "label_0": 1, "caption": "a square"} if i % 2 == 0 else
                {"jpg_0": "img/dark.png", "jpg_1": "img/bright.png", "label_0": 0, "caption": "a square"} for i in range(n)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_preference_folder_puts_the_winner_first_and_skips_ties(tmp_path):
    rows = [{"jpg_0": "img/dark.png", "jpg_1": "img/bright.png", "label_0": 0, "caption": "c"},
            {"jpg_0": "img/bright.png", "jpg_1": "img/dark.png", "label_0": 0.5, "caption": "c"}]
    ds = PreferenceFolder(str(preference_folder(tmp_path, rows)), ImageTransform(8, mode="L"))
    assert len(ds) == 1 and ds.ties == 1
    item = ds[0]
    assert item["pixel_values"].mean() > 0.5 > -0.5 > item[LOSER_KEY].mean() and item["caption"] == "c"


@pytest.mark.parametrize("row,match", [
    ({"jpg_0": "img/bright.png", "label_0": 1, "caption": "c"}, r"metadata.jsonl line 2 has no 'jpg_1'"),
    ({"jpg_0": "img/bright.png", "jpg_1": "img/missing.png", "label_0": 1, "caption": "c"}, r"metadata.jsonl line 2: jpg_1 .*missing.png does not exist"),
    ({"jpg_0": "img/bright.png", "jpg_1": "img/dark.png", "label_0": 0.7, "caption": "c"}, r"metadata.jsonl line 2: label_0=0.7"),
    ({"jpg_0": "img/bright.png", "jpg_1": "img/dark.png", "label_0": 1}, r"metadata.jsonl line 2 has no 'caption'.*caption_column=null"),
])
def test_a_bad_preference_folder_is_a_data_error_naming_file_and_line(tmp_path, row, match):
    good = {"jpg_0": "img/bright.png", "jpg_1": "img/dark.png", "label_0": 1, "caption": "c"}
    root = preference_folder(tmp_path, [good, row])
    with pytest.raises(DataError, match=match):
        PreferenceFolder(str(root), ImageTransform(8, mode="L"))


def test_dpo_digits_runs_from_a_pretrained_pipeline_keeps_the_reference_and_exports(tmp_path):
    """experiment=dpo_digits, shrunk: 3 real Lightning steps from a saved pipeline; the reference copy
    is the saved UNet bit for bit while the policy moved; the export samples."""
    start = tiny_pipeline(tmp_path / "start")
    pairs = preference_folder(tmp_path / "pairs")
    cfg = compose_cfg("train", ["experiment=dpo_digits", f"model.pretrained={start}", f"data.root={pairs}", "logger=csv", "data.batch_size=4",
                                "model.optimizer.lr=1e-3", "model.lr_scheduler.num_warmup_steps=0", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                                "model.preview_steps=2", "callbacks.sample_grid=null", "callbacks.progress_bar=null"], tmp_path / "run")
    _, objs = train(cfg)
    module = objs["model"]
    assert objs["trainer"].global_step == 3
    saved = UNet2DModel.from_pretrained(start / "unet")
    reference = module.method.reference.copy
    assert reference is not None and not has_adapter(module.base_backbone)
    for (name, p), r, s in zip(module.base_backbone.named_parameters(), reference.parameters(), saved.parameters()):
        assert torch.equal(r, s), name  # the reference is the starting model ...
    assert any(not torch.equal(p, s) for p, s in zip(module.base_backbone.parameters(), saved.parameters()))  # ... the policy moved
    rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    for key in ("train/loss", "train/dpo_accuracy", "train/reward_margin", "train/model_mse_w", "train/model_mse_l", "train/ref_mse_w", "train/ref_mse_l"):
        assert key in rows[0].split(","), key
    # the first step: policy = reference, so the loss is log 2 exactly
    first = dict(zip(rows[0].split(","), next(r for r in rows[1:] if r.split(",")[rows[0].split(",").index("train/loss")]).split(",")))
    assert abs(float(first["train/loss"]) - math.log(2)) < 1e-5
    exported = DDPMPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    for p, q in zip(exported.unet.parameters(), module.base_backbone.parameters()):
        torch.testing.assert_close(p, q)
    images = exported(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_dpo_lora_on_a_latent_model_uses_the_base_as_reference(tmp_path):
    """adapter=lora on tiny SD: the reference is the same backbone with the adapter off (no copy),
    which gives the base output while the adapter is trained."""
    from diffusion_lab.testing import tiny

    start = tiny.build(tmp_path / "tiny_sd")
    root = tmp_path / "pairs"
    preference_folder(root)
    for name in ("bright", "dark"):  # RGB 32 px for the tiny SD pipeline
        Image.open(root / "img" / f"{name}.png").convert("RGB").resize((32, 32)).save(root / "img" / f"{name}.png")
    cfg = compose_cfg("train", ["experiment=sd_finetune_tiny", "adapter=lora", "method=dpo", "data=preference", f"data.root={root}", "data.resolution=32",
                                "data.batch_size=2", "data.num_workers=0", f"model.pretrained={start}", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                                "model.optimizer.lr=1e-2", "callbacks.sample_grid=null", "callbacks.ema=null", "callbacks.progress_bar=null"], tmp_path / "run")
    _, objs = train(cfg)
    module = objs["model"]
    dpo = module.method
    assert dpo.reference.copy is None and has_adapter(module.base_backbone)
    x = torch.randn(module.latent_shape(1))
    t = torch.tensor([500])
    cond = module.text_states(["a square"])
    with dpo.reference():
        ref = module.denoise(x, t, **cond)
    policy = module.denoise(x, t, **cond)
    base = __import__("diffusers").UNet2DConditionModel.from_pretrained(start / "unet")(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-5)  # adapter off = the starting UNet
    assert not torch.allclose(policy, base, atol=1e-5)  # the adapter trained


@pytest.mark.parametrize("prefer", ["bright", "dark"])
def test_dpo_on_a_toy_problem_moves_samples_toward_the_preferred_image(prefer):
    """Pairs of a bright and a dark square: DPO makes the samples brighter when bright is preferred
    and darker when dark is (the same run with the labels swapped), and raises the pairs' accuracy."""
    from functools import partial

    from diffusion_lab.diffusion.sampling import load_sampler
    from diffusion_lab.methods.dpo import DPO
    from diffusion_lab.modules.diffusion_module import DiffusionModule

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    module = DiffusionModule(unet, FlowMatchingProcess(FlowMatchEulerDiscreteScheduler(), density="uniform"), load_sampler("flow_euler"), partial(torch.optim.Adam))
    dpo = DPO(beta=200.0)
    dpo.setup(module)
    bright, dark = torch.full((16, 1, 8, 8), 0.6), torch.full((16, 1, 8, 8), -0.6)
    w, l = (bright, dark) if prefer == "bright" else (dark, bright)
    batch = {"pixel_values": w, LOSER_KEY: l}

    def brightness() -> float:
        return float(module.generate(32, 4, generator=torch.Generator().manual_seed(0)).mean())

    def accuracy() -> float:
        torch.manual_seed(1)
        module.eval()
        with torch.no_grad():
            err, ref = dpo.errors(module, batch)
        module.train()
        (ew, el), (rw, rl) = err.chunk(2), ref.chunk(2)
        return float((dpo_loss(ew, el, rw, rl, dpo.beta).inside > 0).float().mean())

    before = brightness()
    opt = torch.optim.Adam(module.backbone.parameters(), lr=1e-3)
    for step in range(30):
        loss = dpo.training_step(module, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = brightness()
    assert (after - before) * (1 if prefer == "bright" else -1) > 0.1, (before, after)
    assert accuracy() > 0.9


def test_preference_parquet_in_pick_a_pic_columns(tmp_path):
    """data=preference_hf: jpg_0 / jpg_1 as encoded bytes (as Pick-a-Pic stores them), ties skipped."""
    import io

    import datasets

    from diffusion_lab.data.preference import PreferenceHF

    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (8, 8), value).save(buf, format="PNG")
        return buf.getvalue()

    rows = {"jpg_0": [png(40), png(220), png(220)], "jpg_1": [png(220), png(40), png(40)], "label_0": [0.0, 1.0, 0.5], "caption": ["a", "b", "c"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    ds = PreferenceHF(ImageTransform(8, mode="L"), data_files=str(tmp_path / "pairs.parquet"), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2 and ds.ties == 1
    for i, caption in enumerate(("a", "b")):
        item = ds[i]
        assert item["pixel_values"].mean() > 0.5 and item[LOSER_KEY].mean() < -0.5 and item["caption"] == caption
