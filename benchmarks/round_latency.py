"""Round latency (issue 6, target 1): our round, optimised, vs the current round and the seed's round.

Three implementations of one active-learning round (fit on the labels, entropy, proposals), timed
side by side in one process on the same cached features, 2 training micrographs, 100 labels:

* ``seed``: a faithful re-implementation of the published round (the ``seed`` recipe: zero prior,
  3x3-pixel labels, 100 pseudo-labels): the loss is written with torch tensors and differentiated
  by autograd, its expectation term runs over EVERY pixel of the training micrographs, L-BFGS
  drives it, then the entropy of every pixel and a full greedy NMS give the proposals.
* ``current``: ``ActiveLearner.fit`` + ``propose`` as they are in cryoal_ext/learner.py today.
* ``fast``: the same learner with the changes recommended to learner.py / model.py
  (``benchmarks/proposed_learner_model.diff``), prototyped here as a subclass (``FastLearner``):
  ``FeatureMap.in_memory`` (float32 features of the training micrographs in RAM), a Newton
  solver (``newton_fit``: exact Hessian, converged to max|grad| < 1e-10) warm-started from the
  last round's model, and ``entropy_peaks`` / ``peaks(max_peaks=k)`` (only the k best peaks are
  needed, computed exactly).

"Same answer": the current L-BFGS-B stops ~1e-3 (in the weights) short of its loss's optimum, a
distance that moves with floating-point details (BLAS thread count), so the reference answer is
the current algorithm run to convergence (``ConvergedLearner``).  On every round state of the
current learner's trajectory (0 to 100 labels, same labels for all), the fast round's proposals
must equal the converged ones, and AP on the held-out micrographs must agree within 0.005.

    python benchmarks/round_latency.py --repeats 7 --seed-repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from cryoal_ext.acquisition import Proposal, entropy, entropy_peaks, peaks
from cryoal_ext.atomic import write_json
from cryoal_ext.benchmark import BenchmarkSettings, load_data
from cryoal_ext.extract import extract_picks, sigmoid
from cryoal_ext.features import blas_threads, head_of
from cryoal_ext.labels import Label
from cryoal_ext.learner import ActiveLearner, Item
from cryoal_ext.metrics import evaluate
from cryoal_ext.model import BLR, _logit, _log_sigmoid, _sigmoid
from cryoal_ext.oracle import Oracle
from cryoal_ext.recipes import Recipe, get_recipe

DATA = Path(os.environ.get("CRYOAL_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --------------------------------------------------------------------------------------------
# fast: the recommended learner.py / model.py changes, as a subclass
# --------------------------------------------------------------------------------------------
def _loss_grad(params, theta, X, y, weight, U, w0):
    """BLR.loss_and_grad (float64), also returning what the Hessian needs."""
    w, b = theta[:-1], theta[-1]
    n = max(float(weight.sum()), 1.0)
    z = X @ w + b
    sig = _sigmoid(z)
    bce = -(y * _log_sigmoid(z) + (1.0 - y) * _log_sigmoid(-z))
    loss = float(np.dot(weight, bce))
    r = weight * (sig - y)
    gw = X.T @ r
    gb = float(r.sum())
    dw = w - w0
    loss += 0.5 * params.l2 * float(dw @ dw)
    gw = gw + params.l2 * dw
    aux = {"sig": sig}
    if params.pi_weight > 0 and U is not None and U.shape[0] > 0:
        pu = _sigmoid(U @ w + b)
        m = float(np.clip(pu.mean(), 1e-12, 1 - 1e-12))
        g = _logit(m) - _logit(params.pi)
        loss += params.pi_weight * g * g
        g1 = 1.0 / (m * (1.0 - m))
        s = pu * (1.0 - pu) / U.shape[0]
        gm = np.r_[U.T @ s, s.sum()]
        gw = gw + 2.0 * params.pi_weight * g * g1 * gm[:-1]
        gb += 2.0 * params.pi_weight * g * g1 * gm[-1]
        aux.update(pu=pu, m=m, g=g, g1=g1, s=s, gm=gm)
    return loss / n, np.r_[gw, gb] / n, aux


def _gram(A32: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[A 1]^T diag(c) [A 1] for the bias-augmented rows, in float32 (only the step direction uses it)."""
    d = A32.shape[1]
    Ac = A32 * c.astype(np.float32)[:, None]
    H = np.empty((d + 1, d + 1))
    H[:d, :d] = Ac.T @ A32
    H[:d, d] = H[d, :d] = Ac.sum(0, dtype=np.float64)
    H[d, d] = float(c.sum())
    return H


