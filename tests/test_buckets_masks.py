"""Paired image columns, loss masks and aspect-ratio buckets (issue 15): one geometric draw for an
image, its paired images and its mask; masked losses; bucketed batches that never mix shapes,
resume exactly and split over DDP ranks; SDXL time ids from the real sizes; tiny latent SD runs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.callbacks.caching import LatentCacheCallback
from diffusion_lab.data import ImageFolderDataset, ImageTransform
from diffusion_lab.data.buckets import AspectBuckets, bucket_batches
from diffusion_lab.data.datamodule import BucketSampler, DiffusionDataModule
from diffusion_lab.diffusion.objectives import downsample_mask, per_sample_loss
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError, DataError
from tests.conftest import compose_cfg
from tests.test_latent_train import FAST, tiny_pipeline  # noqa: F401 (fixture)
from tests.test_processes import _process
from tests.test_sdxl_train import build_module, tiny_sdxl  # noqa: F401 (fixture)

# (h, w) of the images in the bucketed folders: wide, tall and square, a few of each
SHAPES = [(30, 56), (56, 30), (40, 40), (30, 50), (50, 30), (32, 48)]


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _paired_folder(root: Path, n: int = 4, h: int = 8, w: int = 16) -> Path:
    """``n`` images with a conditioning image (the same pixels, in conditioning/) and a mask (a
    grey copy of the image) each, named in metadata.jsonl (the diffusers ControlNet layout)."""
    rows = []
    for i in range(n):
        image = _rgb(h, w, i)
        _save(root / f"{i}.png", image)
        _save(root / "conditioning" / f"{i}.png", image)
        _save(root / "masks" / f"{i}.png", image[..., 0])
        rows.append({"file_name": f"{i}.png", "text": f"image {i}", "conditioning_image": f"conditioning/{i}.png", "mask": f"masks/{i}.png"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _bucket_folder(root: Path, repeats: int = 3) -> Path:
    for i in range(repeats * len(SHAPES)):
        _save(root / f"{i:03d}.png", _rgb(*SHAPES[i % len(SHAPES)], i))
    return root


# ---- paired images and masks: one geometric draw ----------------------------------------------
def test_paired_image_and_mask_get_the_image_s_crop_and_flip(tmp_path):
    root = _paired_folder(tmp_path / "data")
    transform = ImageTransform(resolution=8, crop="random", random_flip=True)  # 8x16 images: crop and flip, no resize
    ds = ImageFolderDataset(str(root), transform, caption_column="auto", paired_images={"conditioning_image": "conditioning_pixel_values", "mask": "mask"})
    assert [p.name for p in ds.files] == ["0.png", "1.png", "2.png", "3.png"]  # paired files are no training images
    assert ds.captions == ["image 0", "image 1", "image 2", "image 3"]  # the paired columns are not the captions
    lefts = set()
    for seed in range(12):
        random.seed(seed)  # what SeededItems does per item
        item = ds[seed % 4]
        assert item["conditioning_pixel_values"].shape == item["pixel_values"].shape == (3, 8, 8)
        assert torch.equal(item["conditioning_pixel_values"], item["pixel_values"])
        assert item["mask"].shape == (1, 8, 8) and 0 <= item["mask"].min() and item["mask"].max() <= 1
        torch.testing.assert_close(item["mask"][0] * 2 - 1, item["pixel_values"][0], rtol=0, atol=1e-6)
        top, left = item["crop_top_left"].tolist()
        assert item["original_size"].tolist() == [8, 16] and top == 0 and 0 <= left <= 8
        lefts.add(left)
    assert len(lefts) > 2  # the crops really vary


def test_paired_images_from_the_command_line(tmp_path):
    """``data.paired_images={column:key}`` as typed on the CLI reaches the built data set and its batches."""
    root = _paired_folder(tmp_path / "data", n=6)
    cfg = compose_cfg("train", ["data=image_folder", f"data.root={root}", "data.resolution=8", "data.num_workers=0", "data.batch_size=2",
                                "data.paired_images={conditioning_image:conditioning_pixel_values,mask:mask}"], tmp_path / "run")
    dm = instantiate(cfg.data.datamodule)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["conditioning_pixel_values"].shape == batch["pixel_values"].shape == (2, 3, 8, 8)
    assert torch.equal(batch["conditioning_pixel_values"], batch["pixel_values"]) and batch["mask"].shape == (2, 1, 8, 8)
    assert len(dm.dataset) == 6  # neither the conditioning images nor the masks are training images


def test_a_paired_image_of_another_size_is_brought_to_the_image_s_size_first(tmp_path):
    root = tmp_path / "data"
    image = _rgb(16, 32, 0)
    _save(root / "0.png", image)
    _save(root / "cond" / "0.png", np.asarray(Image.fromarray(image).resize((64, 32), Image.BICUBIC)))  # twice the size
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "hint": "cond/0.png"}) + "\n")
    item = ImageFolderDataset(str(root), ImageTransform(resolution=8), paired_images={"hint": "hint_pixels"})[0]
    assert item["hint_pixels"].shape == item["pixel_values"].shape == (3, 8, 8)
    assert (item["hint_pixels"] - item["pixel_values"]).abs().mean() < 0.1


def test_missing_or_unreadable_paired_image_is_one_paragraph_naming_file_and_column(tmp_path):
    root = _paired_folder(tmp_path / "data")
    (root / "conditioning" / "2.png").unlink()
    with pytest.raises(DataError) as err:
        ImageFolderDataset(str(root), ImageTransform(resolution=8), paired_images={"conditioning_image": "conditioning_pixel_values"})
    msg = str(err.value)
    assert str(root / "conditioning" / "2.png") in msg and "'conditioning_image'" in msg and str(root / "2.png") in msg and "\n" not in msg
    (root / "conditioning" / "2.png").write_bytes(b"<html>not an image</html>")
    with pytest.raises(DataError, match=r"cannot read .*conditioning/2\.png.*'conditioning_pixel_values' file of .*2\.png \(column 'conditioning_image'"):
        ImageFolderDataset(str(root), ImageTransform(resolution=8), paired_images={"conditioning_image": "conditioning_pixel_values"})
    with pytest.raises(DataError, match=r"has no column 'edges' \(columns found: \['conditioning_image', 'file_name', 'mask', 'text'\]\)"):
        ImageFolderDataset(str(root), ImageTransform(resolution=8), paired_images={"edges": "conditioning_pixel_values"})


def test_mask_files_beside_the_images_and_a_wrong_size_mask_is_named(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _save(root / f"{i}.png", _rgb(8, 8, i))
    left_half = np.zeros((8, 8), np.uint8)
    left_half[:, :4] = 255
    _save(root / "0-masklabel.png", left_half)
    ds = ImageFolderDataset(str(root), ImageTransform(resolution=8), masks=True)
    assert len(ds) == 3 and ds.paired_keys == ("mask",)  # the mask file is no training image
    assert ds[0]["mask"][0, :, :4].eq(1).all() and ds[0]["mask"][0, :, 4:].eq(0).all()
    assert ds[1]["mask"].eq(1).all()  # no mask file: every pixel counts
    _save(root / "1-masklabel.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(DataError) as err:
        ImageFolderDataset(str(root), ImageTransform(resolution=8), masks=True)
    msg = str(err.value)
    assert f"mask {root / '1-masklabel.png'} is 8x6 but its image {root / '1.png'} is 8x8" in msg and "\n" not in msg
    with pytest.raises(DataError, match=r"data\.masks=true but no image .* has a mask beside it"):
        ImageFolderDataset(str(_bucket_folder(tmp_path / "plain", repeats=1)), ImageTransform(resolution=8), masks=True)


# ---- masked loss --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "flow_matching", "edm"])
def test_masked_loss_all_ones_is_the_plain_loss_and_a_half_mask_ignores_its_half(name):
    process = _process(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    noised = process.noised(x0, generator=g)
    output = torch.randn(4, 3, 8, 8, generator=g, requires_grad=True)
    plain = process.loss(output, noised)
    assert torch.equal(process.loss(output, noised, mask=torch.ones(4, 1, 8, 8)), plain)  # exactly
    half = torch.ones(4, 1, 8, 8)
    half[..., :4] = 0
    process.loss(output, noised, mask=half).backward()
    assert output.grad[..., :4].eq(0).all() and output.grad[..., 4:].ne(0).all()
    # only the unmasked half counts: the same as the plain loss of that half alone
    right_half = process.loss(output.detach()[..., 4:], _crop(noised, slice(4, None)))
    torch.testing.assert_close(process.loss(output.detach(), noised, mask=half), right_half)


def _crop(noised, cols: slice):
    """A ``Noised`` batch cut to some columns (what a loss over those pixels alone sees)."""
    from dataclasses import replace

    return replace(noised, x_t=noised.x_t[..., cols], model_input=noised.model_input[..., cols], target=noised.target[..., cols])


def test_masks_are_area_downsampled_for_latents_and_must_fit():
    mask = torch.zeros(1, 1, 4, 8)
    mask[..., :3] = 1  # columns 0-2: the first 2x2 latent column fully, the second half
    latent = downsample_mask(mask, 2)
    assert latent.shape == (1, 1, 2, 4) and latent[0, 0, 0].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert downsample_mask(mask, 1) is mask
    out, target = torch.randn(1, 4, 2, 4), torch.zeros(1, 4, 2, 4)
    expected = ((out**2)[..., 0].sum() + 0.5 * (out**2)[..., 1].sum()) / (4 * 2 * 1.5)  # sum(m e) / sum(m) over channels too
    torch.testing.assert_close(per_sample_loss(out, target, mask=latent), expected.view(1))
    with pytest.raises(ValueError, match="does not fit the target"):
        per_sample_loss(out, target, mask=mask)
    with pytest.raises(ValueError, match="does not divide by the codec's factor 8"):
        downsample_mask(mask, 8)


# ---- buckets ------------------------------------------------------------------------------------
def test_buckets_keep_the_aspect_ratio_within_the_step_and_the_pixel_budget():
    buckets = AspectBuckets(resolution=64, step=8)
    for rw, rh in [(1, 1), (2, 3), (3, 2), (16, 9), (9, 16), (1, 2)]:
        h, w = buckets.sizes[buckets.nearest(rh * 60, rw * 60)]
        assert h % 8 == 0 and w % 8 == 0
        ideal_h = (64 * 64 * rh / rw) ** 0.5
        assert abs(h - ideal_h) <= 4 and abs(w - ideal_h * rw / rh) <= 4  # rounded to the nearest step
        assert abs(h * w - 64 * 64) / (64 * 64) < 0.2
    assert AspectBuckets(32, 8, sizes="32,32;24,40").sizes == [(32, 32), (24, 40)]
    with pytest.raises(ConfigError, match=r"data\.bucket_sizes has \[\(30, 40\)\], not multiples of data\.bucket_step=8"):
        AspectBuckets(32, 8, sizes=[[30, 40]])


def test_bucket_batches_never_mix_cover_every_image_and_split_over_ranks():
    ids = [i % 3 for i in range(23)] + [3]  # buckets of 8, 8, 7 items and one of 1
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ranks = [bucket_batches(ids, 2, num_replicas=2, rank=r, generator=g()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2 + 2 + 2 + 1  # per bucket: ceil(n / 4) global batches
    for a, b in zip(*ranks):
        assert len(a) == len(b) == 2 and len({ids[i] for i in a + b}) == 1  # both ranks: the same bucket
    assert {i for batches in ranks for batch in batches for i in batch} == set(range(24))
    assert ranks[0] == bucket_batches(ids, 2, 2, 0, g())  # the same seed, the same epoch
    assert ranks[0] != bucket_batches(ids, 2, 2, 0, torch.Generator().manual_seed(6))
    whole = bucket_batches(ids, 4, pad=False)  # one process, in order: every item once
    assert sorted(i for batch in whole for i in batch) == list(range(24)) and [len(b) for b in whole] == [4, 4, 4, 4, 4, 3, 1]


def test_bucket_sampler_resumes_mid_epoch_and_reshuffles():
    ids = [i % 3 for i in range(30)]
    full = list(BucketSampler(list(range(30)), ids, batch_size=4, num_replicas=2, rank=1, seed=7, epoch=2))
    assert len(full) == len(BucketSampler(list(range(30)), ids, 4, 2, 1, 7)) == 6 * 4
    resumed = BucketSampler(list(range(30)), ids, 4, 2, 1, seed=7, epoch=2, start=8)
    assert list(resumed) == full[8:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(full) and list(resumed) != full


def _bucketed_datamodule(root: Path, **kwargs) -> DiffusionDataModule:
    ds = ImageFolderDataset(str(root), ImageTransform(resolution=32, crop="random", random_flip=True), buckets=AspectBuckets(32, 8))
    return DiffusionDataModule(ds, batch_size=4, val_fraction=0.2, shuffle_seed=3, **kwargs)


def test_bucketed_loader_batches_have_one_shape_and_resume_exactly(tmp_path):
    root = _bucket_folder(tmp_path / "data")

    def batches(state=None, num_workers=0, epoch=0):
        dm = _bucketed_datamodule(root, num_workers=num_workers)
        if state:
            dm.load_state_dict(state)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [b["pixel_values"] for b in loader], dm

    plain, dm = batches()
    assert len(plain) == len(dm.train_dataloader()) and all(len(b) == 4 for b in plain)
    assert len({tuple(b.shape[-2:]) for b in plain}) >= 3  # several buckets, one per batch (collation would fail otherwise)
    assert all(b.shape[-2] * b.shape[-1] <= 48 * 24 for b in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, batches(num_workers=2)[0], strict=True))
    resumed, _ = batches({"shuffle_seed": 3, "epoch": 0, "samples": 2 * 4})
    assert all(torch.equal(a, b) for a, b in zip(plain[2:], resumed, strict=True))
    assert [tuple(b.shape) for b in batches(epoch=1)[0]] != [tuple(b.shape) for b in plain]  # reshuffled by epoch
    # validation: every held-out image once, one shape per batch; the sample batch has one shape
    val = list(dm.val_dataloader())
    assert sum(len(b["pixel_values"]) for b in val) == len(dm.val_set)
    assert dm.sample_batch(3)["pixel_values"].ndim == 4


def test_sdxl_time_ids_carry_the_true_size_crop_and_bucket(tiny_sdxl, tmp_path):  # noqa: F811
    root = tmp_path / "data"
    _save(root / "wide.png", _rgb(30, 56, 0))
    (root / "wide.txt").write_text("a wide image")
    ds = ImageFolderDataset(str(root), ImageTransform(resolution=32), caption_column="auto", buckets=AspectBuckets(32, 8))
    batch = torch.utils.data.default_collate([ds[0]])
    # 30x56 -> bucket 24x48 (the nearest ratio); resized to 26x48 to cover it, center crop 1 px from the top
    assert batch["pixel_values"].shape == (1, 3, 24, 48)
    module = build_module(tmp_path / "cfg", tiny_sdxl).eval()
    assert module.conditioning(batch, train=False)["time_ids"].tolist() == [[30.0, 56.0, 1.0, 0.0, 24.0, 48.0]]
    moments = {"latent_moments": module.codec.moments(batch["pixel_values"]), **{k: batch[k] for k in ("original_size", "crop_top_left")}}
    assert module.family.conditioning(module, moments, 1, sampling=False)["time_ids"].tolist() == [[30.0, 56.0, 1.0, 0.0, 24.0, 48.0]]  # cached latents: the same


@pytest.mark.filterwarnings("ignore:model.cache=true with random crops")
def test_cache_with_buckets_is_refused(tmp_path):
    dm = _bucketed_datamodule(_bucket_folder(tmp_path / "data", repeats=1))
    dm.setup()
    with pytest.raises(ConfigError, match=r"model\.cache=true with data\.buckets=true.*Set model\.cache=false"):
        LatentCacheCallback(enabled=True).on_fit_start(SimpleNamespace(datamodule=dm), None)


# ---- tiny latent SD runs -------------------------------------------------------------------------
def _masked_bucketed_folder(root: Path) -> list[str]:
    for i in range(12):
        h, w = SHAPES[i % len(SHAPES)]
        _save(root / f"{i:02d}.png", _rgb(h, w, i))
        (root / f"{i:02d}.txt").write_text(f"image {i % 3}")
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = 255
        _save(root / f"{i:02d}-masklabel.png", mask)
    return ["data=image_folder", f"data.root={root}", "data.resolution=32", "data.batch_size=2", "data.val_fraction=0.25",
            "data.num_workers=0", "data.caption_column=auto", "data.masks=true"]


QUIET = ["trainer=cpu", "debug=fast", "logger=csv", "callbacks.progress_bar=null", "callbacks.noising_strip=null"]


def test_latent_sd_fast_dev_run_with_masks_and_buckets(tiny_pipeline, tmp_path):  # noqa: F811
    data = _masked_bucketed_folder(tmp_path / "data")
    cfg = compose_cfg("train", [*FAST, f"model.pretrained={tiny_pipeline}", *data, "data.buckets=true", "data.bucket_step=8", *QUIET], tmp_path / "run")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    batch = next(iter(objects["datamodule"].train_dataloader()))
    assert batch["mask"].shape[-2:] == batch["pixel_values"].shape[-2:] and batch["mask"].shape[1] == 1
    module = objects["model"].eval()
    torch.manual_seed(0)
    masked = module.diffusion_loss(batch, train=False, generator=torch.Generator().manual_seed(1))
    unmasked = module.diffusion_loss({k: v for k, v in batch.items() if k != "mask"}, train=False, generator=torch.Generator().manual_seed(1))
    ones = module.diffusion_loss({**batch, "mask": torch.ones_like(batch["mask"])}, train=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ones, unmasked) and not torch.equal(masked, unmasked)


def test_latent_sd_masks_survive_the_latent_cache(tiny_pipeline, tmp_path):  # noqa: F811
    data = _masked_bucketed_folder(tmp_path / "data")
    cfg = compose_cfg("train", [*FAST, f"model.pretrained={tiny_pipeline}", *data, "model.cache=true", *QUIET], tmp_path / "run")
    _, objects = train(cfg)
    train_set = objects["datamodule"].train_set
    assert type(train_set).__name__ == "CachedLatentDataset" and train_set[0]["mask"].shape == (1, 32, 32)
    assert objects["trainer"].global_step == 1


# ---- exact resume of a bucketed run after SIGKILL --------------------------------------------------
@pytest.mark.slow
def test_sigkilled_bucketed_run_resumes_bit_identical(tmp_path):
    """The reliability test's kill (after step 7, last checkpoint step 6, mid epoch) on a bucketed
    folder with random crops and flips: the resumed run ends with the unbroken run's weights."""
    from tests.test_reliability import HERE, TINY, _assert_identical, _cli, _final_state, _resume_overrides, _start_and_kill

    root = tmp_path / "images"
    for i in range(40):  # four shapes -> three buckets of the resolution-8 ladder
        _save(root / f"{i:03d}.png", _rgb(*[(10, 12), (14, 8), (8, 14), (12, 6)][i % 4], i))
    overrides = [*_resume_overrides(root), "data.buckets=true", "data.bucket_step=2"]
    _, objects = train(compose_cfg("train", TINY + overrides, tmp_path / "unbroken"))
    assert objects["trainer"].global_step == 12
    shapes = {tuple(b["pixel_values"].shape[-2:]) for b in objects["datamodule"].train_dataloader()}
    assert len(shapes) >= 2  # really bucketed
    reference = _final_state(objects)

    marker, killed = tmp_path / "marker", tmp_path / "killed"
    pause = [f"+callbacks.pause={{_target_: {HERE}.PauseAtStep, step: 7, marker: '{marker}'}}"]
    _start_and_kill(_cli(overrides + pause, killed), marker, tmp_path / "child.log")
    last = killed / "checkpoints" / "last.ckpt"
    _, objects = train(compose_cfg("train", TINY + overrides + [f"ckpt_path={last}"], tmp_path / "resumed"))
    assert objects["trainer"].global_step == 12
    _assert_identical(reference, _final_state(objects))


