"""The BLR: analytic gradient, fitting, prediction and pickle-free persistence."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from cryoal_ext.model import BLR, FORMAT


def _problem(seed=0, n=40, d=5, nu=60, soft=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = rng.uniform(size=n) if soft else (rng.uniform(size=n) < 0.4).astype(float)
    weight = rng.uniform(0.2, 2.0, size=n)
    U = rng.normal(size=(nu, d)) + 0.3
    w0 = rng.normal(scale=0.5, size=d)
    b0 = float(rng.normal())
    theta = np.r_[rng.normal(scale=0.7, size=d), rng.normal()]
    return X, y, weight, U, w0, b0, theta


def _reference_loss(theta, X, y, weight, U, w0, l2, pi, pi_weight):
    """The loss written out independently (plain log/exp, fine in float64 for these moderate logits)."""
    w, b = theta[:-1], theta[-1]
    z = X @ w + b
    p = 1.0 / (1.0 + np.exp(-z))
    loss = np.sum(weight * -(y * np.log(p) + (1 - y) * np.log(1 - p)))
    loss += 0.5 * l2 * np.sum((w - w0) ** 2)
    if pi_weight > 0 and U is not None:
        m = np.mean(1.0 / (1.0 + np.exp(-(U @ w + b))))
        loss += pi_weight * (np.log(m / (1 - m)) - np.log(pi / (1 - pi))) ** 2
    return loss / max(weight.sum(), 1.0)


SETTINGS = [
    dict(l2=0.0, pi=0.01, pi_weight=0.0),  # plain weighted BCE
    dict(l2=1.0, pi=0.01, pi_weight=1.0),  # the default
    dict(l2=3.0, pi=0.2, pi_weight=5.0),  # strong expectation term
    dict(l2=0.1, pi=0.5, pi_weight=0.5),
]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("soft", [False, True])
def test_gradient_matches_central_differences(params, soft):
    X, y, weight, U, w0, b0, theta = _problem(seed=1, soft=soft)
    m = BLR(**params)
    f, g = m.loss_and_grad(theta, X, y, weight, U, w0, b0)
    assert f == pytest.approx(_reference_loss(theta, X, y, weight, U, w0, **params), rel=1e-10)
    eps = 1e-6
    fd = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = eps
        fd[i] = (m.loss_and_grad(theta + e, X, y, weight, U, w0, b0)[0]
                 - m.loss_and_grad(theta - e, X, y, weight, U, w0, b0)[0]) / (2 * eps)
    assert g.shape == theta.shape
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_gradient_without_unlabelled_rows_and_prior_pull():
    X, y, weight, _, w0, b0, theta = _problem(seed=2)
    m = BLR(l2=2.0, pi=0.05, pi_weight=3.0)
    f_none, g_none = m.loss_and_grad(theta, X, y, weight, None, w0, b0)
    f_empty, g_empty = m.loss_and_grad(theta, X, y, weight, np.empty((0, X.shape[1])), w0, b0)
    assert f_none == f_empty and np.array_equal(g_none, g_empty)
    assert f_none == pytest.approx(_reference_loss(theta, X, y, weight, None, w0, 2.0, 0.05, 0.0), rel=1e-10)
    # the L2 term pulls towards w0: moving w0 onto w removes exactly that term
    f_at_w0, _ = m.loss_and_grad(theta, X, y, weight, None, theta[:-1], b0)
    assert f_none - f_at_w0 == pytest.approx(0.5 * 2.0 * np.sum((theta[:-1] - w0) ** 2) / weight.sum(), rel=1e-10)


def _separable(seed=0, n=200, d=6):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    X = rng.normal(size=(n, d))
    margin = X @ direction
    keep = np.abs(margin) > 0.5  # a clear gap between the classes
    return X[keep], (margin[keep] > 0).astype(float), direction


def test_fit_decreases_loss_and_separates():
    X, y, direction = _separable()
    m = BLR(l2=0.01, pi_weight=0.0, max_iter=500)
    w0, b0 = np.zeros(X.shape[1]), 0.0
    start = m.loss_and_grad(np.r_[w0, b0], X, y, np.ones_like(y), None, w0, b0)[0]
    m.fit(X, y)
    end = m.loss_and_grad(np.r_[m.coef_, m.intercept_], X, y, np.ones_like(y), None, w0, b0)[0]
    assert start == pytest.approx(np.log(2.0))  # every probability 0.5 at w = 0
    assert end < 0.1 * start
    p = m.predict_proba(X)
    assert p.shape == y.shape and np.all((p >= 0) & (p <= 1))
    assert np.array_equal(p > 0.5, y == 1)
    assert np.array_equal(m.decision_function(X) > 0, y == 1)
    # the learned direction is the true one
    assert float(m.coef_ @ direction) / np.linalg.norm(m.coef_) > 0.95
    # extreme inputs stay probabilities
    far = np.vstack([direction * 1e4, -direction * 1e4])
    pf = m.predict_proba(far)
    assert np.all(np.isfinite(pf)) and pf[0] > 0.999 and pf[1] < 0.001 and np.all((pf >= 0) & (pf <= 1))


def test_expectation_term_pulls_mean_probability_to_pi():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(20, 4))
    y = (X[:, 0] > 0).astype(float)  # labels say half the pixels are positive
    U = rng.normal(size=(3000, 4))
    for pi in (0.02, 0.3):
        m = BLR(l2=0.1, pi=pi, pi_weight=200.0, max_iter=1000, tol=1e-10).fit(X, y, unlabelled=U)
        assert float(m.predict_proba(U).mean()) == pytest.approx(pi, rel=0.15)


def test_prior_weights_are_in_raw_feature_space():
    """A very strong L2 keeps w at the prior w0, with or without standardisation (w0 is given in raw units)."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(100, 5)) * np.array([1.0, 10.0, 0.1, 3.0, 1.0]) + 4.0
    y = (rng.uniform(size=100) < 0.3).astype(float)
    U = rng.normal(size=(500, 5)) * np.array([1.0, 10.0, 0.1, 3.0, 1.0]) + 4.0
    w0 = np.array([0.5, -0.05, 2.0, 0.1, -0.3])
    for standardise in (False, True):
        m = BLR(l2=1e7, pi_weight=0.0, standardise=standardise).fit(X, y, unlabelled=U, prior=(w0, 1.0))
        np.testing.assert_allclose(m.coef_, w0, rtol=1e-3, atol=1e-4)
        assert np.array_equal(m.prior_coef_, w0) and m.prior_intercept_ == 1.0


