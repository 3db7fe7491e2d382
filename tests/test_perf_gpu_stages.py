"""Issue 15, part 2: the GPU stages (torch.fft crop, batched views, device NMS), checked on the CPU.

Each stage runs here with torch CPU tensors and is compared with the CPU path it replaces: the
crop with ``io.fourier_crop``, the batched views with ``features.view_mean``, the device NMS with
``extract.nms`` (exactly: coordinates, values, order).  No GPU is needed; the GPU rates come
from ``benchmarks/gpu_predict.py --pipeline`` on a GPU machine (benchmarks/README.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryoal_ext.crop_torch import fourier_crop_torch
from cryoal_ext.extract import extract_picks, nms
from cryoal_ext.io import fourier_crop, load_micrograph, read_mrc
from cryoal_ext.nms_torch import disc_max, nms_torch

EXAMPLE = Path(__file__).resolve().parents[1] / "cryoal_ext" / "example_data" / "empiar10028_small"
MICS = sorted((EXAMPLE / "micrographs").glob("*.mrc"))


# ---- Fourier crop -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,out", [((64, 64), (32, 32)), ((65, 63), (33, 31)), ((64, 66), (31, 40)),
                                       ((50, 70), (50, 35)), ((40, 40), (40, 40)), ((96, 80), (47, 80))])
def test_torch_crop_equals_numpy_crop(shape, out):
    rng = np.random.default_rng(sum(shape) + sum(out))
    im = (rng.standard_normal(shape) * 3 + 1e4).astype(np.float32)  # an MRC-like offset
    ref = fourier_crop(im, out)
    got64 = fourier_crop_torch(im, out, dtype="float64")
    got32 = fourier_crop_torch(im, out)
    assert got32.dtype == got64.dtype == np.float32 and got32.shape == got64.shape == out
    np.testing.assert_array_equal(got64, ref)  # float64: the same float32 after rounding
    assert np.abs(got32 - ref).max() <= 1e-5 * ref.std() + 1e-3  # float32 FFT: ~1e-6 of the std, plus one ulp of 1e4


def test_torch_crop_of_a_real_micrograph():
    data, _ = read_mrc(MICS[0])
    ref = fourier_crop(data, (343, 343))
    got = fourier_crop_torch(data, (343, 343))
    assert np.abs(got - ref).max() <= 1e-5 * ref.std()
    np.testing.assert_array_equal(fourier_crop_torch(data, (343, 343), dtype="float64"), ref)
    m_np = load_micrograph(MICS[0])
    m_t = load_micrograph(MICS[0], crop_device="cpu")
    assert np.abs(m_t.image - m_np.image).max() < 1e-4  # after the normalisation fit, in normalised units
    with pytest.raises(ValueError, match="downsamples"):
        fourier_crop_torch(data[:32, :32], (40, 40))
    with pytest.raises(ValueError, match="float32 or float64"):
        fourier_crop_torch(data, (64, 64), dtype="float16")


# ---- views as one batched forward ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model(perturbed_head):
    return perturbed_head


@pytest.mark.parametrize("fm", ["resnet16_u32+views8", "resnet16_u32+views2"])
def test_batched_views_equal_sequential_views(model, fm):
    import torch

    from cryoal_ext.predict import picking_net

    img = load_micrograph(MICS[0]).image
    seq = picking_net(model, fm, "cpu")
    for shape in ((40, 40), (32, 48)):  # square; non-square: the odd quarter turns form a second group
        x = torch.from_numpy(np.stack([img[: shape[0], : shape[1]], img[100 : 100 + shape[0], 50 : 50 + shape[1]]]))
        x = x[:, None].contiguous()
        with torch.inference_mode():
            ref = seq(x).numpy()
            for vb in (3, 100):
                got = picking_net(model, fm, "cpu", view_batch=vb)(x).numpy()
                assert got.shape == ref.shape
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_view_mean_batched_is_view_mean_for_an_exact_function():
    """With a function that has no batch-size rounding, the two are bit-identical (same sums, same order)."""
    import torch

    from cryoal_ext.features import view_mean, view_mean_batched

    x = torch.from_numpy(np.random.default_rng(3).standard_normal((3, 1, 5, 7)).astype(np.float32))
    fn = lambda t: t * torch.arange(1, t.shape[-1] + 1, dtype=t.dtype) + t.roll(1, dims=-2)  # position-dependent
    for views in (1, 2, 4, 8):
        for mx in (None, 1, 2, 5):
            assert torch.equal(view_mean_batched(fn, x, views, mx), view_mean(fn, x, views))


# ---- NMS on the device --------------------------------------------------------------------------

def _same(a, b) -> bool:
    return all(np.array_equal(p, q) and p.dtype == q.dtype for p, q in zip(a, b))


def test_device_nms_equals_cpu_nms_on_random_maps():
    rng = np.random.default_rng(0)
    for t in range(240):
        ny, nx = (int(v) for v in rng.integers(1, 40, 2))
        kind = t % 4
        if kind == 0:
            s = rng.standard_normal((ny, nx))
        elif kind == 1:  # many ties: integer plateaus
            s = rng.integers(0, 4, (ny, nx))
        elif kind == 2:  # ties between far-apart pixels
            s = np.round(rng.standard_normal((ny, nx)), 1)
        else:  # smooth ridges (long suppression chains), constant borders
            yy, xx = np.mgrid[:ny, :nx]
            s = np.round(np.sin(xx / 3.0) + 0.3 * yy / max(ny, 1), 2)
            s[:, :2] = s[:2, :] = 1.0
        s = s.astype(np.float32)
        r = float(rng.choice([0, 0.5, 1, 2.3, 3, 5.5, 8, 60]))
        thr = None if t % 3 == 0 else float(rng.standard_normal())
        a = nms(s, r, thr)
        for rounds, tail in ((8, 0), (1, 0), (50, 5), (0, 0)):
            assert _same(a, nms_torch(s, r, thr, rounds=rounds, tail=tail)), (t, ny, nx, r, thr, rounds, tail)


def test_device_nms_corner_cases():
    s = np.zeros((9, 9), np.float32)
    s[0, 0] = s[8, 8] = s[0, 8] = 2.0  # peaks in the corners
    s[4, 4] = -0.0
    for r in (0.0, 3.0, 5.7, 20.0, 1e6):
        for thr in (None, -0.5, 0.0, 1.0, 2.0, 3.0):
            assert _same(nms(s, r, thr), nms_torch(s, r, thr, tail=0))
    z = np.zeros((6, 5), np.float32)
    z[::2] = -0.0  # +0.0 and -0.0 tie, as in numpy's sort
    assert _same(nms(z, 1.5, None), nms_torch(z, 1.5, None, tail=0))
    n = np.ones((7, 7), np.float32)
    n[3, 3] = np.nan  # NaN: the CPU walk as is
    assert _same(nms(n, 2.0, None), nms_torch(n, 2.0, None))
    assert _same(nms(n, 2.0, 0.5), nms_torch(n, 2.0, 0.5))
    # a numpy float64 threshold between two float32 values is compared as numpy compares it
    v = np.float32(0.1)
    m = np.full((4, 4), v, np.float32)
    for thr in (np.float64(v) + 1e-12, float(v) + 1e-12, np.float64(v) - 1e-12):
        assert _same(nms(m, 1.0, thr), nms_torch(m, 1.0, thr, tail=0))


def test_disc_max_is_the_max_over_the_disc():
    import torch

    from cryoal_ext.extract import _disc
    from cryoal_ext.nms_torch import _row_widths

    rng = np.random.default_rng(1)
    x = rng.standard_normal((13, 17)).astype(np.float32)
    for r in (0.0, 1.0, 2.5, 4.0, 30.0):
        dy, dx = _disc(min(r, float(np.hypot(13, 17)) + 1))
        ref = np.full_like(x, -np.inf)
        for a, b in zip(dy, dx):
            if abs(a) >= 13 or abs(b) >= 17:
                continue  # wholly outside the image
            sh = np.full_like(x, -np.inf)
            ys, xs = slice(max(a, 0), 13 + min(a, 0)), slice(max(b, 0), 17 + min(b, 0))
            yd, xd = slice(max(-a, 0), 13 + min(-a, 0)), slice(max(-b, 0), 17 + min(-b, 0))
            sh[yd, xd] = x[ys, xs]
            ref = np.maximum(ref, sh)
        got = disc_max(torch.from_numpy(x), _row_widths(r, x.shape)).numpy()
        np.testing.assert_array_equal(got, ref)


@pytest.fixture(scope="module")
def real_logits(model):
    """Logit maps of the bundled micrographs (one view), as the prediction network gives them."""
    import torch

    from cryoal_ext.predict import picking_net

    net = picking_net(model, "resnet16_u32", "cpu")
    out = []
    with torch.inference_mode():
        for f in MICS[:2]:
            img = load_micrograph(f).image
            out.append(net(torch.from_numpy(img)[None, None])[0, 0].numpy().copy())
    return out


def test_device_nms_equals_cpu_nms_on_real_logit_maps(real_logits):
    import torch

    from cryoal_ext.coords import Frame

    for z in real_logits:
        frame = Frame(original_shape=(512, 512), working_shape=z.shape, pixel_size=5.36)
        for radius in (28.0, 60.0):
            a = extract_picks("m", z, frame, radius)
            b = extract_picks("m", torch.from_numpy(z), frame, radius)
            assert len(a) > 10
            np.testing.assert_array_equal(a.x, b.x)
            np.testing.assert_array_equal(a.y, b.y)
            np.testing.assert_array_equal(a.score, b.score)
        thr = float(np.quantile(z, 0.9))
        assert _same(nms(z, 12.0, thr), nms_torch(z, 12.0, thr))
        # rounded to 2 decimals: plateaus of equal logits across the map
        zr = np.round(z, 2).astype(np.float32)
        assert _same(nms(zr, 12.0, -5.0), nms_torch(zr, 12.0, -5.0, tail=0))


# ---- the stream with every GPU stage on, on the CPU -----------------------------------------------

def test_stream_with_the_gpu_stages_gives_the_cpu_picks(model):
    from cryoal_ext.predict import PredictSettings, stream_predict

    inputs = [(f.stem, str(f), f.stem, None) for f in MICS[:1]]
    fm = "resnet16_u32+views2"
    base = list(stream_predict(inputs, model, lambda *_: 28.0, PredictSettings(feature_model=fm, device="cpu")))
    exact = list(stream_predict(inputs, model, lambda *_: 28.0,
                                PredictSettings(feature_model=fm, device="cpu", device_nms=True, view_batch=8,
                                                batch_size=2)))
    crop = list(stream_predict(inputs, model, lambda *_: 28.0,
                               PredictSettings(feature_model=fm, device="cpu", gpu_crop=True, device_nms=True)))
    for a, b, c in zip(base, exact, crop):
        assert a.name == b.name == c.name and len(a.picks) > 10
        assert set(b.seconds) >= {"read", "crop", "normalise", "network", "nms"}
        np.testing.assert_array_equal(a.picks.x, b.picks.x)
        np.testing.assert_array_equal(a.picks.y, b.picks.y)
        np.testing.assert_allclose(a.picks.score, b.picks.score, rtol=1e-5, atol=1e-7)
        # the float32 torch.fft crop moves pixels by ~1e-6 of their spread: the same picks to rounding
        top = min(len(a.picks), 200)
        np.testing.assert_array_equal(a.picks.x[:top], c.picks.x[:top])
        np.testing.assert_allclose(a.picks.score[:top], c.picks.score[:top], rtol=1e-4, atol=1e-6)


def test_predict_command_gpu_stage_flags(tmp_path):
    from cryoal_ext import cli
    from cryoal_ext.commands.predict import _switch

    assert (_switch("auto"), _switch("on"), _switch("off"), _switch(None)) == (None, True, False, None)
    rc = cli.main(["predict", str(MICS[0]), "--radius-px", "28", "--out-dir", str(tmp_path / "o"), "--device", "cpu",
                   "--feature-model", "resnet16_u32", "--device-nms", "on", "--gpu-crop", "on", "--view-batch", "4",
                   "--no-progress"])
    assert rc == 0 and (tmp_path / "o" / "picks.txt").exists()
    with pytest.raises(ValueError, match="--view-batch"):
        cli.main(["predict", str(MICS[0]), "--radius-px", "28", "--out-dir", str(tmp_path / "p"), "--device", "cpu",
                  "--view-batch", "-1", "--no-progress", "--debug"])
