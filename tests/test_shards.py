"""``data=shards``: training streams litdata shards written by ``diffusion_lab.prepare``: pixel
and latent models, exact resume (in-process replay and a real SIGKILL), 2-process DDP (gloo)
with disjoint ranks, precomputed latents = online encoding, and clear errors for bad folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from diffusion_lab.data import ImageTransform
from diffusion_lab.data.shards import MANIFEST, ShardDataModule
from diffusion_lab.data.shards.prepare import prepare
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError, DataError
from tests.conftest import compose_cfg
from tests.multiproc import run_cli, tiny
from tests.test_prepare import LATENT, image_folder

HERE = __name__


class SeenIndices(pl.Callback):
    """Every rank saves the stored ``index`` of each training item it was given, in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += batch["index"].tolist()

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).mkdir(parents=True, exist_ok=True)
        (Path(self.path) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def write(tmp: Path, *overrides: str) -> Path:
    out = tmp / "shards"
    prepare(compose_cfg("prepare", [*overrides, f"out_dir={out}", "prepare.num_workers=2", "prepare.batch_size=4", "prepare.chunk_bytes=2KB"], tmp / "prep"))
    return out


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> Path:
    """40 random 12x10 images -> 8 px pixel shards: 36 train (in ~10 chunks), 4 val."""
    tmp = tmp_path_factory.mktemp("folder")
    images = image_folder(tmp / "images", n=40)
    return write(tmp, "data=image_folder", f"data.root={images}", "data.resolution=8", "data.val_fraction=0.1")


def shard_overrides(root: Path, *extra: str) -> list[str]:
    return ["data=shards", f"data.root={root}", "data.resolution=8", "data.num_workers=0", "callbacks.noising_strip=null", "callbacks.export=null", *extra]


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


# ---- bad folders --------------------------------------------------------------------------------
def test_a_folder_that_is_not_a_shard_set_is_a_clear_error(tmp_path, folder_shards):
    with pytest.raises(DataError, match="does not exist.*diffusion_lab.prepare"):
        ShardDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"gs:// is not supported; object-store roots are s3://.*Mount the bucket"):
        ShardDataModule("gs://my-bucket/shards")
    images = image_folder(tmp_path / "images", n=2)
    with pytest.raises(DataError, match=r"not a shard set \(no shards.json.*holds images: train on them with data=image_folder"):
        ShardDataModule(str(images))
    (tmp_path / ".half.tmp-1234abcd").mkdir()  # what a killed prepare leaves
    with pytest.raises(DataError, match=r"unfinished prepare left .*\.half\.tmp-1234abcd"):
        ShardDataModule(str(tmp_path / "half"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text("{ cut")
    with pytest.raises(DataError, match="is not JSON"):
        ShardDataModule(str(broken))
    with pytest.raises(ConfigError, match=r"data.resolution=16 but the shards .* hold 8 px images; set data.resolution=8"):
        ShardDataModule(str(folder_shards), resolution=16)
    with pytest.raises(ConfigError, match="data.channels=1 .* 3-channel images"):
        ShardDataModule(str(folder_shards), channels=1)


# ---- order, augmentation, resume (in process) -----------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffled_epochs_and_replayed_resume(folder_shards, num_workers):
    """Each epoch is a new permutation of all 36 training items; a loader rebuilt from the saved
    position (litdata's own loader state) yields exactly the batches the unbroken one had left."""

    def make(state: dict | None = None) -> ShardDataModule:
        dm = ShardDataModule(str(folder_shards), ImageTransform(8, random_flip=True), batch_size=4, num_workers=num_workers, resolution=8, shuffle_seed=3)
        if state:
            dm.load_state_dict(state)
        return dm

    def same(a, b) -> bool:  # same items in the same batches, same flips
        return [i for i, _ in a] == [i for i, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))

    def batches(loader, n: int | None = None) -> list:
        out = []
        for b in loader:
            out.append((b["index"].tolist(), b["pixel_values"]))
            if len(out) == n:  # Lightning ends an epoch after len(loader) batches, without exhausting it
                break
        return out

    def checkpoint(epoch: int, n: int) -> dict:
        """What a checkpoint after ``n`` batches of ``epoch`` holds: the count, and litdata's
        loader state at that batch (the loader has run ahead: Lightning prefetches a batch)."""
        loader = make().train_dataloader()
        for _ in range(epoch):
            batches(loader)
        ahead = iter(loader)
        for _ in range(n + 1):
            next(ahead)
        return {"shuffle_seed": 3, "epoch": epoch, "samples": n * 4, "loader": loader.position(epoch, n)}

    loader = make().train_dataloader()
    epochs = [batches(loader) for _ in range(3)]
    orders = [[i for idx, _ in e for i in idx] for e in epochs]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(36)) and orders[0] != orders[1]
    for epoch in (0, 1):
        loader = make(checkpoint(epoch, 3)).train_dataloader()
        assert same(batches(loader, len(epochs[epoch]) - 3), epochs[epoch][3:])
        assert same(batches(loader, len(epochs[epoch + 1])), epochs[epoch + 1])  # the next epoch starts afresh
    with pytest.raises(ConfigError, match=r"3 batches into epoch 0 .* holds no litdata loader state"):  # an older checkpoint
        make({"shuffle_seed": 3, "epoch": 0, "samples": 12}).train_dataloader()


