"""How firmly to hold the model to Topaz's head, chosen each round by the evidence of the answers.

Why: a constant prior strength (l2 = 10 towards the pretrained head, pseudo-labels at weight 0.3)
keeps a dataset where the head is right on track, and holds a dataset where it is wrong where the
labels say it is wrong.  Everything in the loss that says "the pretrained head is right" is the
prior: the pull of w towards w0 and the pseudo-labels (the head's own extreme peaks).  Both are
scaled by one strength ``s`` (s = 1: the recipe as written), and ``s`` is the one on a log grid
that maximises the Laplace approximation of the log evidence of the real answers:

    log p(answers | s) = log ∫ lik(θ) prior_s(θ) dθ - log ∫ prior_s(θ) dθ,
    prior_s(θ) = exp(-s P(θ)),  P(θ) = l2/2 ||w - w0||² + Σ_pseudo weight · BCE,
    ≈ -E_s(θ_s) - 1/2 log det ∇²E_s(θ_s) + s P(θ_P) + D/2 log s + const,

with E_s the whole loss NOT divided by n (answers' BCE + s P + the expectation term), θ_s its
minimum (the fit), θ_P the minimum of P alone (it does not move with s) and D the prior's
dimension: d + 1 with pseudo-labels (they pin the bias), d without (the bias is then flat in both
integrals and cancels).  The expectation term (mean probability near pi) is counted as part of
the likelihood: it is in E_s and its Hessian, and does not scale with s.  Each answer's pixels
sum to weight 1 (recipe ``label_weight='label'``), so the likelihood counts one observation per
answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .model import BLR

# l2 0.1 .. 100 for the default's l2 = 10; half-decade steps
GRID: tuple[float, ...] = tuple(float(f"{10.0 ** e:.6g}") for e in np.arange(-2.0, 1.01, 0.5))


@dataclass
class Choice:
    """The chosen strength, its fit, and the score (log evidence, or held-out log-likelihood) of every strength tried."""

    strength: float
    model: BLR
    scores: dict[float, float]


def log_evidence(model: BLR, strength: float, prior_minimum: float, prior_dim: int) -> float:
    """Laplace log evidence (up to a constant in ``strength``) of a BLR fitted with ``laplace=True``."""
    if model.energy_ is None or model.log_det_hessian_ is None:
        raise ValueError("the model was not fitted with laplace=True")
    return (-model.energy_ - 0.5 * model.log_det_hessian_ + strength * prior_minimum
            + 0.5 * prior_dim * np.log(strength))


def nearest(grid: tuple[float, ...], strength: float) -> int:
    return int(np.argmin(np.abs(np.log(np.asarray(grid)) - np.log(strength))))


def choose(fit_at: Callable[[float, BLR | None, bool], BLR], prior_minimum: float, prior_dim: int,
           start: float = 1.0, grid: tuple[float, ...] = GRID) -> Choice:
    """Climb the grid from the strength nearest ``start`` to a maximum of the log evidence.

    ``fit_at(s, warm, final)`` fits at strength s with ``laplace=True``, starting from ``warm``: loosely
    converged while ``final`` is false (the evidence only needs the optimum's loss and curvature, to
    ~1e-6), fully for the chosen one (the proposals need the exact optimum).
    """
    return climb(fit_at, lambda s, model: log_evidence(model, s, prior_minimum, prior_dim), start, grid)


def climb(fit_at: Callable[[float, BLR | None, bool], BLR], score: Callable[[float, BLR], float],
          start: float = 1.0, grid: tuple[float, ...] = GRID) -> Choice:
    """Climb the grid from the strength nearest ``start`` to a local maximum of ``score(s, fit at s)``.

    Each neighbour starts from the fit next to it, so a round where the strength stays costs ~3 short
    fits (and their scoring) and one finishing step.  Shared by the evidence and the cross-validated
    likelihood (``strength_cv.py``): only the score differs.
    """
    fits: dict[int, BLR] = {}
    ev: dict[int, float] = {}

    def at(i: int, warm: BLR | None) -> float:
        if i not in ev:
            fits[i] = fit_at(grid[i], warm, False)
            ev[i] = float(score(grid[i], fits[i]))
        return ev[i]

    i = nearest(grid, start)
    at(i, None)
    while True:
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid):
                at(j, fits[i])
        best = max((j for j in (i - 1, i, i + 1) if j in ev), key=lambda j: ev[j])
        if best == i:
            break
        i = best
    model = fit_at(grid[i], fits[i], True)
    return Choice(grid[i], model, {grid[j]: round(float(ev[j]), 4) for j in sorted(ev)})
