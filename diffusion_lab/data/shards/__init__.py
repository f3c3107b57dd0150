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
resume replay are litdata's; this package decodes items and saves litdata's loader state in checkpoints.
Bucketed shards are read by global index instead (``StreamingDataset[i]``), in the order of the
same ``BucketSampler`` that ``DiffusionDataModule`` uses for bucketed folders.

``<root>`` is a folder or an ``s3://bucket/prefix`` (AWS S3 or an S3-compatible store): prepare
writes each split there once it is complete, ``shards.json`` last; training streams the chunks
through litdata into a local cache. Credentials and endpoint come from the environment, as for
any boto3 program (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...).

``store`` (a folder or an s3:// prefix), ``manifest`` (``shards.json``, the model checks),
``writing`` (``write_shards``), ``reading`` (stored sample -> item, litdata's dataset and loader),
``datamodule`` (``ShardDataModule``, ``data=shards``).
"""

from diffusion_lab.data.shards.datamodule import ShardDataModule
from diffusion_lab.data.shards.manifest import MANIFEST, check_shards_fit_model, fingerprint, peek_manifest, read_manifest
from diffusion_lab.data.shards.reading import ShardItems
from diffusion_lab.data.shards.store import LocalRoot, S3Root, shard_root
from diffusion_lab.data.shards.writing import ShardWriter, check_out_dir, write_shards

__all__ = [
    "MANIFEST", "LocalRoot", "S3Root", "ShardDataModule", "ShardItems", "ShardWriter", "check_out_dir", "check_shards_fit_model",
    "fingerprint", "peek_manifest", "read_manifest", "shard_root", "write_shards",
]
