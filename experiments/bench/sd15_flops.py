"""FLOPs of one SD-1.5 fine-tuning step per image, by part, counted on meta tensors (no weights,
no GPU): what caching removes, and the MFU numerator of the GPU benchmark.

    python experiments/bench/sd15_flops.py                                # -> outputs/experiments/bench/<date>_<time>/sd15_flops.json
    python experiments/bench/sd15_flops.py --out experiments/bench/results   # refresh the committed results

UNet: ``conf/backbone/sd15.yaml`` at 64x64 latents, forward + backward. VAE encoder: SD's
AutoencoderKL (128-256-512-512, 8x down-sampling) at 512 px, forward. Text encoder: CLIP ViT-L/14's
text model (12 layers, width 768) on 77 tokens, forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion_lab.metrics import profiling
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p, "bench", "experiments/bench/results")
    args = p.parse_args(argv)
    unet_cfg = OmegaConf.to_container(OmegaConf.load(HERE.parents[1] / "conf" / "model" / "unet" / "sd15.yaml"))
    unet_cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_")} | {"sample_size": 64}
    with torch.device("meta"):
        unet, vae, text = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**SD_VAE), CLIPTextModel(CLIPTextConfig(**CLIP_L))
        latents, t, states = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)
        out = {
            "unet_train_step": profiling.train_step_flops(lambda: unet(latents, t, encoder_hidden_states=states).sample.float().square().mean()),
            "vae_encode_512px": profiling.forward_flops(lambda: vae.encode(torch.randn(1, 3, 512, 512))),
            "text_encoder_77_tokens": profiling.forward_flops(lambda: text(torch.zeros(1, 77, dtype=torch.long))),
        }
    out["caching_speedup_bound_by_flops"] = (out["unet_train_step"] + out["vae_encode_512px"] + out["text_encoder_77_tokens"]) / out["unet_train_step"]
    out["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    folder = run_dir(args.out, "bench")
    (folder / "sd15_flops.json").write_text(json.dumps(out, indent=1))
    for k, v in out.items():
        print(f"{k}: {v / 1e12:.3f} TFLOP" if k.endswith(("step", "px", "tokens")) else f"{k}: {v:,.3f}")
    print(f"wrote sd15_flops.json to {folder}")
    return out


if __name__ == "__main__":
    main()
