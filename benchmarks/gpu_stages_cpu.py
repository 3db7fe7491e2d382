"""Issue 15, part 2, on the CPU: the new GPU stage code against the code it replaces, one 686^2 image.

Not a GPU figure: the new code runs here with torch CPU tensors, to show it is equal (max
difference / exact) and what it costs on a CPU.  Stages, on the real EMPIAR-10028 micrograph
``--micrograph`` (1024^2 at 5.36 A/px, cropped to 686^2 at 8 A/px):

* crop: ``io.fourier_crop`` (numpy, float64) vs ``crop_torch.fourier_crop_torch`` (float32 and float64);
* views: ``features.view_mean`` (8 passes of one image) vs ``features.view_mean_batched`` (one
  pass of 8 images), the prediction network with Topaz's head (``--views-repeats`` 0 skips it);
* NMS: ``extract.nms`` vs ``nms_torch.nms_torch`` on the network's logit map, radius 28 px of the
  file = 18.8 working px, threshold logit(1e-4) as ``cryoal predict`` uses.

    python benchmarks/gpu_stages_cpu.py --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRYOAL_TEST_DATA", ROOT.parent / "shared" / "data"))


def best_of(fn, repeats: int) -> tuple[float, object]:
    ts, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micrograph", default=str(DATA / "empiar10028" / "micrographs" / "061_10028.mrc"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--views-repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_stages_cpu.json"))
    a = ap.parse_args()

    import torch

    from cryoal_ext.coords import working_shape
    from cryoal_ext.crop_torch import fourier_crop_torch
    from cryoal_ext.extract import nms
    from cryoal_ext.features import view_mean, view_mean_batched
    from cryoal_ext.io import fourier_crop, normalise, read_mrc
    from cryoal_ext.nms_torch import nms_torch
    from cryoal_ext.predict import picking_net

    torch.set_num_threads(a.threads)
    data, ps = read_mrc(a.micrograph)
    shape = working_shape(data.shape, ps, 8.0)
    res: dict = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                 "micrograph": Path(a.micrograph).name, "shape": list(data.shape), "working_shape": list(shape),
                 "torch_threads": a.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                 "note": "CPU only (no GPU): equality and CPU cost of the GPU stage code; not a GPU figure"}
    t_np, ref = best_of(lambda: fourier_crop(data, shape), a.repeats)
    t_32, c32 = best_of(lambda: fourier_crop_torch(data, shape), a.repeats)
    t_64, c64 = best_of(lambda: fourier_crop_torch(data, shape, dtype="float64"), a.repeats)
    res["crop"] = {"numpy_s": round(t_np, 4), "torch_float32_s": round(t_32, 4), "torch_float64_s": round(t_64, 4),
                   "max_abs_diff_over_std_float32": float(np.abs(c32 - ref).max() / ref.std()),
                   "max_abs_diff_float64": float(np.abs(c64 - ref).max())}
    print("crop:", res["crop"], flush=True)

    img = normalise(ref)
    net = picking_net(None, "resnet16_u32+views8", "cpu")
    x = torch.from_numpy(img)[None, None]
    with torch.inference_mode():
        if a.views_repeats > 0:
            t_seq, z_seq = best_of(lambda: view_mean(net.one_view, x, 8), a.views_repeats)
            t_bat, z_bat = best_of(lambda: view_mean_batched(net.one_view, x, 8, 8), a.views_repeats)
            res["views"] = {"sequential_8_passes_s": round(t_seq, 3), "batched_1_pass_of_8_s": round(t_bat, 3),
                            "max_abs_diff_logits": float((z_seq - z_bat).abs().max()),
                            "logit_range": [float(z_seq.min()), float(z_seq.max())]}
            print("views:", res["views"], flush=True)
            z = z_seq[0, 0].numpy()
        else:
            z = net.one_view(x)[0, 0].numpy()
    r = 28.0 / (data.shape[0] / shape[0])
    thr = float(np.log(1e-4 / (1 - 1e-4)))
    t_cpu, a_ = best_of(lambda: nms(z, r, thr), a.repeats)
    t_dev, b_ = best_of(lambda: nms_torch(z, r, thr), a.repeats)
    res["nms"] = {"radius_working_px": round(r, 3), "candidates": int((z >= thr).sum()), "picks": int(a_[0].size),
                  "cpu_nms_s": round(t_cpu, 4), "nms_torch_on_cpu_s": round(t_dev, 4),
                  "identical": bool(all(np.array_equal(p, q) for p, q in zip(a_, b_)))}
    print("nms:", res["nms"], flush=True)
    write_json(a.out, res)
    print("->", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
