"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models", section 3 and appendix C). Parameter-free.

Notation: ``t`` counts optimizer steps (1, 2, ...), ``theta_t`` are the weights after step ``t``.

    power EMA       theta^_t = beta_t theta^_{t-1} + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma+1)
    unrolled        theta_tau has weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), tau = 1..t:
                    the integral over [tau-1, tau] of the profile
                    p_{t,gamma}(s) = (gamma+1) s^gamma / t^(gamma+1),  0 <= s <= t
    width           sigma_rel = std of p relative to t = sqrt(gamma+1) / ((gamma+2) sqrt(gamma+3))
    post-hoc        snapshots theta^_i of profiles (t_i, gamma_i); a target profile (t_r, gamma_r):
                    min_x || sum_i x_i p_i - p_r ||^2 (L2 over s)  =>  A x = b,
                    A_ij = <p_i, p_j>, b_i = <p_i, p_r>;  theta^_r ~= sum_i x_i theta^_i
                    (here also constrained to sum_i x_i = 1: ``solve_coefficients``)

Because each discrete EMA weight is the integral of the continuous profile over one step, an exact
fit of the profiles (``residual`` 0) is an exact reconstruction of the EMA a run with the target
profile would have kept. Time ``t`` may be in any unit (steps, images) as long as it is one unit.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sigma_rel_from_gamma(gamma: float) -> float:
    """sigma_rel of the power profile with exponent ``gamma`` (> -1)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


# sigma_rel(gamma) rises from 0 (gamma -> -1) to a maximum and falls again: d/dgamma of
# log sigma_rel^2 = 1/(g+1) - 2/(g+2) - 1/(g+3) vanishes where g^2 + 3 g + 1 = 0. A width is named
# by the branch gamma > GAMMA_AT_MAX (the paper's exponents are all there).
GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2  # -0.382
SIGMA_REL_MAX = sigma_rel_from_gamma(GAMMA_AT_MAX)  # 0.3003


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent ``gamma`` whose profile has width ``sigma_rel`` (0 < sigma_rel < SIGMA_REL_MAX = 0.3003;
    a plain average, gamma 0, is 0.2887). sigma_rel^2 (g+2)^2 (g+3) = g+1 is a
    cubic in g; its largest real root is the branch the paper uses (sigma_rel 0.05 -> 16.97,
    0.10 -> 6.94)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}); got {sigma_rel}")
    k = sigma_rel**-2
    # (g+2)^2 (g+3) - k (g+1) = g^3 + 7 g^2 + (16 - k) g + (12 - k)
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    real = roots[np.abs(roots.imag) < 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    return float(real.max())


def beta(t: int, gamma: float) -> float:
    """The power EMA's decay at step ``t`` (1-based): (1 - 1/t)^(gamma+1); 0 at t = 1."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def step_weights(t: int, gamma: float) -> torch.Tensor:
    """``[t]`` float64: the weight of theta_1..theta_t in the power EMA at step ``t`` (sums to 1)."""
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    return (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> torch.Tensor:
    """<p_a, p_b> = integral over s of p_{t_a,gamma_a}(s) p_{t_b,gamma_b}(s) (broadcasting, float64):

        (ga+1)(gb+1) m^(ga+gb+1) / ((ga+gb+1) t_a^(ga+1) t_b^(gb+1)),  m = min(t_a, t_b)

    computed in logs so large t and gamma do not overflow."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = torch.minimum(t_a, t_b)
    g = gamma_a + gamma_b + 1
    log = torch.log(gamma_a + 1) + torch.log(gamma_b + 1) - torch.log(g) + g * torch.log(m) - (gamma_a + 1) * torch.log(t_a) - (gamma_b + 1) * torch.log(t_b)
    return torch.exp(log)


def solve_coefficients(t: torch.Tensor, gamma: torch.Tensor, t_r: float, gamma_r: float, sum_to_one: bool = True) -> tuple[torch.Tensor, float]:
    """(x ``[K]``, relative residual) for snapshots at steps ``t`` ``[K]`` with exponents ``gamma``
    ``[K]`` and the target profile (``t_r``, ``gamma_r``): x minimises ||sum_i x_i p_i - p_r||, and
    the residual is that norm over ||p_r|| (0 = exact).

    ``sum_to_one`` adds the constraint sum_i x_i = 1 (a Lagrange multiplier: the bordered system
    [[A, 1], [1^T, 0]] [x; lam] = [b; 1]). Every profile integrates to 1, so an exact fit sums to 1
    anyway; with few snapshots the unconstrained fit (the paper's A x = b) sums to 1 +- a few 1e-3,
    which scales the whole weight vector (its norm, not just its recent movement) by that error.
    Least squares (``lstsq``) so repeated or nearly parallel snapshots do not break the solve."""
    t, gamma = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(gamma, dtype=torch.float64)
    K = len(t)
    A = profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])  # [K, K]
    b = profile_dot(t, gamma, t_r, gamma_r)  # [K]
    # scale rows and columns by 1/sqrt(A_ii): the Gram matrix of unit-norm profiles, better conditioned
    d = A.diagonal().rsqrt()
    M, rhs = d[:, None] * A * d[None, :], d * b
    if sum_to_one:  # in the scaled unknowns y = x / d the constraint reads sum_i d_i y_i = 1
        M = torch.cat([torch.cat([M, d[:, None]], 1), torch.cat([d, torch.zeros(1, dtype=d.dtype)])[None]], 0)
        rhs = torch.cat([rhs, torch.ones(1, dtype=d.dtype)])
    x = d * torch.linalg.lstsq(M, rhs[:, None], driver="gelsd").solution[:K, 0]
    rr = profile_dot(t_r, gamma_r, t_r, gamma_r)
    residual2 = (x @ A @ x - 2 * x @ b + rr).clamp_min(0)
    return x, float((residual2 / rr).sqrt())


def combine(snapshots: list[dict[str, torch.Tensor]], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i x_i snapshot_i for each tensor name (accumulated in float64, returned in each
    tensor's own dtype)."""
    out = {}
    for name, first in snapshots[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for xi, snap in zip(x.tolist(), snapshots):
            acc += xi * snap[name].to(torch.float64)
        out[name] = acc.to(first.dtype)
    return out
