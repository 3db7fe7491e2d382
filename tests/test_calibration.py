"""Calibration (Platt scaling on held-out answers) and the benchmark's split / threshold helpers: synthetic data,
plus one round of the learner on the bundled example crops (resnet16_u32)."""
from __future__ import annotations

import numpy as np
import pytest

from cryoal_ext.benchmark import BenchmarkSettings, at_recall, threshold_stats, training_splits
from cryoal_ext.calibration import (Calibration, CalibrationSettings, attach, calibrate, calibrated, count_estimate, of,
                                    platt)
from cryoal_ext.metrics import Evaluation
from cryoal_ext.model import BLR


def test_platt_recovers_a_known_map_and_keeps_the_identity_without_evidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    y = rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))
    cal = platt(z, y)
    few = CalibrationSettings(min_answers=6)
    assert abs(cal.a - 0.5) < 0.05 and abs(cal.b + 1.0) < 0.1
    assert cal.n == z.size and cal.n_positive == int(y.sum())
    # too few answers, or one class only: the identity, never a guess
    assert (platt(z[:3], y[:3]).a, platt(z[:3], y[:3]).b) == (1.0, 0.0)
    ones = platt(z[:50], np.ones(50), few)
    assert (ones.a, ones.b) == (1.0, 0.0)
    # a map that would flip the ranking is floored at a small positive slope
    flip = platt(z[:2000], z[:2000] < 0, CalibrationSettings(prior_sd=100.0))
    assert platt(z[:59], y[:59]) == Calibration(n=59, n_positive=int(y[:59].sum()))  # the default's 60-answer gate
    assert flip.a == CalibrationSettings().min_slope


def _model(meta: dict | None = None) -> BLR:
    m = BLR()
    m.coef_, m.intercept_ = np.array([1.0, -2.0, 0.5]), 0.3
    m.prior_coef_, m.prior_intercept_ = np.zeros(3), 0.0
    m.meta = dict(meta or {})
    return m


def test_calibrated_folds_the_map_into_the_weights_once_and_survives_save_and_load(tmp_path):
    X = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    raw = _model()
    assert calibrated(raw) is raw  # no calibration: the same model
    attach(raw, Calibration(a=0.4, b=-1.5, n=30, n_positive=12, folds=5))
    cm = calibrated(raw)
    assert np.allclose(cm.decision_function(X), 0.4 * raw.decision_function(X) - 1.5, atol=1e-5)
    assert np.array_equal(np.argsort(cm.decision_function(X)), np.argsort(raw.decision_function(X)))
    assert calibrated(cm) is cm  # folding twice would square the map
    assert np.array_equal(raw.coef_, [1.0, -2.0, 0.5])  # the raw weights (proposals, warm start) untouched
    raw.save(tmp_path / "m.npz")
    back = BLR.load(tmp_path / "m.npz")
    assert of(back) == Calibration(a=0.4, b=-1.5, n=30, n_positive=12, folds=5)
    assert np.allclose(calibrated(back).decision_function(X), cm.decision_function(X), atol=1e-5)
    assert of(_model({"calibration": "damaged"})) == Calibration()  # unreadable: the identity


def test_count_range_covers_the_true_count_as_often_as_it_says_when_the_map_is_right(tmp_path):
    """The range of the expected count (delta method on the map's Laplace covariance) holds the count
    the true map gives in about 90% of repeated draws of the answers, and narrows with more of them."""
    rng = np.random.default_rng(3)
    z = rng.normal(-1.0, 2.5, 3000)  # the picks' raw logits
    truth = 1 / (1 + np.exp(-(0.7 * z + 0.4)))
    want = truth.sum()
    inside, widths = [], {}
    for m in (100, 400):
        w = []
        for rep in range(150 if m == 100 else 20):
            i = rng.choice(z.size, m, replace=False)
            cal = platt(z[i], rng.random(m) < truth[i], CalibrationSettings(prior_sd=10.0), min_n=1)
            assert all(np.isfinite(cal.cov)) and cal.cov[0] > 0 and cal.cov[2] > 0
            est = count_estimate(cal.prob(z), cal)
            assert est.low < est.expected < est.high and est.level == 0.9
            if m == 100:
                inside.append(est.low <= want <= est.high)
            w.append(est.high - est.low)
        widths[m] = np.mean(w)
    assert 0.8 <= np.mean(inside) <= 0.98, np.mean(inside)
    assert widths[400] < 0.7 * widths[100]
    # no covariance (raw probabilities, or a model saved before ranges): the sum, no range
    bare = count_estimate(np.array([0.9, 0.5, 0.1]), Calibration())
    assert bare.expected == pytest.approx(1.5) and bare.low is None and "no range" in bare.text
    # the covariance is saved with the model; a damaged one is dropped, not trusted
    m = attach(_model(), Calibration(a=0.5, b=-1.0, n=80, n_positive=20, folds=5, cov=(0.01, -0.002, 0.04)))
    m.save(tmp_path / "m.npz")
    assert of(BLR.load(tmp_path / "m.npz")).cov == pytest.approx((0.01, -0.002, 0.04))
    assert of(_model({"calibration": {"a": 0.5, "b": 0.1, "cov": [-1, 0, 1]}})).cov == (0.0, 0.0, 0.0)
    assert of(_model({"calibration": {"a": 0.5, "b": 0.1, "cov": "x"}})) == Calibration(a=0.5, b=0.1)  # the map kept


