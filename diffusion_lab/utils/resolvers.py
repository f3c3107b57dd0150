"""OmegaConf resolvers used by ``conf/`` (registered once on ``import diffusion_lab``)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def _wandb_mode() -> str:
    """``offline`` unless the user has a W&B key (or forces a mode with ``WANDB_MODE``)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _shard_info(root, key: str, default):
    """``key`` of the shard set at ``root`` (its ``shards.json``: resolution, channels; ``mode`` is
    L for 1 channel), so ``data=shards`` needs no repeated shape; ``default`` when ``root`` is not a
    shard set yet (the data module then says what is wrong with it). An ``s3://`` root's is read
    from the store (``diffusion_lab.data.shards.peek_manifest``)."""
    import json
    from pathlib import Path

    if "://" in str(root):
        from diffusion_lab.data.shards import peek_manifest

        manifest = peek_manifest(str(root))
        if manifest is None:
            return default
    else:
        path = Path(str(root)).expanduser() / "shards.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return default
    if key == "mode":
        return "L" if manifest.get("channels") == 1 else "RGB"
    return manifest.get(key, default)


def _run_naming(name: str):
    """Resolver that defers to ``diffusion_lab.utils.run_names`` (imported late: it pulls in Hydra's internals)."""

    def resolve(*args):
        from diffusion_lab.utils import run_names

        return getattr(run_names, name)(*args)

    return resolve


def register_resolvers() -> None:
    resolvers = {
        # integer division, e.g. latent size = ${div:${data.resolution},${vae.downsample_factor}}
        "div": lambda a, b: int(a) // int(b),
        "mul": lambda a, b: a * b,
        "wandb_mode": _wandb_mode,
        # data=shards: the shape stored in <data.root>/shards.json (data/shards.py)
        "shard_info": _shard_info,
        # W&B run name from the swept overrides / W&B group = the sweep (see utils/run_names.py)
        "run_name": _run_naming("run_name"),
        "sweep_group": _run_naming("sweep_group"),
        # the first argument that is not null: conf/hydra/default.yaml's run dir is paths.output_dir when it is set
        # (paths.output_dir=DIR), else a new dated folder, so train.log and .hydra/ land in the run dir too
        "coalesce": lambda *values: next((v for v in values if v is not None), None),
        # "_rank<k>" in a process torchrun / SLURM started as global rank k > 0, else "": their
        # Hydra log files in the shared run folder (conf/hydra/default.yaml)
        "rank_suffix": lambda: "" if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0" else f"_rank{os.environ.get('RANK', os.environ.get('SLURM_PROCID'))}",
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
