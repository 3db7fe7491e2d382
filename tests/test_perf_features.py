"""Feature cache (issue 6, target 4): float16 on disk, memory-mapped, and a re-run recomputes nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cryoal_ext.features as features
from cryoal_ext import cli
from cryoal_ext.features import FeatureCache
from cryoal_ext.io import load_micrograph
from cryoal_ext.model import BLR

EXAMPLE = Path(__file__).resolve().parents[1] / "cryoal_ext" / "example_data" / "empiar10028_small"
MICS = sorted((EXAMPLE / "micrographs").glob("*.mrc"))


def no_backbone(*_a, **_k):
    raise AssertionError("the backbone ran although the features are cached")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fcache")
    cache = FeatureCache(folder)
    mic = load_micrograph(MICS[0])
    fmap = cache.get(mic)
    assert (cache.hits, cache.misses) == (0, 1)
    return folder, mic, fmap


def test_cache_is_float16_memory_mapped_and_hits(cached, monkeypatch):
    folder, mic, first = cached
    monkeypatch.setattr(features, "compute_features", no_backbone)
    cache = FeatureCache(folder)
    fmap = cache.get(mic)
    assert (cache.hits, cache.misses) == (1, 0)
    assert isinstance(fmap.features, np.memmap) and fmap.features.dtype == np.float16
    assert fmap.features.shape[1:] == mic.frame.working_shape
    np.testing.assert_array_equal(np.asarray(fmap.features), np.asarray(first.features))


def test_in_memory_copy_is_exact(cached):
    _, _, fmap = cached
    mem = fmap.in_memory()
    assert mem.features.dtype == np.float32 and not isinstance(mem.features, np.memmap)
    iy, ix = np.array([0, 5, 100, 342]), np.array([3, 77, 200, 342])
    np.testing.assert_array_equal(mem.at(iy, ix), fmap.at(iy, ix))
    # the model's logit map is bit-identical from either copy (same chunked float32 arithmetic)
    model = BLR()
    rng = np.random.default_rng(0)
    model.coef_, model.intercept_ = rng.standard_normal(fmap.features.shape[0]) * 0.1, -2.0
    np.testing.assert_array_equal(model.logit_map(mem.features), model.logit_map(fmap.features))
    assert mem.in_memory() is mem


def test_round_rerun_recomputes_nothing(tmp_path, monkeypatch):
    """`cryoal round` twice on the example: the second run never calls the backbone."""
    args = ["round", str(EXAMPLE / "micrographs"), "--session", str(tmp_path / "s"), "--radius-px", "28",
            "--positives", str(EXAMPLE / "particles.txt"), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    cached_files = sorted((tmp_path / "cache").glob("*.features.npy"))
    assert cached_files and all(np.load(f, mmap_mode="r").dtype == np.float16 for f in cached_files)
    monkeypatch.setattr(features, "compute_features", no_backbone)
    assert cli.main(args[:6] + args[8:]) == 0  # the same round again, no new labels
