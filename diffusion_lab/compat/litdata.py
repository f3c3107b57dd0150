"""litdata internals, checked against 0.2.76 (the version ``data=shards`` pins). litdata is optional:
nothing here imports it until called. When one breaks, ``tests/test_compat.py`` says which."""

from __future__ import annotations

from typing import Any


def allow_http_endpoints() -> None:
    """Let litdata's obstore clients reach plain-http endpoints (a MinIO on the local network, a test
    server): litdata builds every store from the module-level options dict
    ``litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS`` (0.2.76). Harmless for https. If it
    vanishes, look for an ``storage_options`` / client-options argument of ``StreamingDataset``."""
    from litdata.streaming import downloader

    downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True


def read_whole_chunks(dataset) -> None:
    """Make a ``StreamingDataset`` read items from whole downloaded chunks, not ranged reads of one item
    (its ``_on_demand_bytes`` flag, 0.2.76; the public ``on_demand_bytes`` property is switched back on
    by litdata after each epoch, so the caller also overrides that)."""
    dataset._on_demand_bytes = False


def loader_resume_state(state: dict[str, Any], epoch: int, batches: int, batch_size: int, num_workers: int, world_size: int) -> dict[str, Any]:
    """``StreamingDataLoader.state_dict()`` of a fresh loader -> the state that, loaded with
    ``load_state_dict``, continues litdata epoch ``epoch`` (counted from 1) after this rank's first
    ``batches`` batches: the keys ``current_epoch``, ``num_samples_yielded``, ``latest_worker_idx`` and
    the dataset's ``current_epoch``, ``num_samples_yielded``, ``sample_in_epoch`` (all ranks), 0.2.76.
    Returns a new dict; ``state`` is not changed."""
    samples = batches * batch_size
    out = {**state, "current_epoch": epoch, "num_samples_yielded": samples, "latest_worker_idx": (batches - 1) % max(num_workers, 1)}
    out["dataset"] = {**state["dataset"], "current_epoch": epoch, "num_samples_yielded": samples, "sample_in_epoch": samples * world_size}
    return out