def _hessian(params, weight, X32, U32, aux) -> np.ndarray:
    """Exact Hessian of the BLR loss (BCE + L2 + expectation term)."""
    sig = aux["sig"]
    n = max(float(weight.sum()), 1.0)
    H = _gram(X32, weight * sig * (1.0 - sig))
    d = X32.shape[1]
    H[np.arange(d), np.arange(d)] += params.l2
    if "pu" in aux:
        m, g, g1, pu, s, gm = aux["m"], aux["g"], aux["g1"], aux["pu"], aux["s"], aux["gm"]
        g2 = (2.0 * m - 1.0) / (m * (1.0 - m)) ** 2
        H += 2.0 * params.pi_weight * ((g1 * g1 + g * g2) * np.outer(gm, gm) + g * g1 * _gram(U32, s * (1.0 - 2.0 * pu)))
    return H / n


def newton_fit(model: BLR, X, y, weight, unlabelled, prior, start_from: BLR | None = None,
               gtol: float = 1e-10, max_iter: int = 50) -> BLR:
    """BLR.fit solved by Newton's method (exact Hessian, d = 129) to a tight gradient tolerance.

    Why: L-BFGS-B needs ~140 gradient evaluations and stops ~4e-4 (in the weights) short of the
    optimum, a distance that already changes with the BLAS thread count; Newton reaches the
    optimum (max |gradient| < 1e-10) in 4-7 steps, 4 from the previous round's weights.
    Gradients and losses are float64; the Hessian (only the step direction) float32.
    A failed Newton (non-convex region) falls back to L-BFGS-B from where it stopped.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    U = None if unlabelled is None else np.asarray(unlabelled, dtype=np.float64)
    d = X.shape[1]
    if model.params.standardise:
        ref = U if U is not None and U.shape[0] > 1 else X
        model.mean_, model.scale_ = ref.mean(axis=0), ref.std(axis=0) + 1e-6
        X = (X - model.mean_) / model.scale_
        U = None if U is None else (U - model.mean_) / model.scale_
    else:
        model.mean_, model.scale_ = np.zeros(d), np.ones(d)
    X32 = X.astype(np.float32)
    U32 = None if U is None else U.astype(np.float32)
    w0_raw, b0_raw = (np.zeros(d), 0.0) if prior is None else (np.asarray(prior[0], float), float(prior[1]))
    model.prior_coef_, model.prior_intercept_ = w0_raw, b0_raw
    w0, b0 = model._to_std(w0_raw, b0_raw)
    if start_from is not None and start_from.coef_ is not None and start_from.coef_.shape[0] == d:
        theta = np.r_[model._to_std(start_from.coef_, start_from.intercept_)]
    else:
        theta = np.r_[w0, b0]
    p = model.params
    f, g, aux = _loss_grad(p, theta, X, y, weight, U, w0)
    it = 0
    while it < max_iter and np.abs(g).max() > gtol:
        H = _hessian(p, weight, X32, U32, aux)
        lam = 0.0
        while True:  # Levenberg damping where the Hessian is not positive definite
            try:
                chol = np.linalg.cholesky(H + lam * np.eye(d + 1))
                break
            except np.linalg.LinAlgError:
                lam = max(10.0 * lam, 1e-8 * float(np.abs(np.diag(H)).max()))
        step = -np.linalg.solve(chol.T, np.linalg.solve(chol, g))
        slope = float(g @ step)
        t = 1.0
        while True:  # Armijo backtracking; the full step is taken near the optimum
            f2, g2, aux2 = _loss_grad(p, theta + t * step, X, y, weight, U, w0)
            if f2 <= f + 1e-4 * t * slope or t < 1e-8:
                break
            t *= 0.5
        if t < 1e-8:
            break
        theta, f, g, aux = theta + t * step, f2, g2, aux2
        it += 1
    if np.abs(g).max() > gtol * 100:  # did not converge: let L-BFGS-B finish from here
        res = minimize(model.loss_and_grad, theta, args=(X, y, weight, U, w0, b0), jac=True, method="L-BFGS-B",
                       options={"maxiter": p.max_iter, "gtol": p.tol})
        theta, it = res.x, it + int(res.nit)
    model.n_iter_ = it
    ws, bs = theta[:-1], float(theta[-1])
    model.coef_ = ws / model.scale_
    model.intercept_ = bs - float(np.dot(model.coef_, model.mean_))
    return model


@dataclass
class FastOptions:
    in_memory: bool = True  # float32 features of the training micrographs in RAM
    newton: bool = True  # newton_fit instead of L-BFGS-B
    warm_start: bool = True  # start from the last round's model
    topk: bool = True  # entropy_peaks / peaks(max_peaks=k)
    one_blas_thread: bool = False  # only matters for L-BFGS-B (two OpenBLAS pools spin against each other)


class FastLearner(ActiveLearner):
    """ActiveLearner with the recommended changes (see the module docstring)."""

    def __init__(self, items: list[Item], radius_px: float, recipe: Recipe, feature_model: str = "resnet16_u32",
                 seed: int = 0, options: FastOptions | None = None):
        self.options = options or FastOptions()
        if self.options.in_memory:
            items = [Item(it.mic, it.fmap.in_memory()) for it in items]
        super().__init__(items, radius_px, recipe, feature_model, seed)
        self.warm_from: BLR | None = None  # the model the next fit starts from (the last round's)

    def fit(self, labels: list[Label]) -> BLR:
        t = time.perf_counter()
        r, o = self.recipe, self.options
        start = self.warm_from if o.warm_start else None
        with blas_threads(1 if o.one_blas_thread else None):
            X, y, w = self.training_set(labels)
            model = BLR(l2=r.l2, pi=r.pi, pi_weight=r.pi_weight, standardise=r.standardise)
            if X.shape[0] == 0 and r.prior == "pretrained":
                w0, b0 = head_of(self.feature_model)
                model.coef_, model.intercept_ = w0, b0
                model.prior_coef_, model.prior_intercept_ = w0, b0
            elif o.newton:
                newton_fit(model, X, y, w, self._unlabelled, self.prior(), start)
            else:
                if start is not None:
                    model.coef_, model.intercept_ = start.coef_, start.intercept_
                model.fit(X, y, w, unlabelled=self._unlabelled, prior=self.prior(), warm_start=start is not None)
        model.meta = {"feature_model": self.feature_model, "recipe": r.to_dict(), "radius_px": self.radius_px}
        self.model = model
        self.warm_from = model
        self._logits = {}
        self.last_fit_s = time.perf_counter() - t
        return model

    def _peaks_of(self, kind: str, name: str, k: int, exclude):
        rw = self.radius_w(name)
        if not self.options.topk:
            values = {"entropy": lambda: entropy(self.logits(name)), "logit": lambda: self.logits(name),
                      "-logit": lambda: -self.logits(name)}[kind]()
            return peaks(values, rw, exclude=exclude)
        if kind == "entropy":
            return entropy_peaks(self.logits(name), rw, k, exclude=exclude)
        values = self.logits(name) if kind == "logit" else -self.logits(name)
        return peaks(values, rw, exclude=exclude, max_peaks=k)

    def _candidates_k(self, kind: str, labels: list[Label], k: int):
        """``_candidates`` keeping only each micrograph's k best peaks: ``_take`` never uses more."""
        idx = self._label_index(labels)
        out = {}
        for name, it in self.items.items():
            iy, ix, v = self._peaks_of(kind, name, k, idx.get(name))
            keep = np.isfinite(v)
            iy, ix, v = iy[keep], ix[keep], v[keep]
            x, y = it.mic.frame.to_original(ix, iy)
            p = sigmoid(self.logits(name)[iy, ix])
            out[name] = list(zip(v.tolist(), x.tolist(), y.tolist(), p.tolist()))
        return out

    def propose(self, k: int, labels: list[Label]) -> list[Proposal]:
        r = self.recipe
        n_conf = int(round(k * r.confident_fraction)) if self.model is not None else 0
        unc = self._take(self._candidates_k("entropy", labels, k - n_conf), k - n_conf, "uncertain", r.spread)
        return unc + self._confident(n_conf, labels + [Label(p.micrograph, p.x, p.y, 0) for p in unc])

    def _confident(self, k: int, labels: list[Label]) -> list[Proposal]:
        if k <= 0:
            return []
        n_pos = (k + 1) // 2
        pos = self._take(self._candidates_k("logit", labels, n_pos), n_pos, "positive", "micrographs")
        neg = self._take(self._candidates_k("-logit", labels, k - n_pos), k - n_pos, "negative", "micrographs")
        return pos + neg

    def initial_proposals(self, k: int, labels: list[Label] | None = None) -> list[Proposal]:
        labels = labels or []
        n_pos = max(1, k // 5) if k >= 3 else 0
        n_neg = max(1, k // 5) if k >= 3 else 0
        saved, self.model = self.model, None
        try:
            m = k - n_pos - n_neg
            props = self._take(self._candidates_k("entropy", labels, m), m, "uncertain", "micrographs")
            taken = labels + [Label(p.micrograph, p.x, p.y, 0) for p in props]
            props += self._confident(n_pos + n_neg, taken)
        finally:
            self.model = saved
        return props


# --------------------------------------------------------------------------------------------
# seed: the published round, re-implemented faithfully (torch autograd, every pixel)
# --------------------------------------------------------------------------------------------
class SeedRound:
    """The seed's round: every pixel of the training micrographs in one float32 torch matrix."""

    def __init__(self, items: list[Item], radius_px: float, recipe: Recipe):
        import torch

        self.torch = torch
        self.items = items
        self.radius_px = radius_px
        self.recipe = recipe
        feats = [torch.from_numpy(np.asarray(it.fmap.features, dtype=np.float32).reshape(it.fmap.features.shape[0], -1).T.copy())
                 for it in items]
        self.all_pixels = torch.cat(feats)  # (sum H*W, C): the expectation term's input
        self.learner = ActiveLearner(items, radius_px, recipe.with_(pi_weight=0.0))  # only for its label geometry
        self.coef = None

    def fit(self, labels: list[Label]):
        torch = self.torch
        r = self.recipe
        X, y, w = self.learner.training_set(labels)
        Xt, yt, wt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float32)), torch.from_numpy(w.astype(np.float32))
        U = self.all_pixels
        logit_pi = float(np.log(r.pi) - np.log1p(-r.pi))

        def loss(theta):
            wv, b = theta[:-1], theta[-1]
            z = Xt @ wv + b
            bce = torch.nn.functional.binary_cross_entropy_with_logits(z, yt, weight=wt, reduction="sum")
            m = torch.sigmoid(U @ wv + b).mean().clamp(1e-12, 1 - 1e-12)
            g = torch.log(m) - torch.log1p(-m) - logit_pi
            total = bce + 0.5 * r.l2 * (wv @ wv) + r.pi_weight * g * g
            return total / max(float(wt.sum()), 1.0)

        def fun(x):
            theta = torch.tensor(x, dtype=torch.float32, requires_grad=True)
            val = loss(theta)
            val.backward()
            return float(val.detach()), theta.grad.numpy().astype(np.float64)

        d = X.shape[1]
        res = minimize(fun, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 200, "gtol": 1e-6})
        self.coef = res.x
        self.nit = int(res.nit)

    def propose(self, k: int, labels: list[Label]) -> list[Proposal]:
        torch = self.torch
        wv = torch.from_numpy(self.coef[:-1].astype(np.float32))
        b = float(self.coef[-1])
        cands = []
        start = 0
        for it in self.items:
            ny, nx = it.fmap.shape
            z = (self.all_pixels[start : start + ny * nx] @ wv + b).numpy().reshape(ny, nx)
            start += ny * nx
            h = entropy(z)
            sel = [l for l in labels if l.micrograph == it.mic.name]
            ex = None
            if sel:
                ix, iy = it.mic.frame.to_working_index([l.x for l in sel], [l.y for l in sel])
                ex = (iy, ix)
            iy, ix, v = peaks(h, it.mic.frame.radius_to_working(self.radius_px), exclude=ex)
            x, y = it.mic.frame.to_original(ix, iy)
            cands += [(float(s), it.mic.name, float(a), float(c), float(sigmoid(z[j, i])))
                      for s, a, c, j, i in zip(v, x, y, iy, ix)]
        cands.sort(key=lambda c: -c[0])
        return [Proposal(m, x, y, p, "uncertain") for _, m, x, y, p in cands[:k]]


