"""The fast round prototyped in benchmarks/round_latency.py gives the converged current round's answer."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from cryoal_ext.benchmark import BenchmarkSettings, load_data
from cryoal_ext.learner import ActiveLearner
from cryoal_ext.oracle import Oracle
from cryoal_ext.recipes import get_recipe

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "cryoal_ext" / "example_data" / "empiar10028_small"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("round_latency", REPO / "benchmarks" / "round_latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    s = BenchmarkSettings(micrographs=str(EXAMPLE / "micrographs"), truth=str(EXAMPLE / "particles.txt"),
                          radius_px=28.0, cache_dir=str(tmp_path_factory.mktemp("fc")))
    return load_data(s, progress=lambda *_: None)


@pytest.mark.parametrize("recipe", ["default", "seed"])
def test_fast_round_equals_converged_round(bench, data, recipe):
    names = sorted(data["items"])
    items = [data["items"][n] for n in names[:2]]
    r = get_recipe(recipe)
    conv = bench.ConvergedLearner(items, 28.0, r, seed=0)
    fast = bench.FastLearner(items, 28.0, r, seed=0)
    oracle = Oracle(data["truth"], 28.0)
    labels = []
    if r.pseudo_labels:
        conv.fit(labels)
        fast.fit(labels)
    for _ in range(3):
        pc = conv.initial_proposals(10, labels) if conv.model is None else conv.propose(10, labels)
        pf = fast.initial_proposals(10, labels) if fast.model is None else fast.propose(10, labels)
        assert [(p.micrograph, p.x, p.y) for p in pc] == [(p.micrograph, p.x, p.y) for p in pf]
        labels = labels + oracle.answer(pc)
        conv.fit(labels)
        fast.fit(labels)  # warm-started from the previous round
        assert np.abs(fast.model.coef_ - conv.model.coef_).max() < 1e-4
        assert fast.model.n_iter_ <= 25  # Newton steps; L-BFGS-B needs ~100+


def test_landed_learner_is_the_benchmarked_fast_learner(bench, data):
    """The ActiveLearner in the package is exactly the FastLearner the benchmark times (Newton, warm start, top-k)."""
    names = sorted(data["items"])
    items = [data["items"][n] for n in names[:2]]
    r = get_recipe("default")
    cur = ActiveLearner(items, 28.0, r, seed=0)
    exact = bench.FastLearner(items, 28.0, r, seed=0)
    oracle = Oracle(data["truth"], 28.0)
    labels = []
    for _ in range(3):
        pc = cur.initial_proposals(10, labels) if cur.model is None else cur.propose(10, labels)
        pe = exact.initial_proposals(10, labels) if exact.model is None else exact.propose(10, labels)
        assert pc == pe
        labels = labels + oracle.answer(pc)
        cur.fit(labels)
        exact.fit(labels)
        # the package fits under one BLAS thread: same optimum to rounding
        np.testing.assert_allclose(cur.model.coef_, exact.model.coef_, rtol=0, atol=1e-10)
