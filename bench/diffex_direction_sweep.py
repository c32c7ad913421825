"""Many DiffEx direction settings on trained models at once: directions, explain, measure and the
planted-phenotype table of each (issue 12's "together" must-show), in parallel processes.

    python bench/diffex_direction_sweep.py WORK --train DATA --heldout HELD --classes control,high
        --run TAG:MODEL[:DIRECTIONS OPTIONS[:EXPLAIN OPTIONS]] ... [--jobs N] [--out FILE.md]

Each run is `phenolens directions MODEL TRAIN WORK/TAG/directions OPTIONS`, then `phenolens explain`
towards the last class of --classes on HELD (--n-samples, --render-steps, --threshold, --keep-explained,
--max-directions and the run's own EXPLAIN OPTIONS, which may name another --target), then `phenolens measure` (one worker; not with
--no-measure) and the table of bench/diffex_simulator.py (`direction_table`). Options inside a run are written with commas for spaces:
`tw-w:models/tw:--whiten,-k,20:--alpha,4`. Directions and measure run on the CPU, explain on the GPU
when there is one; --jobs runs go at once (default: CPU count - 2). The tables are written to --out
(default WORK/sweep.md) as each run ends, so a run stopped by a time limit keeps what finished.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffex_simulator import direction_table  # noqa: E402


def one_run(spec: str, args) -> tuple[str, list[str], float]:
    """Directions, explain and measure of one --run; its tag, its table and its seconds."""
    tag, model, *rest = spec.split(":")
    dir_opts = rest[0].split(",") if rest and rest[0] else []
    expl_opts = rest[1].split(",") if len(rest) > 1 and rest[1] else []
    out = args.work / tag
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = open(out / "log.txt", "a")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def phenolens(*a) -> None:
        log.write("$ phenolens " + " ".join(map(str, a)) + "\n")
        log.flush()
        subprocess.run([sys.executable, "-m", "phenolens", *map(str, a)], check=True, stdout=log, stderr=log, env=env)

    target = expl_opts[expl_opts.index("--target") + 1] if "--target" in expl_opts else args.classes.split(",")[-1]
    if not (out / "directions" / "directions.json").is_file():
        phenolens("directions", model, args.train, out / "directions", "--steps", args.direction_steps, *dir_opts)
    if not (out / "explain" / "ranking.csv").is_file():
        phenolens("explain", model, out / "directions", args.heldout, out / "explain", "--target", target,
                  "--n-samples", args.n_samples, "--steps", args.render_steps, "--threshold", args.threshold,
                  "--batch-size", 32, *(["--keep-explained"] if args.keep_explained else []),
                  *(["--max-directions", args.max_directions] if args.max_directions else []), *expl_opts)
    if args.no_measure:
        return tag, ["(explained; not measured: --no-measure)"], time.perf_counter() - start
    lines = direction_table(out / "explain", args.heldout, args.classes.split(","), target, workers=1)
    return tag, lines, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--train", type=Path, required=True, help="the images the directions learn from")
    ap.add_argument("--heldout", type=Path, required=True, help="the images explained and the measure reference")
    ap.add_argument("--classes", required=True, help="the classifier's classes in order (the table's planted "
                                                     "phenotypes; explain moves towards the last)")
    ap.add_argument("--run", action="append", required=True, help="TAG:MODEL[:DIRECTIONS OPTIONS[:EXPLAIN OPTIONS]]")
    ap.add_argument("--direction-steps", type=int, default=2000)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--render-steps", type=int, default=25)
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--keep-explained", action="store_true")
    ap.add_argument("--max-directions", type=int, default=None, help="explain's --max-directions")
    ap.add_argument("--no-measure", action="store_true", help="stop after explain (measure elsewhere, e.g. "
                                                              "where cp_measure is installed)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # direction_table's `phenolens measure` runs in this environment
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "sweep.md"
    done: dict[str, list[str]] = {}
    order = [spec.split(":")[0] for spec in args.run]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(one_run, spec, args): spec for spec in args.run}
        for fut in as_completed(futures):
            spec = futures[fut]
            try:
                tag, lines, seconds = fut.result()
                done[tag] = [f"# {spec} ({seconds:.0f} s)", "", *lines, ""]
            except subprocess.CalledProcessError as err:
                tag = spec.split(":")[0]
                done[tag] = [f"# {spec}: failed ({err}); see {args.work / tag / 'log.txt'}", ""]
            print("\n".join(done[tag]), flush=True)
            text = "\n".join(line for t in order if t in done for line in done[t]) + "\n"
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(out)


if __name__ == "__main__":
    main()
