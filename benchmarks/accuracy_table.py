"""Markdown tables (README "Accuracy") from benchmarks/results/accuracy_<tag>.json files, or from
`cryoal benchmark --splits all` JSON files (the cross-validated tables of issue 16).

    python benchmarks/accuracy_table.py views8 views8_literal
    python benchmarks/accuracy_table.py --splits benchmarks/results/splits_10028_u32.json benchmarks/results/splits_10017_u32.json
    python benchmarks/accuracy_table.py --compare default evidence evidence_seed   # all-splits variants side by side
    python benchmarks/accuracy_table.py --audits audits_10028 audits_10017 audits2_10017  # README "Audits"
    python benchmarks/accuracy_table.py --ranges count_range_10028 count_range_10017  # README "How many particles"
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
NAMES = {"10028": "EMPIAR-10028", "10017": "EMPIAR-10017"}


def rows(tag: str):
    d = json.loads((RESULTS / f"accuracy_{tag}.json").read_text())
    oracle = "literal" if "literal" in d["command"] else "careful"
    for ds, variants in d["results"].items():
        for name, r in variants.items():
            runs = r["runs"]
            base = np.array([x["baseline"]["ap"] for x in runs])
            aps = np.array([[a["ap"] for a in x["active"]] for x in runs])
            budgets = [a["labels"] for a in runs[0]["active"]]
            ceil = [x["ceiling"]["ap"] for x in runs if "ceiling" in x]
            fm = r.get("feature_model", d["command"].split("--feature-model ")[-1].split()[0]
                       if "--feature-model " in d["command"] else "resnet16_u32")
            yield ds, name.split("@")[0], fm, oracle, base, aps, budgets, (float(np.mean(ceil)) if ceil else None), len(runs)


def main(tags: list[str]) -> None:
    print("| dataset | recipe | features | oracle | pretrained | " + " | ".join(f"@{b}" for b in (10, 25, 50, 100))
          + " | ceiling | seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tag in tags:
        for ds, name, fm, oracle, base, aps, budgets, ceil, n in rows(tag):
            cells = [f"{m:.3f} ({lo:+.3f})" for m, lo in zip(aps.mean(0), (aps - base[:, None]).min(0))]
            c = f"{ceil:.3f}" if ceil is not None else "—"
            print(f"| {NAMES.get(ds, ds)} | {name} | {fm} | {oracle} | {base.mean():.3f} | " + " | ".join(cells)
                  + f" | {c} | {n} |")

def splits_tables(paths: list[str]) -> None:
    """AP per budget (mean, worst split, worst gain over the pretrained model), then the threshold a user gets."""
    print("| dataset | recipe | features | runs (splits x seeds) | pretrained | " + " | ".join(
        f"@{b} mean / worst split / worst gain" for b in (10, 25, 50, 100)) + " |")
    print("|---|---|---|---|---|" + "---|" * 4)
    docs = [(p, json.loads(Path(p).read_text())) for p in paths]
    for p, d in docs:
        ds = NAMES.get(next((k for k in NAMES if k in d["settings"]["micrographs"]), ""), Path(p).stem)
        for name, row in d["summary"].items():
            cells = [f"{c['ap_mean']:.3f} / {c['worst_split_ap_mean']:.3f} / {c['min_gain_over_baseline']:+.3f}"
                     for c in row["budgets"].values()]
            fm = next(r["feature_model"] for r in d["runs"] if r["recipe"] == name)
            print(f"| {ds} | {name} | {fm} | {row['runs']} ({row['splits']} x {len(d['settings']['seeds'])}) | "
                  f"{row['baseline_ap_mean']:.3f} | " + " | ".join(cells) + " |")
    print()
    print("| dataset | labels | probabilities | sum of p / true count: mean (worst) | F1 at suggested threshold |"
          " best F1 | F1 lost: mean (worst) |")
    print("|---|---|---|---|---|---|---|")
    for p, d in docs:
        ds = NAMES.get(next((k for k in NAMES if k in d["settings"]["micrographs"]), ""), Path(p).stem)
        for name, row in d["summary"].items():
            b = row["baseline_threshold"]
            print(f"| {ds} | 0 | Topaz pretrained | {b['expected_over_true_mean']:.2f} ({b['expected_over_true_worst']:.2f}) | "
                  f"{b['f1_suggested_mean']:.3f} | {b['f1_best_mean']:.3f} | {b['f1_gap_mean']:.3f} ({b['f1_gap_worst']:.3f}) |")
            for labels, c in row["budgets"].items():
                for kind in ("raw", "calibrated"):
                    if kind in c:
                        t = c[kind]
                        print(f"| {ds} | {labels} | {name}, {kind} | {t['expected_over_true_mean']:.2f} "
                              f"({t['expected_over_true_worst']:.2f}) | {t['f1_suggested_mean']:.3f} | "
                              f"{t['f1_best_mean']:.3f} | {t['f1_gap_mean']:.3f} ({t['f1_gap_worst']:.3f}) |")
    print()
    print("| dataset | labels | pretrained at its threshold: TP / FP | pretrained at our recall: TP / FP | "
          "ours (calibrated threshold): TP / FP |")
    print("|---|---|---|---|---|")
    for p, d in docs:
        ds = NAMES.get(next((k for k in NAMES if k in d["settings"]["micrographs"]), ""), Path(p).stem)
        runs = d["runs"]
        bt = [r["baseline"]["threshold"] for r in runs]
        for i, a in enumerate(runs[0]["active"]):
            th = [r["active"][i]["threshold"] for r in runs]
            kind = "calibrated" if all("calibrated" in t for t in th) else "raw"
            m = [t["baseline_at_matched_recall"] for t in th]
            print(f"| {ds} | {a['labels']} | {np.mean([t['tp'] for t in bt]):.0f} / {np.mean([t['fp'] for t in bt]):.0f} | "
                  f"{np.mean([t['tp'] for t in m]):.0f} / {np.mean([t['fp'] for t in m]):.0f} | "
                  f"{np.mean([t[kind]['tp'] for t in th]):.0f} / {np.mean([t[kind]['fp'] for t in th]):.0f} |")


def compare_tables(tags: list[str], reference: str = "default") -> None:
    """accuracy.py all-splits runs side by side: per budget mean / worst split / worst gain, and per
    split (seed-averaged) how often each variant is at least the reference's AP, and its worst loss to it."""
    res = merged(tags)
    print("| dataset | recipe | runs | pretrained | " + " | ".join(
        f"@{b} mean / worst split / worst gain" for b in (10, 25, 50, 100)) + " | splits >= " + reference
          + " @10/25/50/100 | worst loss to " + reference + " (a split) | round median |")
    print("|---|---|---|---|" + "---|" * 4 + "---|---|---|")
    for ds in sorted(res, reverse=True):
        ref_key = reference if reference in res[ds] else next(  # else the reference on other features
            (k for k in res[ds] if k.split(" (")[0] == reference), None)
        ref = res[ds].get(ref_key)
        for name, r in res[ds].items():
            summ = r["summary"]
            cells = [f"{c['ap_mean']:.3f} / {c['worst_split_ap_mean']:.3f} / {c['min_gain_over_baseline']:+.3f}"
                     for c in summ["budgets"].values()]
            per_split = _split_means(r["runs"])
            if ref is not None and name != ref_key:
                rs = _split_means(ref["runs"])
                diff = np.array([per_split[k] - rs[k] for k in sorted(rs) if k in per_split])
                wins = "/".join(f"{int((diff[:, i] >= -1e-4).sum())}" for i in range(diff.shape[1])) + f" of {len(diff)}"
                loss = f"{diff.min():+.3f}"
            else:
                wins = loss = "—"
            rt = np.median([x["timing"]["round_median_s"] for x in r["runs"]])
            print(f"| {NAMES.get(ds, ds)} | {name} | {summ['runs']} | {summ['baseline_ap_mean']:.3f} | "
                  + " | ".join(cells) + f" | {wins} | {loss} | {rt:.2f} s |")


