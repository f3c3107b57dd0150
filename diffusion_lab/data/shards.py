"""Sharded, streamed training data on litdata (Lightning's streaming engine): written once by
``python -m diffusion_lab.prepare``, read by ``data=shards`` without holding the data in memory.

A shard set is a folder::

    <root>/shards.json     the manifest: what was written, from which data config (and model)
    <root>/train/          litdata chunks + index.json (``litdata.optimize``)
    <root>/val/            the held-out split of the source config (absent when it had none)

Aspect-bucketed sources (``data=image_folder data.buckets=true``) are written one litdata folder
per bucket (``train/<h>x<w>/``) and read by index through ``BucketSampler``: batches never mix
shapes, as with the folder itself.

Each sample is a dict: ``index`` (its position in the source split) and either ``image`` (PNG
bytes of the source transform's output, lossless) or, for encoded shards, ``latent_moments``
``[2c, h, w]`` and the frozen text states (``encoder_hidden_states`` ``[L, D]``, SDXL also
``text_embeds`` ``[D']``); plus ``label`` / ``caption`` / other per-item values of the source.
Sharding across ranks and workers, shuffling (chunks, then items inside a window of chunks) and
resume replay are litdata's; this module decodes items and keeps the run's position in the data.
Bucketed shards are read by global index instead (``StreamingDataset[i]``), in the order of the
same ``BucketSampler`` that ``DiffusionDataModule`` uses for bucketed folders.

``<root>`` is a folder or an ``s3://bucket/prefix`` (AWS S3 or an S3-compatible store): prepare
writes each split there once it is complete, ``shards.json`` last; training streams the chunks
through litdata into a local cache. Credentials and endpoint come from the environment, as for
any boto3 program (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from diffusion_lab.compat.litdata import allow_http_endpoints, loader_resume_state, read_whole_chunks
from diffusion_lab.data.datamodule import DiffusionDataModule, bucket_ids_of
from diffusion_lab.data.sources import MASK_KEY
from diffusion_lab.data.transforms import ImageTransform, to_pil, to_uint8
from diffusion_lab.utils.errors import ConfigError, DataError
from diffusion_lab.utils.quiet import without_printed_noise

MANIFEST = "shards.json"
FORMAT_VERSION = 1
Kind = Literal["pixels", "latents"]


def _litdata():
    try:
        import litdata
    except ImportError as e:  # pragma: no cover - an install without it
        raise ConfigError(
            "data=shards and python -m diffusion_lab.prepare need litdata: pip install --no-deps 'litdata>=0.2.76,<0.3' "
            "boto3 obstore tifffile (--no-deps: its torchvision requirement would pull a CUDA torchvision that breaks a CPU torch)."
        ) from e
    return litdata


# ---- where a shard set lives: a folder or an s3:// prefix -----------------------------------------
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
ENV_HINT = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary keys) in the environment, or "
    "AWS_PROFILE for a profile in ~/.aws; for an S3-compatible store (MinIO, Ceph, Cloudflare R2, ...) also AWS_ENDPOINT_URL "
    "(or AWS_ENDPOINT_URL_S3) and AWS_DEFAULT_REGION. Credentials are read from the environment, never from the config."
)


def is_remote(root: str | Path) -> bool:
    """Whether ``root`` is an object-store URL (``s3://...``) rather than a folder."""
    return "://" in str(root)


class LocalRoot:
    """A shard set in a folder (local disk, or a shared filesystem every node mounts)."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root).expanduser()
        self.url = str(self.path)

    def join(self, *parts: str) -> str:
        return str(self.path.joinpath(*parts))

    def is_file(self, *parts: str) -> bool:
        return self.path.joinpath(*parts).is_file()

    def read_text(self, *parts: str) -> str:
        return self.path.joinpath(*parts).read_text()


class _Unreachable(ConfigError):
    """The object store did not answer (slow to find out: config resolution does not ask twice)."""


class S3Root:
    """A shard set under ``s3://bucket/prefix`` (AWS S3 or an S3-compatible store), reached with
    boto3's own credential chain and endpoint: the ``AWS_*`` environment variables of ``ENV_HINT``
    (or a profile), as litdata's readers reach it. ``key`` is the config key that named it: every
    failure to reach it is a ``ConfigError`` naming the key and the variables to set."""

    def __init__(self, url: str, key: str = "data.root") -> None:
        scheme, _, rest = str(url).partition("://")
        if scheme != "s3":
            raise ConfigError(
                f"{key}={url}: {scheme}:// is not supported; object-store roots are s3:// (AWS S3, or an S3-compatible store "
                f"through AWS_ENDPOINT_URL; this is what is tested). Mount the bucket (e.g. gcsfuse for gs://) and set {key} "
                f"to the mounted folder, or use the store's S3-compatible endpoint."
            )
        self.bucket, _, prefix = rest.partition("/")
        self.prefix, self.key = prefix.strip("/"), key
        if not self.bucket:
            raise ConfigError(f"{key}={url} names no bucket: write s3://<bucket>/<prefix>.")
        self.url = "/".join(["s3:/", self.bucket, *([self.prefix] if self.prefix else [])])
        import boto3
        import botocore.config

        session = boto3.Session()
        if session.get_credentials() is None:
            raise ConfigError(f"{key}={url}: no S3 credentials were found. {ENV_HINT}")
        # a few quick retries: a wrong endpoint must be an error in seconds, not litdata's 1000 attempts
        config = botocore.config.Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
        self.client = session.client("s3", config=config)
        self.endpoint: str = self.client.meta.endpoint_url

    def __getstate__(self) -> dict:  # a boto3 client does not pickle (spawned processes): made again
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["key"])

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def join(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self._key(*parts)}"

    @contextmanager
    def _errors(self):
        """boto3's failures -> one ``ConfigError`` paragraph (missing objects are the caller's)."""
        from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError

        try:
            yield
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise ConfigError(
                    f"{self.key}={self.url}: the bucket {self.bucket!r} does not exist at {self.endpoint}. Create it, or fix the "
                    f"bucket name (another store: set AWS_ENDPOINT_URL to its address)."
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "InvalidClientTokenId"):
                raise ConfigError(f"{self.key}={self.url}: {self.endpoint} refused these credentials ({code}). {ENV_HINT}") from None
            raise
        except (EndpointConnectionError, ConnectTimeoutError) as e:
            raise _Unreachable(
                f"{self.key}={self.url}: cannot reach the object store at {self.endpoint} ({e}). Check the network, or set "
                f"AWS_ENDPOINT_URL to the address of your S3-compatible store (e.g. http://host:9000)."
            ) from None
        except NoCredentialsError:
            raise ConfigError(f"{self.key}={self.url}: no S3 credentials were found. {ENV_HINT}") from None

    def read_bytes(self, *parts: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(*parts))["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def read_text(self, *parts: str) -> str:
        raw = self.read_bytes(*parts)
        if raw is None:
            raise FileNotFoundError(self.join(*parts))
        return raw.decode()

    def is_file(self, *parts: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(*parts))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    return False
                raise

    def _keys(self, max_keys: int | None = None):
        """The keys under the prefix (all of them, or the first ``max_keys``)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"MaxItems": max_keys} if max_keys else {}
            )
            for page in pages:
                yield from (obj["Key"] for obj in page.get("Contents", []))

    def has_objects(self) -> bool:
        return any(True for _ in self._keys(max_keys=1))

    def upload(self, local: Path, *parts: str) -> None:
        """``local`` (a file, or a folder with everything under it) to ``<prefix>/<parts>``."""
        files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
        with self._errors():
            for f in files:
                rel = [] if f == local else [f.relative_to(local).as_posix()]
                self.client.upload_file(str(f), self.bucket, self._key(*parts, *rel))

    def delete_all(self) -> None:
        """Every object under the prefix, ``shards.json`` first (the set stops looking complete)."""
        keys = sorted(self._keys(), key=lambda k: not k.endswith(f"/{MANIFEST}") and k != MANIFEST)
        with self._errors():
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})


