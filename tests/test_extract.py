"""Non-maximum suppression against a brute-force loop, thresholds, probabilities, coordinates back to the file."""
from __future__ import annotations

import numpy as np
import pytest

from cryoal_ext.coords import Frame
from cryoal_ext.extract import Picks, extract_picks, nms, sigmoid


def brute_force_nms(score, radius, threshold=None):
    """The textbook loop: take the best remaining pixel (first in raster order on ties), suppress its disc."""
    s = np.array(score, dtype=np.float64, copy=True)
    ny, nx = s.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    alive = np.ones(s.shape, bool)
    out = []
    while alive.any():
        masked = np.where(alive, s, -np.inf)
        idx = int(np.argmax(masked))  # argmax returns the first maximum in raster order
        y, x = divmod(idx, nx)
        if threshold is not None and s[y, x] < threshold:
            break
        out.append((y, x, score[y, x]))
        alive &= (yy - y) ** 2 + (xx - x) ** 2 > radius * radius
        alive[y, x] = False
    return out


def _maps():
    rng = np.random.default_rng(0)
    yield "gaussian", rng.normal(size=(41, 57)).astype(np.float32)
    yield "ties", rng.integers(0, 4, size=(30, 45)).astype(np.float32)  # many equal values
    yield "smooth", np.cumsum(np.cumsum(rng.normal(size=(50, 33)), 0), 1).astype(np.float32)
    yield "flat", np.zeros((12, 17), np.float32)


@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 3.0, 4.7, 9.2])
def test_nms_equals_brute_force(radius):
    for name, score in _maps():
        iy, ix, v = nms(score, radius)
        ref = brute_force_nms(score, radius)
        assert list(zip(iy.tolist(), ix.tolist())) == [(y, x) for y, x, _ in ref], (name, radius)
        np.testing.assert_array_equal(v, [r[2] for r in ref])
        assert np.all(np.diff(v) <= 0)  # descending
        # every pair of picks is further apart than the radius
        d2 = (iy[:, None] - iy[None]) ** 2 + (ix[:, None] - ix[None]) ** 2
        np.fill_diagonal(d2, 10 ** 9)
        assert d2.min() > radius * radius


def test_nms_threshold_and_max_picks():
    rng = np.random.default_rng(1)
    score = rng.normal(size=(64, 48)).astype(np.float32)
    for thr in (-0.5, 0.8, 2.0, 10.0):
        iy, ix, v = nms(score, 2.5, threshold=thr)
        ref = brute_force_nms(score, 2.5, threshold=thr)
        assert [(y, x) for y, x, _ in ref] == list(zip(iy.tolist(), ix.tolist()))
        assert np.all(v >= thr)
    full = nms(score, 2.5)
    for k in (1, 5, 40, 10 ** 6):
        top = nms(score, 2.5, max_picks=k)
        n = min(k, full[0].size)
        for a, b in zip(top, full):
            np.testing.assert_array_equal(a, b[:n])


def test_extract_picks_scores_and_threshold():
    frame = Frame((100, 100), (100, 100), 1.0)
    logits = np.full((100, 100), -20.0, np.float32)  # probability ~2e-9: below min_score, never a pick
    spots = {(20, 30): 3.0, (70, 60): 0.0, (50, 80): -2.0, (85, 15): -8.0}  # (y, x): logit
    for (y, x), z in spots.items():
        logits[y, x] = z
    p = extract_picks("m", logits, frame, radius_px=5.0)
    assert isinstance(p, Picks) and p.name == "m"
    assert len(p) == 4  # logit -8 -> 3.4e-4 is kept; the -20 background is dropped by min_score 1e-4
    assert np.all((p.score > 0) & (p.score <= 1))
    np.testing.assert_allclose(p.score, 1.0 / (1.0 + np.exp(-np.array([3.0, 0.0, -2.0, -8.0]))), rtol=1e-6)
    assert list(zip(p.x.tolist(), p.y.tolist())) == [(30.0, 20.0), (60.0, 70.0), (80.0, 50.0), (15.0, 85.0)]
    strict = extract_picks("m", logits, frame, radius_px=5.0, threshold=0.5)
    assert len(strict) == 2 and np.all(strict.score >= 0.5)
    assert strict.score.tolist() == pytest.approx([1 / (1 + np.exp(-3.0)), 0.5])
    above = p.above(0.2)  # sigmoid(-2) = 0.119 falls out
    assert len(above) == 2 and np.all(above.score >= 0.2)


def test_extract_picks_min_score():
    frame = Frame((60, 60), (60, 60), 1.0)
    logits = np.full((60, 60), -30.0, np.float32)
    logits[10, 10], logits[40, 40], logits[20, 50] = 1.0, np.log(2e-4 / (1 - 2e-4)), np.log(5e-5 / (1 - 5e-5))
    p = extract_picks("m", logits, frame, radius_px=3.0)
    assert sorted(zip(p.x.tolist(), p.y.tolist())) == [(10.0, 10.0), (40.0, 40.0)]
    assert len(extract_picks("m", logits, frame, radius_px=3.0, min_score=1e-6)) == 3


def test_extract_picks_scales_back_to_file_pixels():
    """Peaks found on the working grid come back as file pixels, x = column and y = row, per-axis scale."""
    frame = Frame(original_shape=(600, 450), working_shape=(200, 90), pixel_size=1.0)  # scale_y 3, scale_x 5
    logits = np.full(frame.working_shape, -30.0, np.float32)
    peaks = [(20, 10, 4.0), (150, 70, 2.0), (100, 40, 1.0)]  # (iy, ix, logit) on the working grid
    for iy, ix, z in peaks:
        logits[iy, ix] = z
    p = extract_picks("m", logits, frame, radius_px=10.0)
    assert p.x.tolist() == [50.0, 350.0, 200.0]
    assert p.y.tolist() == [60.0, 450.0, 300.0]
    # and through the frame they land back on the same working pixels
    ix, iy = frame.to_working_index(p.x, p.y)
    assert list(zip(iy.tolist(), ix.tolist())) == [(a, b) for a, b, _ in peaks]


def test_radius_is_converted_to_working_pixels():
    frame = Frame((400, 400), (100, 100), 1.0)  # 4 file pixels per working pixel
    logits = np.full((100, 100), -30.0, np.float32)
    logits[50, 50], logits[50, 56] = 3.0, 2.0  # 6 working pixels = 24 file pixels apart
    assert len(extract_picks("m", logits, frame, radius_px=20.0)) == 2  # 5 working px < 6
    one = extract_picks("m", logits, frame, radius_px=28.0)  # 7 working px > 6: the weaker peak is suppressed
    assert len(one) == 1 and (one.x[0], one.y[0]) == (200.0, 200.0)


def test_sigmoid_is_stable():
    z = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    s = sigmoid(z)
    assert np.all(np.isfinite(s)) and s[2] == 0.5
    assert s[0] == 0.0 and s[-1] == 1.0
    np.testing.assert_allclose(s[1] + s[3], 1.0)
    np.testing.assert_allclose(s[1], np.exp(-40.0) / (1 + np.exp(-40.0)), rtol=1e-12)