def merged(tags: list[str]) -> dict[str, dict[str, dict]]:
    """dataset -> variant -> {runs, summary, feature_model}; the same variant in several files (seeds run
    separately) is one row, its summary made anew over all its runs.  A variant on other features than
    resnet16_u32 is its own row."""
    from cryoal_ext.benchmark import summarise

    res: dict[str, dict[str, dict]] = {}
    for tag in tags:
        d = json.loads((RESULTS / f"accuracy_{tag}.json").read_text())
        for ds, variants in d["results"].items():
            for name, v in variants.items():
                fm = v.get("feature_model", "resnet16_u32")
                key = name if fm == "resnet16_u32" else f"{name} ({fm})"
                row = res.setdefault(ds, {}).setdefault(key, {"runs": [], "feature_model": fm})
                row["runs"] += v["runs"]
    for variants in res.values():
        for key, row in variants.items():
            runs = [{**r, "recipe": key} for r in row["runs"]]
            row["summary"] = summarise(runs)[key]
    return res


def _split_means(runs) -> dict[tuple, np.ndarray]:
    by: dict[tuple, list] = {}
    for x in runs:
        by.setdefault(tuple(x["train"]), []).append([a["ap"] for a in x["active"]])
    return {k: np.mean(v, axis=0) for k, v in by.items()}


