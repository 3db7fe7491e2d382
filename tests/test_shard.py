"""--shard i/N + merge (issue 6, target 6): exactly the single-process output; idempotent, resumable."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import cryoal_ext.predict as predict_module
from cryoal_ext import cli
from cryoal_ext.shard import Shard, ShardError, merge

EXAMPLE = Path(__file__).resolve().parents[1] / "cryoal_ext" / "example_data" / "empiar10028_small"


def run(*args) -> int:
    return cli.main(["predict", *map(str, args), "--radius-px", "28", "--no-progress", "--device", "cpu"])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mics(tmp_path_factory) -> Path:
    """Four micrographs (the three crops, one twice under another name) so 3 shards are uneven."""
    d = tmp_path_factory.mktemp("mics")
    for f in sorted((EXAMPLE / "micrographs").glob("*.mrc")):
        shutil.copy(f, d / f.name)
    shutil.copy(d / "061_10028_crop.mrc", d / "999_copy.mrc")
    return d


@pytest.fixture(scope="module")
def single(mics, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    assert run(mics, "--out-dir", out) == 0
    return out


def test_shard_parse_and_select():
    assert Shard.parse(None) == Shard(1, 1) and Shard.parse(" 2 / 5 ") == Shard(2, 5)
    for bad in ("0/4", "5/4", "1-4", "a/b", "1/0"):
        with pytest.raises(ShardError):
            Shard.parse(bad)
    names = [f"m{k:03d}" for k in range(23)][::-1]
    parts = [Shard(i, 4).select(names) for i in range(1, 5)]
    assert sorted(sum(parts, [])) == sorted(names)  # a partition: every name once
    assert parts[0] == Shard(1, 4).select(sorted(names))  # input order does not matter
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shards_plus_merge_equal_single_process(mics, single, tmp_path):
    out = tmp_path / "sharded"
    for i in (3, 1, 2):  # any order
        assert run(mics, "--out-dir", out, "--shard", f"{i}/3") == 0
    assert not (out / "picks.txt").exists()
    assert cli.main(["merge", str(out)]) == 0
    a, b = tree(single), tree(out)
    assert a.keys() == b.keys() and a == b
    assert {"picks.txt", "picks.star", "coordinates.star", "predict.json"} <= a.keys()
    assert sum(1 for k in a if k.endswith("_picks.txt")) == 4


def test_rerun_is_idempotent_and_resumes(mics, single, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    shutil.copytree(single, out)
    txt = sorted((out / "micrographs").glob("*_picks.txt"))
    (txt[1]).unlink()  # as if killed before this micrograph finished
    calls = []
    original = predict_module.stream_predict

    def counting(inputs, *a, **k):
        inputs = list(inputs)
        calls.append([i[2] for i in inputs])
        return original(inputs, *a, **k)

    monkeypatch.setattr(predict_module, "stream_predict", counting)
    assert run(mics, "--out-dir", out) == 0
    assert calls[-1] == [txt[1].name[: -len("_picks.txt")]]  # only the missing one was redone
    assert run(mics, "--out-dir", out) == 0
    assert calls[-1] == []  # nothing left to do
    assert tree(out) == tree(single)


def test_other_settings_refused_and_missing_outputs_reported(mics, single, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(single, out)
    assert run(mics, "--out-dir", out, "--threshold", "0.5") == 1  # refused: other settings
    assert run(mics, "--out-dir", out, "--threshold", "0.5", "--overwrite") == 0
    part = tmp_path / "part"
    assert run(mics, "--out-dir", part, "--shard", "1/2") == 0
    with pytest.raises(ShardError, match="no output yet"):
        merge(part)
    res = merge(part, partial=True)
    assert res.micrographs == 2 and len(res.missing) == 2


def test_unreadable_micrograph_fails_softly(mics, tmp_path):
    d = tmp_path / "mics"
    shutil.copytree(mics, d)
    (d / "500_broken.mrc").write_bytes(b"\0" * 100)
    out = tmp_path / "out"
    assert run(d, "--out-dir", out, "--format", "txt") == 1  # others done, exit code flags the failure
    assert (out / "micrographs" / "500_broken_error.txt").exists()
    assert len(list((out / "micrographs").glob("*_picks.txt"))) == 4
    assert (out / "picks.txt").exists()  # merged what could be picked
    with pytest.raises(ShardError, match="could not be read"):
        merge(out)


def test_shard_from_slurm_array():
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert Shard.parse("slurm", env) == Shard(1, 4)
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert Shard.parse("slurm", env) == Shard(4, 4)
    with pytest.raises(ShardError, match="not inside a SLURM job array"):
        Shard.parse("slurm", {})


def test_list_inputs_give_the_same_picks(mics, single, tmp_path):
    """A .txt list and a RELION micrographs STAR with relative paths select the listed micrographs."""
    names = sorted(p.name for p in mics.glob("*.mrc"))
    (tmp_path / "mics").symlink_to(mics)
    (tmp_path / "list.txt").write_text("# micrographs\n" + "\n".join(f"mics/{n}" for n in names[:2]) + "\n")
    (tmp_path / "micrographs.star").write_text(f"data_micrographs\nloop_\n_rlnMicrographName #1\nmics/{names[2]}\n")
    for lst, chosen in (("list.txt", names[:2]), ("micrographs.star", names[2:3])):
        out = tmp_path / f"out_{lst}"
        assert run(tmp_path / lst, "--project-dir", tmp_path, "--out-dir", out, "--format", "txt") == 0
        got = sorted(p.name for p in (out / "micrographs").glob("*_picks.txt"))
        assert got == [n.replace(".mrc", "_picks.txt") for n in chosen]
        for g in got:
            assert (out / "micrographs" / g).read_bytes() == (single / "micrographs" / g).read_bytes()
