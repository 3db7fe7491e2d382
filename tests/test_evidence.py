"""The prior strength chosen by the Laplace evidence: strong where the prior is right, weak where it is wrong."""
from __future__ import annotations

import numpy as np
import pytest

from cryoal_ext import evidence
from cryoal_ext.model import BLR


def _answers(seed=0, n=60, d=8):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    w_true *= 3.0 / np.linalg.norm(w_true)
    X = rng.normal(size=(n, d))
    y = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-(X @ w_true - 0.5)))).astype(float)
    return X, y, w_true


def _choose(X, y, w0, l2=10.0):
    def fit_at(s, warm, final):
        m = BLR(l2=s * l2, pi_weight=0.0, newton_tol=1e-10 if final else 1e-6)
        if warm is not None:
            m.coef_, m.intercept_ = warm.coef_, warm.intercept_
        return m.fit(X, y, prior=(w0, 0.0), warm_start=warm is not None, laplace=not final)
    return evidence.choose(fit_at, prior_minimum=0.0, prior_dim=X.shape[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_right_prior_is_held_wrong_prior_let_go(seed):
    X, y, w_true = _answers(seed)
    right = _choose(X, y, w_true)
    wrong = _choose(X, y, -w_true)
    assert right.strength >= 3.0  # l2 >= 30: the labels agree with w0, keep it
    assert wrong.strength <= 0.1  # l2 <= 1: the labels contradict w0, let it go
    # the climb stopped at a maximum of what it evaluated, and the fit is the chosen strength's
    assert max(right.scores, key=right.scores.get) == right.strength
    assert wrong.model.get_params()["l2"] == pytest.approx(10.0 * wrong.strength)
    # letting go pays: the weak prior's fit points the right way
    assert float(wrong.model.coef_ @ w_true) > 0


def test_laplace_evidence_matches_the_exact_gaussian_evidence():
    """For a quadratic loss the Laplace approximation is exact: check the bookkeeping against
    the closed form of Bayesian linear regression's evidence, written as a 'loss' through the BLR terms."""
    X, y, _ = _answers(3, n=200)
    m = BLR(l2=5.0, pi_weight=0.0).fit(X, y, laplace=True)
    # E at the optimum equals the loss times n; log det is of the un-divided Hessian
    n = X.shape[0]
    assert m.energy_ == pytest.approx(m.loss_and_grad(np.r_[m.coef_, m.intercept_], X, y, np.ones(n), None,
                                                      np.zeros(X.shape[1]), 0.0)[0] * n, rel=1e-9)
    z = X @ m.coef_ + m.intercept_
    p = 1.0 / (1.0 + np.exp(-z))
    A = np.c_[X, np.ones(n)]
    H = A.T @ (A * (p * (1 - p))[:, None])
    H[np.arange(X.shape[1]), np.arange(X.shape[1])] += 5.0
    assert m.log_det_hessian_ == pytest.approx(np.linalg.slogdet(H)[1], abs=1e-4)


def test_grid_and_log_evidence_terms():
    assert evidence.GRID[0] == pytest.approx(0.01) and evidence.GRID[-1] == pytest.approx(10.0)
    assert 1.0 in evidence.GRID
    assert evidence.nearest(evidence.GRID, 0.9) == evidence.GRID.index(1.0)
    with pytest.raises(ValueError, match="laplace"):
        evidence.log_evidence(BLR(), 1.0, 0.0, 3)


def test_laplace_evidence_with_pseudo_labels_follows_quadrature():
    """One feature and a bias: the Laplace log evidence (answers' likelihood, prior = l2 pull + weighted
    pseudo-labels, both scaled by s) changes with s as the exact integral over (w, b) on a grid does."""
    rng = np.random.default_rng(5)
    Xa = rng.normal(size=(40, 1))
    ya = (rng.uniform(size=40) < 1 / (1 + np.exp(-(2.0 * Xa[:, 0] - 0.5)))).astype(float)
    Xp = np.r_[rng.normal(1.5, 0.5, size=(6, 1)), rng.normal(-1.5, 0.5, size=(6, 1))]
    yp = np.r_[np.ones(6), np.zeros(6)]
    wp = np.full(12, 0.3)
    w0, l2 = np.array([1.0]), 2.0
    prior_fit = BLR(l2=l2, pi_weight=0.0).fit(Xp, yp, wp, prior=(w0, 0.0), laplace=True)
    W, B = np.meshgrid(np.linspace(-8, 12, 401), np.linspace(-12, 12, 401), indexing="ij")
    cell = (W[1, 0] - W[0, 0]) * (B[0, 1] - B[0, 0])

    def bce(X, y, wt):
        z = W[..., None] * X[:, 0] + B[..., None]
        return np.sum(wt * (np.logaddexp(0, z) - y * z), axis=-1)

    lik, P = bce(Xa, ya, np.ones(40)), 0.5 * l2 * (W - w0[0]) ** 2 + bce(Xp, yp, wp)

    def log_int(E):
        m = E.min()
        return -m + np.log(np.sum(np.exp(-(E - m))) * cell)

    exact, laplace = [], []
    for s in (0.1, 0.3, 1.0, 3.0, 10.0):
        exact.append(log_int(lik + s * P) - log_int(s * P))
        m = BLR(l2=s * l2, pi_weight=0.0).fit(np.r_[Xa, Xp], np.r_[ya, yp], np.r_[np.ones(40), s * wp],
                                               prior=(w0, 0.0), laplace=True)
        laplace.append(evidence.log_evidence(m, s, prior_fit.energy_, prior_dim=2))
    exact, laplace = np.array(exact), np.array(laplace)
    # the same shape in s (the constant of the Laplace form dropped): within 0.11 here, over a range of 1.1
    np.testing.assert_allclose(laplace - laplace.mean(), exact - exact.mean(), atol=0.2)