def budgets(tags: list[str]):
    """(dataset, variant, its runs, budget index) for every budget of every variant in the tags' results."""
    for tag in tags:
        d = json.loads((RESULTS / f"accuracy_{tag}.json").read_text())
        for ds, variants in d["results"].items():
            for name, v in variants.items():
                for b in range(len(v["runs"][0]["active"])):
                    yield ds, name, v["runs"], b


def audit_tables(tags: list[str]) -> None:
    """Count and threshold at each budget, raw / the answers' map alone / answers + audits (recipe with audits)."""
    print("| dataset | labels (+audits) | probabilities | sum of p / true: mean (worst; runs within 15%) | "
          "F1 lost: mean (worst; runs within 0.02) |")
    print("|---|---|---|---|---|")
    for ds, name, runs, b in budgets(tags):
        aud = max(r["active"][b].get("audits", 0) for r in runs)  # audits apart: on top of the labels
        audited = aud or any(r["active"][b]["threshold"].get("calibrated", {}).get("audits") for r in runs)
        for kind, say in (("raw", "raw"), ("answers_only", "answers"), ("calibrated", "answers + audits")):
            st = [r["active"][b]["threshold"].get(kind) for r in runs]
            st = [s for s in st if s]
            if not st or (kind == "calibrated" and not audited):
                continue
            ratio = np.array([s["expected"] / s["n_true"] for s in st])
            gap = np.array([s["f1_best"] - s["f1"] for s in st])
            print(f"| {NAMES.get(ds, ds)} ({len(st)} runs, {name}) | {runs[0]['active'][b]['labels']} (+{aud}) "
                  f"| {say} | {ratio.mean():.3f} ({ratio[np.argmax(abs(ratio - 1))]:.3f}; "
                  f"{int(np.sum(abs(ratio - 1) <= 0.15))}/{len(st)}) | {gap.mean():.3f} ({gap.max():.3f}; "
                  f"{int(np.sum(gap <= 0.02))}/{len(st)}) |")


def range_tables(tags: list[str]) -> None:
    """The expected count's range (calibration.count_estimate) against the expert count, per budget."""
    print("| dataset | labels | runs | expected / true: mean (range; within 15%) | true count inside the range | "
          "true below / above it | range width / true count: mean (max) |")
    print("|---|---|---|---|---|---|---|")
    for ds, name, runs, b in budgets(tags):
        st = [r["active"][b]["threshold"].get("calibrated") for r in runs]
        st = [s for s in st if s and "expected_low" in s]
        if not st:
            continue
        n = np.array([s["n_true"] for s in st], float)
        e, lo, hi = (np.array([s[k] for s in st]) for k in ("expected", "expected_low", "expected_high"))
        r, w = e / n, (hi - lo) / n
        print(f"| {NAMES.get(ds, ds)} ({name}) | {runs[0]['active'][b]['labels']} | {len(st)} | "
              f"{r.mean():.2f} ({r.min():.2f}-{r.max():.2f}; {int(np.sum(abs(r - 1) <= 0.15))}/{len(st)}) | "
              f"{int(np.sum((lo <= n) & (n <= hi)))}/{len(st)} ({st[0]['expected_level']:.0%} range) | "
              f"{int(np.sum(n < lo))} / {int(np.sum(n > hi))} | {w.mean():.2f} ({w.max():.2f}) |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--audits"]:
        audit_tables(sys.argv[2:])
    elif sys.argv[1:2] == ["--ranges"]:
        range_tables(sys.argv[2:])
    elif sys.argv[1:2] == ["--splits"]:
        splits_tables(sys.argv[2:])
    elif sys.argv[1:2] == ["--compare"]:
        compare_tables(sys.argv[2:])
    else:
        main(sys.argv[1:] or ["views8"])
