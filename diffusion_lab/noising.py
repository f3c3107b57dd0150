"""Draw what the forward (noising) process does to a few data images, as one PNG strip.

    python -m diffusion_lab.noising                                    # digits, vp with linear betas
    python -m diffusion_lab.noising process.scheduler.beta_schedule=squaredcos_cap_v2 out=cosine.png
    python -m diffusion_lab.noising process=flow_matching              # or process=edm

Rows are images, columns levels of the schedule; each column is labelled with t (vp) or the
level, and the SNR there.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401
from diffusion_lab.diffusion.noising_strip import noising_strip
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH
from diffusion_lab.utils.errors import ConfigError


def run(cfg: DictConfig) -> Path:
    process = instantiate(cfg.process)
    bad = [v for v in cfg.levels if not 0 <= float(v) <= 1]
    if bad:
        raise ConfigError(f"levels {bad} are outside [0, 1] (0 = clean data, 1 = the noisiest level of the schedule); pick values in that range.")
    datamodule = instantiate(cfg.data.datamodule)
    x0 = datamodule.sample_batch(cfg.num_images)["pixel_values"]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    noising_strip(x0, process, [float(v) for v in cfg.levels], seed=cfg.seed).save(out)
    print(f"wrote {out}")
    return out


@hydra.main(config_path=CONFIG_PATH, config_name="noising", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("noising"):
        main()