def test_standardisation_does_not_change_the_maximum_likelihood_fit():
    rng = np.random.default_rng(6)
    scales = np.array([1.0, 20.0, 0.05, 3.0])
    X = rng.normal(size=(300, 4)) * scales + np.array([0.0, 50.0, -1.0, 2.0])
    logit = (X - X.mean(0)) / scales @ np.array([1.0, -1.5, 0.5, 0.0]) - 0.5
    y = (rng.uniform(size=300) < 1 / (1 + np.exp(-logit))).astype(float)  # overlapping classes: finite MLE
    kw = dict(l2=0.0, pi_weight=0.0, max_iter=5000, tol=1e-12)
    a = BLR(standardise=False, **kw).fit(X, y)
    b = BLR(standardise=True, **kw).fit(X, y)
    assert b.mean_ is not None and np.all(b.scale_ > 0)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=2e-3)


def _solvers() -> list[str | None]:
    from dataclasses import fields

    from cryoal_ext.model import BLRParams

    return ["newton", "lbfgs"] if "solver" in {f.name for f in fields(BLRParams)} else [None]


def test_solvers_reach_the_same_optimum():
    """Whatever solver is configured, the fit is at a stationary point of the loss (tiny gradient)."""
    X, y, weight, U, w0, b0, _ = _problem(seed=9, n=200, d=6, nu=2000)
    probs = []
    for solver in _solvers():
        kw = dict(l2=1.0, pi=0.05, pi_weight=1.0, max_iter=2000, tol=1e-12)
        if solver:
            kw["solver"] = solver
        m = BLR(**kw).fit(X, y, weight, unlabelled=U, prior=(w0, b0))
        _, g = m.loss_and_grad(np.r_[m.coef_, m.intercept_], X, y, weight, U, w0, b0)
        assert np.abs(g).max() < 1e-5, solver
        probs.append(m.predict_proba(U))
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], atol=1e-4)


