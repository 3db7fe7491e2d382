"""Oracle benchmark: the paper's Table 1 protocol on any dataset with ground truth."""
from __future__ import annotations

import itertools
import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import write_json
from .calibration import answers_map, attach, refine_on_audits
from .extract import Picks, extract_picks
from .features import DEFAULT_FEATURE_MODEL, FeatureCache
from .files import by_micrograph, read_coordinates, write_topaz
from .io import list_micrographs, load_micrograph, micrograph_name
from .labels import Label
from .learner import ActiveLearner, Item
from .metrics import evaluate
from .oracle import Oracle
from .recipes import Recipe, get_recipe

log = logging.getLogger("cryoal_ext.benchmark")


@dataclass
class BenchmarkSettings:
    micrographs: str
    truth: str
    radius_px: float
    pixel_size: float | None = None
    border_px: float = 0.0
    train_micrographs: int = 2
    budgets: tuple[int, ...] = (10, 25, 50, 100)
    batch: int = 10
    seeds: tuple[int, ...] = (0,)
    feature_model: str = DEFAULT_FEATURE_MODEL
    working_pixel_size: float = 8.0
    oracle: str = "careful"
    recipes: tuple[str, ...] = ("default",)
    recipe_overrides: dict = field(default_factory=dict)
    ceiling: bool = False
    splits: str = "seed"  # 'seed': the seed draws the training micrographs; 'all': every choice of them x seeds
    calibrate: bool = True  # Platt-scale the logit on held-out answers before counting and thresholding
    # for a recipe with audits: micrographs (of those not trained on) whose picks it audits, out of the evaluation
    audit_micrographs: int = 2  # as workflow.AUDIT_MICROGRAPHS
    cache_dir: str | None = None
    device: str | None = None


def _evaluate(picks: list[Picks], truth, s: BenchmarkSettings, shapes):
    preds = {p.name: (p.x, p.y, p.score) for p in picks}
    return evaluate(preds, truth, s.radius_px, shapes=shapes, border=s.border_px)


def ceiling_labels(items: list[Item], truth: dict, radius_px: float, rng, negatives_per_mic: int = 4000) -> list[Label]:
    """Every true particle of the training micrographs positive; pixels beyond R of all of them negative."""
    labels = []
    for it in items:
        tx, ty = truth.get(it.mic.name, (np.empty(0), np.empty(0)))
        labels += [Label(it.mic.name, float(x), float(y), 1, "truth") for x, y in zip(tx, ty)]
        ny, nx = it.mic.frame.original_shape
        cand = np.c_[rng.uniform(0, nx, negatives_per_mic * 3), rng.uniform(0, ny, negatives_per_mic * 3)]
        if len(tx):
            from scipy.spatial import cKDTree

            d, _ = cKDTree(np.c_[tx, ty]).query(cand)
            cand = cand[d > radius_px]
        labels += [Label(it.mic.name, float(x), float(y), 0, "truth") for x, y in cand[:negatives_per_mic]]
    return labels


def f1_best(ev) -> tuple[float, float]:
    """The best F1 over every threshold of the pooled ranking, and that threshold."""
    if ev.n_true == 0 or ev.tp.size == 0:
        return 0.0, 1.0
    ctp = np.cumsum(ev.tp)
    f1 = 2.0 * ctp / (np.arange(1, ev.tp.size + 1) + ev.n_true)
    k = int(np.argmax(f1))
    return float(f1[k]), float(ev.scores[k])