ShardRoot = LocalRoot | S3Root


def shard_root(root: str | Path, key: str = "data.root") -> ShardRoot:
    """``S3Root`` for an object-store URL (``key`` names it in messages), else ``LocalRoot``."""
    return S3Root(str(root), key) if is_remote(root) else LocalRoot(root)


_PEEKED: dict[tuple, dict | None] = {}


def peek_manifest(root: str) -> dict | None:
    """The manifest of the object-store shard set at ``root`` for config resolution
    (``${shard_info:...}``, read at every access of ``data.resolution``): read once per process and
    ``AWS_*`` environment; None when it cannot be read (the data module then says why)."""
    key = (str(root), *(os.environ.get(v) for v in S3_ENV))
    if key not in _PEEKED:
        try:
            _PEEKED[key] = read_manifest(root)
        except _Unreachable:
            _PEEKED[key] = None  # finding out took seconds: do not ask again at every access
        except (ConfigError, DataError):
            return None
    return _PEEKED[key]


# ---- identity of the frozen parts, manifest -----------------------------------------------------
def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values): which frozen VAE or text
    encoder the stored latents / states came from."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_manifest(root: str | Path | ShardRoot) -> dict:
    """The manifest of the shard set at ``root`` (a folder or ``s3://bucket/prefix``); a
    ``DataError`` that says what ``root`` is instead when it is not a complete shard set."""
    if isinstance(root, S3Root) or (not isinstance(root, LocalRoot) and is_remote(root)):
        return _read_remote_manifest(root if isinstance(root, S3Root) else S3Root(str(root)))
    root = root.path if isinstance(root, LocalRoot) else Path(root).expanduser()
    path = root / MANIFEST
    if not root.is_dir():
        unfinished = sorted(root.parent.glob(f".{root.name}.tmp-*")) if root.parent.is_dir() else []
        hint = f" An unfinished prepare left {unfinished[0]} (prepare was interrupted: run it again)." if unfinished else ""
        raise DataError(f"data.root={str(root)!r} does not exist.{hint} Write a shard set there with python -m diffusion_lab.prepare data=<source> out_dir={root}.")
    if not path.is_file():
        images = any(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in root.iterdir())
        hint = " It holds images: train on them with data=image_folder, or write shards from them first." if images else ""
        raise DataError(
            f"data.root={str(root)!r} is not a shard set (no {MANIFEST}, which python -m diffusion_lab.prepare writes "
            f"last, once every shard is complete).{hint} Run: python -m diffusion_lab.prepare data=image_folder "
            f"data.root=<images> out_dir={root}."
        )
    return _checked_manifest(path.read_text(), str(path), LocalRoot(root))


