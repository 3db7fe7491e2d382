"""Reading micrographs and bringing them to the working scale."""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from .coords import Frame, working_shape

MICROGRAPH_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec")
NORMALISATIONS = ("gmm", "gmm-sample", "gmm-full", "affine")  # see normalise()
DEFAULT_NORMALISATION = "gmm"


class MicrographError(ValueError):
    """A micrograph file that cannot be used, with the file named in the message."""


@dataclass
class Micrograph:
    """A micrograph at the working scale, with what is needed to map back to the file."""

    name: str  # file name without extension: the key used in label and pick files
    path: str
    image: np.ndarray  # float32 (ny, nx) at the working scale, normalised
    frame: Frame
    digest: str  # content hash of the file: keys the feature cache
    normalisation: str = DEFAULT_NORMALISATION  # how ``image`` was normalised: keys the feature cache too


def micrograph_name(path: str | os.PathLike) -> str:
    """Name of a micrograph as used in Topaz-style files: file name without extension."""
    base = os.path.basename(str(path))
    for suffix in MICROGRAPH_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Read a 2D MRC as float32 and its header pixel size (None when the header has none; negative as stored).

    Accepts float32/float16/int modes and a single-section stack.  Anything else (missing,
    truncated, 3D, empty, constant) raises MicrographError naming the file.
    """
    path = str(path)
    if not os.path.exists(path):
        raise MicrographError(f"micrograph not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise MicrographError(f"{path}: not a readable MRC file (bad header or truncated data)")
                data = np.asarray(mrc.data)
                vs = float(mrc.voxel_size.x)
    except MicrographError:
        raise
    except Exception as exc:  # mrcfile raises ValueError/OSError subclasses on corrupt files
        raise MicrographError(f"{path}: cannot read as MRC ({exc})") from exc
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise MicrographError(f"{path}: expected a 2D micrograph, got data of shape {data.shape}")
    if data.size == 0 or min(data.shape) < 8:
        raise MicrographError(f"{path}: micrograph is empty or too small ({data.shape})")
    if np.iscomplexobj(data):
        raise MicrographError(f"{path}: complex-valued MRC (mode {data.dtype}) is not a micrograph")
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        raise MicrographError(f"{path}: micrograph contains NaN or infinite values")
    if float(data.std()) == 0.0:
        raise MicrographError(f"{path}: micrograph is constant (all pixels equal)")
    return data, (vs if vs != 0 and np.isfinite(vs) else None)  # a negative size is kept, to be reported as such


def fourier_crop(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Band-limit and resample ``image`` to ``shape`` by cropping its spectrum.

    Keeps the DC term and sample 0 aligned, so coordinates scale by n_orig / n_new (coords.Frame).
    """
    ny, nx = image.shape
    my, mx = shape
    if (my, mx) == (ny, nx):
        return image.astype(np.float32, copy=True)
    if my > ny or mx > nx:
        raise ValueError("fourier_crop only downsamples")
    spec = np.fft.rfft2(image.astype(np.float64))
    top = spec[: (my + 1) // 2, : mx // 2 + 1]
    bottom = spec[ny - my // 2 :, : mx // 2 + 1]
    cropped = np.concatenate([top, bottom], axis=0)
    out = np.fft.irfft2(cropped, s=(my, mx)) * (my * mx) / (ny * nx)
    return out.astype(np.float32)


def resolve_normalisation(method: str | None = None) -> str:
    """``method``, else $CRYOAL_NORMALISATION, else the default; an unknown name is an error naming the choices.

    Why an environment variable: the normalisation decides the features of every command (rounds,
    benchmark, predict), and the older methods stay selectable without a flag on each of them.
    """
    m = method or os.environ.get("CRYOAL_NORMALISATION") or DEFAULT_NORMALISATION
    if m not in NORMALISATIONS:
        where = "" if method else " (from $CRYOAL_NORMALISATION)"
        raise ValueError(f"unknown normalisation {m!r}{where}; choose one of {', '.join(NORMALISATIONS)}")
    return m


def normalise(image: np.ndarray, method: str | None = None, sample: int = 10, seed: int = 0,
              device: str | None = None) -> np.ndarray:
    """Per-micrograph normalisation as ``topaz preprocess`` does it, so the pretrained head sees what it was trained on.

    Topaz fits a two-component Gaussian mixture (Beta(900, 1) prior on the weight) and centres and
    scales the image by its dominant component.  Methods:

    * ``gmm`` (default): that fit on ALL pixels via a sort and a histogram (``normalise.fit_gmm``):
      ~0.05 s per 686^2 image on one core, within Topaz's own float32 noise of its full fit;
    * ``gmm-sample``: Topaz's own fit (``topaz.stats.norm_fit``) on a deterministic 1-in-``sample``
      pixel subset, the method before (0.7-0.9 s; up to 0.24 from the full fit); ``device``
      'cuda...' runs it on the GPU;
    * ``gmm-full``: Topaz's own fit on every pixel, the reference (5-10 s per image);
    * ``affine``: mean / std.
    """
    x = np.asarray(image, dtype=np.float32)
    method = resolve_normalisation(method)
    if method == "affine":
        mu, sd = float(x.mean()), float(x.std())
    elif method == "gmm":
        from .normalise import fit_gmm

        fit = fit_gmm(x)
        mu, sd = fit.mu, fit.std
    else:
        import torch
        from topaz.stats import norm_fit

        flat = x.ravel()
        step = 1 if method == "gmm-full" else max(sample, 1)
        n = max(int(round(flat.size / step)), min(flat.size, 1000))
        sub = flat[np.random.default_rng(seed).choice(flat.size, size=n, replace=False)] if n < flat.size else flat
        # One torch thread: the fit is ~1000 tiny reductions, and thread hand-offs made it 25x slower
        # on a loaded 2-core machine (22 s vs 0.9 s); one thread also makes the result reproducible.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            mu, sd = norm_fit(np.ascontiguousarray(sub), alpha=900, beta=1, scale=flat.size / sub.size,
                              num_iters=100, use_cuda=bool(device and str(device).startswith("cuda")))[:2]
        finally:
            torch.set_num_threads(threads)
        mu, sd = float(mu), float(sd)
    if not np.isfinite(sd) or sd <= 0:
        mu, sd = float(x.mean()), float(x.std()) or 1.0
    return ((x - mu) / sd).astype(np.float32)


def load_micrograph(
    path: str | os.PathLike,
    working_pixel_size: float = 8.0,
    pixel_size: float | None = None,
    name: str | None = None,
    device: str | None = None,
    normalisation: str | None = None,
    timings: dict | None = None,
    crop_device: str | None = None,
) -> Micrograph:
    """Read, Fourier-crop to the working pixel size and normalise one micrograph.

    ``pixel_size`` overrides the header (needed when the header is missing or wrong);
    ``normalisation``: see ``normalise`` (None: $CRYOAL_NORMALISATION or the default);
    ``timings``: filled with the seconds of each stage (read, crop, normalise), for profiling;
    ``crop_device``: crop with torch.fft on that device (``crop_torch``; within ~1e-6 of the
    image's standard deviation from the numpy crop), None: numpy.
    """
    from .validate import InputError, check_pixel_size

    method = resolve_normalisation(normalisation)
    t0 = time.perf_counter()
    data, header_ps = read_mrc(path)
    digest = file_digest(path)
    try:
        if pixel_size:
            ps = check_pixel_size(pixel_size, f"{path}: the pixel size given for it (--pixel-size or STAR/.cs metadata)",
                                  "check that value")
        else:
            ps = check_pixel_size(header_ps, f"{path} (MRC header)", "give it with --pixel-size (or in the STAR/.cs metadata)")
    except InputError as exc:
        raise MicrographError(str(exc)) from None
    if header_ps and header_ps > 0 and pixel_size and abs(header_ps - pixel_size) / pixel_size > 0.02:
        warnings.warn(
            f"{path}: header pixel size {header_ps:.3f} A differs from the given {pixel_size:.3f} A; using the given one"
        )
    shape = working_shape(data.shape, ps, working_pixel_size)
    t1 = time.perf_counter()
    if crop_device is None:
        cropped = fourier_crop(data, shape)
    else:
        from .crop_torch import fourier_crop_torch

        cropped = fourier_crop_torch(data, shape, crop_device)
    t2 = time.perf_counter()
    small = normalise(cropped, method, device=device)
    if timings is not None:
        timings.update(read=t1 - t0, crop=t2 - t1, normalise=time.perf_counter() - t2)
    frame = Frame(original_shape=tuple(data.shape), working_shape=shape, pixel_size=float(ps))
    return Micrograph(
        name=name or micrograph_name(path), path=str(path), image=small, frame=frame, digest=digest,
        normalisation=method,
    )


def list_micrographs(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MicrographError(f"micrograph folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in MICROGRAPH_SUFFIXES)
    if not files:
        raise MicrographError(f"{folder}: no .mrc files")
    return files
