"""How firmly to hold the model to Topaz's head, chosen each round by the answers' held-out likelihood.

Why beside the evidence (evidence.py): the Laplace evidence asks how well the prior *and* the
answers fit together; the cross-validated log-likelihood asks only how well a model fitted
without some answers predicts them, the question a user cares about.  Same scaled prior
(``s`` times the l2 pull and the pseudo-labels' weight), same grid and climb; only the score
differs.  The folds are whole rounds (``calibration.answer_folds``): the answers of one round were
proposed together, so holding out single answers would score each with its neighbours' help.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .calibration import answer_folds

if TYPE_CHECKING:
    from .labels import Label
    from .learner import ActiveLearner
    from .model import BLR

FOLDS = 5
REFIT_TOL = 1e-5  # the refits only score a few answers (calibration.py measured 1e-5 as enough for a map)


def held_out_loglik(learner: "ActiveLearner", labels: list["Label"], strength: float, warm: "BLR | None",
                    folds: int = FOLDS) -> float:
    """Sum over the answers of log P(answer | model fitted at ``strength`` without its fold), at the answer's spot."""
    real = [l for l in labels if l.micrograph in learner.items and l.source != "pseudo" and l.label in (0, 1)]
    if len(real) < 2:
        return 0.0
    fold = answer_folds(real, folds)
    total = 0.0
    for f in np.unique(fold):
        out = [real[i] for i in np.flatnonzero(fold == f)]
        model = learner.fit_model([l for l, g in zip(real, fold) if g != f], warm, newton_tol=REFIT_TOL,
                                  strength=strength)
        z = model.decision_function(learner.rows([(l.micrograph, l.x, l.y) for l in out]))
        sign = np.array([1.0 if l.label == 1 else -1.0 for l in out])
        total -= float(np.sum(np.logaddexp(0.0, -sign * z)))
    return total