def _read_remote_manifest(store: S3Root) -> dict:
    raw = store.read_bytes(MANIFEST)
    if raw is None:
        if not store.has_objects():
            raise DataError(
                f"{store.key}={store.url} does not exist (no object under that prefix of bucket {store.bucket!r} at "
                f"{store.endpoint}). Write a shard set there with python -m diffusion_lab.prepare data=<source> out_dir={store.url}."
            )
        raise DataError(
            f"{store.key}={store.url} is not a complete shard set: it holds objects but no {MANIFEST}, which python -m "
            f"diffusion_lab.prepare uploads last, once every shard is up (an interrupted prepare?). Write it again with "
            f"prepare.overwrite=true."
        )
    return _checked_manifest(raw.decode(errors="replace"), store.join(MANIFEST), store)


def _checked_manifest(text: str, path: str, store: ShardRoot) -> dict:
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path} is not JSON ({e}); the shard set is damaged: write it again with python -m diffusion_lab.prepare.") from e
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") not in ("pixels", "latents"):
        raise DataError(f"{path} is not a diffusion_lab shard manifest of format {FORMAT_VERSION}; write the shards again with this version's python -m diffusion_lab.prepare.")
    if not split_dirs(store, "train", manifest):
        raise DataError(f"{store.join('train')} has no litdata index.json: the shard set is incomplete; write it again with python -m diffusion_lab.prepare.")
    return manifest


def split_dirs(store: ShardRoot, split: str, manifest: dict) -> list[tuple[int, str]]:
    """``(bucket id, litdata folder relative to the root)`` of each part of a split: ``[(0, split)]``,
    or for bucketed shards one folder ``<split>/<h>x<w>`` per bucket of ``manifest["buckets"]`` that has items."""
    if not manifest.get("buckets"):
        return [(0, split)] if store.is_file(split, "index.json") else []
    parts = [(b, f"{split}/{h}x{w}") for b, (h, w) in enumerate(manifest["buckets"])]
    return [(b, d) for b, d in parts if store.is_file(d, "index.json")]


def model_identity(module: torch.nn.Module, text_states: bool) -> dict:
    """What encoded shards depend on: the VAE's fingerprint and, when text states are stored,
    the text conditioner's (``model_identity`` of the training module must match)."""
    return {
        "family": getattr(module, "family", type(module).__name__),
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "vae": fingerprint(module.codec),
        "text_encoder": fingerprint(module.conditioner) if text_states else None,
        "text_keys": list(module.text_keys) if text_states else [],
    }


def check_shards_fit_model(manifest: dict, module: torch.nn.Module, root: str) -> None:
    """``ConfigError`` when encoded shards were written for another model than ``module``."""
    from diffusion_lab.components.vae import IdentityCodec

    if manifest["kind"] != "latents":
        return
    stored = manifest["model"]
    codec = getattr(module, "codec", None)
    if codec is None or isinstance(codec, IdentityCodec):
        raise ConfigError(
            f"data.root={root} holds VAE latents (prepared with {_prepared_with(stored)}) but this model has no VAE "
            f"({type(module).__name__}); train with the model it was prepared with, or prepare pixel shards (prepare.encode=false)."
        )
    if fingerprint(codec) != stored["vae"]:
        raise ConfigError(
            f"data.root={root} was encoded with another VAE (shards.json: vae {stored['vae'][:12]}, config {stored.get('vae_config')}) "
            f"than this run's vae= ({fingerprint(codec)[:12]}); its latents would be wrong for this model. Use the model "
            f"config it was prepared with, or prepare again: python -m diffusion_lab.prepare prepare.encode=true model=... out_dir=<new>."
        )
    if stored["text_keys"]:
        conditioner = module.conditioner
        if not conditioner.frozen:
            raise ConfigError(
                f"data.root={root} stores frozen text-encoder states, but this run trains the text encoder "
                f"(text_encoder.trainable / adapter text LoRA), so they would be stale. Prepare with prepare.text_states=false "
                f"(captions only) or keep the text encoder frozen."
            )
        if fingerprint(conditioner) != stored["text_encoder"] or list(module.text_keys) != stored["text_keys"]:
            raise ConfigError(
                f"data.root={root} stores text states of another text encoder (shards.json: text encoder "
                f"{stored['text_encoder'][:12]}, states {stored['text_keys']}) than this run's text_encoder= "
                f"({fingerprint(conditioner)[:12]}, states {list(module.text_keys)}); they would be wrong for this model. "
                f"Train with the model it was prepared with ({_prepared_with(stored)}), or prepare again with this one: "
                f"python -m diffusion_lab.prepare prepare.encode=true model=... out_dir=<new> (prepare.text_states=false: captions only)."
            )


def _prepared_with(stored: dict) -> str:
    """The model overrides encoded shards were prepared with (``manifest["model"]``), for messages."""
    overrides = stored.get("train_overrides")
    if overrides:
        return " ".join(overrides)
    return f"model family {stored['family']}" + (f", model.pretrained={stored['pretrained']}" if stored.get("pretrained") else "")


