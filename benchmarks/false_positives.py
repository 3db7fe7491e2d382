"""What are the confident false positives? (issue 16, item 3: why the expected count overshoots)

Why: at 100 labels the picks' calibrated probabilities add up to 1.4x the expert count, and the
loss is in picks the model is sure of (p > 0.9, a fifth to a quarter of them unmatched).  The expert
picks are CryoPPP's, which keep only particles that survived 2D classification (../shared/data
README), so an unmatched pick is not necessarily junk.  This sorts the confident unmatched picks by
their distance d to the nearest expert pick (R the particle radius, the matching radius):

* ``d <= R``: a second pick on a particle already matched (NMS kept two maxima on one particle);
* ``R < d <= 2R``: beside a particle (off-centre, or a touching neighbour the experts did not keep);
* ``d > 2R``: away from every expert pick (unlabelled particle, or junk / carbon / ice), and of
  those how many are within R of the image edge (or of the ignored border band), a particle cut by it;

and what share of the probability mass above the expert count each class carries, and draws a
gallery (working-scale image, 8 A/px) of confident true positives and of confident far unmatched
picks, to look at.  The loop is `cryoal benchmark`'s (default recipe, careful oracle, batch 10,
one-view `resnet16_u32`, every split, the package's calibrated probabilities at 100 labels).

    CRYOAL_CACHE=/work/cache OMP_NUM_THREADS=1 python benchmarks/false_positives.py --datasets 10028,10017
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from cryoal_ext.atomic import atomic_path, write_json
from cryoal_ext.benchmark import BenchmarkSettings, load_data
from cryoal_ext.coords import inside_border
from cryoal_ext.metrics import match
from cryoal_ext.recipes import get_recipe

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import DATASETS, every_split  # noqa: E402

CLASSES = ("tp", "dup", "beside", "far")


def crop(img: np.ndarray, cx: int, cy: int, h: int) -> np.ndarray:
    """A (2h+1)^2 window of ``img`` centred on (cx, cy); off-image pixels are NaN."""
    out = np.full((2 * h + 1, 2 * h + 1), np.nan)
    y0, y1, x0, x1 = max(cy - h, 0), min(cy + h + 1, img.shape[0]), max(cx - h, 0), min(cx + h + 1, img.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - (cy - h):y1 - (cy - h), x0 - (cx - h):x1 - (cx - h)] = img[y0:y1, x0:x1]
    return out


def contrast(window: np.ndarray, rw: float) -> float:
    """Mean of the ring R..1.5R minus the mean of the disc < R (working image): > 0 for a dark particle."""
    h = window.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    r = np.hypot(xx, yy)
    return float(np.nanmean(window[(r >= rw) & (r < 1.5 * rw)]) - np.nanmean(window[r < rw]))


def classify(learner, data, s, evals) -> tuple[list[dict], int]:
    """Every pick on the evaluation micrographs (probability, class, distance, where); expert picks off the edge."""
    out, inner = [], 0
    for n in evals:
        it = data["items"][n]
        p = learner.picks(it.mic, it.fmap)
        x, y, sc = np.asarray(p.x, float), np.asarray(p.y, float), np.asarray(p.score, float)
        tx, ty = (np.asarray(v, float) for v in data["truth"].get(n, (np.empty(0), np.empty(0))))
        if s.border_px > 0:
            kp = inside_border(x, y, data["shapes"][n], s.border_px)
            kt = inside_border(tx, ty, data["shapes"][n], s.border_px)
            x, y, sc, tx, ty = x[kp], y[kp], sc[kp], tx[kt], ty[kt]
        tp = match(x, y, tx, ty, s.radius_px)
        d = cKDTree(np.c_[tx, ty]).query(np.c_[x, y])[0] if tx.size else np.full(x.size, np.inf)
        ny, nx = data["shapes"][n]
        edge = np.minimum.reduce([x, y, nx - 1 - x, ny - 1 - y]) < s.border_px + s.radius_px
        inner += int(np.sum(np.minimum.reduce([tx, ty, nx - 1 - tx, ny - 1 - ty]) >= s.border_px + s.radius_px))
        fr, img = it.mic.frame, it.mic.image
        rw = fr.radius_to_working(s.radius_px)
        wx, wy = fr.to_working(x, y)
        con = [contrast(crop(img, int(round(a)), int(round(b)), int(np.ceil(1.5 * rw))), rw) for a, b in zip(wx, wy)]
        for i in range(x.size):
            c = "tp" if tp[i] else "dup" if d[i] <= s.radius_px else "beside" if d[i] <= 2 * s.radius_px else "far"
            out.append({"mic": n, "x": float(x[i]), "y": float(y[i]), "p": float(sc[i]), "cls": c, "d": float(d[i]),
                        "edge": bool(edge[i]), "contrast": con[i]})
    return out, inner


def tally(picks: list[dict], n_true: int, n_inner: int) -> dict:
    p = np.array([q["p"] for q in picks])
    cls = np.array([q["cls"] for q in picks])
    conf = p > 0.9
    row = {"n_true": n_true, "expected": round(float(p.sum()), 1), "count_ratio": round(float(p.sum()) / n_true, 4)}
    edge = np.array([q["edge"] for q in picks])
    # the same count with a band of one radius more ignored (picks and expert picks), as a box must fit to extract
    row["count_ratio_off_edge_band"] = round(float(p[~edge].sum()) / max(n_inner, 1), 4)
    row["confident_far_at_edge"] = int(np.sum(conf & (cls == "far") & edge))
    row["mass_far_at_edge"] = round(float(p[(cls == "far") & edge].sum()), 1)
    con = np.array([q["contrast"] for q in picks])
    ref = np.nanpercentile(con[conf & (cls == "tp")], 10) if np.any(conf & (cls == "tp")) else np.nan
    for name, sel in (("confident_tp", conf & (cls == "tp")), ("confident_far", conf & (cls == "far")),
                      ("confident_beside", conf & (cls == "beside")), ("rejected", p < 0.5)):
        row[f"contrast_median_{name}"] = round(float(np.nanmedian(con[sel])), 3) if sel.any() else None
        # share at least as contrasted as the least-contrasted tenth of the confident true positives
        row[f"particle_like_{name}"] = round(float(np.mean(con[sel] >= ref)), 3) if sel.any() else None
    for c in CLASSES:
        row[f"mass_{c}"] = round(float(p[cls == c].sum()), 1)
        row[f"confident_{c}"] = int(np.sum(conf & (cls == c)))
    return row


def gallery(picks: list[dict], data, s, path: Path, rng, n_tp: int = 8, n_fp: int = 24) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("confident\ntrue positives", [q for q in picks if q["p"] > 0.9 and q["cls"] == "tp"], n_tp),
              ("confident, > 2R\nfrom every expert pick", [q for q in picks if q["p"] > 0.9 and q["cls"] == "far"], n_fp),
              ("confident, R-2R\nfrom an expert pick", [q for q in picks if q["p"] > 0.9 and q["cls"] == "beside"], n_tp)]
    cols = 8
    chosen_groups = []
    for title, g, k in groups:
        chosen_groups.append((title, [g[i] for i in sorted(rng.choice(len(g), size=min(k, len(g)), replace=False))]
                              if g else []))
    rows = max(sum(-(-len(c) // cols) for _, c in chosen_groups), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.65), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    r = 0
    for title, chosen in chosen_groups:
        for j, q in enumerate(chosen):
            ax = axes[r + j // cols, j % cols]
            it = data["items"][q["mic"]]
            fr = it.mic.frame
            wx, wy = (float(v[0]) for v in fr.to_working(np.array([q["x"]]), np.array([q["y"]])))
            rw = fr.radius_to_working(s.radius_px)
            h = int(np.ceil(3 * rw))
            img = it.mic.image
            lo, hi = np.percentile(img, [1, 99])
            cx, cy = int(round(wx)), int(round(wy))
            ext = (cx - h - 0.5, cx + h + 0.5, cy + h + 0.5, cy - h - 0.5)
            ax.imshow(crop(img, cx, cy, h), cmap="gray", vmin=lo, vmax=hi, extent=ext)  # fixed size, off-image blank
            ax.add_patch(plt.Circle((wx, wy), rw, fill=False, color="yellow", lw=0.9))
            tx, ty = data["truth"].get(q["mic"], (np.empty(0), np.empty(0)))
            ex, ey = fr.to_working(np.asarray(tx, float), np.asarray(ty, float))
            for a_, b_ in zip(ex, ey):
                if abs(a_ - cx) <= h + rw and abs(b_ - cy) <= h + rw:
                    ax.add_patch(plt.Circle((a_, b_), rw, fill=False, color="cyan", lw=0.7, ls="--"))
            ax.set_xlim(ext[0], ext[1])
            ax.set_ylim(ext[2], ext[3])
            ax.set_title(f"p {q['p']:.2f}" + ("" if q["cls"] == "tp" else f", d {q['d'] / s.radius_px:.1f}R"),
                         fontsize=7, pad=2)
            if j % cols == 0:
                ax.set_ylabel(title if j == 0 else "", fontsize=7)
        r += -(-len(chosen) // cols)
    fig.suptitle(f"{path.stem}: yellow = pick, dashed cyan = expert (CryoPPP) picks", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # as every output: whole or not at all, the umask's mode
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def averages(picks: list[dict], data, s, path: Path) -> None:
    """Mean window of each class of picks (all of them, first split): a particle shows as a dark disc."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [("confident true positives", lambda q: q["p"] > 0.9 and q["cls"] == "tp"),
            ("confident, > 2R from\nevery expert pick", lambda q: q["p"] > 0.9 and q["cls"] == "far"),
            ("confident, R-2R from\nan expert pick", lambda q: q["p"] > 0.9 and q["cls"] == "beside"),
            ("picks with p < 0.5\n(rejected)", lambda q: q["p"] < 0.5)]
    means = []
    for title, keep in sets:
        chosen = [q for q in picks if keep(q)]
        wins = []
        for q in chosen:
            it = data["items"][q["mic"]]
            fr = it.mic.frame
            wx, wy = fr.to_working(np.array([q["x"]]), np.array([q["y"]]))
            h = int(np.ceil(3 * fr.radius_to_working(s.radius_px)))
            wins.append(crop(it.mic.image, int(round(float(wx[0]))), int(round(float(wy[0]))), h))
        means.append((title, len(chosen), np.nanmean(np.stack(wins), axis=0) if wins else None))
    shown = [m for _, _, m in means if m is not None]
    lo, hi = (np.nanpercentile(np.stack(shown), [0.5, 99.5]) if shown else (0, 1))  # one grey scale for all
    fig, axes = plt.subplots(1, len(sets), figsize=(2.4 * len(sets), 3.1), squeeze=False)
    for ax, (title, n, m) in zip(axes[0], means):
        ax.set_xticks([])
        ax.set_yticks([])
        if m is not None:
            ax.imshow(m, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{title}\n(mean of {n})", fontsize=8)
    fig.suptitle(f"{path.stem}: mean image of each class of picks (working scale, first split, one grey scale)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    with atomic_path(path) as tmp:  # as every output: whole or not at all, the umask's mode
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="10028,10017")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--feature-model", default="resnet16_u32")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", default="u32")
    a = ap.parse_args()
    recipe = get_recipe("default")
    res = Path(__file__).parent / "results"
    out = {"command": "python benchmarks/false_positives.py " + " ".join(sys.argv[1:]), "results": {}}
    for ds in a.datasets.split(","):
        s = BenchmarkSettings(**DATASETS[ds], budgets=(a.budget,), cache_dir=a.cache_dir,
                              feature_model=a.feature_model, splits="all")
        data = load_data(s, progress=lambda *_: None)
        runs, first = [], None

        def grab(learner, evals, budget, labels, seed):
            picks, inner = classify(learner, data, s, evals)
            return {"picks": picks, "inner": inner}

        for si, seed, r in every_split(s, recipe, [int(x) for x in a.seeds.split(",")], data, extra=grab):
            got = r["active"][-1]["extra"]
            n_true = r["active"][-1]["threshold"]["calibrated"]["n_true"]
            row = {"split": si, "seed": seed, "ap": r["active"][-1]["ap"], **tally(got["picks"], n_true, got["inner"])}
            runs.append(row)
            first = first or got["picks"]
            print(f"{ds} split {si} seed {seed}: " + " ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        tot = {k: float(np.sum([r[k] for r in runs])) for k in runs[0] if k.startswith(("mass_", "confident_"))}
        tot_edge = {k: tot.pop(k) for k in ("confident_far_at_edge", "mass_far_at_edge")}
        nt = float(np.sum([r["n_true"] for r in runs]))
        excess = float(np.sum([r["expected"] for r in runs])) - nt
        summary = {"count_ratio_mean": round(float(np.mean([r["count_ratio"] for r in runs])), 4),
                   "count_ratio_off_edge_band_mean":
                       round(float(np.mean([r["count_ratio_off_edge_band"] for r in runs])), 4),
                   "excess_over_true": round(excess, 1),
                   **{f"share_of_mass_{c}": round(tot[f"mass_{c}"] / max(sum(tot[f"mass_{k}"] for k in CLASSES), 1e-9), 4)
                      for c in CLASSES},
                   **{f"excess_explained_by_{c}": round(tot[f"mass_{c}"] / max(excess, 1e-9), 4)
                      for c in ("dup", "beside", "far")},
                   **{f"confident_{c}": int(tot[f"confident_{c}"]) for c in CLASSES},
                   "confident_far_at_edge": int(tot_edge["confident_far_at_edge"]),
                   **{k: round(float(np.mean([r[k] for r in runs if r[k] is not None])), 3)
                      for k in runs[0] if k.startswith(("contrast_median_", "particle_like_"))},
                   "excess_explained_by_far_at_edge": round(tot_edge["mass_far_at_edge"] / max(excess, 1e-9), 4)}
        out["results"][ds] = {"runs": runs, "summary": summary}
        print(f"{ds} summary: {summary}", flush=True)
        gallery(first, data, s, res / f"false_positives_{ds}_{a.tag}.png", np.random.default_rng(0))
        averages(first, data, s, res / f"false_positives_{ds}_{a.tag}_means.png")
        write_json(res / f"false_positives_{a.tag}.json", out)


if __name__ == "__main__":
    main()
