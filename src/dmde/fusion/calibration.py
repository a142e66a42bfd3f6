"""Calibration of the experts and of the fused scores, and its measurement (docs/METHOD.md, "The gate").

* :func:`calibrate_logits` / :func:`fit_calibration` — each expert's temperature T_j and
  not-in-group bias b_j, fitted on held-out images before stacking (``fusion.calibrate``).
* :func:`fit_pool_temperature` — one temperature τ of the stacked scores before the N-way layer
  (``fusion.pool_temperature``).
* :func:`calibration_sums` / :func:`calibration_error` — the expected calibration error as counts,
  so chunks of images add up to one pass (:func:`expected_calibration_error` in one call).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dmde.core.errors import MismatchError

#: Per-expert calibration before stacking (:func:`fit_calibration`; ``none``: the raw outputs).
CALIBRATIONS = ("none", "temperature", "temperature_bias")
#: The temperature τ of the stacked scores before the N-way layer (:func:`fit_pool_temperature`).
POOL_TEMPERATURES = ("none", "fit")


def calibrate_logits(logits: Tensor, temperature: Tensor, nig_bias: Tensor | None = None) -> Tensor:
    """Per-expert calibration of padded logits (B, G, W) before the softmax of Eq. 9:
    ``logits / T_j``, then ``+ b_j`` on the not-in-group column (the last). T (G,) > 0, b (G,)."""
    out = logits / temperature.view(1, -1, 1)
    if nig_bias is not None:
        out = torch.cat([out[..., :-1], out[..., -1:] + nig_bias.view(1, -1, 1)], dim=-1)
    return out


def fit_calibration(logits: Tensor, slots: Tensor, bias: bool = True, steps: int = 200) -> tuple[Tensor, Tensor]:
    """Fit each expert's temperature T_j (and not-in-group bias b_j) by minimising the negative
    log-likelihood of its group-view labels ``slots`` (B, G) on held-out padded logits (B, G, W):
    the experts were trained on a 1:1 in-group / not-in-group view, while the images a mixture
    sees fall outside a group (N − M_j)/N of the time, so φ is miscalibrated for Eq. 7.
    Returns (T (G,), b (G,)); b is 0 when ``bias`` is False. Deterministic (L-BFGS, fixed start)."""
    g = logits.shape[1]
    log_t = torch.zeros(g, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(g, dtype=torch.float64, requires_grad=bias)
    z = logits.detach().double()

    def nll() -> Tensor:
        out = calibrate_logits(z, log_t.exp(), b if bias else None)
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), slots.reshape(-1)) * g

    _minimise([log_t, b] if bias else [log_t], nll, steps)
    return log_t.detach().exp().float(), b.detach().float()


#: :func:`fit_pool_temperature` fits on at most this many score entries (rows × N; 512 MiB in
#: float64): one scalar needs few images, and at N = 21,841 that is still 3,072 of them.
POOL_FIT_ELEMENTS = 2**26


def fit_pool_temperature(scores: Tensor, targets: Tensor, steps: int = 100) -> float:
    """The temperature τ of the fused scores: argmin_τ CE(τ·z, y) over held-out images, with z
    (B, N) the N-way layer's input (docs/METHOD.md, "N-way layer"). The product of the experts adds
    every expert's log-probabilities, so the evidence of the experts that share a class is counted
    once per expert: τ < 1 undoes that over-confidence. A scale changes no argmax (argmax Υ is
    kept); it sets the confidence the N-way layer and end-to-end fine-tuning (Eq. 11) start from.
    Deterministic (L-BFGS from τ = 1; above :data:`POOL_FIT_ELEMENTS` on a seeded sample of rows)."""
    if scores.ndim != 2 or len(scores) != len(targets):
        raise MismatchError(f"scores {tuple(scores.shape)} and {len(targets)} targets do not match")
    targets = targets.to(scores.device).long()
    rows = max(1, POOL_FIT_ELEMENTS // max(1, scores.shape[1]))
    if len(scores) > rows:
        keep = torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))[:rows].to(scores.device)
        scores, targets = scores[keep], targets[keep]
    z = scores.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    _minimise([log_t], lambda: torch.nn.functional.cross_entropy(z * log_t.exp(), targets), steps)
    return float(log_t.detach().exp())


def _minimise(params: list[Tensor], loss: Callable[[], Tensor], steps: int) -> None:
    """L-BFGS with a strong-Wolfe line search on ``loss()`` over ``params``, in place: the one
    optimiser of the calibration fits (deterministic for a fixed start)."""
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)


def calibration_sums(prob: Tensor, outcome: Tensor, sums: Tensor) -> Tensor:
    """Add ``prob`` (n,) in [0, 1] and ``outcome`` (n,) bool into the per-bin sums ``sums``
    (2, bins) float64 (Σ p_i, Σ o_i over each equal-width bin of [0, 1]), in place: chunks of
    images added in order give the sums of one pass over them all."""
    bins = sums.shape[1]
    p = prob.double().clamp(0, 1)
    which = (p * bins).long().clamp(max=bins - 1)
    sums[0].index_add_(0, which, p)
    sums[1].index_add_(0, which, outcome.double())
    return sums


def calibration_error(sums: Tensor, n: int) -> float:
    """ECE from :func:`calibration_sums` over ``n`` images:
    Σ_b (n_b / n)·|mean p_b − mean o_b| = Σ_b |Σ_{i∈b} p_i − Σ_{i∈b} o_i| / n."""
    return float((sums[0] - sums[1]).abs().sum() / n) if n else float("nan")


def expected_calibration_error(prob: Tensor, outcome: Tensor, bins: int = 15) -> float:
    """ECE of a binary probability: Σ_b (n_b / n) · |mean prob in bin b − share of outcomes|,
    equal-width bins on [0, 1]. ``prob`` (n,) in [0, 1], ``outcome`` (n,) bool."""
    sums = calibration_sums(prob, outcome, torch.zeros(2, bins, dtype=torch.float64))
    return calibration_error(sums, prob.numel())