# ---- items -----------------------------------------------------------------------------------
def encode_png(pixel_values: torch.Tensor) -> bytes:
    """``[C, H, W]`` in [-1, 1] -> PNG bytes (lossless: the transform's output is uint8-valued)."""
    buf = io.BytesIO()
    to_pil(pixel_values[None])[0].save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShardItems:
    """A stored sample -> a training item. Pixel samples: the PNG through ``transform`` (random
    crops/flips seeded by ``(seed, epoch, index)``, so they do not depend on workers or resume).
    The stored paired images and loss mask of the sample get the image's crop and flip.
    ``bucketed``: images keep their stored size (their bucket; only flips), drawn from Python's
    global RNG, which ``SeededItems`` seeds per ``(epoch, index)``. Encoded samples pass through,
    their float16 tensors (``prepare.store_dtype=float16``) read back as float32."""

    def __init__(self, transform: ImageTransform | None, seed: int, bucketed: bool = False) -> None:
        self.transform = transform
        self.seed = seed
        self.bucketed = bucketed

    def __call__(self, sample: dict, epoch: int) -> dict:
        item = dict(sample)
        png = item.pop("image", None)
        if png is None:
            return {k: v.float() if torch.is_tensor(v) and v.dtype == torch.float16 else v for k, v in item.items()}
        rng = None if self.bucketed else random.Random(int(np.random.SeedSequence([self.seed, epoch, int(item["index"])]).generate_state(1)[0]))
        with Image.open(io.BytesIO(png)) as im:
            geometry = self.transform.draw(im.size, rng, size=(im.height, im.width) if self.bucketed else None)
            item["pixel_values"] = self.transform.apply(im, geometry)
        if geometry.size == geometry.original_size and not geometry.flip:
            return item  # stored at the training size, not flipped: the paired values as stored
        for key, value in sample.items():  # stored aligned with the image (paired images, mask)
            if torch.is_tensor(value) and value.ndim == 3 and tuple(value.shape[1:]) == geometry.original_size:
                if key == MASK_KEY:
                    item[key] = self.transform.apply_mask(Image.fromarray(to_uint8(value * 2 - 1)[0].numpy(), "L"), geometry)
                else:
                    item[key] = self.transform.apply(to_pil(value[None])[0], geometry)
        return item


class SplitByIndex(Dataset):
    """The items ``0..n-1`` of a streaming split by their global index (``StreamingDataset[i]``)."""

    def __init__(self, streaming, n: int) -> None:
        self.streaming, self.n = streaming, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.streaming[int(i)]


class BucketedSplit(ConcatDataset):
    """A bucketed split by global index: its buckets' parts (``(bucket id, SplitByIndex)``) one
    after another. ``bucket_ids`` is what ``BucketSampler`` batches by: with the sampler's index
    lists, a few integers per item are all it keeps in memory."""

    def __init__(self, parts: list[tuple[int, SplitByIndex]]) -> None:
        super().__init__([split for _, split in parts])
        self.bucket_ids = [b for b, split in parts for _ in range(len(split))]


def _dataset_class():
    StreamingDataset = _litdata().StreamingDataset

    class ShardDataset(StreamingDataset):
        """litdata's ``StreamingDataset`` whose items go through ``items`` (with litdata's epoch).
        ``allow_http``: the chunks come from a plain-http object store (``compat.litdata.allow_http_endpoints``,
        set in each process that downloads). An item read by index from an object store comes from
        its whole chunk, downloaded to the cache: litdata's default there, a ranged read of the one
        item, assumes a row layout that its Arrow chunks (what ``ShardWriter``'s dicts are stored
        as) do not have, and reads empty bytes. Folders are read from their chunk files either way."""

        def __init__(self, input_dir: str, items: ShardItems, allow_http: bool = False, **kwargs) -> None:
            super().__init__(input_dir, **kwargs)
            self.items, self.allow_http = items, allow_http
            read_whole_chunks(self)  # the cache litdata creates on first use reads whole chunks

        @property
        def on_demand_bytes(self) -> bool:
            return False

        @on_demand_bytes.setter
        def on_demand_bytes(self, value: bool) -> None:  # litdata switches it back on after each epoch
            StreamingDataset.on_demand_bytes.fset(self, False)

        def __iter__(self):
            if self.allow_http:
                allow_http_endpoints()
            return super().__iter__()

        def __getitem__(self, index):
            if self.allow_http:
                allow_http_endpoints()
            if not self.items.bucketed:
                return self.items(super().__getitem__(index), int(self.current_epoch))
            # bucketed flips come from Python's global RNG, seeded per item (SeededItems); litdata's
            # S3 client draws from it when it is created (its refresh jitter), in the middle of that
            state = random.getstate()
            sample = super().__getitem__(index)
            random.setstate(state)
            return self.items(sample, int(self.current_epoch))

    return ShardDataset