def threshold_stats(ev, bins: int = 10, cal=None) -> dict:
    """What a user thresholding at the suggested value gets, next to the best threshold; reliability bins.

    ``expected``: the sum of the picks' probabilities, the model's own estimate of the particle count;
    with ``cal`` (the calibration behind the scores) also its range (``expected_low``/``_high``).
    """
    from .workflow import suggest_threshold

    t = suggest_threshold(ev.scores)
    c = ev.counts_at(t)
    f1 = 2 * c["tp"] / max(2 * c["tp"] + c["fp"] + c["fn"], 1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(ev.scores, edges) - 1, 0, bins - 1)
    rel = {"n": np.bincount(which, minlength=bins).tolist(),
           "sum_p": np.round(np.bincount(which, ev.scores, minlength=bins), 3).tolist(),
           "sum_tp": np.bincount(which, ev.tp.astype(float), minlength=bins).astype(int).tolist()}
    best, t_best = f1_best(ev)
    return {"threshold": round(t, 4), "tp": c["tp"], "fp": c["fp"], "precision": round(c["precision"], 4),
            "recall": round(c["recall"], 4), "f1": round(f1, 4), "f1_best": round(best, 4),
            "threshold_best": round(t_best, 4),
            "expected": round(float(ev.scores.sum()), 1), "n_true": ev.n_true, "reliability": rel,
            **(_count_range(ev.scores, cal) if cal is not None else {})}


def _count_range(scores, cal) -> dict:
    from .calibration import count_estimate

    est = count_estimate(scores, cal)
    return {} if est.low is None else {"expected_low": round(est.low, 1), "expected_high": round(est.high, 1),
                                       "expected_level": est.level}


def at_recall(ev, recall: float) -> dict:
    """True and false positives of the shortest prefix of the ranking that reaches ``recall``."""
    ctp = np.cumsum(ev.tp)
    need = int(np.ceil(recall * ev.n_true - 1e-9))
    k = int(np.searchsorted(ctp, need) + 1) if need > 0 and ctp.size and ctp[-1] >= need else int(ev.tp.size)
    tp = int(ctp[k - 1]) if k else 0
    return {"tp": tp, "fp": k - tp, "recall": round(tp / max(ev.n_true, 1), 4), "reached": bool(ctp.size and ctp[-1] >= need)}


def training_splits(names: list[str], s: BenchmarkSettings) -> list[list[str] | None]:
    """``None`` (the seed draws them) or every choice of ``train_micrographs`` training micrographs."""
    if s.splits == "seed":
        return [None]
    if s.splits != "all":
        raise ValueError(f"unknown splits {s.splits!r}; choose seed or all")
    k = min(s.train_micrographs, len(names) - 1)
    return [list(c) for c in itertools.combinations(sorted(names), k)]


