"""Dense per-pixel features and the baseline score from Topaz's pretrained detectors."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .io import Micrograph

PRETRAINED = ("resnet16_u32", "resnet16_u64", "resnet8_u32", "resnet8_u64")
CACHE_VERSION = "2"  # bump when preprocessing changes, so stale caches are not reused


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_MODELS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def load_pretrained(name: str = "resnet16_u32", device: str = "cpu"):
    """Topaz pretrained detector in dense ('filled') mode, loaded the way topaz-em loads it."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown feature model {name!r}; choose one of {', '.join(PRETRAINED)}")
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


def compute_features(image: np.ndarray, name: str = "resnet16_u32", device: str | None = None):
    """Run the backbone once: (features float16 (C,H,W), baseline logits float32 (H,W))."""
    import torch

    device = device or default_device()
    model = load_pretrained(name, device)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
        z = model.features(x)
        s = model.classifier(z)
        feats = z[0].to(torch.float16).cpu().numpy()
        score = s[0, 0].float().cpu().numpy()
    return feats, score


class FeatureCache:
    """Features on disk as float16 .npy, memory-mapped on reuse.

    Keyed by micrograph content, feature model, working shape and preprocessing version, so a
    second round or a second command never recomputes them and a changed file never hits.
    """

    def __init__(self, folder: str | os.PathLike | None, model: str = "resnet16_u32", device: str | None = None):
        self.folder = Path(folder) if folder else None
        self.model = model
        self.device = device
        self.hits = 0
        self.misses = 0

    def _stem(self, mic: Micrograph) -> Path:
        ny, nx = mic.frame.working_shape
        return self.folder / f"{mic.name}.{mic.digest[:16]}.{self.model}.{ny}x{nx}.v{CACHE_VERSION}"

    def get(self, mic: Micrograph) -> FeatureMap:
        if self.folder is None:
            self.misses += 1
            return FeatureMap(*compute_features(mic.image, self.model, self.device))
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
        feats, score = compute_features(mic.image, self.model, self.device)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(fpath) as tmp:
            np.save(tmp, feats)
        with atomic_path(spath) as tmp:
            np.save(tmp, score)
        return FeatureMap(np.load(fpath, mmap_mode="r"), score)