def _loader_class():
    StreamingDataLoader = _litdata().StreamingDataLoader

    class ShardLoader(StreamingDataLoader):
        """litdata's ``StreamingDataLoader``; Lightning's own loader-state saving is switched off
        (``state_dict`` is empty): the loader runs ahead of training by Lightning's prefetched
        batch, so the position is kept by the datamodule and replayed with ``resume``."""

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

        def __iter__(self):
            # litdata keeps replaying a restored position until one epoch runs to its end, but Lightning
            # ends an epoch after len(loader) batches without exhausting the iterator: once the resumed
            # epoch has started, the next one must start afresh (a new shuffle, every chunk).
            if getattr(self, "_resumed_epoch_started", False):
                self.restore = self._resumed_epoch_started = False
            if self.restore:
                self._resumed_epoch_started = True
            yield from super().__iter__()

        def resume(self, epoch: int, batches: int, world_size: int) -> None:
            """Continue Lightning epoch ``epoch`` after this rank's first ``batches`` batches (litdata
            replays its shuffle and skips them in each worker)."""
            if batches <= 0:
                self.current_epoch = epoch  # __iter__ adds one: litdata counts epochs from 1
                return
            super().load_state_dict(loader_resume_state(super().state_dict(), epoch + 1, batches, self.batch_size, self.num_workers, world_size))

    return ShardLoader