# ---- training -------------------------------------------------------------------------------------
def test_pixel_model_trains_on_shards_with_validation_and_grids(folder_shards, train_cfg, tmp_path):
    cfg = train_cfg(*shard_overrides(folder_shards, f"+callbacks.seen={{_target_: {HERE}.SeenIndices, path: '{tmp_path / 'seen'}'}}"))
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 4
    assert "val/loss" in objects["trainer"].callback_metrics
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    seen = json.loads((tmp_path / "seen" / "rank0.json").read_text())
    assert len(seen) == 32 and len(set(seen)) == 32  # 4 batches of 8, no repeats inside the epoch


@pytest.mark.slow  # two latent runs: ~4 min on a shared 2-core machine
def test_precomputed_latents_give_the_same_loss_curve_as_online_encoding(tmp_path):
    """Center crops, no flips: pixel shards encoded by the VAE at every step vs the same items'
    posteriors (and text states) stored by prepare.encode=true: same chunks (chunk_size counts
    items), so the same order and the same draws."""
    data = ["data=digits_captioned", "data.resolution=16", "data.val_fraction=0.97", "prepare.chunk_size=8"]
    pixels = write(tmp_path / "pixels", *data)
    latents = write(tmp_path / "latents", *data, *LATENT, "prepare.encode=true")
    run = [*LATENT, "callbacks.sample_grid=null", "callbacks.ema=null", "trainer.max_steps=3", "data.resolution=16", "model.caption_dropout=0.5"]
    curves = {}
    for name, root in (("online", pixels), ("stored", latents)):
        out = tmp_path / name
        cfg = compose_cfg("train", tiny(*run, *shard_overrides(root, "data.resolution=16")), out)
        train(cfg)
        curves[name] = losses(out)
    assert len(curves["stored"]) == 3
    np.testing.assert_allclose(curves["stored"], curves["online"], rtol=1e-4)


def test_float16_storage_halves_encoded_shards_and_reads_back_as_float32(tmp_path):
    data = ["data=digits_captioned", "data.resolution=16", "data.val_fraction=0.97", *LATENT, "prepare.encode=true"]
    full, half = write(tmp_path / "full", *data), write(tmp_path / "half", *data, "prepare.store_dtype=float16")
    assert json.loads((half / MANIFEST).read_text())["store_dtype"] == "float16"
    size = {name: sum(f.stat().st_size for f in (root / "train").glob("*.bin")) for name, root in (("full", full), ("half", half))}
    assert 0.45 < size["half"] / size["full"] < 0.6
    a, b = (ShardDataModule(str(root), num_workers=0).dataset for root in (full, half))
    for i in (0, len(a) - 1):
        for key in ("latent_moments", "encoder_hidden_states"):
            assert b[i][key].dtype == torch.float32
            assert torch.equal(b[i][key], a[i][key].half().float())  # exactly the float32 states rounded once
    with pytest.raises(ConfigError, match="prepare.store_dtype='bfloat16': use float32 or float16"):
        write(tmp_path / "bf16", *data, "prepare.store_dtype=bfloat16")


