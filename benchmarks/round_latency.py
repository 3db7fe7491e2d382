"""Round latency (issue 6, target 1): our round, optimised, vs the current round and the seed's round.

Three implementations of one active-learning round (fit on the labels, entropy, proposals), timed
side by side in one process on the same cached features, 2 training micrographs, 100 labels:

* ``seed``: a faithful re-implementation of the published round (the ``seed`` recipe: zero prior,
  3x3-pixel labels, 100 pseudo-labels): the loss is written with torch tensors and differentiated
  by autograd, its expectation term runs over EVERY pixel of the training micrographs, L-BFGS
  drives it, then the entropy of every pixel and a full greedy NMS give the proposals.
* ``current``: ``ActiveLearner.fit`` + ``propose`` as the package runs them (warm-started from
  its own last fit).
* ``fast``: the same learner (``FastLearner``), restarted every repeat from the previous round's
  model, with each speed-up switchable for ``--ablation``: ``FeatureMap.in_memory`` (float32
  features of the training micrographs in RAM), the Newton solver (exact Hessian, converged to
  max|grad| < 1e-10), the warm start, and ``entropy_peaks`` / ``peaks(max_peaks=k)`` (only the k
  best peaks are needed, computed exactly).  These changes were first prototyped here and
  proposed as ``benchmarks/proposed_learner_model.diff``; they have since landed in the package.

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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from cryoal_ext.acquisition import Proposal, entropy, peaks
from cryoal_ext.atomic import write_json
from cryoal_ext.calibration import of
from cryoal_ext.benchmark import BenchmarkSettings, load_data
from cryoal_ext.extract import extract_picks, sigmoid
from cryoal_ext.labels import Label
from cryoal_ext.learner import ActiveLearner, Item
from cryoal_ext.metrics import evaluate
from cryoal_ext.model import BLR
from cryoal_ext.oracle import Oracle
from cryoal_ext.recipes import Recipe, get_recipe
from cryoal_ext.session import Session
from cryoal_ext.workflow import labelling_round

DATA = Path(os.environ.get("CRYOAL_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --------------------------------------------------------------------------------------------
# fast: the package learner, each speed-up switchable
# --------------------------------------------------------------------------------------------
@dataclass
class FastOptions:
    in_memory: bool = True  # float32 features of the training micrographs in RAM
    newton: bool = True  # Newton (exact Hessian) instead of L-BFGS-B
    warm_start: bool = True  # start from the last round's model
    topk: bool = True  # entropy_peaks / peaks(max_peaks=k)


class FastLearner(ActiveLearner):
    """The package's learner with each speed-up switchable, for the ablation.

    With the default options it is exactly ``ActiveLearner`` (the prototype that was
    ``proposed_learner_model.diff`` has landed in cryoal_ext/learner.py and model.py).
    ``warm_from`` is the model the next fit starts from, so a timed round can restart from the
    same previous round every repeat.
    """

    def __init__(self, items: list[Item], radius_px: float, recipe: Recipe, feature_model: str = "resnet16_u32",
                 seed: int = 0, options: FastOptions | None = None):
        self.options = o = options or FastOptions()
        self.solver = "newton" if o.newton else "lbfgs"
        self.warm_start, self.top_k = o.warm_start, o.topk
        super().__init__(items, radius_px, recipe, feature_model, seed, in_memory=o.in_memory)
        self.warm_from: BLR | None = None

    def fit(self, labels: list[Label]) -> BLR:
        model = super().fit(labels, start=self.warm_from)
        self.warm_from = model
        return model


# --------------------------------------------------------------------------------------------
# seed: the published round, re-implemented as the reference
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


def trajectory(learner, oracle: Oracle, n_labels: int, batch: int, asked: list | None = None):
    """Drive a learner from 0 to ``n_labels`` labels: the label list before each round (``asked``: gets
    each round's proposals, audits included)."""
    labels: list[Label] = []
    states = []
    if learner.recipe.pseudo_labels > 0:
        learner.fit(labels)
    rnd = 0
    while len(labels) < n_labels:
        k = min(batch, n_labels - len(labels))
        props = learner.initial_proposals(k, labels) if learner.model is None else learner.propose(k, labels)
        labels = labels + oracle.answer(props, rnd)
        if asked is not None:
            asked.append(props)
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
    asked: list[list[Proposal]] = []
    states = trajectory(cur, Oracle(truth, a.radius_px), a.labels, a.batch, asked)
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
    # 3. the round as every front end runs it (workflow.labelling_round): the fit, the calibration on the
    # held-out answers and the audits (one refit per fold), the proposals with the recipe's audits, the
    # model and the proposals saved; on a session holding the trajectory's labels and proposals
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(Path(tmp) / "session")
        session.labels.add(labels)
        for r, props in enumerate(asked):
            session.save_proposals(r, props)
        session.save_state(round=len(asked))
        t_front = timed(lambda: labelling_round(session, items, recipe, a.radius_px, a.batch, s.feature_model),
                        a.repeats)
        cal = of(BLR.load(session.model_path))
    n_audits = sum(p.kind == "audit" for props in asked for p in props)

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
        "front_end_round_s": {"median": round(statistics.median(t_front), 4), "all": [round(x, 4) for x in t_front],
                              "what": "workflow.labelling_round: fit + calibration (held-out refits) + proposals "
                                      "+ saving, as the RELION/cryoSPARC/pipeliner jobs and cryoal round run it",
                              "audits_asked": n_audits, "calibration": cal.to_dict()},
        "parts_s": parts,
        "speedup": {"fast_vs_seed": round(med["seed"] / med["fast"], 1),
                    "fast_vs_current": round(med["current"] / med["fast"], 1),
                    "current_vs_seed": round(med["seed"] / med["current"], 1)},
        "seed_fit_iterations": seed.nit,
    }
    if ablation:
        result["ablation_median_s"] = ablation
    write_json(a.out, result)
    print(json.dumps({k: result[k] for k in ("round_s", "parts_s", "speedup", "front_end_round_s")}, indent=1))
    print("same answer:", {k: v for k, v in result["same_answer"].items() if k != "per_round"})
    if ablation:
        print("ablation (fast round with one change off):", ablation)
    ok = (med["fast"] <= 0.25 and med["seed"] / med["fast"] >= 30 and n_same == len(rows) and max_ap_diff <= 0.005)
    print(f"target (<= 0.25 s, >= 30x the seed round, same proposals, AP within 0.005): {'MET' if ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