def test_training_splits_are_every_pair_or_the_seed_draw():
    s = BenchmarkSettings(micrographs="m", truth="t", radius_px=10, splits="all")
    assert len(training_splits(list("abcd"), s)) == 6
    assert len(training_splits(list("abcdef"), s)) == 15
    assert training_splits(list("cab"), s) == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert training_splits(list("abcd"), BenchmarkSettings(micrographs="m", truth="t", radius_px=10)) == [None]
    with pytest.raises(ValueError, match="splits"):
        training_splits(list("abcd"), BenchmarkSettings(micrographs="m", truth="t", radius_px=10, splits="some"))


def test_threshold_stats_and_matched_recall_count_what_a_user_keeps():
    scores = np.array([0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1])
    tp = np.array([1, 1, 0, 1, 0, 1, 0], bool)
    ev = Evaluation(0.0, 0.0, 0.0, 5, scores.size, scores, tp)
    t = threshold_stats(ev, bins=5)
    assert t["expected"] == pytest.approx(scores.sum(), abs=0.05) and t["n_true"] == 5
    assert t["tp"] + t["fp"] == int((scores >= t["threshold"]).sum())
    assert t["f1_best"] == pytest.approx(max(2 * np.cumsum(tp)[k] / (k + 1 + 5) for k in range(7)), abs=1e-4)
    assert t["f1"] <= t["f1_best"]
    assert sum(t["reliability"]["n"]) == 7 and sum(t["reliability"]["sum_tp"]) == 4
    m = at_recall(ev, 0.6)  # 3 of 5 true: the first 4 picks
    assert (m["tp"], m["fp"], m["reached"]) == (3, 1, True)
    assert at_recall(ev, 1.0)["reached"] is False  # one particle is never picked


def test_calibrate_scores_each_answer_with_a_model_that_did_not_see_it(example_data, feature_cache):
    from cryoal_ext.features import FeatureCache
    from cryoal_ext.files import by_micrograph, read_coordinates
    from cryoal_ext.io import load_micrograph
    from cryoal_ext.learner import ActiveLearner, Item
    from cryoal_ext.oracle import Oracle
    from cryoal_ext.recipes import get_recipe

    cache = FeatureCache(feature_cache, "resnet16_u32", "cpu")
    mic = load_micrograph(example_data / "micrographs" / "061_10028_crop.mrc")
    learner = ActiveLearner([Item(mic, cache.get(mic))], 28.0, get_recipe("default"), "resnet16_u32", seed=0)
    oracle = Oracle(by_micrograph(read_coordinates(example_data / "particles.txt")), 28.0, "careful")
    labels = []
    learner.fit(labels)
    for rnd in range(3):
        props = learner.initial_proposals(8, labels) if rnd == 0 else learner.propose(8, labels)
        labels += oracle.answer(props, rnd)
        learner.fit(labels)
    before = learner.model.coef_.copy()
    gated = calibrate(learner, labels)  # 24 answers: under the default's 60, the probabilities stay raw
    assert (gated.a, gated.b, gated.n, gated.folds) == (1.0, 0.0, len(labels), 0)
    cal = calibrate(learner, labels, CalibrationSettings(min_answers=6))
    assert cal.n == len(labels) and cal.folds == 3 and cal.a > 0  # one fold per round
    assert np.array_equal(learner.model.coef_, before)  # the refits leave the learner's model alone
    attach(learner.model, cal)
    pk = learner.picks(mic, learner.items[mic.name].fmap)
    raw = 1 / (1 + np.exp(-learner.model.logit_map(learner.items[mic.name].fmap.features)))
    assert len(pk) and pk.score.max() == pytest.approx(cal.prob(np.log(raw.max() / (1 - raw.max()))), rel=1e-4)


def test_round_note_says_what_the_probabilities_rest_on():
    """The sentence every front end logs after a round: its audits, and the calibration behind the picks."""
    from cryoal_ext.acquisition import Proposal
    from cryoal_ext.workflow import RoundResult, expected_count

    props = [Proposal("m", 1.0, 2.0, 0.5, "uncertain")] * 7 + [Proposal("m", 5.0, 6.0, 0.9, "audit")] * 3
    assert RoundResult(None, props[:7], 0, 0, 0.0, 0.0).note == "probabilities not calibrated yet (too few answers)"
    m = attach(_model(), Calibration(a=0.7, b=-0.2, n=84, n_positive=30, folds=5, audits=6, cov=(0.01, 0, 0.02)))
    note = RoundResult(m, props, 84, 30, 0.1, 0.2).note
    assert note == ("3 of the 10 queries are the model's own picks (audits): review them as any other; "
                    "probabilities calibrated on 84 answers held out by rounds and 6 audited picks")
    raw = attach(_model(), Calibration(n=40, n_positive=10))  # under the 60-answer gate: the identity
    assert RoundResult(raw, props[:7], 40, 10, 0.1, 0.2).note.startswith("probabilities not calibrated yet")
    est = expected_count(np.array([0.9, 0.6, 0.2]), m)
    assert est.expected == pytest.approx(1.7) and est.low < 1.7 < est.high and "90% range" in est.text
    assert expected_count(np.array([0.9]), None).low is None  # the pretrained score: no range
    from cryoal_ext.calibration import CountEstimate

    back = CountEstimate.from_dict(est.to_dict())  # as a job's summary.json carries it to the pipeliner's display
    assert back.text == est.text and CountEstimate.from_dict(None) is None
    assert CountEstimate.from_dict({"expected": 3.0, "low": None}).range_text == "probabilities not calibrated: no range"
