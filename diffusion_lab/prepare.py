"""Write a data config as litdata shards, once, for streaming (``data=shards``).

    python -m diffusion_lab.prepare data=image_folder data.root=/images data.resolution=64 out_dir=/data/shards
    python -m diffusion_lab.prepare data=digits_captioned out_dir=outputs/shards/digits
    python -m diffusion_lab.prepare data=digits_captioned prepare.encode=true model=latent_sd \\
        model.pretrained=outputs/tiny_sd out_dir=outputs/shards/digits_sd       # VAE latents + text states
    python -m diffusion_lab.prepare data=image_folder data.root=/images data.buckets=true out_dir=...  # one folder per aspect bucket
    python -m diffusion_lab.prepare data=digits out_dir=s3://bucket/shards/digits   # credentials: AWS_* environment variables

Builds the source data config's datamodule (its transform and train/val split) and, with
``prepare.encode=true``, the model; ``diffusion_lab.data.shards.prepare`` does the work.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401  (registers config resolvers)
from diffusion_lab.data.shards.prepare import prepare, train_command
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH


@hydra.main(config_path=CONFIG_PATH, config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        manifest = prepare(cfg)
    counts = ", ".join(f"{n} {split}" for split, n in manifest["num_items"].items())
    print(f"\nshards: {cfg.out_dir} ({manifest['kind']}: {counts}; {len(manifest['skipped'])} skipped)")
    print(f"train:  {train_command(cfg.out_dir, manifest)}")


if __name__ == "__main__":
    with explain_unknown_keys("prepare"):
        main()
