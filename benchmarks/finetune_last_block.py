"""Issue 16, item 5: fine-tuning Topaz's last backbone block on the answers, against the linear head.

Topaz's ResNet16's last block is one convolution (64 -> 128 channels, 5x5, dilation 4) and a ReLU,
so a feature vector is ReLU(W p + c) with p the 64x5x5 patch of the block's input around the pixel.
With that input cached per micrograph, fine-tuning the block and the head together is a two-layer
model on patches, started from the pretrained W, c and the BLR the loop fitted, and trained on the
loop's own answers with the BLR's loss plus a pull towards the pretrained block:

    (BCE over the training pixels + l2/2 |w - w0|^2 + lam/2 |(W, c) - (W0, c0)|^2
     + pi_weight (logit(mean p_U) - logit(pi))^2) / n,

the same pixels, weights, pseudo-labels, l2, pi as the recipe (``ActiveLearner.training_pixels``).
``lam`` is chosen per budget by 3-fold cross-validation over the answers (held-out log-likelihood),
among a grid that includes lam = inf (the linear head, W frozen): "cv" is what a user would get;
each fixed lam is also scored, to show what the best choice could reach.  The loop, its
proposals, the oracle and the scoring are `cryoal benchmark`'s (`benchmark.run_one`, default
recipe); only the model scored at each budget differs.  An experiment outside the package.

    OMP_NUM_THREADS=1 python benchmarks/finetune_last_block.py --dataset 10028 --seeds 0 --tag u32

Results: benchmarks/results/finetune_last_block_<dataset>_<tag>.json.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402  (the datasets and their radii)

from cryoal_ext.atomic import write_json  # noqa: E402
from cryoal_ext.benchmark import BenchmarkSettings, _evaluate, load_data, run_one, training_splits  # noqa: E402
from cryoal_ext.extract import extract_picks  # noqa: E402
from cryoal_ext.features import head_of, load_pretrained  # noqa: E402
from cryoal_ext.learner import _offsets  # noqa: E402
from cryoal_ext.recipes import get_recipe  # noqa: E402

DILATION, KERNEL = 4, 5
REACH = DILATION * (KERNEL - 1)  # the block's input is this much larger than its output


def block_inputs(items: dict, model_name: str, cache_dir: str) -> dict[str, np.ndarray]:
    """Per micrograph: the last block's input (64, H + 16, W + 16) float16, cached beside the features."""
    import torch
    import torch.nn.functional as F

    net = load_pretrained(model_name, "cpu").features
    out = {}
    for name, it in items.items():
        path = Path(cache_dir) / f"{name}.{it.mic.digest[:16]}.{model_name}.block8_input.npy"
        if not path.exists():
            x = torch.from_numpy(np.ascontiguousarray(it.mic.image, dtype=np.float32))[None, None]
            with torch.inference_mode():
                h = F.pad(x, (net.width // 2,) * 4)
                for layer in list(net.features)[:-1]:
                    h = layer(h)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, h[0].numpy().astype(np.float16))
            os.replace(tmp, path)
        out[name] = np.load(path, mmap_mode="r")
    return out


def patches(h: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """(n, 64*5*5) float32 patches of the block's input for output pixels (iy, ix), in W's (c, i, j) order."""
    k = np.arange(KERNEL) * DILATION
    yy = iy[:, None, None] + k[None, :, None]
    xx = ix[:, None, None] + k[None, None, :]
    p = np.asarray(h[:, yy, xx], dtype=np.float32)  # (64, n, 5, 5)
    return np.ascontiguousarray(p.transpose(1, 0, 2, 3).reshape(iy.size, -1))


class Block:
    """The block + head as torch tensors; ``fit`` minimises the loss above from a given start."""

    def __init__(self, model_name: str):
        conv = load_pretrained(model_name, "cpu").features.features[-1].conv
        self.W0 = conv.weight.detach().reshape(conv.weight.shape[0], -1).float().clone()
        self.c0 = conv.bias.detach().float().clone()
        w0, b0 = head_of(model_name)
        self.w0, self.b0 = w0, b0

    def fit(self, P, y, wt, U, lam: float, l2: float, pi: float, pi_weight: float, start, iters: int = 60):
        import torch

        P, U = torch.from_numpy(P), torch.from_numpy(U)  # float32: the fits are compute-bound, half the time of float64
        y, wt = torch.from_numpy(y).float(), torch.from_numpy(wt).float()
        w = torch.tensor(start[0], dtype=torch.float32, requires_grad=True)
        b = torch.tensor([start[1]], dtype=torch.float32, requires_grad=True)
        W = self.W0.clone().requires_grad_(math.isfinite(lam))
        c = self.c0.clone().requires_grad_(math.isfinite(lam))
        w0 = torch.from_numpy(self.w0).float()
        n = max(float(wt.sum()), 1.0)
        lp = math.log(pi / (1 - pi))
        params = [w, b] + ([W, c] if math.isfinite(lam) else [])
        opt = torch.optim.LBFGS(params, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-7)

        frozen = None if math.isfinite(lam) else (torch.relu(P @ W.T + c), torch.relu(U @ W.T + c))

        def closure():
            opt.zero_grad()
            z = (frozen[0] if frozen else torch.relu(P @ W.T + c)) @ w + b
            loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()
            loss = loss + 0.5 * l2 * ((w - w0) ** 2).sum()
            if math.isfinite(lam):
                loss = loss + 0.5 * lam * (((W - self.W0) ** 2).sum() + ((c - self.c0) ** 2).sum())
            if pi_weight > 0:
                m = torch.sigmoid((frozen[1] if frozen else torch.relu(U @ W.T + c)) @ w + b).mean().clamp(1e-12, 1 - 1e-12)
                loss = loss + pi_weight * (torch.log(m / (1 - m)) - lp) ** 2
            loss = loss / n
            loss.backward()
            return loss

        opt.step(closure)
        return W.detach(), c.detach(), w.detach(), float(b.detach())

    @staticmethod
    def logit_map(h: np.ndarray, fitted) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        W, c, w, b = fitted
        k = W.shape[0]
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(h, dtype=np.float32))[None]
            z = F.relu(F.conv2d(x, W.reshape(k, -1, KERNEL, KERNEL), c, dilation=DILATION))
            return (torch.einsum("kyx,k->yx", z[0], w) + b).numpy()

    @staticmethod
    def logits(P: np.ndarray, fitted) -> np.ndarray:
        import torch

        W, c, w, b = fitted
        return (torch.relu(torch.from_numpy(P) @ W.T + c) @ w + b).double().numpy()


def gather(learner, h_in: dict, labels, rng, n_unlabelled: int):
    """Patches, targets, weights and label ids (-1: a pseudo-label) of the fit's pixels, and an unlabelled sample."""
    real, pseudo = learner.training_pixels(labels)
    P, y, wt, gid, next_id = [], [], [], [], 0
    for is_real, blocks in ((True, real), (False, pseudo)):
        for name, iy, ix, t, w in blocks:
            P.append(patches(h_in[name], iy, ix))
            y.append(t)
            wt.append(w)
            if is_real:  # a label's pixels are consecutive, its disc's size apart (learner.training_pixels)
                per = _offsets(learner.recipe, learner.radius_w(name))[0].size
                gid.append(next_id + np.arange(iy.size) // per)
                next_id += iy.size // per
            else:
                gid.append(np.full(iy.size, -1))
    names = list(learner.items)
    per_mic = max(1, n_unlabelled // len(names))
    U = []
    for name in names:
        ny, nx = learner.items[name].fmap.shape
        flat = rng.choice(ny * nx, size=per_mic, replace=False)
        U.append(patches(h_in[name], *np.divmod(flat, nx)))
    return np.concatenate(P), np.concatenate(y), np.concatenate(wt), np.concatenate(gid), np.concatenate(U)


def choose_lam(block: Block, data, grid, l2, pi, pi_weight, folds: int, rng) -> tuple[float, dict]:
    """The lam whose fits on the other folds give the held-out answers the highest log-likelihood."""
    P, y, wt, gid, U = data
    labels = np.unique(gid[gid >= 0])
    fold_of = dict(zip(rng.permutation(labels), np.arange(labels.size) % folds))
    f = np.array([fold_of.get(g, -1) for g in gid])
    ll = {}
    for lam in grid:
        total = 0.0
        for k in range(folds):
            tr, te = f != k, f == k
            if not te.any():
                continue
            fitted = block.fit(P[tr], y[tr], wt[tr], U, lam, l2, pi, pi_weight, (block.w0, block.b0))
            z = block.logits(P[te], fitted)
            total += float(np.sum(wt[te] * -(np.logaddexp(0, -z) * y[te] + np.logaddexp(0, z) * (1 - y[te]))))
        ll[lam] = total
    best = max(grid, key=lambda g: ll[g])
    return best, {str(k): round(v, 3) for k, v in ll.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="10028")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--budgets", default="25,100")
    ap.add_argument("--grid", default="inf,1000,100,10", help="lam values; inf = the linear head")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--unlabelled", type=int, default=1000, help="pixels for the expectation term")
    ap.add_argument("--feature-model", default="resnet16_u32")
    ap.add_argument("--max-splits", type=int, default=0, help="only the first N splits")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", default="run")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    budgets = tuple(int(b) for b in a.budgets.split(","))
    grid = [float(g) for g in a.grid.split(",")]
    s = BenchmarkSettings(**A.DATASETS[a.dataset], budgets=budgets, batch=10, oracle="careful",
                          cache_dir=a.cache_dir, feature_model=a.feature_model, splits="all", calibrate=False)
    data = load_data(s, progress=lambda *_: None)
    items = data["items"]
    h_in = block_inputs(items, a.feature_model, a.cache_dir)
    block = Block(a.feature_model)
    recipe = get_recipe("default")
    out = {"command": "python benchmarks/finetune_last_block.py " + " ".join(sys.argv[1:]), "grid": a.grid, "runs": []}
    path = Path(__file__).resolve().parent / "results" / f"finetune_last_block_{a.dataset}_{a.tag}.json"
    splits = training_splits(sorted(items), s)
    splits = splits[: a.max_splits] if a.max_splits else splits
    for si, train in enumerate(splits):
        for seed in seeds:
            labels_at: dict = {}
            rng = np.random.default_rng(1000 + seed)

            def extra(learner, evals, budget):
                t = time.perf_counter()
                d = gather(learner, h_in, labels_at[budget], rng, a.unlabelled)
                r = learner.recipe
                lam, ll = choose_lam(block, d, grid, r.l2, learner.pi(), r.pi_weight, a.folds, rng)
                start = (learner.model.coef_, learner.model.intercept_)
                res = {"cv_lam": lam, "cv_loglik": ll}
                for g in grid:
                    if not math.isfinite(g):
                        continue
                    fitted = block.fit(d[0], d[1], d[2], d[4], g, r.l2, learner.pi(), r.pi_weight, start)
                    picks = [extract_picks(n, block.logit_map(h_in[n], fitted)[:items[n].fmap.shape[0],
                                                                                :items[n].fmap.shape[1]],
                                           items[n].mic.frame, s.radius_px) for n in evals]
                    res[f"ap_lam{g:g}"] = round(_evaluate(picks, data["truth"], s, data["shapes"]).ap, 4)
                res["seconds"] = round(time.perf_counter() - t, 1)
                return res

            rec = run_one(s, recipe, seed, data, progress=lambda *_: None, train=train, extra=extra,
                          labels_at=labels_at)
            for b in rec["active"]:
                e = b["extra"]
                e["ap_cv"] = b["ap"] if not math.isfinite(e["cv_lam"]) else e[f"ap_lam{e['cv_lam']:g}"]
            rec["split"] = si
            out["runs"].append(rec)
            print(f"split {si} seed {seed} train {train}: baseline {rec['baseline']['ap']:.3f} "
                  + "  ".join(f"@{b['labels']} linear {b['ap']:.3f} cv {b['extra']['ap_cv']:.3f} (lam {b['extra']['cv_lam']:g}) "
                              + " ".join(f"{k[6:]}:{v:.3f}" for k, v in b["extra"].items() if k.startswith("ap_lam"))
                              + f" [{b['extra']['seconds']:.0f} s]" for b in rec["active"]), flush=True)
            write_json(path, {**out, "summary": summarise(out["runs"], grid)})


def summarise(runs: list[dict], grid) -> dict:
    """Per budget: mean and worst split of the linear head, the cv choice and each fixed lam; cv minus linear."""
    out = {}
    for i, b in enumerate(runs[0]["active"]):
        cols = {"linear": [r["active"][i]["ap"] for r in runs], "cv": [r["active"][i]["extra"]["ap_cv"] for r in runs]}
        for g in grid:
            if math.isfinite(g):
                cols[f"lam{g:g}"] = [r["active"][i]["extra"][f"ap_lam{g:g}"] for r in runs]
        cell = {}
        for k, v in cols.items():
            by_split: dict = {}
            for r, x in zip(runs, v):
                by_split.setdefault(r["split"], []).append(x)
            cell[k] = {"mean": round(float(np.mean(v)), 4), "worst_split": round(float(min(np.mean(x) for x in by_split.values())), 4)}
        diff = np.array(cols["cv"]) - np.array(cols["linear"])
        cell["cv_minus_linear"] = {"mean": round(float(diff.mean()), 4), "min": round(float(diff.min()), 4),
                                   "max": round(float(diff.max()), 4), "better": int((diff > 0).sum()), "runs": len(runs)}
        cell["cv_lams"] = [r["active"][i]["extra"]["cv_lam"] for r in runs]
        out[str(b["labels"])] = cell
    return out


if __name__ == "__main__":
    main()
