"""Topaz features and their cache, and the active learner's proposals, on the bundled example crops."""
from __future__ import annotations

import os
import sys

import mrcfile
import numpy as np
import pytest

from cryoal_ext.acquisition import block_labelled, entropy, entropy_peaks, peaks, spread_in_features
from cryoal_ext.features import FeatureCache, head_of
from cryoal_ext.files import by_micrograph, read_coordinates
from cryoal_ext.io import load_micrograph
from cryoal_ext.labels import Label
from cryoal_ext.learner import ActiveLearner, Item
from cryoal_ext.oracle import Oracle
from cryoal_ext.recipes import get_recipe
from cryoal_ext import strength_cv

sys.path.insert(0, os.path.dirname(__file__))  # conftest helpers, under any pytest import mode
from conftest import write_mrc  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RADIUS = 28.0  # EMPIAR-10028 particle radius in pixels of the example crops
TRAIN = ("061_10028_crop", "311_10028_crop")


@pytest.fixture(scope="module")
def example_items(example_data, feature_cache) -> dict[str, Item]:
    cache = FeatureCache(feature_cache, "resnet16_u32", "cpu")
    items = {}
    for name in TRAIN:
        mic = load_micrograph(example_data / "micrographs" / f"{name}.mrc")
        items[name] = Item(mic, cache.get(mic))
    return items


@pytest.fixture(scope="module")
def example_truth(example_data):
    return by_micrograph(read_coordinates(example_data / "particles.txt"))


@pytest.fixture
def small_mrc(example_data, tmp_path):
    """A 200 x 160 piece of an example crop as float32 (features in a fraction of a second)."""
    with mrcfile.open(example_data / "micrographs" / "061_10028_crop.mrc", permissive=True) as m:
        data = np.asarray(m.data, dtype=np.float32)[100:300, 150:310]
        ps = float(m.voxel_size.x)
    return write_mrc(tmp_path / "piece.mrc", data, ps)


# --- features ------------------------------------------------------------------------------------
def test_features_have_128_channels_and_the_baseline_is_the_pretrained_head(example_items):
    it = example_items["061_10028_crop"]
    assert it.mic.frame.working_shape == (343, 343)  # 512 px at 5.36 A -> 8 A
    assert it.fmap.features.shape == (128, 343, 343) and it.fmap.features.dtype == np.float16
    assert it.fmap.score.shape == (343, 343) and it.fmap.shape == (343, 343)
    assert np.all(np.isfinite(it.fmap.score))
    # the baseline logit is Topaz's linear head on these features (up to float16 rounding of the features)
    w, b = head_of("resnet16_u32")
    assert w.shape == (128,)
    again = np.tensordot(w.astype(np.float32), np.asarray(it.fmap.features, np.float32), axes=(0, 0)) + b
    assert np.abs(again - it.fmap.score).max() < 0.02
    # rows at given pixels
    rows = it.fmap.at(np.array([0, 10, 342]), np.array([5, 20, 342]))
    assert rows.shape == (3, 128) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[1], np.asarray(it.fmap.features[:, 10, 20], np.float32))


def test_cache_hit_returns_the_same_features_without_recompute(small_mrc, tmp_path):
    folder = tmp_path / "cache"
    mic = load_micrograph(small_mrc)
    first = FeatureCache(folder, "resnet16_u32", "cpu")
    a = first.get(mic)
    assert (first.hits, first.misses) == (0, 1)
    files = sorted(folder.iterdir())
    assert [f.name.split(".")[-2:] for f in files] == [["features", "npy"], ["score", "npy"]]
    assert not [f for f in files if ".tmp" in f.name]
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    second = FeatureCache(folder, "resnet16_u32", "cpu")  # a new process would start like this
    b = second.get(load_micrograph(small_mrc))
    assert (second.hits, second.misses) == (1, 0)
    assert isinstance(b.features, np.memmap)
    np.testing.assert_array_equal(np.asarray(b.features), np.asarray(a.features))
    np.testing.assert_array_equal(b.score, a.score)
    assert {f: f.stat().st_mtime_ns for f in sorted(folder.iterdir())} == mtimes  # nothing rewritten
    # no cache folder: computed every time, and the same numbers
    none = FeatureCache(None, "resnet16_u32", "cpu")
    c = none.get(mic)
    assert (none.hits, none.misses) == (0, 1)
    np.testing.assert_array_equal(c.features, np.asarray(a.features))