def test_shards_encoded_for_another_model_are_refused(tmp_path):
    data = ["data=digits_captioned", "data.resolution=16", "data.val_fraction=0.97"]
    latents = write(tmp_path, *data, *LATENT, "prepare.encode=true")
    base = [*LATENT, *shard_overrides(latents, "data.resolution=16")]

    def model(*extra: str):
        return instantiate(compose_cfg("train", tiny(*base, *extra), tmp_path / "m").model)

    dm = ShardDataModule(str(latents), resolution=16, channels=3, num_workers=0)
    dm.check_model(model())  # the model it was written with
    with pytest.raises(ConfigError, match=r"encoded with another VAE .*prepare again"):
        ShardDataModule(str(latents), num_workers=0).check_model(model("+vae.vae.seed=1"))
    with pytest.raises(ConfigError, match="stores text states of another text encoder"):
        ShardDataModule(str(latents), num_workers=0).check_model(model("+text_encoder.text_encoder.seed=1"))
    with pytest.raises(ConfigError, match="holds VAE latents .* but this model has no VAE"):  # before training
        train(compose_cfg("train", tiny(*shard_overrides(latents, "data.resolution=16")), tmp_path / "c"))
    with pytest.raises(ConfigError, match="model.cache=true with data=shards"):
        train(compose_cfg("train", tiny(*base, "model.cache=true"), tmp_path / "d"))


# ---- DDP --------------------------------------------------------------------------------------------
def test_two_ddp_ranks_read_disjoint_halves_of_the_epoch(folder_shards, tmp_path):
    """trainer=ddp_cpu (2 gloo processes), global batch 6 = 2 x 3: one epoch of the 36 items is
    6 steps (litdata gives each rank the same whole number of batches; here nothing is left over)."""
    seen = tmp_path / "seen"
    args = tiny(
        "trainer=ddp_cpu", *shard_overrides(folder_shards), "data.batch_size=6", "trainer.max_steps=6", "callbacks.sample_grid=null",
        f"+callbacks.seen={{_target_: {HERE}.SeenIndices, path: '{seen}'}}", f"hydra.run.dir={tmp_path / 'run'}",
    )
    proc = run_cli(args, tmp_path, timeout=900)  # two ranks' start-up on a loaded 2-core machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((seen / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 18
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(36))


