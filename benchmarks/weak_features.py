"""A stand-in for a protein the backbone knows less well: Topaz's features with smooth noise added.

Why: issue 16's new proteins have a weak pretrained head (AP 0.40-0.44) *and* weak features (the
linear ceiling on all training particles 0.70-0.73, against 0.85-0.90 on the shared datasets), and
neither is shared.  The weak-head stand-in (weak_head.py) keeps the features, so every recipe
recovers within 100 labels.  Here each of the 128 feature channels gets Gaussian noise, smoothed
over a few working pixels as the features themselves are and scaled to ``sigma`` times that
channel's own spread, one fixed draw per micrograph: every direction of the feature space carries
less about the particles, the ceiling falls, and Topaz's head (unchanged) scores worse.  '~AP'
then turns that head further (weak_head.weaken) to the new proteins' pretrained AP.

What it does not imitate: the noise is random, not a backbone's particular blindness to an
unfamiliar protein (ice, aggregates and empty micelles look like particles to it, not random spots).
Tried first and dropped: projecting onto k random directions of the 128 (the head's AP went *up* at
k = 4-8 on EMPIAR-10028 and jumped about with k on -10017: the features are redundant, and a model
with 4-16 weights learns unlike one with 128).
"""
from __future__ import annotations

import zlib

import numpy as np
from scipy.ndimage import gaussian_filter

from cryoal_ext.features import FeatureMap, head_of
from cryoal_ext.learner import Item
from weak_head import head_model

SEED = 17  # one fixed draw of the noise: a stand-in, not a search over draws
SMOOTH_PX = 2.0  # the noise's correlation length in working pixels (8 A/px): about the features' own


def noise(name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Unit-variance smooth noise for one micrograph, the same for the same name and shape."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    n = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0, SMOOTH_PX, SMOOTH_PX))
    return n / n.reshape(shape[0], -1).std(axis=1)[:, None, None]


def add_noise(data: dict, feature_model: str, sigma: float) -> dict:
    """``data`` (benchmark.load_data) with noise of ``sigma`` x each channel's spread added to the features.

    The head stays Topaz's (``head``, for weak_head.use and weak_head.weaken); the baseline score is
    its map on the noisy features.
    """
    w0, b0 = head_of(feature_model)
    head = head_model(w0, b0)
    feats = {n: np.asarray(it.fmap.features, dtype=np.float32) for n, it in data["items"].items()}
    spread = np.sqrt(np.mean([f.reshape(f.shape[0], -1).var(axis=1) for f in feats.values()], axis=0))
    items = {}
    for n, it in data["items"].items():
        g = feats[n] + sigma * spread[:, None, None] * noise(n, feats[n].shape)
        items[n] = Item(it.mic, FeatureMap(g.astype(np.float16), head.logit_map(g)))
    return dict(data, items=items, head=(w0, b0),
                weak_features={"sigma": sigma, "smooth_px": SMOOTH_PX, "noise_seed": SEED})