def test_unfitted_model_and_params():
    m = BLR(l2=3.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        m.predict_proba(np.zeros((2, 3)))
    assert m.get_params()["l2"] == 3.0 and m.get_params()["pi"] == 0.01
    m.set_params(pi=0.2)
    assert m.get_params()["l2"] == 3.0 and m.get_params()["pi"] == 0.2
    with pytest.raises(TypeError):
        BLR(no_such_setting=1)


def test_logit_map_equals_decision_function():
    X, y, _ = _separable(seed=7, d=8)
    m = BLR(pi_weight=0.0).fit(X, y)
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(8, 37, 23)).astype(np.float16)
    out = m.logit_map(fmap, rows_per_chunk=5)
    assert out.shape == (37, 23)
    rows = fmap.reshape(8, -1).T.astype(np.float32)
    np.testing.assert_allclose(out.ravel(), m.decision_function(rows), rtol=1e-5, atol=1e-5)


# --- persistence -----------------------------------------------------------------------------------
def _fitted():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(80, 6))
    y = (X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=80) > 0).astype(float)
    m = BLR(l2=0.5, pi=0.1, pi_weight=0.5, standardise=True)
    m.fit(X, y, unlabelled=rng.normal(size=(300, 6)), prior=(rng.normal(size=6), 0.2))
    return m, rng.normal(size=(500, 6))


def test_save_load_round_trip(tmp_path):
    m, Xtest = _fitted()
    path = m.save(tmp_path / "model", feature_model="resnet16_u32", radius_px=28.0)
    assert path == tmp_path / "model.npz" and path.exists() and (tmp_path / "model.json").exists()
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["format"] == FORMAT and meta["params"] == m.get_params() and meta["feature_model"] == "resnet16_u32"
    loaded = BLR.load(tmp_path / "model.npz")
    assert np.array_equal(loaded.predict_proba(Xtest), m.predict_proba(Xtest))
    assert np.array_equal(loaded.coef_, m.coef_) and loaded.intercept_ == m.intercept_
    assert np.array_equal(loaded.prior_coef_, m.prior_coef_) and loaded.prior_intercept_ == m.prior_intercept_
    assert loaded.get_params() == m.get_params()
    assert loaded.meta["radius_px"] == 28.0
    # the same model through the .json name too
    assert np.array_equal(BLR.load(tmp_path / "model.json").predict_proba(Xtest), m.predict_proba(Xtest))
    # no pickle anywhere: numpy reads every array with pickles refused, and none is an object array
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"coef", "intercept", "prior_coef", "prior_intercept"}
        assert all(z[k].dtype != object for k in z.files)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_save_unfitted_refused(tmp_path):
    with pytest.raises(RuntimeError):
        BLR().save(tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


def test_load_foreign_or_missing_files(tmp_path):
    m, _ = _fitted()
    m.save(tmp_path / "model.npz")
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        BLR.load(tmp_path / "nothing.npz")
    # weights without their json
    shutil.copy(tmp_path / "model.npz", tmp_path / "lonely.npz")
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        BLR.load(tmp_path / "lonely.npz")
    # a json of some other program
    shutil.copy(tmp_path / "model.npz", tmp_path / "other.npz")
    (tmp_path / "other.json").write_text(json.dumps({"format": "sklearn", "params": {}}))
    with pytest.raises(ValueError, match="other.json"):
        BLR.load(tmp_path / "other.npz")


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_pickled_weights_are_never_unpickled(tmp_path):
    m, _ = _fitted()
    m.save(tmp_path / "model.npz")
    marker = tmp_path / "pwned"
    (tmp_path / "model.npz").write_bytes(pickle.dumps({"coef": _Boom(str(marker))}))
    with pytest.raises(Exception):
        BLR.load(tmp_path / "model.npz")
    assert not marker.exists()
    # an .npz holding an object array is refused too
    np.savez(tmp_path / "model.npz", coef=np.array([_Boom(str(marker))], dtype=object),
             intercept=np.zeros(1), prior_coef=np.zeros(6), prior_intercept=np.zeros(1))
    with pytest.raises(ValueError):
        BLR.load(tmp_path / "model.npz")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated_npz", "npz_without_coef", "broken_json"])
def test_load_malformed_files_clear_error(tmp_path, damage):
    m, _ = _fitted()
    path = m.save(tmp_path / "model.npz")
    if damage == "truncated_npz":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        name = "model.npz"
    elif damage == "npz_without_coef":
        np.savez(path, other=np.ones(3))
        name = "model.npz"
    else:
        (tmp_path / "model.json").write_text("{not json")
        name = "model.json"
    with pytest.raises(ValueError, match=name):
        BLR.load(path)
