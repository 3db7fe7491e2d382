"""Join the per-micrograph outputs of ``cryoal predict --shard i/N`` runs into picks.txt and STAR files."""
from __future__ import annotations

from pathlib import Path

from ..shard import merge
from ..workflow import suggest_threshold


def add_arguments(p) -> None:
    p.add_argument("out_dir", help="the --out-dir every shard wrote to")
    p.add_argument("--partial", action="store_true",
                   help="merge what is there even if some micrographs have no output yet")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def main(args) -> int:
    res = merge(args.out_dir, partial=args.partial)
    out = Path(args.out_dir)
    if res.missing:
        print(f"warning: {len(res.missing)} micrograph(s) left out (no output yet), e.g. {', '.join(res.missing[:3])}")
    thr = suggest_threshold(res.scores)
    n = int((res.scores >= thr).sum())
    print(f"{res.micrographs} micrographs, {res.picks} picks -> {out / 'picks.txt'}; "
          f"suggested threshold {thr:.3f} keeps {n} picks")
    return 0