# --------------------------------------------------------------------------------------------
class ConvergedLearner(ActiveLearner):
    """The current learner with L-BFGS-B run to convergence: the reference answer of the loss."""

    def fit(self, labels: list[Label]) -> BLR:
        import cryoal_ext.model as model_module

        original = model_module.minimize

        def tight(*args, **kw):
            return original(*args, **{**kw, "options": {"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-16}})

        model_module.minimize = tight
        try:
            return super().fit(labels)
        finally:
            model_module.minimize = original


def key(props: list[Proposal]) -> list[tuple[str, float, float]]:
    return [(p.micrograph, round(p.x, 3), round(p.y, 3)) for p in props]


def ap_of(model: BLR, evals: list[Item], truth, radius: float) -> float:
    picks = [extract_picks(it.mic.name, model.logit_map(it.fmap.features), it.mic.frame, radius) for it in evals]
    return round(evaluate({p.name: (p.x, p.y, p.score) for p in picks}, truth, radius).ap, 4)


def trajectory(learner, oracle: Oracle, n_labels: int, batch: int):
    """Drive a learner from 0 to ``n_labels`` labels: the label list before each round, and its proposals."""
    labels: list[Label] = []
    states = []
    if learner.recipe.pseudo_labels > 0:
        learner.fit(labels)
    rnd = 0
    while len(labels) < n_labels:
        k = min(batch, n_labels - len(labels))
        props = learner.initial_proposals(k, labels) if learner.model is None else learner.propose(k, labels)
        labels = labels + oracle.answer(props, rnd)
        learner.fit(labels)
        states.append(labels)
        rnd += 1
    return states


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micrographs", default=str(DATA / "empiar10028" / "micrographs"))
    ap.add_argument("--truth", default=str(DATA / "empiar10028" / "particles.txt"))
    ap.add_argument("--radius-px", type=float, default=28.0)
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--labels", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--split-seed", type=int, default=0, help="which 2 micrographs train (as cryoal benchmark)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed-repeats", type=int, default=3)
    ap.add_argument("--ablation", action="store_true", help="also time the fast round with each change turned off")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "round_latency.json"))
    a = ap.parse_args()

    import torch

    import cryoal_ext.features as features_module

    s = BenchmarkSettings(micrographs=a.micrographs, truth=a.truth, radius_px=a.radius_px, cache_dir=a.cache_dir)
    t = time.perf_counter()
    data = load_data(s, progress=lambda *_: None)
    load_s = time.perf_counter() - t
    names = sorted(data["items"])
    rng = np.random.default_rng(a.split_seed)
    train = sorted(rng.choice(names, size=2, replace=False).tolist())
    evals = [data["items"][n] for n in names if n not in train]
    items = [data["items"][n] for n in train]
    truth = data["truth"]
    recipe = get_recipe(a.recipe)
    print(f"features: {len(names)} micrographs from the cache in {load_s:.1f} s ({data['cache_hits']} hits); "
          f"train {train}, recipe {recipe.name}", flush=True)

    # nothing below may run the backbone: the round works on cached features only
    def no_backbone(*_a, **_k):
        raise AssertionError("feature recomputation during a round")

    features_module.compute_features = no_backbone

    # 1. same answer: every round state of the current learner's trajectory, same labels for all
    cur = ActiveLearner(items, a.radius_px, recipe, seed=0)
    conv = ConvergedLearner(items, a.radius_px, recipe, seed=0)
    t = time.perf_counter()
    fast = FastLearner(items, a.radius_px, recipe, seed=0)
    setup_fast_s = time.perf_counter() - t
    states = trajectory(cur, Oracle(truth, a.radius_px), a.labels, a.batch)
    rows = []
    prev_fast: BLR | None = None
    for i, labels in enumerate(states):
        cur.fit(labels)
        conv.fit(labels)
        fast.warm_from = prev_fast
        fast.fit(labels)
        prev_fast = fast.model
        pc, pr, pf = key(cur.propose(a.batch, labels)), key(conv.propose(a.batch, labels)), key(fast.propose(a.batch, labels))
        row = {"labels": len(labels), "fast_eq_converged": pf == pr, "current_eq_converged": pc == pr,
               "fast_eq_current": pf == pc,
               "max_coef_diff": {"current_vs_converged": float(np.abs(cur.model.coef_ - conv.model.coef_).max()),
                                 "fast_vs_converged": float(np.abs(fast.model.coef_ - conv.model.coef_).max())}}
        if len(labels) in (10, 50, a.labels):
            row["ap"] = {"current": ap_of(cur.model, evals, truth, a.radius_px),
                         "converged": ap_of(conv.model, evals, truth, a.radius_px),
                         "fast": ap_of(fast.model, evals, truth, a.radius_px)}
        rows.append(row)
        print(f"  {len(labels):4d} labels: proposals fast==converged {row['fast_eq_converged']}, "
              f"current==converged {row['current_eq_converged']}, fast==current {row['fast_eq_current']}; "
              f"|dw| current {row['max_coef_diff']['current_vs_converged']:.1e} "
              f"fast {row['max_coef_diff']['fast_vs_converged']:.1e} {row.get('ap', '')}", flush=True)
    ap_rows = [r["ap"] for r in rows if "ap" in r]
    max_ap_diff = max(max(abs(r["fast"] - r["current"]), abs(r["fast"] - r["converged"])) for r in ap_rows)

    # 2. the round at `labels` labels, timed side by side, interleaved
    labels = states[-1]
    fast.warm_from = None
    fast.fit(states[-2])
    warm = fast.model

    def round_current():
        cur.fit(labels)
        return cur.propose(a.batch, labels)

    def round_fast():
        fast.warm_from = warm  # every repeat starts from the previous round's model, as in use
        fast.fit(labels)
        return fast.propose(a.batch, labels)

    seed = SeedRound(items, a.radius_px, get_recipe("seed"))

    def round_seed():
        seed.fit(labels)
        return seed.propose(a.batch, labels)

    t_cur, t_fast, t_seed = [], [], []
    for i in range(max(a.repeats, a.seed_repeats)):
        if i < a.repeats:
            t_cur += timed(round_current, 1)
            t_fast += timed(round_fast, 1)
        if i < a.seed_repeats:
            t_seed += timed(round_seed, 1)
    parts = {}
    for name, lr in (("current", cur), ("fast", fast)):
        fast.warm_from = warm
        t0 = time.perf_counter()
        lr.fit(labels)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lr.propose(a.batch, labels)
        parts[name] = {"fit_s": round(fit_s, 4), "propose_s": round(time.perf_counter() - t0, 4),
                       "fit_iterations": lr.model.n_iter_}
    ablation = {}
    if a.ablation:
        for off in ("in_memory", "newton", "warm_start", "topk"):
            opts = FastOptions(**{off: False})
            fl = FastLearner(items, a.radius_px, recipe, seed=0, options=opts)
            fl.fit(states[-2])
            w_ = fl.model

            def rnd(fl=fl, w_=w_):
                fl.warm_from = w_
                fl.fit(labels)
                fl.propose(a.batch, labels)

            ablation[f"without_{off}"] = round(statistics.median(timed(rnd, max(3, a.repeats // 2))), 4)
        fl = FastLearner(items, a.radius_px, recipe, seed=0, options=FastOptions(newton=False, one_blas_thread=True))
        fl.fit(states[-2])
        w_ = fl.model

        def rnd1(fl=fl, w_=w_):
            fl.warm_from = w_
            fl.fit(labels)
            fl.propose(a.batch, labels)

        ablation["lbfgs_one_blas_thread_instead_of_newton"] = round(statistics.median(timed(rnd1, max(3, a.repeats // 2))), 4)

    med = {k: statistics.median(v) for k, v in (("seed", t_seed), ("current", t_cur), ("fast", t_fast))}
    n_same = sum(r["fast_eq_converged"] for r in rows)
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "note": "2 CPU cores shared with other jobs; compare ratios within one run"},
        "setup": {"train": train, "recipe": recipe.name, "labels": len(labels), "batch": a.batch,
                  "radius_px": a.radius_px, "feature_cache_hits": data["cache_hits"],
                  "features_recomputed_during_rounds": 0, "fast_learner_setup_s": round(setup_fast_s, 3)},
        "same_answer": {"per_round": rows, "fast_eq_converged_rounds": f"{n_same}/{len(rows)}",
                        "current_eq_converged_rounds": f"{sum(r['current_eq_converged'] for r in rows)}/{len(rows)}",
                        "fast_eq_current_rounds": f"{sum(r['fast_eq_current'] for r in rows)}/{len(rows)}",
                        "max_ap_diff": round(max_ap_diff, 4)},
        "round_s": {k: {"median": round(med[k], 4), "all": [round(x, 4) for x in v]}
                    for k, v in (("seed", t_seed), ("current", t_cur), ("fast", t_fast))},
        "parts_s": parts,
        "speedup": {"fast_vs_seed": round(med["seed"] / med["fast"], 1),
                    "fast_vs_current": round(med["current"] / med["fast"], 1),
                    "current_vs_seed": round(med["seed"] / med["current"], 1)},
        "seed_fit_iterations": seed.nit,
    }
    if ablation:
        result["ablation_median_s"] = ablation
    write_json(a.out, result)
    print(json.dumps({k: result[k] for k in ("round_s", "parts_s", "speedup")}, indent=1))
    print("same answer:", {k: v for k, v in result["same_answer"].items() if k != "per_round"})
    if ablation:
        print("ablation (fast round with one change off):", ablation)
    ok = (med["fast"] <= 0.25 and med["seed"] / med["fast"] >= 30 and n_same == len(rows) and max_ap_diff <= 0.005)
    print(f"target (<= 0.25 s, >= 30x the seed round, same proposals, AP within 0.005): {'MET' if ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