# ---- two real DDP ranks (gloo) ---------------------------------------------------------------------
@pytest.mark.slow
def test_two_ddp_ranks_each_train_their_slice_of_the_same_bucket(tmp_path):
    from diffusion_lab.data.datamodule import bucket_ids_of
    from tests.multiproc import PROBE, load_probes, run_cli, tiny

    root = tmp_path / "images"
    for i in range(40):
        _save(root / f"{i:03d}.png", _rgb(*[(10, 12), (14, 8), (8, 14), (12, 6)][i % 4], i))
    data = ["data=image_folder", f"data.root={root}", "data.resolution=8", "data.buckets=true", "data.bucket_step=2", "data.num_workers=0",
            "data.batch_size=8", "data.val_fraction=0.2", "data.crop=random", "data.random_flip=true"]
    run_dir = tmp_path / "run"
    args = tiny("trainer=ddp_cpu", *data, "trainer.max_steps=4", "trainer.limit_val_batches=2", "callbacks.sample_grid=null",
                "callbacks.noising_strip=null", "callbacks.export=null", *PROBE, f"hydra.run.dir={run_dir}")
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_probes(run_dir)
    assert r0["world_size"] == 2 and r0["global_step"] == r1["global_step"] == 4
    assert r0["sampler_is_distributed"] and r0["val_loss"] == r1["val_loss"]  # bucketed validation, reduced over the ranks
    assert all(torch.equal(r0["unet"][k], r1["unet"][k]) for k in r0["unet"])
    dm = instantiate(compose_cfg("train", tiny(*data), tmp_path / "cfg").data.datamodule)
    dm.setup()
    ids = bucket_ids_of(dm.train_set)
    order0, order1 = ([i for _, i in r["sampler_order"]] for r in (r0, r1))
    assert len(order0) == len(order1) and len(order0) % 4 == 0
    for step in range(len(order0) // 4):
        a, b = order0[4 * step : 4 * step + 4], order1[4 * step : 4 * step + 4]
        assert len({ids[i] for i in a + b}) == 1  # one bucket per step, on both ranks
    assert set(order0) | set(order1) == set(range(len(ids)))  # together: every training image