def run_one(s: BenchmarkSettings, recipe: Recipe, seed: int, data, progress=print, picks_out: str | None = None,
            train: list[str] | None = None, extra=None, labels_at: dict | None = None,
            audits_at: dict | None = None) -> dict:
    """One seed of one recipe (on ``train``, or micrographs the seed draws): the JSON record of the issue's format.

    ``labels_at``: filled with the answers collected by each budget (for peers trained on the same labels);
    ``audits_at``: with the audit proposals asked by then (for peers calibrated on the same audits).
    ``extra(learner, evals, budget)``: called at each budget with the fitted (calibrated) learner and
    the evaluation micrographs; a dict it returns is kept as that budget's ``extra`` (e.g. the same
    model scored on other features: benchmarks/view_count.py).
    """
    items_all, truth, shapes = data["items"], data["truth"], data["shapes"]
    names = sorted(items_all)
    rng = np.random.default_rng(seed)
    drawn = sorted(rng.choice(names, size=min(s.train_micrographs, len(names) - 1), replace=False).tolist())
    train = sorted(train) if train is not None else drawn
    rest = [n for n in names if n not in train]
    n_aud = min(s.audit_micrographs, len(rest) - 1) if recipe.audits_apart else 0
    audited = sorted(rest[(seed + i) % len(rest)] for i in range(n_aud))  # each seed audits another micrograph
    evals = [n for n in rest if n not in audited]
    t0 = time.perf_counter()
    base_picks = [extract_picks(n, items_all[n].fmap.score, items_all[n].mic.frame, s.radius_px) for n in evals]
    base = _evaluate(base_picks, truth, s, shapes)
    base_thr = threshold_stats(base)
    out_dir = Path(picks_out) if picks_out else None
    if out_dir:
        write_topaz(out_dir / "baseline.txt", base_picks)

    learner = ActiveLearner([items_all[n] for n in train], s.radius_px, recipe, s.feature_model, seed=seed,
                            audit_items=[items_all[n] for n in audited])
    oracle = Oracle(truth, s.radius_px, s.oracle)
    labels: list[Label] = []
    active, round_times, rnd = [], [], 0
    audits: list = []  # the audited picks asked so far (recipe audits), for the calibration

    def trained() -> int:  # the budget counts answers on the training micrographs; audits come on top
        return sum(1 for l in labels if l.micrograph in learner.items)

    if recipe.pseudo_labels > 0:
        learner.fit(labels)  # the published recipe starts from a model fitted on pseudo-labels alone
    for budget in sorted(s.budgets):
        while trained() < budget:
            k = min(s.batch, budget - trained())
            tr = time.perf_counter()
            props = learner.initial_proposals(k, labels) if learner.model is None else learner.propose(k, labels)
            if rnd > 0:
                round_times.append(time.perf_counter() - tr + learner.last_fit_s)
            if not props:
                log.warning("no more proposals at %d labels", trained())
                break
            labels += oracle.answer(props, rnd)
            audits += [p for p in props if p.kind == "audit"]
            learner.fit(labels)
            rnd += 1
        if labels_at is not None:
            labels_at[budget] = list(labels)
        if audits_at is not None:
            audits_at[budget] = list(audits)
        picks = [learner.picks(items_all[n].mic, items_all[n].fmap) for n in evals]
        ev = _evaluate(picks, truth, s, shapes)
        rec_b = {"raw": threshold_stats(ev)}
        if s.calibrate and learner.model is not None:
            plain = answers_map(learner, labels)  # refitted once per fold; the audits only refine it
            cal = refine_on_audits(learner, labels, plain, audits)
            attach(learner.model, cal)  # learner.picks now scores with the calibrated logit (same ranking)
            picks = [learner.picks(items_all[n].mic, items_all[n].fmap) for n in evals]
            ev = _evaluate(picks, truth, s, shapes)
            rec_b["calibrated"] = {**threshold_stats(ev, cal=cal), "a": round(cal.a, 4), "b": round(cal.b, 4), "answers": cal.n,
                                    **({"audits": cal.audits} if cal.audits else {})}
            if cal.audits:  # what the answers alone would have given, on the same picks
                attach(learner.model, plain)
                alone = _evaluate([learner.picks(items_all[n].mic, items_all[n].fmap) for n in evals], truth, s, shapes)
                rec_b["answers_only"] = {**threshold_stats(alone), "a": round(plain.a, 4), "b": round(plain.b, 4)}
                attach(learner.model, cal)
        shown = rec_b.get("calibrated", rec_b["raw"])
        rec_b["baseline_at_matched_recall"] = at_recall(base, shown["recall"])
        n_pos = sum(l.label for l in labels if l.micrograph in learner.items)
        active.append({"labels": trained(), "positives": n_pos, "ap": round(ev.ap, 4), "ap90": round(ev.ap90, 4),
                       "recall": round(ev.recall, 4), "threshold": rec_b})
        if audited:
            active[-1]["audits"] = len(labels) - trained()
        if learner.model is not None and "prior_strength" in learner.model.meta:  # recipe prior_strength='evidence'
            active[-1]["prior_strength"] = learner.model.meta["prior_strength"]
        more = extra(learner, evals, budget) if extra is not None else None
        if more is not None:
            active[-1]["extra"] = more
        progress(f"  [{recipe.name} seed {seed}] {trained():4d} labels ({n_pos} positive): AP {ev.ap:.3f} "
                 f"AP90 {ev.ap90:.3f}  (baseline {base.ap:.3f})")
        if out_dir:
            write_topaz(out_dir / f"labels_{budget}.txt", picks)
    rec = {"recipe": recipe.name, "seed": seed, "oracle": s.oracle,
           "baseline": {"ap": round(base.ap, 4), "ap90": round(base.ap90, 4), "recall": round(base.recall, 4),
                        "threshold": base_thr},
           "active": active, "train": train, "eval": evals, **({"audited": audited} if audited else {})}
    if s.ceiling:
        cl = ActiveLearner([items_all[n] for n in train], s.radius_px, recipe.with_(pseudo_labels=0),
                           s.feature_model, seed=seed)
        cl.fit(ceiling_labels([items_all[n] for n in train], truth, s.radius_px, rng))
        ev = _evaluate([cl.picks(items_all[n].mic, items_all[n].fmap) for n in evals], truth, s, shapes)
        rec["ceiling"] = {"ap": round(ev.ap, 4), "ap90": round(ev.ap90, 4), "recall": round(ev.recall, 4)}
        progress(f"  [{recipe.name} seed {seed}] ceiling (all training particles): AP {ev.ap:.3f}")
    rec["timing"] = {"round_median_s": round(statistics.median(round_times), 4) if round_times else None,
                     "run_s": round(time.perf_counter() - t0, 2)}
    return rec


