"""Topaz's GMM fit (the old ``gmm-sample`` method) on the CPU vs on the GPU: time and max |difference| (GPU machine).

The default ``gmm`` (histogram fit, cryoal_ext/normalise.py) runs on the CPU only; see normalise_speed.py.

    python benchmarks/normalise_cpu_vs_gpu.py DATA_DIR   # reads DATA_DIR/*/micrographs/*.mrc (first 6)
"""
import glob
import sys
import time

import numpy as np
import torch

from cryoal_ext.io import fourier_crop, normalise, read_mrc, working_shape


def main(folder: str) -> None:
    for f in sorted(glob.glob(f"{folder}/*/micrographs/*.mrc"))[:6]:
        data, ps = read_mrc(f)
        small = fourier_crop(data, working_shape(data.shape, ps, 8.0))
        t = time.time()
        cpu = normalise(small, "gmm-sample")
        t_cpu = time.time() - t
        normalise(small, "gmm-sample", device="cuda")  # warm-up
        torch.cuda.synchronize()
        t = time.time()
        gpu = normalise(small, "gmm-sample", device="cuda")
        t_gpu = time.time() - t
        print(f"{f.split('/')[-1]}: cpu {t_cpu:.2f}s gpu {t_gpu:.2f}s max|diff| {np.abs(cpu - gpu).max():.2e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".gpu_data")