# ---- a real kill --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [7, 5])
def test_sigkilled_run_on_shards_resumes_bit_identical(folder_shards, tmp_path, kill_after):
    """Random flips, validation, EMA, 2 loader workers; 4 batches of 8 per epoch (36 items, the
    last partial batch dropped), checkpoints every 3 steps. kill_after=7: resume from step 6 (mid epoch 1);
    kill_after=5: from step 3, and the resumed run crosses the epoch boundary."""
    from tests.test_reliability import (
        _assert_identical,
        _cli,
        _final_state,
        _start_and_kill,
    )

    run = shard_overrides(folder_shards, "data.random_flip=true", "data.num_workers=2", "data.batch_size=8") + [
        "trainer.max_steps=12", "trainer.val_check_interval=5", "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.sample_grid.every_n_steps=5", "model.lr_scheduler.num_warmup_steps=4", "callbacks.ema.decay=0.9",
    ]
    _, objects = train(compose_cfg("train", tiny(*run), tmp_path / "unbroken"))
    assert objects["trainer"].global_step == 12 and objects["trainer"].current_epoch >= 2
    reference = _final_state(objects)

    killed, marker = tmp_path / "killed", tmp_path / "marker"
    pause = f"+callbacks.pause={{_target_: tests.test_reliability.PauseAtStep, step: {kill_after}, marker: '{marker}'}}"
    _start_and_kill(_cli(run + [pause], killed), marker, tmp_path / "child.log")
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == (kill_after // 3) * 3
    _, objects = train(compose_cfg("train", tiny(*run, f"ckpt_path={last}"), tmp_path / "resumed"))
    assert objects["trainer"].global_step == 12
    _assert_identical(reference, _final_state(objects))


# ---- SDXL ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sdxl_trains_on_encoded_bucketed_shards(tmp_path):
    """SDXL on a captioned folder of six shapes, data.buckets=true, prepare.encode=true: both text
    states stored, and each batch's time ids carry its images' original sizes."""
    from diffusion_lab.testing import tiny as tiny_parts
    from tests.test_buckets_masks import _masked_bucketed_folder

    pipeline = tiny_parts.build(tmp_path / "tiny_sdxl", kind="sdxl")
    model = ["model=latent_sdxl", f"model.pretrained={pipeline}"]
    data = [o for o in _masked_bucketed_folder(tmp_path / "data") if o != "data.masks=true"]
    latents = write(tmp_path, *data, "data.buckets=true", "data.bucket_step=8", *model, "prepare.encode=true")
    manifest = json.loads((latents / MANIFEST).read_text())
    assert manifest["model"]["text_keys"] == ["encoder_hidden_states", "text_embeds"] and len(manifest["buckets"]) >= 3
    cfg = compose_cfg("train", tiny(*model, *shard_overrides(latents, "data.resolution=32", "data.batch_size=2", "trainer.max_steps=2"), "backbone=sd_pretrained", "callbacks.sample_grid=null"), tmp_path / "run")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    batches = list(objects["datamodule"].train_dataloader())
    assert all("encoder_hidden_states" in b and "text_embeds" in b for b in batches)
    assert len({tuple(b["original_size"][0].tolist()) for b in batches}) >= 3


def test_data_shards_takes_its_shape_from_the_manifest(folder_shards, tmp_path):
    """data=shards data.root=... alone: resolution, channels and mode come from shards.json."""
    manifest = json.loads((folder_shards / MANIFEST).read_text())
    cfg = compose_cfg("train", ["data=shards", f"data.root={folder_shards}"], tmp_path / "run")
    assert (cfg.data.resolution, cfg.data.channels) == (manifest["resolution"], manifest["channels"])
    assert cfg.data.mode == ("L" if manifest["channels"] == 1 else "RGB")
    assert cfg.model.backbone.in_channels == manifest["channels"]


@pytest.mark.slow  # three 2-process runs: ~3 min
def test_sigkilled_ddp_run_on_shards_resumes_bit_identical(folder_shards, tmp_path):
    """2 gloo processes, random flips, global batch 6 (6 steps an epoch), checkpoints every 4
    steps: both ranks SIGKILLed after step 9, resumed from step 8 (mid epoch 1) to 12: every rank
    ends with the weights and EMA of the unbroken 2-process run. No loader workers: forking them
    beside gloo's threads hung once here (the single-process kill test has 2 workers)."""
    from tests.multiproc import PROBE, kill_all_ranks_after_step, load_probes

    run = tiny(
        "trainer=ddp_cpu", *shard_overrides(folder_shards, "data.random_flip=true", "data.num_workers=0", "data.batch_size=6"), *PROBE,
        "trainer.max_steps=12", "trainer.val_check_interval=5", "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.sample_grid=null",
    )
    proc = run_cli([*run, f"hydra.run.dir={tmp_path / 'unbroken'}"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_all_ranks_after_step([*run, f"hydra.run.dir={killed}"], 9, tmp_path)
    ckpt = killed / "checkpoints" / "step_000008.ckpt"
    proc = run_cli([*run, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unbroken, resumed = load_probes(tmp_path / "unbroken"), load_probes(tmp_path / "resumed")
    assert [r["global_step"] for r in resumed] == [12, 12]
    for a, b in zip(unbroken, resumed, strict=True):
        assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"]), a["rank"]
        assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"], strict=True))


# ---- aspect buckets ---------------------------------------------------------------------------------
BUCKET_SHAPES = [(10, 12), (14, 8), (8, 14), (12, 6)]  # (h, w): four shapes -> several buckets of the resolution-8 ladder


@pytest.fixture(scope="module")
def bucketed_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, shard set) of 40 images of four shapes, data.buckets=true: one litdata folder per bucket."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("bucketed")
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (*BUCKET_SHAPES[i % 4], 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    return images, write(tmp, "data=image_folder", f"data.root={images}", "data.resolution=8", "data.buckets=true", "data.bucket_step=2", "data.val_fraction=0.1")


def test_bucketed_shards_keep_each_image_at_its_bucket_and_batches_one_shape(bucketed_shards, tmp_path):
    images, root = bucketed_shards
    manifest = json.loads((root / MANIFEST).read_text())
    sizes = [tuple(s) for s in manifest["buckets"]]
    assert len(sizes) >= 3 and sum(manifest["num_items"].values()) == 40
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(f"{h}x{w}" for h, w in sizes)
    # the source's training split, as prepare built it: each item at its bucket, center crop, no flip
    source = instantiate(compose_cfg("prepare", ["data=image_folder", f"data.root={images}", "data.resolution=8", "data.buckets=true", "data.bucket_step=2", "data.val_fraction=0.1", "out_dir=x"], tmp_path).data.datamodule)
    source.setup()

    def make(state: dict | None = None, num_workers: int = 0) -> ShardDataModule:
        dm = ShardDataModule(str(root), ImageTransform(8, random_flip=True), batch_size=4, num_workers=num_workers, resolution=8, shuffle_seed=3)
        if state:
            dm.load_state_dict(state)
        return dm

    def epoch(dm: ShardDataModule, n: int) -> list[dict]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(n)  # what Lightning does at each epoch
        return list(loader)

    dm = make()
    first = epoch(dm, 0)
    assert len({tuple(b["pixel_values"].shape[-2:]) for b in first}) >= 3 and all(len(b["index"]) == 4 for b in first)
    assert {i for b in first for i in b["index"].tolist()} == set(range(len(source.train_set)))  # every item (short buckets padded)
    flipped = total = 0
    for b in first:  # each item is its source image at its bucket, as stored, or mirrored (data.random_flip)
        for px, index in zip(b["pixel_values"], b["index"].tolist(), strict=True):
            stored = source.train_set[index]["pixel_values"]
            assert torch.equal(px, stored) or torch.equal(px, stored.flip(-1))
            flipped, total = flipped + (not torch.equal(px, stored)), total + 1
    assert 0 < flipped < total
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, epoch(make(num_workers=2), 0), strict=True))
    resumed = epoch(make({"shuffle_seed": 3, "epoch": 0, "samples": 8}), 0)
    assert len(resumed) == len(first) - 2
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first[2:], resumed, strict=True))
    assert [b["index"].tolist() for b in epoch(dm, 1)] != [b["index"].tolist() for b in first]  # reshuffled by epoch
    val = list(dm.val_dataloader())
    assert sum(len(b["index"]) for b in val) == manifest["num_items"]["val"] == len(source.val_set)
    assert dm.sample_batch(3)["pixel_values"].ndim == 4
    with pytest.raises(ConfigError, match="hold aspect buckets of ~8"):
        ShardDataModule(str(root), resolution=6)


def test_a_pixel_model_trains_on_bucketed_shards(bucketed_shards, train_cfg, tmp_path):
    _, root = bucketed_shards
    cfg = train_cfg(*shard_overrides(root, "data.batch_size=4", "data.random_flip=true", "trainer.max_steps=6"))
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 6 and "val/loss" in objects["trainer"].callback_metrics
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_a_latent_model_trains_on_encoded_bucketed_shards_with_masks(tmp_path):
    """Captioned images of six shapes with loss masks, data.buckets=true, prepare.encode=true: VAE
    posteriors of several shapes (one folder per bucket) and the masks at their bucket's size."""
    from tests.test_buckets_masks import _masked_bucketed_folder

    data = _masked_bucketed_folder(tmp_path / "data")
    root = write(tmp_path, *data, "data.buckets=true", "data.bucket_step=8", *LATENT, "prepare.encode=true")
    assert len(json.loads((root / MANIFEST).read_text())["buckets"]) >= 3
    cfg = compose_cfg("train", tiny(*LATENT, *shard_overrides(root, "data.resolution=32", "data.batch_size=2", "trainer.max_steps=3"), "callbacks.sample_grid=null"), tmp_path / "run")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 3
    batches = list(objects["datamodule"].train_dataloader())
    assert len({tuple(b["latent_moments"].shape[-2:]) for b in batches}) >= 3
    for b in batches:  # each mask at its images' size: the latent's times the VAE factor (2 for the tiny VAE)
        assert b["mask"].shape[-2:] == tuple(2 * s for s in b["latent_moments"].shape[-2:])


def test_stored_paired_images_and_masks_get_the_training_crop_and_flip(tmp_path):
    """Pixel shards at 16 px trained with flips, and at 8 px with random crops: the stored
    conditioning image (the image's own pixels) and mask (its first channel) move with the image."""
    from tests.test_buckets_masks import _paired_folder

    images = _paired_folder(tmp_path / "data", n=8, h=16, w=16)
    root = write(tmp_path, "data=image_folder", f"data.root={images}", "data.resolution=16", "data.val_fraction=0",
                 "data.paired_images={conditioning_image:conditioning_pixel_values,mask:mask}")

    def batch(transform: ImageTransform) -> dict:
        (b,) = list(ShardDataModule(str(root), transform, batch_size=8, num_workers=0, shuffle_seed=1).train_dataloader())
        return b

    flipped = batch(ImageTransform(16, random_flip=True))  # no resize: the mask must be the image's first channel exactly
    stored = batch(ImageTransform(16))
    assert 0 < sum(not torch.equal(a, b) for a, b in zip(flipped["pixel_values"], stored["pixel_values"])) < 8
    assert torch.equal(flipped["conditioning_pixel_values"], flipped["pixel_values"])
    torch.testing.assert_close(flipped["mask"][:, 0], (flipped["pixel_values"][:, 0] + 1) / 2, atol=0.5 / 255, rtol=0)
    cropped = batch(ImageTransform(8, crop="random", random_flip=True))  # resized and cropped: the same geometry for all three
    assert cropped["conditioning_pixel_values"].shape == (8, 3, 8, 8) and cropped["mask"].shape == (8, 1, 8, 8)
    assert torch.equal(cropped["conditioning_pixel_values"], cropped["pixel_values"])


@pytest.mark.slow  # two gloo processes: ~1 min
def test_two_ddp_ranks_train_their_slices_of_the_same_bucket_from_shards(bucketed_shards, tmp_path):
    _, root = bucketed_shards
    seen = tmp_path / "seen"
    args = tiny("trainer=ddp_cpu", *shard_overrides(root, "data.batch_size=4", "trainer.max_steps=6"), "callbacks.sample_grid=null",
                f"+callbacks.seen={{_target_: {HERE}.SeenIndices, path: '{seen}'}}", f"hydra.run.dir={tmp_path / 'run'}")
    proc = run_cli(args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = ShardDataModule(str(root), ImageTransform(8), num_workers=0).dataset
    buckets = {int(stored[i]["index"]): b for i, b in enumerate(stored.bucket_ids)}  # source index -> bucket
    ranks = [json.loads((seen / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12  # 6 steps x 2 items per rank
    for step in range(6):  # both ranks in the same bucket at each step, each its own items
        a, b = ranks[0][2 * step : 2 * step + 2], ranks[1][2 * step : 2 * step + 2]
        assert len({buckets[i] for i in a + b}) == 1
    assert len(set(ranks[0]) & set(ranks[1])) <= 2  # disjoint but for a padded short bucket


@pytest.mark.parametrize("data", ["shards", "bucketed_shards", "bucketed_folder"])
def test_resume_from_a_checkpoint_saved_on_a_validation_step_ends_with_the_same_bits(folder_shards, bucketed_shards, tmp_path, data):
    """Checkpoint and validation on the same step (as with the defaults: validation every 500 steps, a checkpoint every 1000): the
    checkpoint is written before that validation, so validation must not draw from the global RNG,
    or the unbroken run would go on with other noise than a run resumed from the checkpoint."""
    from tests.test_reliability import _assert_identical, _final_state

    images, bucketed = bucketed_shards
    source = {
        "shards": shard_overrides(folder_shards),
        "bucketed_shards": shard_overrides(bucketed),
        "bucketed_folder": ["data=image_folder", f"data.root={images}", "data.resolution=8", "data.buckets=true", "data.bucket_step=2", "data.num_workers=0", "callbacks.noising_strip=null", "callbacks.export=null"],
    }[data]
    run = tiny(*source, "data.batch_size=4", "data.random_flip=true", "trainer.max_steps=8", "trainer.val_check_interval=4",
               "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.sample_grid=null", "callbacks.ema.decay=0.9")
    _, objects = train(compose_cfg("train", run, tmp_path / "unbroken"))
    reference = _final_state(objects)
    _, objects = train(compose_cfg("train", tiny(*run, f"ckpt_path={tmp_path / 'unbroken' / 'checkpoints' / 'step_000004.ckpt'}"), tmp_path / "resumed"))
    assert objects["trainer"].global_step == 8
    _assert_identical(reference, _final_state(objects))
