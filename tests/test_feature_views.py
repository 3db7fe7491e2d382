"""Features averaged over rotated/flipped views ('+viewsN'): alignment, equivariance, one network for both paths."""
from __future__ import annotations

import numpy as np
import pytest

from cryoal_ext.features import (DEFAULT_FEATURE_MODEL, FEATURE_MODELS, FeatureCache, compute_features, head_of,
                                 parse_feature_model)
from cryoal_ext.predict import picking_net

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def piece(example_data):
    """A non-square 72 x 88 working-scale piece of a real crop (normalised), so views change the shape."""
    from cryoal_ext.io import load_micrograph

    mic = load_micrograph(example_data / "micrographs" / "061_10028_crop.mrc")
    return np.ascontiguousarray(mic.image[100:172, 120:208])


def test_names_parse_and_bad_names_are_refused():
    assert parse_feature_model("resnet16_u32") == ("resnet16_u32", 1)
    assert parse_feature_model("resnet16_u64+views4") == ("resnet16_u64", 4)
    assert parse_feature_model(DEFAULT_FEATURE_MODEL) == ("resnet16_u32", 8)
    assert all(parse_feature_model(n)[0] in n for n in FEATURE_MODELS)
    for bad in ("resnet16_u32+views3", "resnet99", "resnet16_u32+", "resnet16_u32+views8+views2"):
        with pytest.raises(ValueError, match="unknown feature model"):
            parse_feature_model(bad)
    with pytest.raises(ValueError, match="resnet16_u32\\+views3"):
        FeatureCache(None, "resnet16_u32+views3")


def test_eight_views_make_the_features_follow_a_rotation_of_the_micrograph(piece):
    """Rotating the micrograph rotates the 8-view features with it; one view's features do not follow."""
    errors = {}
    for name in ("resnet16_u32", "resnet16_u32+views8"):
        f, s = compute_features(piece, name, "cpu")
        fr, sr = compute_features(np.rot90(piece).copy(), name, "cpu")
        assert f.shape == (128, 72, 88) and fr.shape == (128, 88, 72)
        back = np.rot90(np.asarray(fr, np.float32), -1, axes=(1, 2))
        errors[name] = np.abs(back - np.asarray(f, np.float32)).max() / np.abs(np.asarray(f, np.float32)).max()
        ff, _ = compute_features(piece[:, ::-1].copy(), name, "cpu")
        errors[name + " flip"] = (np.abs(np.asarray(ff, np.float32)[:, :, ::-1] - np.asarray(f, np.float32)).max()
                                  / np.abs(np.asarray(f, np.float32)).max())
    assert errors["resnet16_u32+views8"] < 2e-3 and errors["resnet16_u32+views8 flip"] < 2e-3  # float16 rounding
    assert errors["resnet16_u32"] > 0.05 and errors["resnet16_u32 flip"] > 0.05


def test_views_average_the_one_view_maps_pixel_for_pixel(piece):
    """2 views = mean of the plain features and the mirrored image's features mirrored back (no shift)."""
    f1, _ = compute_features(piece, "resnet16_u32", "cpu")
    fm, _ = compute_features(piece[:, ::-1].copy(), "resnet16_u32", "cpu")
    f2, s2 = compute_features(piece, "resnet16_u32+views2", "cpu")
    expect = (np.asarray(f1, np.float32) + np.asarray(fm, np.float32)[:, :, ::-1]) / 2
    np.testing.assert_allclose(np.asarray(f2, np.float32), expect, atol=2e-2, rtol=2e-3)
    w, b = head_of("resnet16_u32+views2")  # the same head: views change the features, not the network
    np.testing.assert_array_equal(w, head_of("resnet16_u32")[0])
    np.testing.assert_allclose(np.tensordot(w, np.asarray(f2, np.float64), axes=(0, 0)) + b, s2, atol=0.02)


@pytest.mark.parametrize("views", [4, 8])
def test_prediction_network_gives_the_training_features_logits(piece, views):
    """The streaming predictor (views of backbone+head) and the cached features + head agree."""
    import torch

    name = f"resnet16_u32+views{views}"
    _, score = compute_features(piece, name, "cpu")
    with torch.inference_mode():
        z = picking_net(None, name, "cpu")(torch.from_numpy(piece)[None, None])[0, 0].numpy()
    assert z.shape == score.shape
    np.testing.assert_allclose(z, score, atol=1e-3)
    with torch.inference_mode():
        z1 = picking_net(None, "resnet16_u32", "cpu")(torch.from_numpy(piece)[None, None])[0, 0].numpy()
    assert np.abs(z1 - score).max() > 0.05  # a model trained on view features must not be run on one view


def test_cache_keeps_view_counts_apart(example_data, tmp_path):
    from cryoal_ext.io import load_micrograph

    mic = load_micrograph(example_data / "micrographs" / "061_10028_crop.mrc")
    stems = {n: FeatureCache(tmp_path, n, "cpu")._stem(mic).name for n in ("resnet16_u32", "resnet16_u32+views8")}
    assert stems["resnet16_u32"] != stems["resnet16_u32+views8"] and "+views8" in stems["resnet16_u32+views8"]


def test_one_pass_gives_every_view_count_exactly(piece, example_data, tmp_path):
    """compute_features_views (one 8-view pass, benchmarks/view_count.py) = compute_features per count, bit for bit,
    and what it puts in the cache is what the cache would have computed."""
    from cryoal_ext.features import VIEWS, compute_features_views
    from cryoal_ext.io import load_micrograph

    seconds: dict = {}
    got = compute_features_views(piece, "resnet16_u32", seconds=seconds)
    assert sorted(got) == [1, 2, 4, 8] and sorted(seconds) == list(range(8))
    for n, (f, s) in got.items():
        fe, se = compute_features(piece, "resnet16_u32" + VIEWS[n], "cpu")
        np.testing.assert_array_equal(f, fe)
        np.testing.assert_array_equal(s, se)
    from dataclasses import replace

    mic = load_micrograph(example_data / "micrographs" / "061_10028_crop.mrc")
    mic = replace(mic, image=piece, frame=replace(mic.frame, working_shape=piece.shape))  # the cache keys on it
    cache = FeatureCache(tmp_path, "resnet16_u32+views2", "cpu")
    assert not cache.has(mic)
    cache.put(mic, *got[2])
    assert cache.has(mic)
    fm = cache.get(mic)
    assert cache.hits == 1 and cache.misses == 0
    np.testing.assert_array_equal(np.asarray(fm.features), got[2][0])
    with pytest.raises(ValueError, match="working shape"):
        cache.put(mic, got[2][0][:, :10], got[2][1][:10])
