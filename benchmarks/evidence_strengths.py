"""Which prior strength the `evidence` recipe chose, round by round, on every training split (issue 16).

Runs the benchmark protocol (`run_one`, careful oracle, batch 10, no calibration: it never changes
the proposals) and records each fit's strength s (l2 = 10 s, pseudo weight 0.3 s) and the AP per
budget, to `results/evidence_strengths_<dataset>.json`.

    python benchmarks/evidence_strengths.py 10017 --feature-model resnet16_u32
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import DATASETS  # noqa: E402

from cryoal_ext.atomic import write_json  # noqa: E402
from cryoal_ext.benchmark import BenchmarkSettings, load_data, run_one, training_splits  # noqa: E402
from cryoal_ext.learner import ActiveLearner  # noqa: E402
from cryoal_ext.recipes import get_recipe  # noqa: E402


class TracingLearner(ActiveLearner):
    """The package learner, noting the strength each fit chose."""

    trace: list = []

    def fit(self, labels, start=None):
        model = super().fit(labels, start)
        TracingLearner.trace.append([len(labels), model.meta.get("prior_strength", 1.0)])
        return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feature-model", default="resnet16_u32")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    a = ap.parse_args()
    s = BenchmarkSettings(**DATASETS[a.dataset], budgets=(10, 25, 50, 100), batch=10, oracle="careful",
                          cache_dir=a.cache_dir, feature_model=a.feature_model, splits="all", calibrate=False)
    data = load_data(s, progress=lambda *_: None)
    import cryoal_ext.benchmark as bm
    bm.ActiveLearner = TracingLearner
    out = {"command": "python benchmarks/evidence_strengths.py " + " ".join(sys.argv[1:]), "splits": []}
    for train in training_splits(sorted(data["items"]), s):
        TracingLearner.trace = []
        r = run_one(s, get_recipe("evidence"), a.seed, data, progress=lambda *_: None, train=train)
        strengths = [t for t in TracingLearner.trace if t[0] > 0]
        out["splits"].append({"train": train, "ap": [b["ap"] for b in r["active"]], "strengths": strengths})
        print(train, [b["ap"] for b in r["active"]], "s:", sorted({t[1] for t in strengths}),
              "first s != 1 at", next((t[0] for t in strengths if t[1] != 1.0), None), flush=True)
        write_json(Path(__file__).parent / "results" / f"evidence_strengths_{a.dataset}.json", out)


if __name__ == "__main__":
    main()