def test_cache_key_changes_with_model_content_and_scale(small_mrc, tmp_path):
    folder = tmp_path / "cache"
    mic = load_micrograph(small_mrc)
    c16 = FeatureCache(folder, "resnet16_u32", "cpu")
    f16 = c16.get(mic)
    c8 = FeatureCache(folder, "resnet8_u32", "cpu")
    f8 = c8.get(mic)
    assert (c8.hits, c8.misses) == (0, 1)  # another model: not served from the resnet16 entry
    assert len(list(folder.glob("*.features.npy"))) == 2
    assert not np.array_equal(np.asarray(f8.features), np.asarray(f16.features))
    assert c8.get(mic) is not None and c8.hits == 1

    # another working scale: another entry
    coarse = load_micrograph(small_mrc, working_pixel_size=12.0)
    c16.get(coarse)
    assert c16.misses == 2 and c16.hits == 0
    # same file name, changed content: not served from the old entry
    with mrcfile.open(small_mrc, mode="r+") as m:
        m.data[:20] = m.data[:20][::-1]
    changed = load_micrograph(small_mrc)
    assert changed.name == mic.name and changed.digest != mic.digest
    c16.get(changed)
    assert c16.misses == 3 and c16.hits == 0


def test_damaged_cache_entry_is_recomputed(small_mrc, tmp_path):
    folder = tmp_path / "cache"
    mic = load_micrograph(small_mrc)
    ref = FeatureCache(folder).get(mic)
    ref_feats = np.array(ref.features)
    del ref
    (fpath,) = folder.glob("*.features.npy")
    raw = fpath.read_bytes()
    fpath.write_bytes(raw[: len(raw) // 3])
    cache = FeatureCache(folder)
    again = cache.get(mic)
    assert (cache.hits, cache.misses) == (0, 1)
    np.testing.assert_array_equal(np.asarray(again.features), ref_feats)
    assert fpath.stat().st_size == len(raw)


def test_unknown_feature_model_is_refused(small_mrc, tmp_path):
    with pytest.raises(ValueError, match="resnet99"):
        FeatureCache(tmp_path, "resnet99").get(load_micrograph(small_mrc))


# --- acquisition -----------------------------------------------------------------------------------
def test_entropy_values():
    z = np.array([0.0, 1.0, -1.0, 30.0, -30.0, 1000.0])
    h = entropy(z)
    assert h[0] == pytest.approx(np.log(2.0), rel=1e-6)
    p = 1 / (1 + np.exp(-1.0))
    assert h[1] == pytest.approx(-(p * np.log(p) + (1 - p) * np.log(1 - p)), rel=1e-6)
    assert h[1] == h[2] and h[3] == h[4]
    assert np.all(np.isfinite(h)) and h[5] == 0.0 and 0 < h[3] < 1e-11
    assert np.all(np.diff(entropy(np.linspace(0, 20, 50))) <= 0)  # falls with |logit|


def _logit_map(seed=0, shape=(120, 150)):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return (gaussian_filter(rng.normal(size=shape), 3.0) * 40).astype(np.float32)


@pytest.mark.parametrize("radius", [3.0, 7.5, 12.0])
def test_entropy_peaks_are_separated_and_avoid_labelled_spots(radius):
    z = _logit_map()
    exclude = (np.array([60, 10]), np.array([75, 140]))  # (iy, ix) of two labelled pixels
    iy, ix, v = entropy_peaks(z, radius, k=25, exclude=exclude)
    assert iy.size == 25
    assert np.all(np.diff(v) <= 0)
    d2 = (iy[:, None] - iy[None]) ** 2 + (ix[:, None] - ix[None]) ** 2
    np.fill_diagonal(d2, 10 ** 9)
    assert d2.min() > radius * radius  # peaks at least the suppression radius apart
    for ey, ex in zip(*exclude):
        assert np.min((iy - ey) ** 2 + (ix - ex) ** 2) > radius * radius  # never at a labelled spot
    np.testing.assert_array_equal(v, entropy(z)[iy, ix])
    # the same answer as the plain computation over every pixel
    fy, fx, fv = peaks(entropy(z), radius, exclude=exclude, max_peaks=25)
    assert iy.tolist() == fy.tolist() and ix.tolist() == fx.tolist()
    # the first peak is the most uncertain pixel outside the labelled discs
    assert v[0] == np.max(block_labelled(entropy(z), exclude[0], exclude[1], radius))


# --- the learner ---------------------------------------------------------------------------------
def _clusters():
    """Candidates best first: 4 alike (A), 2 alike some way off (B), 1 far outlier (O) that is less uncertain."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, (4, 5))
    b = rng.normal(0, 0.05, (2, 5)) + [10, 0, 0, 0, 0]
    o = np.array([[1000.0, 0, 0, 0, 0]])
    return np.r_[a, b, o], np.array([1.0, 0.99, 0.98, 0.97, 0.9, 0.89, 0.5])


def test_spread_in_features_takes_one_of_each_kind_before_a_second_alike():
    points, values = _clusters()
    # by uncertainty alone the batch would be the four alike candidates 0-3
    assert spread_in_features(points, values, 2) == [0, 4]  # then B, not the far outlier
    assert spread_in_features(points, values, 3) == [0, 4, 6]  # the outlier before a second A or B
    # a labelled spot among the A's: the batch starts with B, and the A's wait
    assert spread_in_features(points, values, 2, centres=points[1:2] + 0.01) == [4, 6]
    assert spread_in_features(points, values, 7) == list(range(7))
    assert spread_in_features(points, values, 10) == list(range(7))
    # identical candidates (zero distances) do not divide by zero: the most uncertain first
    assert spread_in_features(np.zeros((3, 4)), [0.2, 0.7, 0.5], 2)[0] == 1


def test_features_spread_proposes_from_the_most_uncertain_peaks_only(example_items, example_truth):
    recipe = get_recipe("default", spread="features", diversity_pool=3)
    learner = ActiveLearner(list(example_items.values()), RADIUS, recipe, seed=0)
    labels = Oracle(example_truth, RADIUS, "careful").answer(learner.initial_proposals(10), 0)
    learner.fit(labels)
    props = learner.propose(10, labels)
    assert len(props) == 10 and all(p.kind == "uncertain" for p in props)
    _dist_ok(props, labels, RADIUS)
    # every proposal is among the 30 most uncertain peaks, pooled over the training micrographs
    pool = learner._candidates("entropy", labels, 30)
    top = sorted((c for cs in pool.values() for c in cs), key=lambda c: -c[0])[:30]
    spots = {(round(c[1], 3), round(c[2], 3)) for c in top}
    assert all((round(p.x, 3), round(p.y, 3)) in spots for p in props)
    # and the batch is not simply the 10 most uncertain of them
    plain = learner._take(pool, 10, "uncertain", "none")
    assert {(p.micrograph, p.x, p.y) for p in props} != {(p.micrograph, p.x, p.y) for p in plain}
    with pytest.raises(ValueError, match="unknown spread 'clusters'"):
        get_recipe("default", spread="clusters")


def _dist_ok(props, labels, radius_px, label_slack=1.2):
    """Every proposal is further than radius_px from every label on its micrograph and from every other proposal.

    Labels are blocked around their nearest working pixel, so a label between pixels may sit up to
    half a working pixel diagonally (0.71 x 1.49 = 1.06 file pixels here) closer: ``label_slack``.
    """
    for p in props:
        same = [l for l in labels if l.micrograph == p.micrograph]
        if same:
            d = np.hypot([l.x - p.x for l in same], [l.y - p.y for l in same])
            assert d.min() > radius_px - label_slack, (p, d.min())
    for i, p in enumerate(props):
        for q in props[i + 1 :]:
            if p.micrograph == q.micrograph:
                assert np.hypot(p.x - q.x, p.y - q.y) > radius_px - 1e-6, (p, q)


def test_learner_rounds_never_repropose_labelled_spots(example_items, example_truth):
    learner = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), seed=0)
    oracle = Oracle(example_truth, RADIUS, "careful")
    props = learner.initial_proposals(10)
    assert len(props) == 10
    kinds = [p.kind for p in props]
    assert kinds.count("positive") == 2 and kinds.count("negative") == 2 and kinds.count("uncertain") == 6
    assert {p.micrograph for p in props} == set(TRAIN)  # spread over the training micrographs
    assert all(0.0 <= p.score <= 1.0 for p in props)
    _dist_ok(props, [], RADIUS)
    # the oracle answers every proposal; the careful oracle re-centres hits on the true particle
    labels = oracle.answer(props, 0)
    assert len(labels) == 10 and 0 < sum(l.label for l in labels) < 10
    # a label on a micrograph the learner does not hold is ignored, not an error
    labels.append(Label("not_a_training_micrograph", 10.0, 10.0, 1))
    shown = list(props)
    for rnd in (1, 2, 3):
        model = learner.fit(labels)
        assert model.coef_.shape == (128,)
        k = 7 if rnd == 2 else 10
        props = learner.propose(k, labels)
        assert len(props) == k  # the batch size
        _dist_ok(props, labels, RADIUS)
        # nothing shown before is shown again: every earlier proposal was labelled at (or near) its spot
        for p in props:
            assert all(np.hypot(p.x - q.x, p.y - q.y) > 1.0 for q in shown if q.micrograph == p.micrograph)
        shown += props
        labels += oracle.answer(props, rnd)
    pk = learner.picks(example_items[TRAIN[0]].mic, example_items[TRAIN[0]].fmap)
    assert len(pk) > 0 and np.all((pk.score > 0) & (pk.score <= 1))
    assert pk.x.max() < 512 and pk.y.max() < 512


def test_learner_excludes_labels_given_before_round_zero(example_items):
    learner = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), seed=0)
    first = learner.initial_proposals(10)
    # label exactly the spots it would have proposed: none of them may come back
    given = [Label(p.micrograph, p.x, p.y, 0) for p in first]
    again = learner.initial_proposals(10, given)
    assert len(again) == 10
    _dist_ok(again, given, RADIUS, label_slack=1e-6)  # labels on working pixels: exact
    fewer = learner.initial_proposals(4, given)
    assert len(fewer) == 4


def test_training_pixels_are_the_pixels_the_fit_trains_on(example_items, example_truth):
    """A model on other features of the same pixels (benchmarks/finetune_last_block.py) relies on this."""
    learner = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), seed=0)
    labels = Oracle(example_truth, RADIUS, "careful").answer(learner.initial_proposals(10), 0)
    learner.fit(labels)  # fills the pseudo-labels
    real, pseudo = learner.training_pixels(labels)
    parts = learner.training_parts(labels)
    assert real and pseudo
    for blocks, (X, y, w) in zip((real, pseudo), parts):
        assert np.array_equal(X, np.concatenate([example_items[n].fmap.at(iy, ix) for n, iy, ix, _, _ in blocks]))
        assert np.array_equal(y, np.concatenate([b[3] for b in blocks]))
        assert np.array_equal(w, np.concatenate([b[4] for b in blocks]))
    assert sum(b[1].size for b in real) % len(labels) == 0  # every label: the same disc of pixels


def test_l2_decay_weakens_the_prior_as_labels_accumulate(example_items, example_truth):
    labels = Oracle(example_truth, RADIUS, "careful").answer(
        ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), seed=0).initial_proposals(10), 0)
    w0, _ = head_of("resnet16_u32")
    dist = {}
    for decay in (0.0, 1.0):
        learner = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default", l2_decay=decay), seed=0)
        model = learner.fit(labels)
        assert model.get_params()["l2"] == pytest.approx(10.0 / (1.0 + decay * len(labels)))
        dist[decay] = float(np.linalg.norm(model.coef_ - w0))
    assert dist[1.0] > dist[0.0]  # a weaker pull towards Topaz's head lets the labels move the weights further


def test_evidence_prior_strength_is_chosen_per_fit_and_kept_by_refits(example_items, example_truth):
    labels = Oracle(example_truth, RADIUS, "careful").answer(
        ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), seed=0).initial_proposals(10), 0)
    learner = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("evidence"), seed=0)
    model = learner.fit(labels)
    s = model.meta["prior_strength"]
    assert s == learner.strength and str(s) in model.meta["log_evidence"]
    assert model.get_params()["l2"] == pytest.approx(10.0 * s)
    # the chosen strength is the best the climb saw, and a refit (calibration's folds) keeps it
    ev = model.meta["log_evidence"]
    assert max(ev, key=ev.get) == str(s)
    assert learner.fit_model(labels[:5]).get_params()["l2"] == pytest.approx(10.0 * s)
    # the fixed recipe is untouched: l2 10, pseudo weight as written
    fixed = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), seed=0).fit(labels)
    assert fixed.get_params()["l2"] == 10.0 and "prior_strength" not in fixed.meta


def test_cv_prior_strength_is_the_best_held_out_likelihood_the_climb_saw(example_items, example_truth):
    """prior_strength='cv': the strength whose fits best predict held-out rounds of answers (strength_cv.py)."""
    oracle = Oracle(example_truth, RADIUS, "careful")
    first = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), seed=0)
    labels = oracle.answer(first.initial_proposals(10), 0)
    first.fit(labels)
    labels += oracle.answer(first.propose(10, labels), 1)
    first.fit(labels)
    labels += oracle.answer(first.propose(10, labels), 2)
    learner = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default", prior_strength="cv"), seed=0)
    model = learner.fit(labels)
    s = model.meta["prior_strength"]
    scores = model.meta["cv_loglik"]
    assert s == learner.strength and max(scores, key=scores.get) == str(s)
    assert model.get_params()["l2"] == pytest.approx(10.0 * s)
    assert learner.fit_model(labels[:5]).get_params()["l2"] == pytest.approx(10.0 * s)  # refits keep it
    assert strength_cv.held_out_loglik(learner, labels, s, model) == pytest.approx(scores[str(s)], abs=1e-3)


def test_default_holds_the_weights_towards_zero_and_head_towards_topaz(example_items):
    """Issue 16: the default's prior centre is zero (a ridge); `head` keeps Topaz's head as the centre."""
    w0, b0 = head_of("resnet16_u32")
    default = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("default"), "resnet16_u32", seed=0)
    head = ActiveLearner(list(example_items.values()), RADIUS, get_recipe("head"), "resnet16_u32", seed=0)
    assert default.prior() is None and np.array_equal(head.prior()[0], w0)
    # the differences: the prior's centre, and (issue 16, item 3) 3 audits of the training micrographs a batch
    assert get_recipe("default").with_(name="head", prior="pretrained", audits=0, audits_on="apart") == get_recipe("head")
    assert get_recipe("default").audits_training and not get_recipe("default").audits_apart
    assert get_recipe("evidence").prior == get_recipe("audited").prior == "pretrained"  # measured on `head`
    # pseudo-labels only: the zero-centred fit still follows Topaz's head where it is sure
    m = default.fit([])
    assert np.all(m.prior_coef_ == 0) and np.corrcoef(m.coef_, w0)[0, 1] > 0


def test_nothing_to_fit_gives_topaz_head_whatever_the_prior(example_items):
    """No labels and no pseudo-labels: the pretrained head, not a constant map from the ridge alone."""
    w0, b0 = head_of("resnet16_u32")
    for name in ("default", "head"):
        learner = ActiveLearner(list(example_items.values()), RADIUS, get_recipe(name, pseudo_labels=0),
                                "resnet16_u32", seed=0)
        m = learner.fit([])
        assert np.array_equal(m.coef_, w0) and m.intercept_ == b0
