"""Topaz's full GMM normalisation fit (every pixel) of each working-scale image, stored as a small JSON fixture.

Why a fixture: the full fit (``topaz.stats.normalize(x, alpha=900, beta=1, num_iters=100,
sample=1)``) takes 5-10 s per 686^2 image, too slow to repeat in every CI run.  The test
(tests/test_normalise.py) recomputes the working image (read + Fourier crop, cheap and exact),
fits it with cryoal_ext.normalise and compares with the stored mean/scale.  Since both
normalisations are affine in the pixel value, max |difference| over the image is reached at
the smallest or largest pixel, so mean, scale, min and max are all that is needed.

The fit runs on one torch thread (the float32 sums depend on the thread count; one thread is
reproducible).  Each entry records the file's SHA-1, so a changed file is noticed.

    python benchmarks/normalise_reference.py                   # bundled crops + ../shared/data
    python benchmarks/normalise_reference.py --out tests/fixtures/normalise_reference.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "cryoal_ext" / "example_data" / "empiar10028_small" / "micrographs"
DATA = Path(os.environ.get("CRYOAL_TEST_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "tests" / "fixtures" / "normalise_reference.json"


def reference_files() -> list[tuple[str, Path]]:
    """(group, path): the bundled crops, then every micrograph of the shared data when present."""
    files = [("example", p) for p in sorted(EXAMPLE.glob("*.mrc"))]
    for ds in ("empiar10028", "empiar10017"):
        files += [(ds, p) for p in sorted((DATA / ds / "micrographs").glob("*.mrc"))]
    return files


def working_image(path: Path, working_pixel_size: float = 8.0) -> np.ndarray:
    """The image ``io.load_micrograph`` normalises: read, then Fourier-crop to the working pixel size."""
    from cryoal_ext.coords import working_shape
    from cryoal_ext.io import fourier_crop, read_mrc

    data, ps = read_mrc(path)
    return fourier_crop(data, working_shape(data.shape, ps, working_pixel_size))


def topaz_full_fit(x: np.ndarray) -> dict:
    """Topaz's own normalisation fit on every pixel, on one torch thread."""
    import torch
    from topaz.stats import normalize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time.perf_counter()
        _, md = normalize(np.ascontiguousarray(x, dtype=np.float32), alpha=900, beta=1, num_iters=100, sample=1)
        dt = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    return {"mu": float(md["mu"]), "std": float(md["std"]), "pi": float(md["pi"]), "seconds": round(dt, 2),
            "logps": [float(v) for v in md["logps"]], "mus": [float(v) for v in md["mus"]],
            "stds": [float(v) for v in md["stds"]], "pis": [float(v) for v in md["pis"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--working-pixel-size", type=float, default=8.0)
    a = ap.parse_args()
    from cryoal_ext.io import file_digest

    entries = []
    for group, path in reference_files():
        x = working_image(path, a.working_pixel_size)
        fit = topaz_full_fit(x)
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path("../shared/data") / path.relative_to(DATA)
        entries.append({"group": group, "file": rel.as_posix(), "sha1": file_digest(path),
                        "working_shape": list(x.shape), "min": float(x.min()), "max": float(x.max()), **fit})
        print(f"{group:12s} {path.name:40s} {x.shape} mu {fit['mu']:+.5f} std {fit['std']:.5f} pi {fit['pi']:.4f} "
              f"{fit['seconds']:.1f} s", flush=True)
    write_json(a.out, {"what": "topaz.stats.normalize(x, alpha=900, beta=1, num_iters=100, sample=1) on the "
                               "working-scale image (read_mrc + fourier_crop), one torch thread",
                       "working_pixel_size": a.working_pixel_size, "command": "python benchmarks/normalise_reference.py",
                       "images": entries})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
