"""Cost of the '+viewsN' feature models: seconds per micrograph for 1, 2, 4 and 8 views, side by side.

One process, the same working-scale images (one EMPIAR-10028 micrograph, 686², and one
EMPIAR-10017 micrograph, 906², already read and normalised), the backbone alone (the head is a
1x1 convolution), each setting timed ``--repeats`` times; the median is reported.  What it
buys in AP is in README "Accuracy" (benchmarks/results/accuracy_views8*.json).

    python benchmarks/feature_views.py --repeats 2
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from cryoal_ext.atomic import write_json

DATA = Path(os.environ.get("CRYOAL_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backbone", default="resnet16_u32")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "feature_views.json"))
    a = ap.parse_args()

    import torch

    from cryoal_ext.features import VIEWS, compute_features
    from cryoal_ext.io import load_micrograph

    files = [sorted((DATA / d / "micrographs").glob("*.mrc"))[0] for d in ("empiar10028", "empiar10017")]
    images = [load_micrograph(f).image for f in files]
    compute_features(images[0][:128, :128], a.backbone, "cpu")  # warm-up
    rows = {}
    for views, suffix in VIEWS.items():
        name = a.backbone + suffix
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            for im in images:
                compute_features(im, name, "cpu")
            times.append((time.perf_counter() - t) / len(images))
        rows[name] = {"views": views, "s_per_micrograph": round(statistics.median(times), 2),
                      "all": [round(x, 2) for x in times]}
        print(f"{name:24s} {rows[name]['s_per_micrograph']:6.2f} s/micrograph", flush=True)
    one = rows[a.backbone]["s_per_micrograph"]
    for r in rows.values():
        r["over_one_view"] = round(r["s_per_micrograph"] / one, 2)
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "micrographs": [f.name for f in files], "working_shapes": [list(im.shape) for im in images],
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "feature_models": rows}
    write_json(a.out, result)
    print({k: v["over_one_view"] for k, v in rows.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
