"""How firmly to hold the model to Topaz's head, chosen each round by the answers' held-out likelihood.

Why beside the evidence (evidence.py): the Laplace evidence asks how well the prior *and* the
answers fit together; the cross-validated log-likelihood asks only how well a model fitted
without some answers predicts them, the question a user cares about.  Same scaled prior
(``s`` times the l2 pull and the pseudo-labels' weight), same grid and climb; only the score
differs.  The folds are whole rounds (``calibration.held_out_scores``): the answers of one round were
proposed together, so holding out single answers would score each with its neighbours' help.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .calibration import answers, held_out_scores

if TYPE_CHECKING:
    from .labels import Label
    from .learner import ActiveLearner
    from .model import BLR

FOLDS = 5
REFIT_TOL = 1e-5  # the refits only score a few answers (calibration.py measured 1e-5 as enough for a map)


def held_out_loglik(learner: "ActiveLearner", labels: list["Label"], strength: float, warm: "BLR | None",
                    folds: int = FOLDS) -> float:
    """Sum over the answers of log P(answer | model fitted at ``strength`` without its fold), at the answer's spot."""
    real = answers(learner, labels)
    if len(real) < 2:
        return 0.0
    z, _ = held_out_scores(learner, real, folds, warm, REFIT_TOL, strength=strength)
    return answers_loglik(z, real)


def answers_loglik(z: np.ndarray, real: list["Label"]) -> float:
    """Sum of log P(answer) for logits ``z`` at the answers ``real`` (held out by the caller)."""
    sign = np.array([1.0 if l.label == 1 else -1.0 for l in real])
    return -float(np.sum(np.logaddexp(0.0, -sign * z)))
