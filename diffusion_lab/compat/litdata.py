"""litdata internals, checked against 0.2.76 (the version ``data=shards`` pins). litdata is optional:
nothing here imports it until called. When one breaks, ``tests/test_compat.py`` says which."""

from __future__ import annotations

from types import ModuleType

from diffusion_lab.utils.errors import ConfigError


def import_litdata() -> ModuleType:
    """litdata, or a ``ConfigError`` saying how to install it (it is optional: shards only)."""
    try:
        import litdata
    except ImportError as e:  # pragma: no cover - an install without it
        raise ConfigError(
            "data=shards and python -m diffusion_lab.prepare need litdata: pip install --no-deps 'litdata>=0.2.76,<0.3' "
            "boto3 obstore tifffile (--no-deps: its torchvision requirement would pull a CUDA torchvision that breaks a CPU torch)."
        ) from e
    return litdata


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
