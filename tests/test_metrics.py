"""Matching, AP / AP90, border exclusion, counts at a threshold and the PR plot, on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from cryoal_ext.metrics import average_precision, evaluate, match


# --- matching ------------------------------------------------------------------------------------
def test_match_within_radius_only():
    # predictions at distance 0, 5 (exactly the radius), 5.001 and 9 from the single nearest particle
    px, py = [0.0, 105.0, 205.001, 309.0], [0.0, 100.0, 200.0, 300.0]
    tx, ty = [0.0, 100.0, 200.0, 300.0], [0.0, 100.0, 200.0, 300.0]
    assert match(px, py, tx, ty, 5.0).tolist() == [True, True, False, False]


def test_match_is_one_to_one_and_optimal():
    """Greedy nearest-first would give A the particle B needs; the assignment matches both."""
    # A(0,0): T1 at 2, T2 at 3.5.  B(5,0): T1 at 3, T2 at 8.5 (beyond the radius 4).
    px, py = [0.0, 5.0], [0.0, 0.0]
    tx, ty = [2.0, -3.5], [0.0, 0.0]
    assert match(px, py, tx, ty, 4.0).tolist() == [True, True]
    # in the other order of predictions too
    assert match(px[::-1], py[::-1], tx, ty, 4.0).tolist() == [True, True]


def test_duplicates_count_once():
    px, py = [10.0, 10.5, 11.0], [10.0, 10.0, 10.0]
    hit = match(px, py, [10.0], [10.0], 5.0)
    assert hit.sum() == 1  # one particle, one true positive; the other two are false positives
    assert hit.tolist() == [True, False, False]  # the closest prediction gets it


def test_match_empty_inputs():
    assert match([], [], [1.0], [1.0], 5.0).tolist() == []
    assert match([1.0, 2.0], [1.0, 2.0], [], [], 5.0).tolist() == [False, False]
    assert match([0.0], [0.0], [100.0], [100.0], 5.0).tolist() == [False]


def test_match_many_random_is_a_maximum_matching():
    """Against a brute-force maximum bipartite matching count on small random sets."""
    from itertools import permutations

    rng = np.random.default_rng(0)
    for _ in range(30):
        n, m = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        p = rng.uniform(0, 20, size=(n, 2))
        t = rng.uniform(0, 20, size=(m, 2))
        hit = match(p[:, 0], p[:, 1], t[:, 0], t[:, 1], 6.0)
        ok = np.hypot(p[:, None, 0] - t[None, :, 0], p[:, None, 1] - t[None, :, 1]) <= 6.0
        best = 0
        for perm in permutations(range(max(n, m)), n):  # prediction i -> particle perm[i] (>= m: none)
            best = max(best, sum(1 for i, j in enumerate(perm) if j < m and ok[i, j]))
        assert hit.sum() == best
        # matched predictions really are within the radius of some particle
        assert np.all(ok[hit].any(axis=1))


# --- average precision -----------------------------------------------------------------------------
def test_average_precision_hand_computed():
    # ranking: TP FP TP TP FP TP, 5 particles (one never found)
    # precision 1, 1/2, 2/3, 3/4, 3/5, 4/6; recall .2 .2 .4 .6 .6 .8
    # AP = .2 * (1 + 2/3 + 3/4 + 4/6) = 37/60; every recall <= 0.9, so AP90 = (37/60) / 0.9 = 37/54
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    tp = np.array([1, 0, 1, 1, 0, 1], bool)
    assert average_precision(scores, tp, 5) == pytest.approx(37 / 60)
    assert average_precision(scores, tp, 5, max_recall=0.9) == pytest.approx(37 / 54)
    # the order comes from the scores, not from the order of the arrays
    perm = np.array([3, 0, 5, 1, 4, 2])
    assert average_precision(scores[perm], tp[perm], 5) == pytest.approx(37 / 60)


def test_ap90_stops_at_ninety_percent_recall():
    # 10 particles: 9 found first (precision 1 up to recall 0.9), then 5 FP, then the 10th
    tp = np.array([1] * 9 + [0] * 5 + [1], bool)
    scores = np.linspace(1.0, 0.1, tp.size)
    # AP = 0.1 * (9 * 1 + 10/15) = 0.9 + 1/15;  AP90 = (0.1 * 9) / 0.9 = 1
    assert average_precision(scores, tp, 10) == pytest.approx(0.9 + 1 / 15)
    assert average_precision(scores, tp, 10, max_recall=0.9) == pytest.approx(1.0)
    assert average_precision(scores[:10], np.ones(10, bool), 10) == pytest.approx(1.0)
    assert average_precision(scores[:0], tp[:0], 10) == 0.0
    assert average_precision(scores, tp, 0) == 0.0


def test_evaluate_pools_micrographs_into_one_ranking():
    # a: TP at 0.9, FP at 0.5;  b: FP at 0.8, TP at 0.7
    # pooled: T F T F -> precision 1, 1/2, 2/3, 1/2; recall .5 .5 1 1 -> AP = .5 + .5 * 2/3 = 5/6
    # (the mean of per-micrograph APs would be (1 + 1/2) / 2 = 0.75)
    preds = {"a": ([10.0, 50.0], [10.0, 50.0], [0.9, 0.5]), "b": ([80.0, 20.0], [80.0, 20.0], [0.8, 0.7])}
    truth = {"a": ([11.0], [10.0]), "b": ([20.0], [21.0]), "c": ([1.0], [1.0])}
    ev = evaluate(preds, truth, radius=5.0)
    assert ev.ap == pytest.approx(5 / 6)
    assert ev.n_true == 2  # micrograph c has no predictions: not evaluated
    assert ev.n_pred == 4 and ev.recall == 1.0
    assert ev.scores.tolist() == [0.9, 0.8, 0.7, 0.5] and ev.tp.tolist() == [True, False, True, False]
    r, p = ev.curve()
    np.testing.assert_allclose(r, [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(p, [1.0, 0.5, 2 / 3, 0.5])
    d = ev.to_dict()
    assert d["ap"] == round(5 / 6, 4) and d["n_true"] == 2 and d["n_pred"] == 4


def test_evaluate_micrograph_without_truth_counts_false_positives():
    ev = evaluate({"a": ([10.0], [10.0], [0.9]), "b": ([10.0], [10.0], [0.95])}, {"a": ([10.0], [10.0])}, 5.0)
    assert ev.tp.tolist() == [False, True] and ev.n_true == 1
    assert ev.ap == pytest.approx(0.5)


def test_border_exclusion():
    shape = (100, 200)  # ny, nx
    preds = {"m": ([5.0, 100.0, 100.0, 195.0], [50.0, 50.0, 15.0, 50.0], [0.9, 0.8, 0.7, 0.6])}
    # truth at x=5 (outside a 10 px border), x=100 (inside), y=8 (outside; the pick at y=15 is within 7 px of it)
    truth = {"m": ([5.0, 100.0, 100.0], [50.0, 50.0, 8.0])}
    full = evaluate(preds, truth, radius=8.0)
    assert full.n_true == 3 and full.n_pred == 4 and int(full.tp.sum()) == 3
    ev = evaluate(preds, truth, radius=8.0, shapes={"m": shape}, border=10.0)
    assert ev.n_true == 1  # only the truth at (100, 50) is inside
    assert ev.n_pred == 2  # picks at x=5 and x=195 are left out; y=15 is inside
    assert ev.scores.tolist() == [0.8, 0.7] and ev.tp.tolist() == [True, False]
    with pytest.raises(ValueError, match="m"):
        evaluate(preds, truth, radius=8.0, border=10.0)


def test_counts_at_threshold():
    preds = {"a": ([0.0, 20.0, 40.0, 60.0, 80.0], [0.0] * 5, [0.9, 0.8, 0.6, 0.4, 0.2])}
    truth = {"a": ([0.0, 40.0, 80.0, 200.0], [0.0, 0.0, 0.0, 0.0])}  # picks 1, 3, 5 are right
    ev = evaluate(preds, truth, 5.0)
    c = ev.counts_at(0.5)
    assert (c["tp"], c["fp"], c["fn"]) == (2, 1, 2)
    assert c["precision"] == pytest.approx(2 / 3) and c["recall"] == pytest.approx(0.5)
    c = ev.counts_at(0.0)
    assert (c["tp"], c["fp"], c["fn"]) == (3, 2, 1)
    c = ev.counts_at(0.95)
    assert (c["tp"], c["fp"], c["fn"], c["precision"]) == (0, 0, 4, 0.0)


def test_pr_curve_png(tmp_path):
    from cryoal_ext.plots import plot_pr

    preds = {"a": ([0.0, 20.0, 40.0], [0.0] * 3, [0.9, 0.8, 0.6])}
    ev = evaluate(preds, {"a": ([0.0, 40.0], [0.0, 0.0])}, 5.0)
    out = tmp_path / "pr.png"
    plot_pr({"picks": ev, "again": ev}, str(out), title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["pr.png"]
