"""Read an offline W&B run (``<run dir>/wandb/offline-run-*/run-*.wandb``) without the network.

wandb >= 0.19 no longer ships a Python reader for its transaction log, so this is the small
LevelDB-log reader the format needs: a 7-byte file header (``:W&B``, magic 0xBEE1, version 0),
then 32 KiB blocks of records, each ``crc32 | length (uint16) | type (FULL/FIRST/MIDDLE/LAST)``,
whose payloads are ``wandb_internal_pb2.Record`` protobufs. Used by tests and experiment scripts
to check names, groups, config and logged history of runs that were never synced.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What a run logged: identity, the config it sent, its history rows and how it ended."""

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    exit_code: int | None = None  # None: the run was never finished

    def metric(self, key: str) -> list[tuple[int, float]]:
        """``(trainer/global_step, value)`` for every history row holding ``key``."""
        return [(int(r.get("trainer/global_step", r.get("_step", 0))), r[key]) for r in self.history if key in r]


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log (missing ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:  # zero-filled tail of a file still being written
            return


def _items(items) -> dict:
    """Config/history/summary items: ``key`` or ``nested_key`` -> decoded ``value_json``."""
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse ``run_dir`` (an ``offline-run-*`` folder) into an ``OfflineRun``."""
    run_dir = Path(run_dir)
    log_file = next(run_dir.glob("run-*.wandb"), None)
    if log_file is None:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    run = OfflineRun(path=run_dir)
    for payload in _payloads(log_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group, run.project = r.run_id, r.display_name, r.run_group, r.project
            run.tags = list(r.tags)
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline run under ``root`` (e.g. a multirun folder), in path order."""
    return [read_offline_run(p) for p in sorted(Path(root).rglob("offline-run-*")) if p.is_dir()]
