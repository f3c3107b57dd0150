"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization"): fine-tune on preference pairs (a preferred image ``w`` and a rejected one ``l`` per
prompt) without a reward model, the starting model as the reference.

Eq. 14 of the paper, with the constant ``T omega(lambda_t)`` folded into ``beta`` as the paper's own
code and diffusers' research script do: both images get the SAME noise ``eps`` and level ``t``,

    err(x) = || target(x, eps, t) - net(x_t, t, c) ||^2            (per example, mean over pixels)
    inside = -beta / 2 * ((err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l)))
    loss   = -log sigmoid(inside)

``inside`` is the implicit reward margin: positive when the policy has lowered the winner's error
relative to the loser's more than the reference did (``train/dpo_accuracy`` is the share of such
pairs). ``err`` is the process's own per-example loss (``Process.loss(reduce=False)``), so the form is
the same for every process:

- ``process=vp``: the error of the epsilon / v / x0 prediction the model trains with (the paper: epsilon);
- ``process=flow_matching``: the error of the predicted velocity ``eps - x_0``, the form the flow-DPO
  papers use (Flow-DPO: Liu et al. 2025, "Improving Video Generation with Human Feedback");
- ``process=edm``: the preconditioned denoiser's x0 error.

The process's loss weighting (min-SNR, sigma_sqrt, EDM's lambda) is part of ``err``; with the
default ``none`` it is diffusers' plain MSE. ``beta`` scales with what ``err`` averages over: 5000
(the paper's code's default) for SD's 64x64x4 latents; small 8x8 pixel models want far smaller values
(``conf/experiment/dpo_digits.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffusion_lab.compat.lightning import attached_trainer
from diffusion_lab.data.preference import LOSER_KEY
from diffusion_lab.methods.base import Method, frozen_reference
from diffusion_lab.utils.errors import ConfigError, DataError

if TYPE_CHECKING:
    from diffusion_lab.modules.diffusion_module import DiffusionModule


@dataclass
class DPOTerms:
    """``loss`` ``[N]`` = -log sigmoid(``inside``); ``inside`` ``[N]``: the implicit reward margin
    (> 0: the pair is ranked as the data ranks it)."""

    loss: torch.Tensor
    inside: torch.Tensor


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float) -> DPOTerms:
    """Diffusion-DPO's loss per pair (eq. 14, ``T omega(lambda_t)`` in ``beta``) from the per-example
    denoising errors ``[N]`` of the policy and the reference on the winners and losers."""
    model_diff = err_w - err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    return DPOTerms(loss=-F.logsigmoid(inside), inside=inside)


def _repeat_pair(cond):
    """Conditioning of the ``N`` pairs -> of the ``2N`` images ``[w; l]`` (tensors along dim 0)."""
    if torch.is_tensor(cond):
        return torch.cat([cond, cond]) if cond.ndim else cond
    if isinstance(cond, dict):
        return {k: _repeat_pair(v) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_repeat_pair(v) for v in cond)
    return cond


class DPO(Method):
    """``method=dpo``: Diffusion-DPO on ``data=preference`` pairs (``pixel_values``: the preferred
    image, ``loser_pixel_values``: the rejected one, ``caption``).

    The reference is ``frozen_reference(module)``: with an adapter (``adapter=lora``) the same backbone
    with the adapter off, else a frozen copy of the starting backbone (taken before a checkpoint is restored). Text conditioning is
    computed once per pair (one caption dropout draw) and given to both images and to the reference.

    Args:
        beta: the KL weight of eq. 14 (larger: stay closer to the reference).
    """

    name = "dpo"

    def __init__(self, beta: float = 5000.0) -> None:
        if not beta > 0:
            raise ConfigError(f"method.beta={beta} must be > 0 (the KL weight of Diffusion-DPO; e.g. 5000 for SD latents).")
        self.beta = float(beta)
        self.reference: frozen_reference | None = None

    def setup(self, module: "DiffusionModule") -> None:
        dm = module.trainer.datamodule if attached_trainer(module) is not None else None
        keys = getattr(getattr(dm, "dataset", None), "paired_keys", None)
        if keys is not None and LOSER_KEY not in keys:
            raise ConfigError(
                f"method=dpo trains on preference pairs, but the data gives no rejected image ({LOSER_KEY!r}); "
                f"use data=preference data.root=<folder with metadata.jsonl: jpg_0, jpg_1, label_0, caption> "
                f"(or data=preference_hf for a parquet / Pick-a-Pic style data set)."
            )
        self.reference = frozen_reference(module)

    def errors(self, module: "DiffusionModule", batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) per-example errors ``[2N]`` of ``[winners; losers]``, one noise and
        level per pair."""
        if LOSER_KEY not in batch:
            raise DataError(f"method=dpo: the batch has no {LOSER_KEY!r} (keys: {sorted(batch)}); train on data=preference.")
        x0_w = module.encode(batch)
        x0_l = module.encode({"pixel_values": batch[LOSER_KEY]})
        cond = _repeat_pair(module.conditioning(batch, train=True))
        noised = module.process.noised_pair(x0_w, x0_l)
        err = module.process.loss(module.denoise(noised.model_input, noised.timestep, **cond), noised, reduce=False)
        with self.reference():
            ref_err = module.process.loss(module.denoise(noised.model_input, noised.timestep, **cond), noised, reduce=False)
        return err, ref_err

    def training_step(self, module: "DiffusionModule", batch: dict, batch_idx: int) -> torch.Tensor:
        if self.reference is None:  # a module used outside a Trainer (tests, scripts)
            self.setup(module)
        err, ref_err = self.errors(module, batch)
        (err_w, err_l), (ref_w, ref_l) = err.chunk(2), ref_err.chunk(2)
        terms = dpo_loss(err_w, err_l, ref_w, ref_l, self.beta)
        loss = terms.loss.mean()
        n = len(err_w)
        module.log("train/loss", loss, prog_bar=True, batch_size=n)
        metrics = {
            "dpo_accuracy": (terms.inside > 0).float().mean(),
            "reward_margin": terms.inside.mean(),
            "model_mse_w": err_w.mean(),
            "model_mse_l": err_l.mean(),
            "ref_mse_w": ref_w.mean(),
            "ref_mse_l": ref_l.mean(),
        }
        for name, value in metrics.items():
            module.log(f"train/{name}", value.detach(), batch_size=n)
        return loss
