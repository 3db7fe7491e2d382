"""Dense per-pixel features and the baseline score from Topaz's pretrained detectors."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import atomic_path
from .io import Micrograph

PRETRAINED = ("resnet16_u32", "resnet16_u64", "resnet8_u32", "resnet8_u64")
# "+viewsN": the backbone's features averaged over N rotated/flipped copies of the micrograph, mapped
# back onto it.  Topaz's network is not rotation invariant and particles lie at every angle, so the
# average is a better per-pixel description: on EMPIAR-10028/-10017 (5 splits) 8 views raised the
# all-label ceiling by 0.010/0.024 AP and AP at 100 labels by 0.016/0.018 (benchmarks/README.md).
VIEWS = {1: "", 2: "+views2", 4: "+views4", 8: "+views8"}
VIEW_ORDER = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}  # which views (see _view) each count averages
FEATURE_MODELS = tuple(b + s for b in PRETRAINED for s in VIEWS.values())
DEFAULT_FEATURE_MODEL = "resnet16_u32+views8"
CACHE_VERSION = "3"  # bump when preprocessing changes, so stale caches are not reused (3: normalisation in the key)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS = ("fp32", "fp16", "bf16")
_PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16",
                      "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}


def resolve_precision(precision: str | None, device: str):
    """``precision`` ('fp32', 'fp16', 'bf16') -> the autocast dtype for the backbone (None: float32).

    float16 is refused on the CPU (torch's CPU float16 convolutions are slow or missing);
    bfloat16 runs on both (CPU autocast supports it; on the CPU it is rarely faster).
    """
    import torch

    p = _PRECISION_ALIASES.get(str(precision or "fp32").lower())
    if p is None:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    on_cuda = str(device).startswith("cuda")
    if p == "fp16" and not on_cuda:
        raise ValueError(f"float16 (--half / --precision fp16) needs a CUDA device, not {device!r}; "
                         "use --precision bf16 on the CPU, or leave the precision at fp32")
    if p == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device}: this GPU has no bfloat16; use --precision fp16")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[p]


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); None where unknown.

    Why: without them torch emulates bfloat16, and one view of resnet16_u32 on a 64 x 64 image took
    10.7 s against 0.13 s in float32 (a 2-core Xeon with AVX2 only).
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def precision_warning(dtype, device: str, native: bool | None = None) -> str | None:
    """A line for the user when bf16 was asked for on a CPU that would emulate it (else None)."""
    import torch

    if dtype is not torch.bfloat16 or str(device).startswith("cuda"):
        return None
    native = cpu_has_bf16() if native is None else native
    if native is not False:
        return None
    return ("--precision bf16: this CPU has no bfloat16 instructions (no AVX512-BF16 or AMX), so torch emulates "
            "it, 30-80x slower than fp32 here; leave the precision at fp32 on this machine")


def autocast(device: str, dtype):
    """Mixed precision for the block (``dtype`` None: plain float32).  Thread-local, like torch's."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype)


@contextlib.contextmanager
def blas_threads(n: int | None = 1) -> Iterator[None]:
    """Limit the BLAS thread pools (numpy's and scipy's OpenBLAS) inside the block.

    Why: the BLR fit alternates numpy mat-vecs on ~30k x 128 arrays with scipy's L-BFGS-B step,
    and the two OpenBLAS pools (one bundled with numpy, one with scipy) spin against each other
    and against torch's OpenMP threads: on 2 cores one thread each made the fit 3x faster.  A
    no-op when threadpoolctl is absent or ``n`` is None.
    """
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


_MODELS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def parse_feature_model(name: str) -> tuple[str, int]:
    """'resnet16_u32+views8' -> ('resnet16_u32', 8); a bare backbone name is one view."""
    backbone, plus, suffix = str(name).partition("+")
    views = {v.lstrip("+"): n for n, v in VIEWS.items() if v}.get(suffix) if plus else 1
    if backbone not in PRETRAINED or views is None:
        raise ValueError(f"unknown feature model {name!r}; choose one of {', '.join(FEATURE_MODELS)}")
    return backbone, views


def _view(x, k: int):
    """View k of a (..., H, W) tensor: k % 4 quarter turns, after a left-right flip when k >= 4."""
    import torch

    if k == 0:
        return x  # torch.rot90 by 0 copies; one view must cost what the bare backbone costs
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _unview(x, k: int):
    """Inverse of ``_view``: brings a dense map computed on view k back onto the original pixels."""
    import torch

    if k == 0:
        return x
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def view_mean(fn, x, views: int):
    """Mean over ``views`` rotated/flipped copies of ``fn(view(x))`` mapped back: dense in, dense out.

    Exact pixel alignment holds because Topaz's filled network pads symmetrically and uses odd,
    centred kernels.  Views 2 = identity + flip, 4 = the quarter turns, 8 = both.  ``fn`` must
    return a new tensor (a network's output): the sum accumulates into the first view's in place.
    """
    return view_means(fn, x, (int(views),))[int(views)]


def view_mean_batched(fn, x, views: int, max_images: int | None = None):
    """``view_mean`` with the views of all N images run as few forward passes (issue 15, part 2).

    Why: on a GPU, 8 passes of N images each cost 8 rounds of kernel launches; stacking the views
    gives one pass of 8N images (or passes of at most ``max_images``; None or 0: no limit).  A
    quarter turn transposes the shape, so on non-square images views 1, 3, 5, 7 form a second
    group.  The mapped-back maps are summed in ``view_mean``'s order with its operations, so the
    result equals it up to the network's own batch-size rounding (tested: 1e-5).
    """
    import torch

    order = VIEW_ORDER[int(views)]
    n = x.shape[0]
    groups: dict[tuple[int, int], list[int]] = {}
    for k in order:
        groups.setdefault(tuple(_view(x[:1], k).shape[-2:]), []).append(k)
    outs: dict[int, object] = {}
    for ks in groups.values():
        stacked = torch.cat([_view(x, k) for k in ks], dim=0)  # view-major: rows k*n .. k*n + n - 1
        step = stacked.shape[0] if not max_images else max(1, int(max_images))
        parts = [fn(stacked[i : i + step]) for i in range(0, stacked.shape[0], step)]
        z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        for j, k in enumerate(ks):
            outs[k] = _unview(z[j * n : (j + 1) * n], k).float()
    acc = None
    for k in order:
        acc = outs[k] if acc is None else acc.add_(outs[k])
    return acc / len(order) if len(order) > 1 else acc


def view_means(fn, x, views=tuple(VIEWS), seconds: dict | None = None) -> dict:
    """``{n: view_mean(fn, x, n)}`` for several view counts from ONE pass over the views they need.

    Why: the subsets are nested (1 and 4 are prefixes of 8, 2 = views 0 and 4), so the 8 backbone
    calls of 8 views give every count; each count is summed in view order, the one loop behind
    ``view_mean`` too, so the maps are bit-identical to its.  ``seconds``: filled with each view's time.
    """
    counts = [int(n) for n in views]
    need = sorted({k for n in counts for k in VIEW_ORDER[n]})
    acc: dict = {}
    for k in need:
        t = time.perf_counter()
        z = _unview(fn(_view(x, k)), k).float()
        if seconds is not None:
            seconds[k] = time.perf_counter() - t
        users = [n for n in counts if k in VIEW_ORDER[n]]
        for n in users:  # a map shared by several counts is copied before one of them accumulates into it
            acc[n] = acc[n].add_(z) if n in acc else (z if len(users) == 1 else z.clone())
    return {n: acc[n] / len(VIEW_ORDER[n]) if len(VIEW_ORDER[n]) > 1 else acc[n] for n in counts}


def load_pretrained(name: str = DEFAULT_FEATURE_MODEL, device: str = "cpu"):
    """Topaz pretrained detector in dense ('filled') mode, loaded the way topaz-em loads it.

    ``name`` may carry a views suffix: the network is the same, only its use differs.
    """
    name, _ = parse_feature_model(name)
    key = (name, device)
    with _LOCK:
        if key not in _MODELS:
            from topaz.model.factory import load_model

            model = load_model(name)
            model.eval()
            model.fill()
            _MODELS[key] = model.to(device)
        return _MODELS[key]


def head_of(name: str) -> tuple[np.ndarray, float]:
    """Weights and bias of the pretrained linear head (the baseline is a logistic regression too)."""
    model = load_pretrained(name, "cpu")
    w = model.classifier.weight.detach().cpu().numpy().reshape(-1).astype(np.float64)
    b = float(model.classifier.bias.detach().cpu().numpy().reshape(-1)[0])
    return w, b


@dataclass
class FeatureMap:
    """Features (C, ny, nx) float16, possibly memory-mapped, and the baseline logit map (ny, nx)."""

    features: np.ndarray
    score: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.score.shape)

    def at(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """Feature rows (n, C) float32 at the given pixels."""
        return np.asarray(self.features[:, iy, ix], dtype=np.float32).T

    @property
    def nbytes_float32(self) -> int:
        return int(np.prod(self.features.shape)) * 4

    def in_memory(self) -> "FeatureMap":
        """The same features as a float32 array in RAM (exact: float16 -> float32 loses nothing).

        Why: a round reads every training pixel's features (logits for entropy) and gathers label
        rows; converting the float16 memory map on each read was half the proposal time.  Costs
        C*H*W*4 bytes (241 MB for a 686x686 micrograph with 128 features), so meant for the few
        training micrographs of a round, never for prediction.
        """
        if self.features.dtype == np.float32 and not isinstance(self.features, np.memmap):
            return self
        feats = np.empty(self.features.shape, dtype=np.float32)
        rows = 64
        for r in range(0, feats.shape[1], rows):  # chunked: never a second full-size temporary
            feats[:, r : r + rows] = self.features[:, r : r + rows]
        return FeatureMap(feats, np.asarray(self.score, dtype=np.float32))


def compute_features(image: np.ndarray, name: str = DEFAULT_FEATURE_MODEL, device: str | None = None,
                     precision: str | None = None):
    """Run the backbone once: (features float16 (C,H,W), baseline logits float32 (H,W))."""
    return compute_features_batch([image], name, device, precision)[0]


def compute_features_batch(images: list[np.ndarray], name: str = DEFAULT_FEATURE_MODEL, device: str | None = None,
                           precision: str | None = None, batch_size: int = 4):
    """``compute_features`` for several images, up to ``batch_size`` equal-shape ones per forward pass.

    ``precision`` 'fp16'/'bf16' runs the backbone under autocast (the features are stored as
    float16 either way; the baseline head runs in float32).  Images of different shapes are fine:
    a batch holds consecutive images of one shape.
    """
    import torch

    device = device or default_device()
    dtype = resolve_precision(precision, device)
    model = load_pretrained(name, device)
    views = parse_feature_model(name)[1]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    i = 0
    while i < len(images):
        j = i + 1
        while j < len(images) and j - i < max(1, int(batch_size)) and images[j].shape == images[i].shape:
            j += 1
        x = np.stack([np.ascontiguousarray(im, dtype=np.float32) for im in images[i:j]])[:, None]
        with torch.inference_mode():
            t = torch.from_numpy(x).to(device)
            with autocast(device, dtype):
                z = view_mean(model.features, t, views)
            feats, score = _with_head(model, z)
        out += [(feats[k], score[k]) for k in range(j - i)]
        i = j
    return out


def _with_head(model, z) -> tuple[np.ndarray, np.ndarray]:
    """Dense features (N, C, H, W) -> (float16 features, float32 baseline logits (N, H, W)), on the host."""
    import torch

    z = z.float()
    s = model.classifier(z)
    return z.to(torch.float16).cpu().numpy(), s[:, 0].float().cpu().numpy()


def compute_features_views(image: np.ndarray, backbone: str = "resnet16_u32", views=tuple(VIEWS),
                           device: str | None = None, precision: str | None = None,
                           seconds: dict | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``compute_features(image, backbone + VIEWS[n])`` for every ``n`` in ``views`` from one pass (``view_means``).

    The results are exactly those of ``compute_features`` (same arithmetic, same order), so they
    can go into the ``FeatureCache`` of each '+viewsN' model (benchmarks/view_count.py).
    """
    import torch

    device = device or default_device()
    dtype = resolve_precision(precision, device)
    model = load_pretrained(backbone, device)
    x = np.ascontiguousarray(image, dtype=np.float32)[None, None]
    out = {}
    with torch.inference_mode():
        t = torch.from_numpy(x).to(device)
        with autocast(device, dtype):
            zs = view_means(model.features, t, views, seconds)
        for n, z in zs.items():
            feats, score = _with_head(model, z)
            out[n] = (feats[0], score[0])
    return out


class FeatureCache:
    """Features on disk as float16 .npy, memory-mapped on reuse.

    Keyed by micrograph content, feature model, working shape, normalisation and preprocessing
    version, so a second round or a second command never recomputes them, and a changed file or
    features of an image normalised another way never hit.
    """

    def __init__(self, folder: str | os.PathLike | None, model: str = DEFAULT_FEATURE_MODEL, device: str | None = None,
                 precision: str | None = None):
        from .validate import check_writable

        parse_feature_model(model)  # a bad name fails here, before any micrograph is read
        check_writable(folder, "feature cache folder")  # and a read-only cache, not after the features are computed
        self.folder = Path(folder) if folder else None
        self.model = model
        self.device = device
        self.precision = _PRECISION_ALIASES.get(str(precision or "fp32").lower(), precision)
        self.hits = 0
        self.misses = 0

    def _stem(self, mic: Micrograph) -> Path:
        ny, nx = mic.frame.working_shape
        tag = "" if self.precision == "fp32" else f".{self.precision}"  # mixed-precision features never mix in
        return self.folder / (f"{mic.name}.{mic.digest[:16]}.{self.model}{tag}.{ny}x{nx}."
                              f"{mic.normalisation}.v{CACHE_VERSION}")

    def get(self, mic: Micrograph) -> FeatureMap:
        if self.folder is None:
            self.misses += 1
            return FeatureMap(*compute_features(mic.image, self.model, self.device, self.precision))
        stem = self._stem(mic)
        fpath, spath = Path(f"{stem}.features.npy"), Path(f"{stem}.score.npy")
        if fpath.exists() and spath.exists():
            try:
                feats = np.load(fpath, mmap_mode="r")
                score = np.load(spath)
                if feats.shape[1:] == score.shape == tuple(mic.frame.working_shape):
                    self.hits += 1
                    return FeatureMap(feats, score)
            except (ValueError, OSError):
                pass  # a damaged cache entry is recomputed below
        self.misses += 1
        return self.put(mic, *compute_features(mic.image, self.model, self.device, self.precision))

    def has(self, mic: Micrograph) -> bool:
        """Whether this micrograph's entry is on disk (not whether it is readable: ``get`` checks that)."""
        if self.folder is None:
            return False
        stem = self._stem(mic)
        return Path(f"{stem}.features.npy").exists() and Path(f"{stem}.score.npy").exists()

    def put(self, mic: Micrograph, feats: np.ndarray, score: np.ndarray) -> FeatureMap:
        """Store features computed elsewhere (they must be this cache's model's, e.g. ``compute_features_views``)."""
        if self.folder is None:
            return FeatureMap(feats, score)
        if feats.shape[1:] != score.shape or score.shape != tuple(mic.frame.working_shape):
            raise ValueError(f"{mic.name}: features {feats.shape} / score {score.shape} do not match the working "
                             f"shape {tuple(mic.frame.working_shape)}")
        stem = self._stem(mic)
        fpath, spath = Path(f"{stem}.features.npy"), Path(f"{stem}.score.npy")
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(fpath) as tmp:
            np.save(tmp, feats)
        with atomic_path(spath) as tmp:
            np.save(tmp, score)
        return FeatureMap(np.load(fpath, mmap_mode="r"), score)