# ---- the data module -------------------------------------------------------------------------
class ShardDataModule(pl.LightningDataModule):
    """Streams a shard set written by ``python -m diffusion_lab.prepare``: the interface of
    ``DiffusionDataModule`` (global ``batch_size``, ``per_device_batch_size``, ``dataset``,
    ``sample_batch``, a val loader, exact mid-epoch resume through ``state_dict``). Bucketed
    shards are read by index by an inner ``DiffusionDataModule`` (its ``BucketSampler``).

    Args:
        root: the shard set (``out_dir`` of prepare): a folder or ``s3://bucket/prefix``.
        transform: for pixel shards, applied to each stored image (``data.resolution`` / crop /
            flip); ignored for encoded shards, whose resolution must equal the prepared one.
        batch_size: the global batch (split over ``world_size`` processes, it must divide).
        num_workers: loader processes; litdata assigns chunks to (rank, worker), so an exact
            resume needs the same ``num_workers`` and number of processes.
        shuffle_seed: seed of litdata's shuffle and the augmentations; None = the run's seed.
        resolution, channels: ``data.resolution`` / ``data.channels``, checked against the shards.
        cache_dir, max_cache_size: for an ``s3://`` root, the local folder litdata caches the
            streamed chunks in and its cap (e.g. ``"50GB"``); None: litdata's, ``$LITDATA_CACHE_DIR``
            or ``~/.lightning/chunks``, up to 75% of the free disk. Ignored for folders.
    """

    def __init__(
        self,
        root: str,
        transform: ImageTransform | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        resolution: int | None = None,
        channels: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle_seed: int | None = None,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
    ) -> None:
        super().__init__()
        self.store = shard_root(root)
        self.manifest = read_manifest(self.store)
        self.root = self.store.url
        # object stores: where litdata caches the streamed chunks, and how much (None: litdata's defaults)
        self._remote = {"cache_dir": cache_dir, "max_cache_size": max_cache_size} if isinstance(self.store, S3Root) else None
        self.kind: Kind = self.manifest["kind"]
        self._check_shape(resolution, channels)
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.shuffle_seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if shuffle_seed is None else shuffle_seed
        self._resume: dict = {}
        self._train_loader = None
        self._checked: torch.nn.Module | None = None
        self._bucketed: DiffusionDataModule | None = None
        if self.manifest.get("buckets"):
            self.dataset = self._indexed("train")
            self._bucketed = DiffusionDataModule(self.dataset, batch_size, num_workers, 0.0, pin_memory, persistent_workers, shuffle_seed=self.shuffle_seed)
            self._bucketed.train_set, self._bucketed.val_set = self.dataset, self._indexed("val")  # split at prepare time
        else:
            # random access (checks before fit, sample grids, noising strip): the training split in stored order
            self.dataset = self._streaming("train", shuffle=False)

    per_device_batch_size = DiffusionDataModule.per_device_batch_size

    def _check_shape(self, resolution: int | None, channels: int | None) -> None:
        stored = self.manifest
        what = "VAE latents of " if self.kind == "latents" else ""
        if channels is not None and channels != stored["channels"]:
            raise ConfigError(
                f"data.channels={channels} but the shards at {self.root} hold {what}{stored['channels']}-channel images; "
                f"set data.channels={stored['channels']}."
            )
        if resolution is None or resolution == stored["resolution"]:
            return
        if stored.get("buckets"):
            raise ConfigError(
                f"data.resolution={resolution} but the shards at {self.root} hold aspect buckets of ~{stored['resolution']}^2 px "
                f"({len(stored['buckets'])} sizes); set data.resolution={stored['resolution']}, or prepare again at data.resolution={resolution}."
            )
        if self.kind == "latents" or resolution > stored["resolution"]:
            fix = "" if self.kind == "latents" else " (or smaller: stored images are cropped to it)"
            raise ConfigError(
                f"data.resolution={resolution} but the shards at {self.root} hold {what}{stored['resolution']} px images; "
                f"set data.resolution={stored['resolution']}{fix}, or prepare again at data.resolution={resolution}."
            )

    def _streaming(self, split: str, shuffle: bool, bucketed: bool = False):
        items = ShardItems(self.transform, self.shuffle_seed, bucketed)
        remote = {}
        if self._remote is not None:
            remote = {k: v for k, v in self._remote.items() if v is not None} | {"allow_http": self.store.endpoint.startswith("http://")}
        return _dataset_class()(self.store.join(split), items, shuffle=shuffle, seed=self.shuffle_seed, **remote)

    def _indexed(self, split: str) -> BucketedSplit | None:
        """A bucketed split read by index (None when the source had no such split)."""
        parts = split_dirs(self.store, split, self.manifest)
        if not parts:
            return None
        return BucketedSplit([(b, SplitByIndex(self._streaming(d, shuffle=False, bucketed=True), _count(self.store, d))) for b, d in parts])

    def check_model(self, module: torch.nn.Module) -> None:
        """``ConfigError`` unless encoded shards were written by this module's VAE and text
        encoder (called by ``train.py`` before fit, and in ``setup``)."""
        if self._checked is not module:
            check_shards_fit_model(self.manifest, module, self.root)
            self._checked = module

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is None or getattr(trainer, "lightning_module", None) is None:
            return
        self.check_model(trainer.lightning_module)
        from diffusion_lab.callbacks.caching import LatentCacheCallback

        if any(isinstance(cb, LatentCacheCallback) and cb.enabled for cb in trainer.callbacks):
            raise ConfigError(
                "model.cache=true with data=shards: the in-RAM cache would read every shard into memory. Store the latents "
                "in the shards instead (python -m diffusion_lab.prepare prepare.encode=true model=...) and set model.cache=false."
            )

    def _loader(self, split: str, shuffle: bool):
        # built here, after the process group is up: litdata reads the rank and world size when it is
        # created. Training drops each stream's last partial batch, as DiffusionDataModule does.
        return _loader_class()(
            self._streaming(split, shuffle),
            batch_size=self.per_device_batch_size,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            # its own generator: creating an iterator must not draw from the global RNG the training
            # step uses, or a resumed run (which creates one mid-epoch) would draw different noise
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    def _inner(self) -> DiffusionDataModule:
        """The bucketed data's ``DiffusionDataModule``, told this module's trainer, seed and resume point."""
        inner = self._bucketed
        inner.trainer, inner.shuffle_seed = self.trainer, self.shuffle_seed
        inner._resume, self._resume = self._resume or inner._resume, {}
        return inner

    def train_dataloader(self):
        if self._bucketed is not None:
            return self._inner().train_dataloader()
        # litdata gives each (rank, worker) its own chunks, so the length Lightning warns about is right
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        loader = self._loader("train", shuffle=True)
        if self._resume:
            world = self.trainer.world_size if self.trainer is not None else 1
            loader.resume(self._resume.get("epoch", 0), self._resume.get("samples", 0) // self.batch_size, world)
        self._resume = {}
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        if self._bucketed is not None:
            return self._inner().val_dataloader()
        if not self.store.is_file("val", "index.json"):
            return []
        # read by global index like a map-style data set, so Lightning's DistributedSampler splits
        # it over ranks: litdata splits by chunk, and a small val split has fewer chunks than ranks
        # DiffusionDataModule's loader: its own generator, so a validation pass draws nothing from the
        # global RNG (a checkpoint is written before its step's validation; a resumed run must match)
        return DiffusionDataModule._loader(self, SplitByIndex(self._streaming("val", shuffle=False), _count(self.store, "val")), sampler=None, drop_last=False)

    def state_dict(self) -> dict:
        """The shuffle seed, the epoch and how many samples of it (all ranks together) were trained
        on, counted from Lightning's batch progress (as ``DiffusionDataModule.state_dict``)."""
        return DiffusionDataModule.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        self.shuffle_seed = state_dict.get("shuffle_seed", self.shuffle_seed)
        self._resume = dict(state_dict)

    def sample_batch(self, n: int) -> dict:
        """The first ``n`` stored training items as one batch (noising strips, grid conditioning);
        bucketed: of the first bucket."""
        if self._bucketed is not None:
            return self._inner().sample_batch(n)
        items = [self.dataset[i] for i in range(min(n, len(self.dataset)))]
        return torch.utils.data.default_collate(items)


# ---- writing ---------------------------------------------------------------------------------
def item_name(dataset: Dataset, i: int) -> str:
    """The file behind item ``i`` (through splits and concatenations), for error messages."""
    while True:
        if isinstance(dataset, Subset):
            dataset, i = dataset.dataset, int(dataset.indices[i])
        elif isinstance(dataset, ConcatDataset):
            k = int(np.searchsorted(dataset.cumulative_sizes, i, side="right"))
            dataset, i = dataset.datasets[k], i - (dataset.cumulative_sizes[k - 1] if k else 0)
        else:
            break
    files = getattr(dataset, "files", None)
    return str(files[i]) if files is not None else f"item {i} of {type(dataset).__name__}"


def _plain(value: Any) -> Any:
    """A per-item value as litdata stores it (tensors, ints, floats, strings)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


class ShardWriter:
    """The function ``litdata.optimize`` runs in each worker process over batches of indices of
    ``dataset``: yields one sample per readable item. Unreadable items are skipped (listed in
    ``log_dir``) or, with ``on_bad_image=fail``, recorded there so that ``write_shards`` raises
    (an exception inside a litdata worker would hang the job)."""

    def __init__(
        self, dataset: Dataset, log_dir: str, on_bad_image: Literal["fail", "skip"], module: torch.nn.Module | None = None,
        text_states: bool = True, device: str = "cpu", store_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dataset, self.log_dir, self.on_bad_image = dataset, Path(log_dir), on_bad_image
        self.module, self.text_states, self.device, self.store_dtype = module, text_states, device, store_dtype

    def _log(self, kind: str, line: str) -> None:
        with open(self.log_dir / f"{kind}-{os.getpid()}.txt", "a") as f:
            f.write(line.replace("\n", " ") + "\n")

    def _failed(self) -> bool:
        return any(self.log_dir.glob("failed-*.txt"))

    @torch.no_grad()
    def __call__(self, indices: list[int]):
        if self._failed():
            return  # another worker found a bad image: stop early, the job fails
        items = []
        for i in indices:
            try:
                items.append((i, self.dataset[i]))
            except Exception as e:  # PIL raises many types for truncated/garbage files
                self._log("skipped" if self.on_bad_image == "skip" else "failed", f"{item_name(self.dataset, i)}\t{type(e).__name__}: {e}")
                if self.on_bad_image != "skip":
                    return
        if not items:
            return
        encoded = self._encode([item for _, item in items]) if self.module is not None else None
        for k, (i, item) in enumerate(items):
            sample: dict = {"index": int(i)}
            for key, value in item.items():
                if key == "pixel_values":
                    if encoded is None:
                        sample["image"] = encode_png(value)
                else:
                    sample[key] = _plain(value)
            if encoded is not None:
                sample.update({key: v[k] for key, v in encoded.items()})
            yield sample

    def _encode(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """The VAE posterior of each image (and the frozen text states of each caption): what the
        module computes from a batch, so training reads ``latent_moments`` and the text states
        (stored as ``store_dtype``)."""
        module = self.module.to(self.device)
        pixels = torch.stack([item["pixel_values"] for item in items]).to(self.device)
        out = {"latent_moments": module.codec.moments(pixels)}
        if self.text_states and "caption" in items[0]:
            out.update(module.text_states([item["caption"] for item in items]))
        return {k: v.to("cpu", self.store_dtype) for k, v in out.items()}


def _parts(dataset: Dataset, bucket_sizes: list[tuple[int, int]] | None) -> list[tuple[tuple[int, int] | None, list[int]]]:
    """``(bucket size, indices)`` groups of ``dataset`` to write: one group of every index, or one
    per aspect bucket when its items have ``bucket_ids``."""
    ids = bucket_ids_of(dataset)
    if ids is None:
        return [(None, list(range(len(dataset))))]
    if bucket_sizes is None:
        raise ValueError("bucketed items need bucket_sizes")
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(ids):
        groups.setdefault(int(b), []).append(i)
    return [(tuple(bucket_sizes[b]), idx) for b, idx in sorted(groups.items())]


def _count(store: ShardRoot, split_dir: str) -> int:
    index = json.loads(store.read_text(split_dir, "index.json"))
    return sum(chunk["chunk_size"] for chunk in index["chunks"])


def write_shards(
    splits: dict[str, Dataset | None],
    out_dir: str | Path,
    source: dict,
    resolution: int,
    channels: int,
    module: torch.nn.Module | None = None,
    model_config: dict | None = None,
    text_states: bool = True,
    num_workers: int = 2,
    batch_size: int = 16,
    chunk_bytes: str | None = "64MB",
    chunk_size: int | None = None,
    on_bad_image: Literal["fail", "skip"] = "fail",
    device: str = "cpu",
    overwrite: bool = False,
    bucket_sizes: list[tuple[int, int]] | None = None,
    store_dtype: Literal["float32", "float16"] = "float32",
    staging_dir: str | None = None,
) -> dict:
    """Write ``splits`` (``{"train": ds, "val": ds | None}``, datasets of the usual item dicts) as
    a shard set at ``out_dir``, built in a temp folder beside it and renamed into place once
    complete with its manifest (a killed job leaves no shard set that looks whole). An
    ``s3://bucket/prefix`` ``out_dir`` is staged in ``staging_dir`` one split (or bucket) at a time,
    each uploaded once complete, the manifest last. With
    ``module`` (a latent model), stores VAE posteriors and, with ``text_states``, frozen text
    states instead of pixels. Items with aspect buckets (``bucket_ids``; ``bucket_sizes`` their
    ``(h, w)``) are written one folder per bucket, ``<split>/<h>x<w>/``. ``store_dtype=float16``
    halves the disk of encoded latents and text states. Returns the manifest."""
    from diffusion_lab.components.vae import IdentityCodec
    from diffusion_lab.utils.io import atomic_dir

    optimize = _litdata().optimize
    target = check_out_dir(out_dir, overwrite)
    remote = isinstance(target, S3Root)
    out_dir = target.url if remote else target.path
    kind: Kind = "pixels"
    if module is not None:
        if isinstance(getattr(module, "codec", None), IdentityCodec) or not hasattr(module, "codec"):
            raise ConfigError("prepare.encode=true stores VAE latents: it needs a latent model (model=latent_sd / latent_sdxl with a vae=), not a pixel model; or set prepare.encode=false.")
        kind = "latents"
        text_states = text_states and hasattr(module, "text_states") and module.conditioner.frozen
        module.eval()
    if store_dtype not in ("float32", "float16"):  # litdata cannot store bfloat16
        raise ConfigError(f"prepare.store_dtype={store_dtype!r}: use float32 or float16 (half the disk for encoded latents and text states).")
    manifest: dict = {"format_version": FORMAT_VERSION, "kind": kind, "resolution": resolution, "channels": channels, "source": source, "num_items": {}, "skipped": []}
    if module is not None:
        manifest["model"] = model_identity(module, text_states) | (model_config or {})
        manifest["store_dtype"] = store_dtype
    parts = {split: _parts(ds, bucket_sizes) for split, ds in splits.items() if ds is not None and len(ds)}
    used = sorted({size for groups in parts.values() for size, _ in groups if size})
    if used:
        manifest["buckets"] = [list(size) for size in used]
    with (_uploaded(target, staging_dir) if remote else atomic_dir(out_dir)) as tmp:
        log_dir = Path(tmp) / "log"
        log_dir.mkdir()
        for split, groups in parts.items():
            writer = ShardWriter(splits[split], str(log_dir), on_bad_image, module, text_states, device, getattr(torch, store_dtype))
            manifest["num_items"][split] = 0
            for size, inputs in groups:
                dest = Path(tmp) / split / (f"{size[0]}x{size[1]}" if size else "")
                workers = max(1, min(num_workers, -(-len(inputs) // batch_size)))
                print(f"writing {len(inputs)} {split} items to {out_dir}/{dest.relative_to(tmp)} ({kind}, {workers} worker processes)", flush=True)
                with without_printed_noise():  # litdata's account banner (utils/quiet.py)
                    optimize(
                        writer, inputs, str(dest), batch_size=batch_size, num_workers=workers,
                        **({"chunk_size": chunk_size} if chunk_size else {"chunk_bytes": chunk_bytes}),
                        keep_data_ordered=True, reorder_files=False, start_method="fork", verbose=True,
                    )
                failed = sorted(log_dir.glob("failed-*.txt"))
                if failed:
                    name, why = failed[0].read_text().splitlines()[0].split("\t", 1)
                    raise DataError(
                        f"cannot read image {name}: {why}. The file is truncated or not an image. Delete or replace it, or set "
                        f"prepare.on_bad_image=skip (data.on_bad_image=skip) to skip unreadable files; nothing was written to {out_dir}."
                    )
                if (dest / "index.json").is_file():  # every item of a group can have been skipped
                    rel = dest.relative_to(tmp).as_posix()
                    manifest["num_items"][split] += _count(LocalRoot(tmp), rel)
                    if remote:  # staged one part at a time: the local disk holds one split (or bucket)
                        print(f"uploading {out_dir}/{rel}", flush=True)
                        target.upload(dest, rel)
                        shutil.rmtree(dest)
        skipped = [line.split("\t")[0] for f in sorted(log_dir.glob("skipped-*.txt")) for line in f.read_text().splitlines()]
        manifest["skipped"] = [str(p) for p in source.pop("_skipped", [])] + skipped
        if manifest["skipped"]:
            warnings.warn(f"skipped {len(manifest['skipped'])} unreadable image(s) (first: {manifest['skipped'][0]}); listed in {out_dir}/{MANIFEST}", stacklevel=2)
        shutil.rmtree(log_dir)
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))  # last: marks the set complete
        if remote:
            target.upload(Path(tmp) / MANIFEST, MANIFEST)
            for key in [k for k in _PEEKED if k[0] == str(out_dir)]:
                del _PEEKED[key]
    return manifest


def check_out_dir(out_dir: str | Path, overwrite: bool) -> ShardRoot:
    """Where prepare writes (``out_dir``: a folder or ``s3://bucket/prefix``); a ``ConfigError``
    before any work when it is taken and ``overwrite`` is off, or the store cannot be reached."""
    target = shard_root(out_dir, key="out_dir")
    if isinstance(target, LocalRoot):
        if target.path.exists() and not overwrite:
            raise ConfigError(f"out_dir={target.path} exists; pick another folder or set prepare.overwrite=true to replace it (the old one stays until the new one is complete).")
        return target
    if target.is_file(MANIFEST) and not overwrite:
        raise ConfigError(f"out_dir={target.url} holds a shard set; pick another prefix or set prepare.overwrite=true to replace it (on an object store the old set is deleted first).")
    if not overwrite and target.has_objects():
        raise ConfigError(
            f"out_dir={target.url} holds objects but no {MANIFEST} (an interrupted prepare, or other data); pick another prefix, "
            f"or set prepare.overwrite=true to delete everything under it and write the shard set."
        )
    return target


@contextmanager
def _uploaded(target: S3Root, staging_dir: str | None):
    """A local staging folder (in ``staging_dir``, default the system's temp folder) for writing
    to ``target``; the caller uploads each finished part. The old objects under the prefix go
    first; a failed prepare deletes what it uploaded (a killed one leaves objects without
    ``shards.json``, which ``read_manifest`` refuses)."""
    if staging_dir:
        Path(staging_dir).expanduser().mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="diffusion_lab-prepare-", dir=Path(staging_dir).expanduser() if staging_dir else None)
    try:
        target.delete_all()
        yield tmp
    except BaseException:
        try:
            target.delete_all()
        except Exception as cleanup:  # the first error is the one to report
            warnings.warn(f"could not delete the partial upload under {target.url}: {cleanup}", stacklevel=3)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "MANIFEST", "LocalRoot", "S3Root", "ShardDataModule", "ShardItems", "ShardWriter", "check_out_dir", "check_shards_fit_model",
    "fingerprint", "peek_manifest", "read_manifest", "shard_root", "write_shards",
]