def load_data(s: BenchmarkSettings, progress=print) -> dict:
    files = list_micrographs(s.micrographs)
    truth_table = read_coordinates(s.truth)
    truth = by_micrograph(truth_table)
    unknown = set(truth) - {micrograph_name(f) for f in files}
    if unknown and len(unknown) == len(truth):
        raise ValueError(f"{s.truth}: none of its image names match a micrograph in {s.micrographs}")
    cache = FeatureCache(s.cache_dir, s.feature_model, s.device)
    items = {}
    t = time.perf_counter()
    for i, f in enumerate(files, 1):
        mic = load_micrograph(f, s.working_pixel_size, s.pixel_size)
        items[mic.name] = Item(mic, cache.get(mic))
        progress(f"features {i}/{len(files)}: {mic.name} {mic.frame.original_shape} -> {mic.frame.working_shape} "
                 f"({time.perf_counter() - t:.1f} s)")
    shapes = {n: it.mic.frame.original_shape for n, it in items.items()}
    return {"items": items, "truth": truth, "shapes": shapes, "features_s": time.perf_counter() - t,
            "cache_hits": cache.hits}


def _threshold_summary(stats: list[dict]) -> dict:
    """Expected/true count and the F1 lost by the suggested threshold: mean and worst over runs."""
    ratio = np.array([t["expected"] / max(t["n_true"], 1) for t in stats])
    gap = np.array([t["f1_best"] - t["f1"] for t in stats])
    return {"expected_over_true_mean": round(float(ratio.mean()), 3),
            "expected_over_true_worst": round(float(ratio[np.argmax(np.abs(ratio - 1))]), 3),
            "f1_suggested_mean": round(float(np.mean([t["f1"] for t in stats])), 4),
            "f1_best_mean": round(float(np.mean([t["f1_best"] for t in stats])), 4),
            "f1_gap_mean": round(float(gap.mean()), 4), "f1_gap_worst": round(float(gap.max()), 4),
            **_range_coverage(stats)}


def _range_coverage(stats: list[dict]) -> dict:
    """How often the expected count's range held the true count, and how wide it was (relative to it)."""
    ranged = [t for t in stats if "expected_low" in t]
    if not ranged:
        return {}
    inside = [t["expected_low"] <= t["n_true"] <= t["expected_high"] for t in ranged]
    width = [(t["expected_high"] - t["expected_low"]) / max(t["n_true"], 1) for t in ranged]
    return {"count_range_level": ranged[0]["expected_level"], "count_range_runs": len(ranged),
            "count_range_coverage": round(float(np.mean(inside)), 3),
            "count_range_width_mean": round(float(np.mean(width)), 3)}


