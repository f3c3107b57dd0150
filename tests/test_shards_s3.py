"""Shards on an object store: ``prepare ... out_dir=s3://...`` writes a shard set to the store and
``data=shards data.root=s3://...`` streams it through litdata, against a real S3-compatible server
(moto's server mode, a subprocess on 127.0.0.1): the same items, order and loss curve as the same
shards in a folder. Credentials and endpoint come from the ``AWS_*`` environment variables only;
without them, or with a missing bucket or prefix, the error is one paragraph before any work."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from diffusion_lab.data import ImageTransform
from diffusion_lab.data.shards import ShardDataModule, check_out_dir, read_manifest
from diffusion_lab.data.shards.prepare import prepare
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError, DataError
from tests.conftest import compose_cfg
from tests.multiproc import run_cli, tiny

BUCKET = "shards"
HERE = __name__
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port of 127.0.0.1 (up within 60 s, stopped after the module), this
    process's environment pointed at it with test credentials (nothing read from ~/.aws), and a
    bucket. Yields the endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (see {log.name})") from None
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as env:
            nowhere = str(tmp_path_factory.mktemp("aws") / "none")
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "LITDATA_CACHE_DIR"):
                env.delenv(name, raising=False)
            for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
                                "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere}.items():
                env.setenv(name, value)
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


PREP = ["data=digits", "data.resolution=8", "data.val_fraction=0.02", "prepare.num_workers=2", "prepare.batch_size=16", "prepare.chunk_bytes=4KB"]


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory) -> tuple[str, Path, Path]:
    """The same digits at 8 px written by prepare twice: to s3://shards/digits (staged in a folder
    of its own) and to a folder."""
    tmp = tmp_path_factory.mktemp("prep")
    url, folder, staging = f"s3://{BUCKET}/digits", tmp / "digits", tmp / "staging"
    for out in (url, folder):
        prepare(compose_cfg("prepare", [*PREP, f"out_dir={out}", f"prepare.staging_dir={staging}"], tmp / "hydra"))
    return url, folder, staging


def keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# ---- writing ------------------------------------------------------------------------------------
def test_prepare_writes_the_shard_set_to_the_store(shards, tmp_path, monkeypatch):
    url, folder, staging = shards
    stored = keys("digits/")
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(k.removeprefix("digits/") for k in stored) == local  # every chunk and index, the manifest
    assert len([k for k in stored if k.endswith(".bin")]) > 4
    assert read_manifest(url) == read_manifest(folder)
    assert staging.is_dir() and not list(staging.iterdir())  # each part uploaded, then deleted
    # issue #29 item 4: out_dir=s3://... used to write a local folder ./s3:/bucket/...
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"out_dir=s3://shards/digits holds a shard set; .*prepare.overwrite=true"):
        prepare(compose_cfg("prepare", [*PREP, f"out_dir={url}"], tmp_path / "hydra"))
    assert not (tmp_path / "s3:").exists()


# ---- reading ------------------------------------------------------------------------------------
def test_streamed_items_and_order_equal_the_folders(shards, tmp_path):
    """Random access (checks, sample grids), a shuffled epoch with 2 loader workers and a resume
    mid-epoch: the same items, pixels and order from the store (through litdata's cache) as from
    the folder."""
    url, folder, _ = shards
    make = lambda root: ShardDataModule(  # noqa: E731
        str(root), ImageTransform(8, random_flip=True, mode="L"), batch_size=16, num_workers=2, resolution=8, channels=1,
        shuffle_seed=5, cache_dir=str(tmp_path / "cache"),
    )
    remote, local = make(url), make(folder)
    assert remote.root == url and len(remote.dataset) == len(local.dataset) > 1000
    for i in (0, 1, 37, len(local.dataset) - 1):
        a, b = remote.dataset[i], local.dataset[i]
        assert a["index"] == b["index"] and a["label"] == b["label"] and torch.equal(a["pixel_values"], b["pixel_values"])

    def epoch(dm, n=6):
        out = []
        for batch in dm.train_dataloader():
            out.append((batch["index"], batch["pixel_values"]))
            if len(out) == n:
                return out

    unbroken = epoch(local)
    for (ia, xa), (ib, xb) in zip(epoch(remote), unbroken, strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    running = make(url).train_dataloader()
    ahead = iter(running)
    for _ in range(4):  # Lightning's prefetch: the loader runs a batch ahead of training
        next(ahead)
    resumed = make(url)  # a run resumed after 3 batches (the datamodule's saved position) replays the rest
    resumed.load_state_dict({"shuffle_seed": 5, "epoch": 0, "samples": 3 * 16, "loader": running.position(0, 3)})
    for (ia, xa), (ib, xb) in zip(epoch(resumed, n=3), unbroken[3:], strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    val = next(iter(remote.val_dataloader()))
    assert torch.equal(val["index"], next(iter(local.val_dataloader()))["index"])
    assert list((tmp_path / "cache").rglob("chunk-*.bin"))  # streamed into data.cache_dir


def test_bucketed_shards_from_the_store_equal_the_folders(s3, tmp_path):
    """data.buckets=true: one litdata folder per aspect bucket, read by index through the
    BucketSampler: the same batches of the same shapes from the store as from the folder."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (*[(10, 12), (14, 8), (8, 14)][i % 3], 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    data = ["data=image_folder", f"data.root={images}", "data.resolution=8", "data.buckets=true", "data.bucket_step=2", "data.val_fraction=0.1"]
    url, folder = f"s3://{BUCKET}/bucketed", tmp_path / "bucketed"
    for out in (url, folder):
        prepare(compose_cfg("prepare", [*data, f"out_dir={out}", "prepare.num_workers=1", "prepare.chunk_bytes=2KB"], tmp_path / "hydra"))
    assert len(read_manifest(url)["buckets"]) >= 2 and all(any(k.startswith(f"bucketed/train/{h}x{w}/chunk-") for k in keys("bucketed/")) for h, w in read_manifest(url)["buckets"])

    def batches(root) -> list:
        dm = ShardDataModule(str(root), ImageTransform(8, random_flip=True), batch_size=4, num_workers=0, resolution=8, shuffle_seed=3, cache_dir=str(tmp_path / "cache"))
        counts = dm.manifest["num_items"]
        assert (len(dm.dataset), len(dm.val_dataloader().dataset)) == (counts["train"], counts["val"]) and sum(counts.values()) == 24
        return [(b["index"], b["pixel_values"]) for b in dm.train_dataloader()]

    remote, local = batches(url), batches(folder)
    assert len(remote) == len(local) >= 4
    for (ia, xa), (ib, xb) in zip(remote, local, strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_training_streams_from_the_store_like_from_the_folder(shards, tmp_path):
    """data=shards data.root=s3://...: the shape comes from the stored shards.json, and 3 steps give
    the loss curve of the same run on the folder."""
    url, folder, _ = shards
    curves = []
    for name, root in (("s3", url), ("folder", folder)):
        over = ["data=shards", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "trainer.max_steps=3",
                "callbacks.noising_strip=null", "callbacks.export=null", "callbacks.sample_grid=null", "callbacks.ema=null"]
        cfg = compose_cfg("train", tiny(*over), tmp_path / name)
        assert (cfg.data.resolution, cfg.data.channels, cfg.data.mode) == (8, 1, "L")  # read from s3://.../shards.json
        _, objects = train(cfg)
        assert objects["trainer"].global_step == 3
        curves.append(losses(tmp_path / name))
    assert len(curves[0]) == 3 and curves[0] == curves[1]


# ---- errors before any work ---------------------------------------------------------------------
def test_without_credentials_training_stops_with_one_paragraph_naming_the_variables(shards, tmp_path, monkeypatch):
    url, _, _ = shards
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match=r"no S3 credentials were found\. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.*AWS_ENDPOINT_URL"):
        ShardDataModule(url)
    with pytest.raises(ConfigError, match=r"out_dir=s3://shards/new: no S3 credentials"):
        prepare(compose_cfg("prepare", [*PREP, f"out_dir=s3://{BUCKET}/new"], tmp_path / "hydra"))
    assert compose_cfg("train", ["data=shards", f"data.root={url}"], tmp_path / "c").data.resolution == 64  # composes; the data module says why


@pytest.mark.slow  # a CLI process: ~15 s of imports
def test_without_credentials_the_cli_prints_one_paragraph_not_a_traceback(shards, tmp_path, monkeypatch):
    url, _, _ = shards
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    proc = run_cli(tiny("data=shards", f"data.root={url}", f"hydra.run.dir={tmp_path / 'run'}"), tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error: data.root=s3://shards/digits: no S3 credentials were found" in proc.stderr
    assert "AWS_ACCESS_KEY_ID" in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_missing_bucket_prefix_or_manifest_and_other_stores_are_clear_errors(s3, tmp_path):
    import boto3

    with pytest.raises(ConfigError, match=r"data.root=s3://no-such-bucket/x: the bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        ShardDataModule("s3://no-such-bucket/x")
    with pytest.raises(ConfigError, match=r"out_dir=s3://no-such-bucket/x: the bucket 'no-such-bucket' does not exist"):
        check_out_dir("s3://no-such-bucket/x", overwrite=False)
    with pytest.raises(DataError, match=r"data.root=s3://shards/nothing-here does not exist .*prepare data=<source> out_dir=s3://shards/nothing-here"):
        ShardDataModule(f"s3://{BUCKET}/nothing-here")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="half/train/chunk-0-0.bin", Body=b"x")  # what a killed prepare leaves
    with pytest.raises(DataError, match=r"s3://shards/half is not a complete shard set: .*no shards.json.*prepare.overwrite=true"):
        ShardDataModule(f"s3://{BUCKET}/half")
    with pytest.raises(ConfigError, match=r"holds objects but no shards.json .*prepare.overwrite=true"):
        check_out_dir(f"s3://{BUCKET}/half", overwrite=False)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="broken/shards.json", Body=b"{ cut")
    with pytest.raises(DataError, match=r"s3://shards/broken/shards.json is not JSON"):
        ShardDataModule(f"s3://{BUCKET}/broken")
    with pytest.raises(ConfigError, match=r"gs:// is not supported; object-store roots are s3://.*Mount the bucket"):
        ShardDataModule("gs://bucket/shards")
    with pytest.raises(ConfigError, match=r"names no bucket"):
        ShardDataModule("s3:///shards")


def test_an_unreachable_endpoint_is_a_clear_error_in_seconds(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot reach the object store at http://127.0.0.1:\d+ .*AWS_ENDPOINT_URL"):
        ShardDataModule(f"s3://{BUCKET}/digits")
    assert time.monotonic() - start < 30


# ---- DDP ------------------------------------------------------------------------------------------
@pytest.mark.slow  # two gloo processes: ~1-2 min on a shared 2-core machine
def test_two_ddp_ranks_stream_disjoint_halves_from_the_store(shards, tmp_path):
    """trainer=ddp_cpu over s3://: each rank streams its own chunks; together one epoch's items once."""
    url, folder, _ = shards
    n = read_manifest(url)["num_items"]["train"]
    seen = tmp_path / "seen"
    steps = 4
    args = tiny(
        "trainer=ddp_cpu", "data=shards", f"data.root={url}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
        "data.batch_size=8", f"trainer.max_steps={steps}", "callbacks.sample_grid=null", "callbacks.noising_strip=null", "callbacks.export=null",
        f"+callbacks.seen={{_target_: tests.test_shards.SeenIndices, path: '{seen}'}}", f"hydra.run.dir={tmp_path / 'run'}",
    )
    proc = run_cli(args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((seen / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == steps * 4
    assert not set(ranks[0]) & set(ranks[1]) and set(ranks[0] + ranks[1]) <= set(range(n))
