"""Draw what the forward (noising) process does to a few data images, as one PNG strip.

    python -m diffusion_lab.noising                                    # digits, linear betas
    python -m diffusion_lab.noising scheduler.beta_schedule=squaredcos_cap_v2 out=cosine.png

Rows are images, columns timesteps; each column is labelled with t and SNR(t).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.run import explain_unknown_keys, friendly_errors
from diffusion_lab.viz import noising_strip


def run(cfg: DictConfig) -> Path:
    scheduler = instantiate(cfg.scheduler)
    T = scheduler.config.num_train_timesteps
    bad = [t for t in cfg.timesteps if not 0 <= int(t) < T]
    if bad:
        raise ConfigError(f"timesteps {bad} are outside [0, {T - 1}] (scheduler.num_train_timesteps={T}); pick values in that range.")
    datamodule = instantiate(cfg.data.datamodule)
    x0 = datamodule.sample_batch(cfg.num_images)["pixel_values"]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    noising_strip(x0, scheduler, [int(t) for t in cfg.timesteps], seed=cfg.seed).save(out)
    print(f"wrote {out}")
    return out


@hydra.main(config_path="../conf", config_name="noising", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("noising"):
        main()
