"""Build a tiny random Stable Diffusion pipeline offline and ``save_pretrained`` it.

    python -m diffusion_lab.tiny_sd outputs/tiny_sd                     # SD 1.x layout (~1 MB)
    python -m diffusion_lab.tiny_sd outputs/tiny_sd_v --prediction-type v_prediction
    python -m diffusion_lab.tiny_sd outputs/tiny_sdxl --kind sdxl       # SDXL base
    python -m diffusion_lab.tiny_sd outputs/tiny_sdxl_refiner --kind sdxl-refiner
    python -m diffusion_lab.tiny_sd outputs/tiny_sd_split --sd15-split  # VAE/UNet cost split of SD 1.5
    python -m diffusion_lab.tiny_sd outputs/tiny_sd3 --kind sd3        # SD3.5 layout (MMDiT, 2 CLIP + T5)
    python -m diffusion_lab.tiny_sd outputs/tiny_flux --kind flux      # FLUX.1-dev layout (guidance embedding)
    python -m diffusion_lab.tiny_sd outputs/tiny_qwen_image --kind qwen_image   # any family with a builder in diffusion_lab/testing/

The command line only: the parts and the pipelines are built by ``diffusion_lab.testing.tiny``,
whose factories are also the ``_target_`` of ``vae=tiny``, ``text_encoder=tiny`` and
``backbone=sd_tiny``, so the saved folder and the config groups are the same models.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from diffusion_lab.testing.tiny import SD15_SPLIT_VAE, build, kinds


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write (replaced atomically)")
    p.add_argument("--kind", default="sd", choices=kinds(), help="a family (diffusion_lab/testing/<kind>.py builds the new ones)")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sd15-split", action="store_true", help="a VAE as costly relative to the UNet as SD 1.5's (for benchmarks of latent caching)")
    a = p.parse_args(argv)
    if a.sd15_split and a.kind != "sd":
        p.error("--sd15-split is for --kind sd")
    out = build(a.out, a.kind, a.prediction_type, a.resolution, a.seed, SD15_SPLIT_VAE if a.sd15_split else None)
    print(f"wrote tiny {a.kind} pipeline to {out}")


if __name__ == "__main__":
    main()
