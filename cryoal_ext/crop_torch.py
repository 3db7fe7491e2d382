"""Fourier cropping with torch.fft, for the GPU prediction path (issue 15, part 2).

Why: on a GPU the numpy crop (float64 FFTs of the full-size micrograph on one CPU core) costs
more than the network; cuFFT does it in milliseconds.  The spectrum is cropped exactly as
``io.fourier_crop`` crops it.  Two details keep the answer the numpy one on every FFT backend:

* the inverse is written as numpy computes it (a complex inverse along rows, then a real inverse
  along columns with the imaginary parts of the DC and Nyquist columns dropped, which numpy's
  pocketfft ignores and cuFFT's or MKL's need not);
* in float32 the image mean is taken out first (in float64) and put back after: cropping is
  linear and maps a constant onto itself, so this is exact in arithmetic, and it keeps the FFT's
  rounding relative to the image's contrast rather than its offset (MRC counts can sit on 10^4).
"""
from __future__ import annotations

import numpy as np


def fourier_crop_torch(image, shape: tuple[int, int], device: str = "cpu", dtype: str = "float32") -> np.ndarray:
    """``io.fourier_crop(image, shape)`` computed with torch.fft on ``device``; float32 numpy (ny', nx') out.

    ``image``: numpy (ny, nx) or a torch tensor.  ``dtype`` 'float32' (default: within ~1e-6 of
    the image's standard deviation from numpy's float64 crop) or 'float64' (within ~1e-12).
    """
    import torch

    real = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if real is None:
        raise ValueError(f"fourier_crop_torch: dtype must be float32 or float64, not {dtype!r}")
    if not isinstance(image, torch.Tensor):
        arr = np.ascontiguousarray(image)
        image = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # a read-only memory map
    x = image
    ny, nx = x.shape
    my, mx = shape
    if (my, mx) == (ny, nx):
        return x.to(torch.float32).cpu().numpy().copy()
    if my > ny or mx > nx:
        raise ValueError("fourier_crop only downsamples")
    with torch.inference_mode():
        x = x.to(device=device)
        mean = x.double().mean()
        x = (x.double() - mean).to(real) if real == torch.float32 else x.double() - mean
        spec = torch.fft.rfft2(x)
        cropped = torch.cat([spec[: (my + 1) // 2, : mx // 2 + 1], spec[ny - my // 2 :, : mx // 2 + 1]], dim=0)
        rows = torch.fft.ifft(cropped, dim=0)
        rows[:, 0] = rows[:, 0].real.to(rows.dtype)
        if mx % 2 == 0:
            rows[:, mx // 2] = rows[:, mx // 2].real.to(rows.dtype)
        out = torch.fft.irfft(rows, n=mx, dim=1) * ((my * mx) / (ny * nx))
        out = out.double() + mean
        return out.to(torch.float32).cpu().numpy()
