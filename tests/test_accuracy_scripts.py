"""The benchmark scripts' own helpers: the particle-size and weak-head stand-ins, merged seed files (issue 16)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy  # noqa: E402
import accuracy_table  # noqa: E402
import backbone_choice  # noqa: E402,F401 (imports: its helpers are the package's, tested below)
import count_limits  # noqa: E402
import weak_features  # noqa: E402
import weak_head  # noqa: E402


def test_dataset_scales_the_header_pixel_size(shared_data):
    assert "pixel_size" not in accuracy.dataset("10028")
    assert accuracy.dataset("10028/2")["pixel_size"] == pytest.approx(2.68, abs=1e-3)
    assert accuracy.dataset("10028*1.5")["pixel_size"] == pytest.approx(8.04, abs=1e-3)
    assert accuracy.dataset("10017/2")["radius_px"] == 13.5  # radius and truth stay in the files' pixels


def test_dataset_of_a_weak_stand_in_is_the_datasets_own():
    assert accuracy.dataset("10028+5~0.45") == accuracy.dataset("10028") == accuracy.dataset("10028+5")


def _run(split, seed, aps, base=0.5):
    thr = {"expected": 10.0, "n_true": 10, "f1": 0.8, "f1_best": 0.9}
    return {"recipe": "default", "seed": seed, "split": split, "train": [f"m{split}"], "baseline": {"ap": base, "threshold": thr},
            "active": [{"labels": b, "ap": a, "threshold": {"raw": thr}} for b, a in zip((10, 100), aps)],
            "timing": {"round_median_s": 0.1}}


def test_compare_merges_one_variant_over_several_files(tmp_path, monkeypatch):
    for tag, seed, aps in (("a", 0, (0.6, 0.7)), ("b", 1, (0.8, 0.9))):
        runs = [_run(0, seed, aps), _run(1, seed, aps)]
        doc = {"command": "x", "results": {"10028": {"default": {"feature_model": "resnet16_u32", "runs": runs}}}}
        (tmp_path / f"accuracy_{tag}.json").write_text(json.dumps(doc))
    monkeypatch.setattr(accuracy_table, "RESULTS", tmp_path)
    row = accuracy_table.merged(["a", "b"])["10028"]["default"]
    assert row["summary"]["runs"] == 4 and row["summary"]["splits"] == 2
    assert row["summary"]["budgets"]["10"]["ap_mean"] == pytest.approx(0.7)
    assert row["summary"]["budgets"]["100"]["ap_min"] == pytest.approx(0.7)


def test_weak_head_turns_the_head_at_its_norm_and_keeps_the_mean_logit():
    rng = np.random.default_rng(0)
    w0, b0, mean = rng.standard_normal(128), 0.3, rng.standard_normal(128)
    for deg in (0.0, 30.0, 84.0):
        w, b = weak_head.rotated(w0, b0, np.radians(deg), mean)
        assert np.linalg.norm(w) == pytest.approx(np.linalg.norm(w0))
        assert np.degrees(np.arccos(w @ w0 / (w0 @ w0))) == pytest.approx(deg, abs=1e-6)
        assert w @ mean + b == pytest.approx(w0 @ mean + b0)


def test_weak_head_logit_map_is_the_linear_head():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((8, 70, 5)).astype(np.float16)
    w = rng.standard_normal(8)
    want = np.tensordot(w, f.astype(np.float64), axes=1) + 0.5
    assert np.allclose(weak_head.head_model(w, 0.5).logit_map(f, rows_per_chunk=16), want, atol=1e-4)


def test_weak_head_use_patches_and_restores_the_learners_prior_centre():
    import cryoal_ext.learner as LRN
    from cryoal_ext.features import head_of

    weak_head.use({"head": (np.ones(3), 0.25)})
    try:
        assert LRN.head_of("anything")[1] == 0.25
    finally:
        weak_head.use({})
    assert LRN.head_of is head_of


def test_weak_features_noise_is_fixed_smooth_and_unit_variance():
    a = weak_features.noise("m1", (3, 64, 64))
    assert np.array_equal(a, weak_features.noise("m1", (3, 64, 64)))  # one fixed draw per micrograph
    assert not np.allclose(a, weak_features.noise("m2", (3, 64, 64)))
    assert np.allclose(a.reshape(3, -1).std(axis=1), 1.0, atol=1e-5)
    # smoothed over ~SMOOTH_PX: neighbours correlate, far pixels do not
    assert np.corrcoef(a[0, :, :-1].ravel(), a[0, :, 1:].ravel())[0, 1] > 0.8
    assert abs(np.corrcoef(a[0, :, :-20].ravel(), a[0, :, 20:].ravel())[0, 1]) < 0.1


def test_weak_features_add_noise_scales_to_each_channel_and_keeps_topaz_head(monkeypatch):
    from cryoal_ext.features import FeatureMap
    from cryoal_ext.learner import Item

    w0, b0 = np.array([1.0, -2.0]), 0.5
    monkeypatch.setattr(weak_features, "head_of", lambda name: (w0, b0))
    f = np.stack([np.zeros((40, 40)), 3 * np.ones((40, 40))]).astype(np.float16)
    f[0, ::2] = 10.0  # channel 0 spreads 5, channel 1 not at all
    data = {"items": {"m": Item(None, FeatureMap(f, np.zeros((40, 40), np.float32)))}, "truth": {}}
    out = weak_features.add_noise(data, "resnet16_u32", 2.0)
    g = np.asarray(out["items"]["m"].fmap.features, dtype=np.float64)
    assert (g - f)[0].std() == pytest.approx(10.0, rel=0.02) and np.allclose(g[1], 3.0, atol=1e-2)
    assert np.allclose(out["items"]["m"].fmap.score, np.tensordot(w0, g, axes=1) + b0, atol=0.1)  # g is float16
    assert out["head"] == (w0, b0) and out["weak_features"]["sigma"] == 2.0
    assert np.array_equal(np.asarray(data["items"]["m"].fmap.features), f)  # the input is left as it was


def test_count_limits_rows_from_the_committed_dump():
    """One draw of the offline audits (the dumps are in benchmarks/results): a table row for each question."""
    assert count_limits.count_row("10028", 15, "platt1", 1).startswith("| 10028 | 15 | platt1 | ")
    assert count_limits.count_row("10028", 15, "shift1", 1).count("|") == 7
    assert count_limits.range_row("10028", 15, 0.9, 1).startswith("| 10028 | 15 | 90% | ")


def test_count_limits_ceiling_is_the_precision_the_audits_find_at_the_top():
    rng = np.random.default_rng(0)
    z = rng.uniform(2.0, 4.0, 400)  # confident picks: the answers' map says ~0.98-1.0 there
    y = (rng.random(400) < 0.7).astype(float)
    cap = count_limits.fit_ceiling(z, y, (1.5, 0.0), k=0)
    assert cap.c == pytest.approx(0.7, abs=0.05) and (cap.a, cap.b) == (1.5, 0.0)
    assert cap.prob(np.array([10.0]))[0] == pytest.approx(cap.c, abs=1e-6)
    assert count_limits.fit_ceiling(z[:10], np.ones(10), (1.5, 0.0), k=2).c > 0.99  # all confirmed: no cap


def test_count_limits_threshold_rows_from_the_committed_dump():
    row = count_limits.threshold_row("10028", 15, 1)
    assert row.startswith("| 10028 | 15 | ") and row.count("|") == 5


def test_audit_table_shows_the_calibration_of_audits_of_the_training_micrographs(tmp_path, monkeypatch, capsys):
    """audits_on='training' records its audits in the calibrated threshold only (no audit micrograph)."""
    runs = [_run(0, 0, (0.6, 0.7))]
    runs[0]["active"][1]["threshold"]["calibrated"] = {"expected": 11.0, "n_true": 10, "f1": 0.85, "f1_best": 0.9,
                                                       "audits": 6}
    doc = {"command": "x", "results": {"10028": {"default": {"feature_model": "resnet16_u32", "runs": runs}}}}
    (tmp_path / "accuracy_t.json").write_text(json.dumps(doc))
    monkeypatch.setattr(accuracy_table, "RESULTS", tmp_path)
    accuracy_table.audit_tables(["t"])
    rows = [l for l in capsys.readouterr().out.splitlines() if "| 100 (" in l]
    assert [r.split(" | ")[2] for r in rows] == ["raw", "answers + audits"]
    assert "1.100 (1.100; 1/1)" in rows[1]


def test_audited_platt_the_map_of_training_audits_and_of_the_mean_of_logits():
    """The uncertain answers give the centre, the audits move it (training_audit_map's rule, backbone_choice's map)."""
    from cryoal_ext.calibration import CalibrationSettings, audited_platt, platt

    rng = np.random.default_rng(1)
    z = np.r_[rng.normal(0.0, 1.5, 80), rng.uniform(2.0, 4.0, 12)]
    y = np.r_[(rng.random(80) < 1 / (1 + np.exp(-z[:80]))), rng.random(12) < 0.6].astype(float)
    audited = np.r_[np.zeros(80, bool), np.ones(12, bool)]
    centre = platt(z[:80], y[:80])
    moved = audited_platt(z, y, audited)
    assert (moved.a, moved.b) != (centre.a, centre.b) and moved.a > 0
    three = audited & (np.arange(92) < 83)  # below the gate: the answers' own map, the rest counted as answers
    few = audited_platt(z, y, three, CalibrationSettings(min_audits=5))
    plain = platt(z[~three], y[~three])
    assert (few.a, few.b) == (plain.a, plain.b)
