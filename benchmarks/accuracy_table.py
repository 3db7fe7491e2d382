"""Markdown table (README "Accuracy") from benchmarks/results/accuracy_<tag>.json files.

    python benchmarks/accuracy_table.py views8 views8_literal
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

if __name__ == "__main__":
    main(sys.argv[1:] or ["views8"])
