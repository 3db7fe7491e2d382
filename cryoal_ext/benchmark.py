"""Oracle benchmark: the paper's Table 1 protocol on any dataset with ground truth."""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import write_json
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


def run_one(s: BenchmarkSettings, recipe: Recipe, seed: int, data, progress=print, picks_out: str | None = None) -> dict:
    """One seed of one recipe: returns the JSON record of the issue's format."""
    items_all, truth, shapes = data["items"], data["truth"], data["shapes"]
    names = sorted(items_all)
    rng = np.random.default_rng(seed)
    train = sorted(rng.choice(names, size=min(s.train_micrographs, len(names) - 1), replace=False).tolist())
    evals = [n for n in names if n not in train]
    t0 = time.perf_counter()
    base_picks = [extract_picks(n, items_all[n].fmap.score, items_all[n].mic.frame, s.radius_px) for n in evals]
    base = _evaluate(base_picks, truth, s, shapes)
    out_dir = Path(picks_out) if picks_out else None
    if out_dir:
        write_topaz(out_dir / "baseline.txt", base_picks)

    learner = ActiveLearner([items_all[n] for n in train], s.radius_px, recipe, s.feature_model, seed=seed)
    oracle = Oracle(truth, s.radius_px, s.oracle)
    labels: list[Label] = []
    active, round_times, rnd = [], [], 0
    if recipe.pseudo_labels > 0:
        learner.fit(labels)  # the published recipe starts from a model fitted on pseudo-labels alone
    for budget in sorted(s.budgets):
        while len(labels) < budget:
            k = min(s.batch, budget - len(labels))
            tr = time.perf_counter()
            props = learner.initial_proposals(k, labels) if learner.model is None else learner.propose(k, labels)
            if rnd > 0:
                round_times.append(time.perf_counter() - tr + learner.last_fit_s)
            if not props:
                log.warning("no more proposals at %d labels", len(labels))
                break
            labels += oracle.answer(props, rnd)
            learner.fit(labels)
            rnd += 1
        picks = [learner.picks(items_all[n].mic, items_all[n].fmap) for n in evals]
        ev = _evaluate(picks, truth, s, shapes)
        n_pos = sum(l.label for l in labels)
        active.append({"labels": len(labels), "positives": n_pos, "ap": round(ev.ap, 4), "ap90": round(ev.ap90, 4),
                       "recall": round(ev.recall, 4)})
        progress(f"  [{recipe.name} seed {seed}] {len(labels):4d} labels ({n_pos} positive): AP {ev.ap:.3f} "
                 f"AP90 {ev.ap90:.3f}  (baseline {base.ap:.3f})")
        if out_dir:
            write_topaz(out_dir / f"labels_{budget}.txt", picks)
    rec = {"recipe": recipe.name, "seed": seed, "oracle": s.oracle,
           "baseline": {"ap": round(base.ap, 4), "ap90": round(base.ap90, 4), "recall": round(base.recall, 4)},
           "active": active, "train": train, "eval": evals}
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


def summarise(runs: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["recipe"] for r in runs):
        rs = [r for r in runs if r["recipe"] == name]
        budgets = [a["labels"] for a in rs[0]["active"]]
        row = {"baseline_ap_mean": round(float(np.mean([r["baseline"]["ap"] for r in rs])), 4), "budgets": {}}
        for i, b in enumerate(budgets):
            aps = [r["active"][i]["ap"] for r in rs if i < len(r["active"])]
            gains = [r["active"][i]["ap"] - r["baseline"]["ap"] for r in rs if i < len(r["active"])]
            row["budgets"][str(b)] = {"ap_mean": round(float(np.mean(aps)), 4), "ap_std": round(float(np.std(aps)), 4),
                                      "ap_min": round(float(np.min(aps)), 4),
                                      "min_gain_over_baseline": round(float(np.min(gains)), 4)}
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
        for seed in s.seeds:
            po = None
            if picks_out:
                po = picks_out if len(s.recipes) == 1 and len(s.seeds) == 1 else \
                    str(Path(picks_out) / f"{spec.replace('@', '_')}_seed{seed}")
            rec = run_one(sf, recipe, seed, datas[sf.feature_model], progress, po)
            rec["recipe"], rec["feature_model"] = spec, sf.feature_model
            runs.append(rec)
    total = time.perf_counter() - t0
    rounds = [r["timing"]["round_median_s"] for r in runs if r["timing"]["round_median_s"] is not None]
    timing = {"features_s": round(sum(d["features_s"] for d in datas.values()), 2),
              "round_median_s": round(statistics.median(rounds), 4) if rounds else None,
              "total_s": round(total, 2), "feature_cache_hits": sum(d["cache_hits"] for d in datas.values())}
    settings = {"micrographs": s.micrographs, "truth": s.truth, "radius_px": s.radius_px, "border_px": s.border_px,
                "batch": s.batch, "budgets": list(s.budgets), "feature_model": s.feature_model, "oracle": s.oracle,
                "working_pixel_size": s.working_pixel_size}
    if len(runs) == 1:
        result = {k: v for k, v in runs[0].items() if k not in ("timing", "feature_model")}  # the format
        result["timing"] = timing
        result["settings"] = {**settings, "feature_model": runs[0]["feature_model"]}
    else:
        result = {"settings": settings, "summary": summarise(runs), "runs": runs, "timing": timing}
    write_json(json_out, result)
    try:
        from .plots import plot_benchmark

        plot_benchmark(result, str(Path(json_out).with_suffix(".png")))
    except Exception as exc:  # a missing plot must not lose the figures
        log.warning("could not draw the AP-vs-labels plot: %s", exc)
    return result
