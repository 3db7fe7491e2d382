"""GPU code paths (issue 6, target 5), checked on the CPU: batching, precision, devices, readers.

No test here needs a GPU.  The device figures (micrographs/s, AP fp32 vs half) come from
``benchmarks/gpu_predict.py`` on a GPU machine; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from cryoal_ext.features import (compute_features, compute_features_batch, cpu_has_bf16, precision_warning,
                                 resolve_precision)
from cryoal_ext.io import load_micrograph
from cryoal_ext.predict import PredictSettings, backbone_seconds, picking_net, stream_predict

EXAMPLE = Path(__file__).resolve().parents[1] / "cryoal_ext" / "example_data" / "empiar10028_small"
MICS = sorted((EXAMPLE / "micrographs").glob("*.mrc"))


def inputs(files):
    return [(f.stem, str(f), f.stem, None) for f in files]


@pytest.fixture(scope="module")
def model(perturbed_head):
    return perturbed_head


@pytest.fixture(scope="module")
def images():
    """Two same-shape crops of real (normalised) micrographs, small enough for a fast CPU test."""
    return [load_micrograph(f).image[:160, :176].copy() for f in MICS[:2]]


def test_batched_net_equals_unbatched(model, images):
    import torch

    net = picking_net(model, device="cpu")
    with torch.inference_mode():
        one = [net(torch.from_numpy(im)[None, None])[0, 0].numpy() for im in images]
        both = net(torch.from_numpy(np.stack(images))[:, None])[:, 0].numpy()
    for a, b in zip(one, both):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_batched_features_equal_unbatched(images):
    singles = [compute_features(im, device="cpu") for im in images]
    mixed = images + [images[0][:96, :128]]  # a third, other-shape image: its own batch
    batched = compute_features_batch(mixed, device="cpu", batch_size=4)
    assert [f.shape for f, _ in batched] == [(128, 160, 176)] * 2 + [(128, 96, 128)]
    for (fa, sa), (fb, sb) in zip(singles, batched):
        np.testing.assert_allclose(fb.astype(np.float32), fa.astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(sb, sa, rtol=1e-5, atol=1e-5)


U32 = "resnet16_u32"  # one view: the stream's order and batching are the same for any view count, at 1/8 the cost


def test_stream_batch_sizes_give_the_same_picks(model):
    runs = [list(stream_predict(inputs(MICS), model, lambda *_: 28.0,
                                PredictSettings(device="cpu", batch_size=b, feature_model=U32)))
            for b in (1, 3)]
    for a, b in zip(*runs):
        assert a.name == b.name
        np.testing.assert_array_equal(a.picks.x, b.picks.x)
        np.testing.assert_allclose(a.picks.score, b.picks.score, rtol=1e-5)


def test_several_readers_keep_the_order_and_the_picks(model, tmp_path):
    import shutil

    files = []
    for k in range(5):
        p = tmp_path / f"m{k}.mrc"
        shutil.copy(MICS[k % len(MICS)], p)
        files.append(p)
    bad = tmp_path / "m2.mrc"
    bad.write_bytes(b"broken" * 50)
    one = list(stream_predict(inputs(files), model, lambda *_: 28.0,
                              PredictSettings(device="cpu", readers=1, feature_model=U32)))
    three = list(stream_predict(inputs(files), model, lambda *_: 28.0,
                                PredictSettings(device="cpu", readers=3, batch_size=2, prefetch=1,
                                                feature_model=U32)))
    assert [r.name for r in three] == [f.stem for f in files] == [r.name for r in one]
    assert three[2].picks is None and "m2.mrc" in three[2].error
    for a, b in zip(one, three):
        if a.picks is not None:
            np.testing.assert_array_equal(a.picks.x, b.picks.x)
            np.testing.assert_allclose(a.picks.score, b.picks.score, rtol=1e-5)


def test_fp16_on_cpu_is_refused_clearly():
    for call in (lambda: resolve_precision("fp16", "cpu"),
                 lambda: picking_net(None, device="cpu", half=True),
                 lambda: compute_features(np.zeros((64, 64), np.float32), device="cpu", precision="fp16")):
        with pytest.raises(ValueError, match="needs a CUDA device.*bf16"):
            call()
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", "cpu")
    with pytest.raises(ValueError, match="conflicts"):
        next(stream_predict([], None, lambda *_: 28.0, PredictSettings(device="cpu", half=True, precision="bf16")))


def test_bf16_on_a_cpu_without_it_is_named(tmp_path):
    """bf16 on a CPU that would emulate it gets a warning; with the instructions, on CUDA, or fp32: none."""
    import torch

    plain, native = tmp_path / "plain", tmp_path / "native"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16\n")
    assert cpu_has_bf16(str(plain)) is False and cpu_has_bf16(str(native)) is True
    assert cpu_has_bf16(str(tmp_path / "absent")) is None
    assert "no bfloat16 instructions" in precision_warning(torch.bfloat16, "cpu", native=False)
    for args in ((torch.bfloat16, "cpu", True), (torch.bfloat16, "cpu", None), (torch.bfloat16, "cuda", False),
                 (None, "cpu", False)):
        if args[2] is None and cpu_has_bf16() is False:
            continue  # this machine itself lacks bf16: the None case is the False case
        assert precision_warning(*args) is None


def test_bf16_on_cpu_works_and_is_close(model, images, make_mrc):
    """Tiny crops and one view: where the CPU has no bfloat16 instructions torch emulates them, 30-80x
    slower than float32 (a 64 x 64 image: 10.7 s against 0.13 s on 2 cores), so the default's 8 views
    of the example micrographs ran for over 20 minutes."""
    import torch

    x = torch.from_numpy(np.stack([im[:40, :48] for im in images]))[:, None]
    with torch.inference_mode():
        ref = picking_net(model, "resnet16_u32", device="cpu")(x).numpy()
        got = picking_net(model, "resnet16_u32", device="cpu", precision="bf16")(x)
    assert got.dtype == torch.float32  # the head runs in float32 after the autocast backbone
    got = got.numpy()
    assert np.isfinite(got).all()
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    # and through the stream (a 72 x 72 crop at 5.36 A/px: 48 x 48 at the working 8 A/px) and the feature path
    import mrcfile

    with mrcfile.open(MICS[0], permissive=True) as f:
        crop = make_mrc("crop.mrc", np.asarray(f.data[:72, :72], np.float32), float(f.voxel_size.x))
    res = next(stream_predict(inputs([crop]), model, lambda *_: 28.0,
                              PredictSettings(device="cpu", precision="bf16", feature_model="resnet16_u32")))
    assert res.picks is not None and len(res.picks.x) > 0 and np.isfinite(res.picks.score).all()
    feats, score = compute_features(images[0][:40, :48], "resnet16_u32", device="cpu", precision="bf16")
    assert feats.dtype == np.float16 and np.isfinite(score).all()


def test_channels_last_is_the_same_network(model, images):
    import torch

    x = torch.from_numpy(np.stack(images))[:, None]
    with torch.inference_mode():
        a = picking_net(model, device="cpu")(x).numpy()
        b = picking_net(model, device="cpu", channels_last=True)(x).numpy()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_backbone_seconds_batches(model, images):
    assert backbone_seconds(images, model, device="cpu", batch_size=2) > 0
    tiny = [im[:40, :48] for im in images]  # bfloat16 may be emulated on the CPU (see above)
    assert backbone_seconds(tiny, model, "resnet16_u32", device="cpu", batch_size=2, precision="bf16") > 0


def test_predict_command_precision_flags(tmp_path):
    from cryoal_ext.commands.predict import precision_of, run_settings

    ns = argparse.Namespace
    assert precision_of(ns(precision=None, half=False)) == "fp32"
    assert precision_of(ns(precision=None, half=True)) == "fp16"
    assert precision_of(ns(precision="bf16", half=False)) == "bf16"
    with pytest.raises(ValueError, match="conflicts"):
        precision_of(ns(precision="bf16", half=True))
    a = ns(precision="bf16", half=False, working_pixel_size=8.0, pixel_size=None, radius_px=28.0, diameter_A=None,
           threshold=None)
    assert run_settings(a, None, "resnet16_u32", {"txt"})["precision"] == "bf16"
    from cryoal_ext import cli

    with pytest.raises(ValueError, match="needs a CUDA device"):
        cli.main(["predict", str(MICS[0]), "--radius-px", "28", "--out-dir", str(tmp_path / "o"), "--device", "cpu",
                  "--half", "--no-progress", "--debug"])
    assert not (tmp_path / "o" / "predict.json").exists()  # refused before anything was written
