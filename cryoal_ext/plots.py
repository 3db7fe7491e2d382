"""Pictures: pick overlays, score histograms, precision-recall and AP-vs-labels curves (PNG, headless)."""
from __future__ import annotations

import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=os.path.splitext(path)[1][1:] or "png")
    _plt().close(fig)


def plot_pr(evaluations: dict, path: str, title: str = "") -> None:
    """Precision-recall curves, one per named Evaluation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, ev in evaluations.items():
        r, p = ev.curve()
        ax.plot(r, p, label=f"{label} (AP {ev.ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title)
    _save(fig, path)


def plot_benchmark(result: dict, path: str) -> None:
    """AP against number of labels, the pretrained baseline as a line, mean and spread over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    runs = result.get("runs", [result])
    for name in dict.fromkeys(r.get("recipe", "default") for r in runs):
        rs = [r for r in runs if r.get("recipe", "default") == name]
        n = [a["labels"] for a in rs[0]["active"]]
        aps = np.array([[a["ap"] for a in r["active"]] for r in rs if len(r["active"]) == len(n)])
        ax.errorbar(n, aps.mean(0), yerr=aps.std(0) if len(aps) > 1 else None, marker="o", capsize=3, label=name)
        if "ceiling" in rs[0]:
            ax.axhline(np.mean([r["ceiling"]["ap"] for r in rs]), ls=":", lw=1, label=f"{name} ceiling")
    fms = list(dict.fromkeys(r.get("feature_model") for r in runs))
    for i, fm in enumerate(fms):  # the baseline depends on the features, not the recipe
        base = np.mean([r["baseline"]["ap"] for r in runs if r.get("feature_model") == fm])
        ax.axhline(base, color="k", ls=("--", "-.", ":")[i % 3], lw=1, label="Topaz pretrained" + (f" ({fm})" if len(fms) > 1 else ""))
    ax.set_xlabel("labels")
    ax.set_ylabel("average precision")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_overlay(image: np.ndarray, path: str, picks=None, queries=None, labels=None, radius: float = 10.0,
                 title: str = "", scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """Micrograph with picks (blue circles), queries (yellow) and labels (green +, red x).

    Coordinates are original pixels; ``scale`` = (sx, sy) maps them onto ``image`` (working scale).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    lo, hi = np.percentile(image, [1, 99])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="upper")
    sx, sy = scale
    from matplotlib.patches import Circle

    def circles(xs, ys, color, lw=1.0):
        for x, y in zip(xs, ys):
            ax.add_patch(Circle((x / sx, y / sy), radius, fill=False, color=color, lw=lw))

    if picks is not None and len(picks):
        circles(picks[0], picks[1], "#3b82f6")
    if queries is not None and len(queries):
        circles(queries[0], queries[1], "#facc15", 1.5)
    if labels is not None:
        for (x, y, lab) in labels:
            ax.plot(x / sx, y / sy, "+" if lab else "x", color="#22c55e" if lab else "#ef4444", ms=8, mew=2)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_histogram(scores: np.ndarray, path: str, threshold: float | None = None, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(np.asarray(scores), bins=50, range=(0, 1), color="#3b82f6")
    if threshold is not None:
        ax.axvline(threshold, color="r", ls="--", label=f"suggested threshold {threshold:.2f}")
        ax.legend()
    ax.set_xlabel("pick probability")
    ax.set_ylabel("picks")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def _last_budget(runs: list[dict], name: str) -> tuple[list[dict], int]:
    rs = [r for r in runs if r.get("recipe", "default") == name and r["active"]]
    n = max(len(r["active"]) for r in rs)
    return [r for r in rs if len(r["active"]) == n], n - 1


def plot_calibration(result: dict, path: str) -> None:
    """Reliability diagram (pooled picks of every run, largest budget) and expected / true count per run,
    with the range each run gave for its count (why a ratio: the runs' true counts are often alike)."""
    runs = result.get("runs", [result])
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.3))
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls=":")
    n_runs = 1
    for name in dict.fromkeys(r.get("recipe", "default") for r in runs):
        rs, i = _last_budget(runs, name)
        labels_n = rs[0]["active"][i]["labels"]
        for kind, marker in (("raw", "s"), ("calibrated", "o")):
            stats = [r["active"][i]["threshold"][kind] for r in rs if kind in r["active"][i].get("threshold", {})]
            if not stats:
                continue
            n = np.sum([t["reliability"]["n"] for t in stats], axis=0)
            sp = np.sum([t["reliability"]["sum_p"] for t in stats], axis=0)
            st = np.sum([t["reliability"]["sum_tp"] for t in stats], axis=0)
            ok = n >= 5
            ax.plot(sp[ok] / n[ok], st[ok] / n[ok], marker=marker, label=f"{name} {kind} ({labels_n} labels)")
            stats = sorted(stats, key=lambda t: t["expected"] / max(t["n_true"], 1))
            ratio = np.array([t["expected"] / max(t["n_true"], 1) for t in stats])
            x = np.arange(1, ratio.size + 1)
            dots = bx.scatter(x, ratio, marker=marker, s=14, label=f"{name} {kind}", zorder=3)
            if all("expected_low" in t for t in stats):  # the range each run gave (calibration.count_estimate)
                lo = np.array([(t["expected"] - t["expected_low"]) / max(t["n_true"], 1) for t in stats])
                hi = np.array([(t["expected_high"] - t["expected"]) / max(t["n_true"], 1) for t in stats])
                bx.errorbar(x, ratio, yerr=[lo, hi], fmt="none", lw=0.8, alpha=0.6, color=dots.get_facecolor()[0],
                            label=f"{name} {kind}: its {stats[0]['expected_level']:.0%} range")
            n_runs = max(n_runs, ratio.size)
    base = sorted(r["baseline"]["threshold"]["expected"] / max(r["baseline"]["threshold"]["n_true"], 1)
                  for r in runs if "threshold" in r["baseline"])
    if base:
        bx.scatter(np.arange(1, len(base) + 1), base, marker="x", s=14, color="k", label="Topaz pretrained")
    ax.set_xlabel("predicted probability (bin mean)")
    ax.set_ylabel("fraction of picks that are particles")
    ax.set_title("reliability, held-out micrographs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.axhline(1.0, color="k", lw=0.8)
    bx.axhspan(0.85, 1.15, color="0.85", label="within 15%", zorder=0)
    bx.set_xlim(0, n_runs + 1)
    bx.set_xlabel("run (sorted by the ratio)")
    bx.set_ylabel("sum of pick probabilities / true particles")
    bx.set_title("expected / true count, one point per run", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    _save(fig, path)


def plot_fig3(result: dict, path: str) -> None:
    """True and false positives (mean over runs, largest budget): pretrained at its suggested threshold and at
    our recall, and ours at the suggested threshold (the seed paper's Figure 3, measured)."""
    runs = result.get("runs", [result])
    plt = _plt()
    bars: list[tuple[str, float, float]] = []
    base = [r["baseline"]["threshold"] for r in runs if "threshold" in r["baseline"]]
    if base:
        bars.append(("pretrained\nsuggested thr.", np.mean([t["tp"] for t in base]), np.mean([t["fp"] for t in base])))
    for name in dict.fromkeys(r.get("recipe", "default") for r in runs):
        rs, i = _last_budget(runs, name)
        th = [r["active"][i]["threshold"] for r in rs]
        kind = "calibrated" if all("calibrated" in t for t in th) else "raw"
        m = [t["baseline_at_matched_recall"] for t in th]
        bars.append((f"pretrained\nat {name}'s recall", np.mean([t["tp"] for t in m]), np.mean([t["fp"] for t in m])))
        bars.append((f"{name}, {rs[0]['active'][i]['labels']} labels\nsuggested thr.",
                     np.mean([t[kind]["tp"] for t in th]), np.mean([t[kind]["fp"] for t in th])))
    fig, ax = plt.subplots(figsize=(1.9 * len(bars) + 1, 4))
    x = np.arange(len(bars))
    ax.bar(x - 0.2, [b[1] for b in bars], 0.4, label="true positives", color="#22c55e")
    ax.bar(x + 0.2, [b[2] for b in bars], 0.4, label="false positives", color="#ef4444")
    for xi, (_, tp, fp) in zip(x, bars):
        ax.text(xi - 0.2, tp, f"{tp:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(xi + 0.2, fp, f"{fp:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [b[0] for b in bars], fontsize=8)
    ax.set_ylabel(f"picks on the held-out micrographs (mean of {len(runs)} runs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
