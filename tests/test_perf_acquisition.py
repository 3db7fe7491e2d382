"""The fast proposal path gives exactly the full computation's answer (issue 6, target 1)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cryoal_ext.acquisition import block_labelled, entropy, entropy_peaks, peaks
from cryoal_ext.extract import nms, nms_top

LOWEST = -np.finfo(np.float32).max


def full_peaks(values, radius, k, exclude=None, margin=0):
    """The reference: every pixel sorted, the whole greedy walk, then the first k."""
    v = block_labelled(values, *exclude, radius) if exclude is not None else np.array(values, np.float32)
    if margin:
        v[:margin], v[-margin:], v[:, :margin], v[:, -margin:] = -np.inf, -np.inf, -np.inf, -np.inf
    iy, ix, val = nms(v, radius, threshold=LOWEST)
    return iy[:k], ix[:k], val[:k]


def logit_maps(n=40, seed=0):
    rng = np.random.default_rng(seed)
    for trial in range(n):
        ny, nx = (int(v) for v in rng.integers(40, 260, 2))
        z = gaussian_filter(rng.standard_normal((ny, nx)), rng.uniform(0.5, 6.0)) * rng.uniform(1.0, 300.0)
        z = z.astype(np.float32)
        if trial % 5 == 0:
            z = np.round(z, 1)  # many exact ties
        if trial % 7 == 0:
            z[:8] = 0.0  # a flat band of maximal entropy
        ex = (rng.integers(0, ny, 6), rng.integers(0, nx, 6)) if trial % 2 else None
        yield z, float(rng.uniform(1.0, 25.0)), int(rng.integers(1, 40)), ex, int(rng.integers(0, 5)) if trial % 3 == 0 else 0


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_peaks_equal_full_computation(seed):
    for z, r, k, ex, margin in logit_maps(seed=seed):
        ref = full_peaks(entropy(z), r, k, ex, margin)
        got = entropy_peaks(z, r, k, exclude=ex, margin=margin)
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)


def test_peaks_with_max_peaks_equal_full_computation():
    for z, r, k, ex, margin in logit_maps(seed=3):
        for values in (z, -z):
            ref = full_peaks(values, r, k, ex, margin)
            got = peaks(values, r, exclude=ex, max_peaks=k, margin=margin)
            for a, b in zip(ref, got):
                np.testing.assert_array_equal(a, b)


def test_nms_top_with_threshold_and_tiny_first_set():
    """Forcing the candidate set to start tiny exercises the grow-and-retry path."""
    for z, r, k, _, _ in logit_maps(seed=4):
        thr = float(np.quantile(z, 0.8))
        ref = nms(z, r, threshold=thr)
        got = nms_top(z, r, k, threshold=thr, first=16)
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a[:k], b)


def test_entropy_values_bit_identical_on_subsets():
    """entropy_peaks relies on element-wise entropy giving the same bits on a subset."""
    z = (np.random.default_rng(5).standard_normal(100_003) * 30).astype(np.float32)
    idx = np.sort(np.random.default_rng(6).choice(z.size, 1_001, replace=False))
    np.testing.assert_array_equal(entropy(z)[idx], entropy(z[idx]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_and_edge_cases():
    z = np.zeros((30, 30), np.float32)
    assert [a.size for a in entropy_peaks(z, 5.0, 0)] == [0, 0, 0]
    z[3, 4] = np.nan
    ref = full_peaks(entropy(z), 5.0, 3)
    got = entropy_peaks(z, 5.0, 3)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
