"""Run the whole loop on the bundled example (three EMPIAR-10028 crops) with a simulated user."""
from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from ..benchmark import BenchmarkSettings, run_benchmark
from .common import add_engine_arguments, apply_threads, check_inputs

RADIUS_PX = 28.0


def example_folder() -> Path:
    return Path(str(resources.files("cryoal_ext") / "example_data" / "empiar10028_small"))


def add_arguments(p) -> None:
    p.add_argument("--out", default="cryoal_example", help="output folder (default %(default)s)")
    p.add_argument("--recipe", default="default")
    add_engine_arguments(p)


def main(args) -> int:
    apply_threads(args)
    data = example_folder()
    out = Path(args.out)
    check_inputs(args, sorted((data / "micrographs").glob("*.mrc")),
                 {"output folder (--out)": out, "feature cache folder (--cache-dir)": args.cache_dir})
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    s = BenchmarkSettings(micrographs=str(data / "micrographs"), truth=str(data / "particles.txt"), radius_px=RADIUS_PX,
                          train_micrographs=2, budgets=(10, 20, 40), batch=10, seeds=(0,), recipes=(args.recipe,),
                          feature_model=args.feature_model, cache_dir=args.cache_dir, device=args.device,
                          working_pixel_size=args.working_pixel_size)
    print(f"bundled example: {data}")
    result = run_benchmark(s, str(out / "example.json"), picks_out=str(out / "picks"))
    base, last = result["baseline"]["ap"], result["active"][-1]
    print(json.dumps({"baseline_ap": base, "active": result["active"]}, indent=1))
    print(f"pretrained AP {base:.3f} -> {last['ap']:.3f} with {last['labels']} simulated labels "
          f"({time.perf_counter() - t:.0f} s). Picks: {out / 'picks'}; plot: {out / 'example.png'}")
    return 0
