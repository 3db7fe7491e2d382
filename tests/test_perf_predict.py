"""Streaming prediction (issue 6, targets 2, 3, 5): the folded network gives the cached path's logits."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from cryoal_ext.extract import extract_picks
from cryoal_ext.features import compute_features
from cryoal_ext.io import load_micrograph
from cryoal_ext.model import BLR
from cryoal_ext.predict import PredictSettings, picking_net, resolve_device, stream_predict

EXAMPLE = Path(__file__).resolve().parents[1] / "cryoal_ext" / "example_data" / "empiar10028_small"
MICS = sorted((EXAMPLE / "micrographs").glob("*.mrc"))


def inputs(files):
    return [(f.stem, str(f), f.stem, None) for f in files]


@pytest.fixture(scope="module")
def model():
    m = BLR()
    rng = np.random.default_rng(0)
    from cryoal_ext.features import head_of

    w0, b0 = head_of("resnet16_u32")
    m.coef_, m.intercept_ = w0 + 0.05 * rng.standard_normal(w0.size), b0 - 0.3
    return m


@pytest.fixture(scope="module")
def reference(model):
    """Backbone features (float16, as cached), pretrained score, the image frame, of the default
    feature model (8 views) on one micrograph: 8 views of all three cost minutes on 2 CPU cores."""
    out = {}
    for f in MICS[:1]:
        mic = load_micrograph(f)
        feats, score = compute_features(mic.image, device="cpu")
        out[f.stem] = (mic, feats, score)
    return out


def test_folded_head_equals_cached_path(model, reference):
    import torch

    for mic, feats, score in reference.values():
        x = torch.from_numpy(mic.image)[None, None]
        with torch.inference_mode():
            pre = picking_net(None)(x)[0, 0].numpy()
            blr = picking_net(model)(x)[0, 0].numpy()
        # Topaz's head: the mean of 8 views' logits vs the head of the 8 views' mean features
        np.testing.assert_allclose(pre, score, atol=1e-4)
        # ours from float32 features; the cached path rounds the features to float16 first
        np.testing.assert_allclose(blr, model.logit_map(feats), atol=0.05)
        assert np.corrcoef(blr.ravel(), model.logit_map(feats).ravel())[0, 1] > 0.9999


def test_one_view_folded_head_is_bit_identical_to_the_cache_score():
    import torch

    mic = load_micrograph(MICS[0])
    _, score = compute_features(mic.image, "resnet16_u32", device="cpu")
    with torch.inference_mode():
        pre = picking_net(None, "resnet16_u32")(torch.from_numpy(mic.image)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(pre, score)


U32 = "resnet16_u32"  # one view: order and batching do not depend on the view count, and cost 1/8


def test_stream_in_order_and_batched_equals_single(model, reference):
    one = list(stream_predict(inputs(MICS), model, lambda *_: 28.0,
                              PredictSettings(batch_size=1, device="cpu", feature_model=U32)))
    two = list(stream_predict(inputs(MICS), model, lambda *_: 28.0,
                              PredictSettings(batch_size=2, device="cpu", feature_model=U32)))
    assert [r.name for r in one] == [f.stem for f in MICS] == [r.name for r in two]
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.picks.score, b.picks.score, rtol=1e-5)
        np.testing.assert_allclose(a.picks.x, b.picks.x)
    # same picks as NMS on the reference logit map, coordinates in file pixels
    mic, feats, _ = reference[MICS[0].stem]
    import torch

    with torch.inference_mode():
        z = picking_net(model, U32)(torch.from_numpy(mic.image)[None, None])[0, 0].numpy()
    ref = extract_picks(mic.name, z, mic.frame, 28.0)
    np.testing.assert_array_equal(one[0].picks.x, ref.x)
    np.testing.assert_array_equal(one[0].picks.score, ref.score)


def test_unreadable_micrograph_is_reported_and_skipped(tmp_path):
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"not an mrc file at all" * 10)
    files = [MICS[0], bad, MICS[1]]
    res = list(stream_predict(inputs(files), None, lambda *_: 28.0, PredictSettings(device="cpu", feature_model=U32)))
    assert [r.name for r in res] == [MICS[0].stem, "broken", MICS[1].stem]
    assert res[1].picks is None and "broken.mrc" in res[1].error
    assert res[0].picks is not None and res[2].picks is not None


def test_abandoned_stream_stops_its_threads(tmp_path):
    files = []
    for k in range(6):
        p = tmp_path / f"m{k}.mrc"
        shutil.copy(MICS[k % len(MICS)], p)
        files.append(p)
    before = {t.name for t in threading.enumerate()}
    # one view: the stop is checked between forward passes, and an 8-view pass on a busy CPU can
    # outlast the join's patience; what is tested here is that no thread is left behind
    gen = stream_predict(inputs(files), None, lambda *_: 28.0,
                         PredictSettings(device="cpu", prefetch=1, feature_model="resnet16_u32"))
    next(gen)
    gen.close()
    alive = [t for t in threading.enumerate() if t.name.startswith("cryoal-") and t.name not in before]
    assert not alive


def test_device_and_half_options():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            resolve_device("cuda")
    # float16 on the CPU is refused with a clear message (not silently run in float32)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        next(stream_predict(inputs(MICS[:1]), None, lambda *_: 28.0, PredictSettings(device="cpu", half=True)))


def test_predict_views_option_runs_fewer_views_of_a_views8_model_and_records_them(model, tmp_path):
    """`cryoal predict --views 1` on a model trained on +views8 features: one view's network, recorded in predict.json."""
    import json

    import torch

    from cryoal_ext import cli

    m = BLR()
    m.coef_, m.intercept_ = model.coef_, model.intercept_
    m.save(tmp_path / "model.npz", feature_model="resnet16_u32+views8")
    x = torch.from_numpy(load_micrograph(MICS[0]).image[:96, :96].copy())[None, None]
    with torch.inference_mode():  # one view of the views8 model is the one-view network, bit for bit
        np.testing.assert_array_equal(picking_net(m, "resnet16_u32+views8", views=1)(x).numpy(),
                                      picking_net(m, "resnet16_u32")(x).numpy())
    rc = cli.main(["predict", str(MICS[0]), "--model", str(tmp_path / "model.npz"), "--radius-px", "28",
                   "--out-dir", str(tmp_path / "o"), "--device", "cpu", "--views", "1", "--no-progress",
                   "--threads", "1"])
    assert rc == 0
    settings = json.loads((tmp_path / "o" / "predict.json").read_text())["settings"]
    assert settings["views"] == 1 and settings["feature_model"] == "resnet16_u32+views8"
    assert (tmp_path / "o" / "picks.txt").read_text().count("\n") > 10


def test_prediction_views_default_per_device_and_every_count_selectable():
    """benchmarks/view_count.py: 4 views on the CPU kept the AP of 8; a GPU keeps the model's own; never more by default."""
    from cryoal_ext.predict import prediction_views

    assert prediction_views("resnet16_u32+views8", "cpu") == 4
    assert prediction_views("resnet16_u32+views8", "cuda") == prediction_views("resnet16_u32+views8", "cuda:1") == 8
    assert prediction_views("resnet16_u32", "cpu") == 1 and prediction_views("resnet16_u32+views2", "cpu") == 2
    assert [prediction_views("resnet16_u32+views8", "cpu", n) for n in (1, 2, 4, 8)] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="--views 3"):
        prediction_views("resnet16_u32+views8", "cpu", 3)
