"""`cryoal predict --shard slurm` for real: a one-node SLURM on this machine, an array of 4, merge, byte-compare.

Why: the SLURM path (``Shard.parse("slurm")`` reading SLURM_ARRAY_TASK_*) is otherwise only
tested with a faked environment.  This script runs it under real daemons:

1. writes a minimal slurm.conf for this host (loopback only; auth/none, no munge, no cgroups)
   into a temporary folder, and starts slurmctld and slurmd from it (Debian's slurm-wlm);
2. ``sbatch --array=1-4 --wait``: each task runs ``cryoal predict ... --shard slurm`` into one
   shared output folder;
3. ``cryoal merge`` on that folder; one unsharded ``cryoal predict`` into another folder;
4. compares every file of the two folders byte for byte;
5. stops the daemons (``scontrol shutdown``, then their pids) and removes the folder.

The micrographs are the bundled example's three crops, linked under ``--copies`` names each so
that every one of the 4 shards has work (``--copies 1``: the crops alone, one shard empty).

    python benchmarks/slurm_one_node.py                  # needs slurmctld/slurmd/sbatch on PATH, run as root
    python benchmarks/slurm_one_node.py --copies 1 --keep
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "cryoal_ext" / "example_data" / "empiar10028_small" / "micrographs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(tmp: Path, host: str, cpus: int, mem_mb: int) -> str:
    """The smallest slurm.conf that runs batch arrays on this one host, every path inside ``tmp``."""
    user = os.environ.get("USER") or "root"
    return "\n".join([
        "ClusterName=cryoal-one-node",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmUser={user}", f"SlurmdUser={user}",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/none", "CredType=cred/none",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none",
        "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30",
        f"StateSaveLocation={tmp}/state", f"SlurmdSpoolDir={tmp}/spool",
        f"SlurmctldPidFile={tmp}/slurmctld.pid", f"SlurmdPidFile={tmp}/slurmd.pid",
        f"SlurmctldLogFile={tmp}/slurmctld.log", f"SlurmdLogFile={tmp}/slurmd.log",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        f"PartitionName=one Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def run(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, check=True, text=True, **kw)


def wait_for_node(env: dict, timeout: float = 60.0) -> str:
    """Until sinfo reports the node idle (slurmd registered with slurmctld)."""
    end = time.time() + timeout
    state = ""
    while time.time() < end:
        got = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, text=True, capture_output=True)
        state = got.stdout.strip()
        if got.returncode == 0 and state.startswith("idle"):
            return state
        time.sleep(1)
    raise RuntimeError(f"the SLURM node did not come up (sinfo: {state!r}); see the logs in the temp folder")


def compare_dirs(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """(files identical, files that differ or exist on one side only), relative paths."""
    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    same = sorted(f for f in fa & fb if filecmp.cmp(a / f, b / f, shallow=False))
    return same, sorted((fa ^ fb) | {f for f in fa & fb if f not in same})


def stop_daemons(tmp: Path, env: dict) -> None:
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
    for name in ("slurmd", "slurmctld"):
        pidfile = tmp / f"{name}.pid"
        for _ in range(50):
            if not pidfile.exists():
                break
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.2)
        else:  # still running after 10 s: this script started it, so end it by its pid
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--copies", type=int, default=3, help="names per bundled crop (3 crops x 3 = 9 micrographs)")
    ap.add_argument("--feature-model", default="resnet16_u32", help="one view keeps the run short on a CPU")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (config, logs, outputs)")
    a = ap.parse_args()
    for tool in ("slurmctld", "slurmd", "sbatch", "sinfo", "scontrol"):
        if shutil.which(tool) is None:
            print(f"slurm_one_node: {tool} not found (apt-get install slurm-wlm)", file=sys.stderr)
            return 1

    tmp = Path(tempfile.mkdtemp(prefix="cryoal_slurm_"))
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "mics", "sharded", "single"):
        (tmp / d).mkdir()
    conf = tmp / "slurm.conf"
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf.write_text(slurm_conf(tmp, host, os.cpu_count() or 1, mem_mb))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for k in range(a.copies):
        for f in sorted(EXAMPLE.glob("*.mrc")):
            (tmp / "mics" / (f.name if a.copies == 1 else f"c{k}_{f.name}")).symlink_to(f)
    cryoal = [sys.executable, "-m", "cryoal_ext.cli"]
    common = [str(tmp / "mics"), "--radius-px", "28", "--feature-model", a.feature_model, "--no-progress",
              "--threads", "1"]
    rc = 1
    try:
        got = subprocess.run(["sinfo", "-V"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(f"temp folder {tmp}; host {host}; {got.stdout.strip()}")
        run(["slurmctld", "-f", str(conf)], env)
        run(["slurmd", "-f", str(conf)], env)
        print("node:", wait_for_node(env), flush=True)
        script = tmp / "pick_array.sh"
        script.write_text("#!/bin/bash\n"
                          f"#SBATCH --array=1-{a.shards}\n#SBATCH --cpus-per-task=1\n"
                          f"#SBATCH --output={tmp}/task_%A_%a.out\n"
                          f"cd {ROOT}\n"
                          "echo \"task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT on $(hostname)\"\n"
                          + " ".join(cryoal + ["predict"] + common + ["--out-dir", str(tmp / "sharded"), "--shard", "slurm"])
                          + "\n")
        t = time.perf_counter()
        run(["sbatch", "--wait", str(script)], env, capture_output=False)
        t_array = time.perf_counter() - t
        for out in sorted(tmp.glob("task_*.out")):
            print(f"--- {out.name}\n{out.read_text().strip()}")
        run(cryoal + ["merge", str(tmp / "sharded")], env)
        t = time.perf_counter()
        run(cryoal + ["predict"] + common + ["--out-dir", str(tmp / "single")], env, capture_output=True)
        t_single = time.perf_counter() - t
        same, differ = compare_dirs(tmp / "sharded", tmp / "single")
        print(f"array of {a.shards} on one SLURM node: {t_array:.1f} s; one process: {t_single:.1f} s")
        print(f"{len(same)} files byte-identical ({', '.join(f for f in same if '/' not in f)} and "
              f"{sum('/' in f for f in same)} per-micrograph files); {len(differ)} differ: {differ}")
        rc = 0 if same and not differ else 1
        print("BYTE-IDENTICAL" if rc == 0 else "DIFFERENT")
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"slurm_one_node: {exc}", file=sys.stderr)
        for log in ("slurmctld.log", "slurmd.log"):
            if (tmp / log).exists():
                print(f"--- {log} (last lines)\n" + "\n".join((tmp / log).read_text().splitlines()[-15:]), file=sys.stderr)
    finally:
        stop_daemons(tmp, env)
        print("daemons stopped", flush=True)
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