def summarise(runs: list[dict]) -> dict:
    """Per recipe and budget: mean AP, the worst run, the worst split (its mean over seeds), the worst gain."""
    out = {}
    for name in dict.fromkeys(r["recipe"] for r in runs):
        rs = [r for r in runs if r["recipe"] == name]
        budgets = [a["labels"] for a in rs[0]["active"]]
        row = {"runs": len(rs), "splits": len({r.get("split") for r in rs}),
               "baseline_ap_mean": round(float(np.mean([r["baseline"]["ap"] for r in rs])), 4),
               "baseline_threshold": _threshold_summary([r["baseline"]["threshold"] for r in rs]), "budgets": {}}
        for i, b in enumerate(budgets):
            got = [r for r in rs if i < len(r["active"])]
            aps = [r["active"][i]["ap"] for r in got]
            gains = [r["active"][i]["ap"] - r["baseline"]["ap"] for r in got]
            by_split: dict = {}
            for r in got:
                by_split.setdefault(r.get("split"), []).append(r["active"][i]["ap"])
            cell = {"ap_mean": round(float(np.mean(aps)), 4), "ap_std": round(float(np.std(aps)), 4),
                    "ap_min": round(float(np.min(aps)), 4),
                    "worst_split_ap_mean": round(float(min(np.mean(v) for v in by_split.values())), 4),
                    "min_gain_over_baseline": round(float(np.min(gains)), 4)}
            for kind in ("raw", "calibrated"):
                stats = [r["active"][i]["threshold"][kind] for r in got if kind in r["active"][i].get("threshold", {})]
                if stats:
                    cell[kind] = _threshold_summary(stats)
            row["budgets"][str(b)] = cell
        if "ceiling" in rs[0]:
            row["ceiling_ap_mean"] = round(float(np.mean([r["ceiling"]["ap"] for r in rs])), 4)
        out[name] = row
    return out


def run_benchmark(s: BenchmarkSettings, json_out: str, picks_out: str | None = None, progress=print) -> dict:
    t0 = time.perf_counter()
    datas: dict[str, dict] = {}
    runs = []
    for spec in s.recipes:
        # 'seed@resnet16_u32': a recipe on its own features, e.g. the published recipe on the
        # published one-view features beside the default on --feature-model, in one run
        name, _, fm = spec.partition("@")
        sf = replace(s, feature_model=fm or s.feature_model)  # a bad name fails in load_data's FeatureCache
        # the recipe first: a bad setting is refused before minutes of feature computation
        recipe = get_recipe(name, **s.recipe_overrides) if name == "default" or s.recipe_overrides else get_recipe(name)
        if sf.feature_model not in datas:
            datas[sf.feature_model] = load_data(sf, progress)
        splits = training_splits(sorted(datas[sf.feature_model]["items"]), s)
        for si, train in enumerate(splits):
            for seed in s.seeds:
                po = None
                if picks_out:
                    po = picks_out if len(s.recipes) == 1 and len(s.seeds) == 1 and len(splits) == 1 else \
                        str(Path(picks_out) / (f"{spec.replace('@', '_')}_seed{seed}" + (f"_split{si}" if train else "")))
                rec = run_one(sf, recipe, seed, datas[sf.feature_model], progress, po, train=train)
                rec["recipe"], rec["feature_model"] = spec, sf.feature_model
                rec["split"] = si if train is not None else None
                runs.append(rec)
    total = time.perf_counter() - t0
    rounds = [r["timing"]["round_median_s"] for r in runs if r["timing"]["round_median_s"] is not None]
    timing = {"features_s": round(sum(d["features_s"] for d in datas.values()), 2),
              "round_median_s": round(statistics.median(rounds), 4) if rounds else None,
              "total_s": round(total, 2), "feature_cache_hits": sum(d["cache_hits"] for d in datas.values())}
    settings = {"micrographs": s.micrographs, "truth": s.truth, "radius_px": s.radius_px, "border_px": s.border_px,
                "batch": s.batch, "budgets": list(s.budgets), "feature_model": s.feature_model, "oracle": s.oracle,
                "working_pixel_size": s.working_pixel_size, "splits": s.splits, "seeds": list(s.seeds),
                "calibrate": s.calibrate}
    if len(runs) == 1:
        result = {k: v for k, v in runs[0].items() if k not in ("timing", "feature_model", "split")}  # the format
        result["timing"] = timing
        result["settings"] = {**settings, "feature_model": runs[0]["feature_model"]}
    else:
        result = {"settings": settings, "summary": summarise(runs), "runs": runs, "timing": timing}
    write_json(json_out, result)
    from . import plots

    stem = Path(json_out).with_suffix("")
    for draw, suffix in ((plots.plot_benchmark, ".png"), (plots.plot_calibration, "_calibration.png"),
                         (plots.plot_fig3, "_fig3.png")):
        try:
            draw(result, f"{stem}{suffix}")
        except Exception as exc:  # a missing plot must not lose the figures
            log.warning("could not draw %s%s: %s", stem, suffix, exc)
    return result
