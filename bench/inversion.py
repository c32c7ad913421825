"""Inversion benchmark: network calls against reconstruction exactness, one row per solver.

    python bench/inversion.py DATA_DIR [--model MODEL_DIR] [--n 32] [--steps 50]
                              [--tols 1e-3,3e-4,1e-4,5e-5,3e-5] [--solvers picard,anderson]
                              [--skips 0,10,25,40] [--cap 8]
                              [--batch 32] [--threads 1] [--out table.csv]

Takes the first N images of the source condition (default: the model's first condition) in DATA_DIR
(a dataset root or manifest, e.g. `phenolens simulate DIR --size 48 --seed 7`: held-out, not the
demo model's seed 0), inverts each under its own condition and renders it again under the same one,
through `CounterfactualModel.translate` (the path `phenolens translate` takes). The reconstruction
error is the floor under which no counterfactual change can be believed; the calls are what
inversion costs. Rows:

    ddim              plain DDIM inversion (PhenDiff eq. 6): one call per step, not exact
    legacy            fixed-point as phenolens ran it before issue 10: 1 + 5 calls per step, no tolerance
    picard tol=T      fixed-point, warm start, stop an image's iteration below residual T (cap --cap)
    anderson tol=T    the same with Anderson acceleration
    ef-ddpm skip=K    edit-friendly DDPM inversion from step K: exact by construction (its PSNR is
                      float rounding), one call per inverted step

Prints a markdown table: inversion calls per image (mean) and per inverted step, their ratio to the
legacy row, reconstruction PSNR mean and min over images (dB, data range 2 on [-1, 1]), seconds per
image (inversion + reconstruction, this machine, --threads), and whether the row meets the default's
bar (min PSNR >= --min-db with <= --max-calls calls per step). Then the cheapest fixed-point row that
meets it: the candidate default.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phenolens.atomic import write_csv_atomic
from phenolens.data.io import read_image
from phenolens.data.records import discover
from phenolens.diffusion.inversion import DEFAULT_ITERS, InversionSettings
from phenolens.errors import PhenolensError
from phenolens.measure.image_metrics import psnr_from_mse
from phenolens.methods.core import CounterfactualModel
from phenolens.methods.registry import load_model_for

DEMO_MODEL = Path(__file__).resolve().parents[1] / "src" / "phenolens" / "assets" / "demo_model"
MIN_DB = 60.0  # issue 10: the default keeps every image's reconstruction above this
MAX_CALLS_PER_STEP = 2.5  # ... with at most this many inversion calls per step on average
COLUMNS = ["row", "inversion", "solver", "tol", "skip", "n", "calls_per_image", "calls_per_step", "calls_vs_legacy",
           "psnr_mean_db", "psnr_min_db", "sec_per_image", "meets"]


@dataclass(frozen=True)
class Row:
    """One line of the table: its label and the settings it inverts with."""

    label: str
    settings: InversionSettings


def build_rows(steps: int, tols: list[float], skips: list[int], cap: int,
               solvers: tuple[str, ...] = ("picard", "anderson")) -> list[Row]:
    rows = [Row("ddim", InversionSettings(method="ddim", steps=steps)),
            Row("legacy", InversionSettings.legacy(steps=steps))]
    for solver in solvers:
        rows += [Row(f"{solver} tol={tol:g}", InversionSettings(steps=steps, iters=cap, tol=tol, solver=solver,
                                                                warm_start=True)) for tol in tols]
    rows += [Row(f"ef-ddpm skip={k}", InversionSettings(method="ef-ddpm", steps=steps, skip=k)) for k in skips]
    for r in rows:
        r.settings.check()
    return rows


def load_sources(data_dir: Path, model: CounterfactualModel, condition: str, n: int) -> list[np.ndarray]:
    """The first N images of CONDITION in DATA_DIR, raw, as `phenolens translate` reads them (one shape)."""
    records = discover(data_dir, condition=condition)
    if len(records) < n:
        raise PhenolensError(f"{data_dir}: {len(records)} image(s) of {condition!r}, --n asks for {n}")
    raws = [read_image(r.path, channels=model.info.channels)[0] for r in records[:n]]
    if len({r.shape for r in raws}) != 1:
        raise PhenolensError(f"{data_dir}: the first {n} {condition!r} images differ in shape; the bench needs one")
    return raws


def bench_row(model: CounterfactualModel, raws: list[np.ndarray], condition: str, row: Row, batch: int,
              seed: int) -> dict:
    """Invert and reconstruct every image with ROW's settings; returns the table's numbers."""
    mses, calls = [], []
    t0 = time.perf_counter()
    for i in range(0, len(raws), batch):
        part = raws[i:i + batch]
        generator = ([torch.Generator().manual_seed(seed + i + j) for j in range(len(part))]
                     if row.settings.method == "ef-ddpm" else None)
        result = model.translate(part, condition, [], inversion=row.settings, generator=generator)
        mses += result.recon_mse.tolist()
        calls += result.inversion_forwards.tolist()
    sec = (time.perf_counter() - t0) / len(raws)
    s = row.settings
    psnr = psnr_from_mse(np.array(mses))
    per_image = float(np.mean(calls))
    return dict(row=row.label, inversion=s.method, solver=s.solver if s.method == "fixed-point" else "",
                tol=s.tol if s.method == "fixed-point" else "", skip=s.skip, n=len(raws),
                calls_per_image=per_image, calls_per_step=per_image / (s.steps - s.skip),
                psnr_mean_db=float(psnr.mean()), psnr_min_db=float(psnr.min()), sec_per_image=sec)


def meets(r: dict, min_db: float, max_calls: float) -> bool:
    return r["psnr_min_db"] >= min_db and r["calls_per_step"] <= max_calls


def recommend(results: list[dict], min_db: float, max_calls: float) -> dict | None:
    """The cheapest warm-start fixed-point row that meets the bar (ties: the higher min PSNR)."""
    ok = [r for r in results if r["inversion"] == "fixed-point" and r["row"] != "legacy" and r["meets"]]
    return min(ok, key=lambda r: (round(r["calls_per_image"], 1), -r["psnr_min_db"])) if ok else None


def format_table(results: list[dict]) -> str:
    lines = ["| row | calls / image | calls / step | calls vs legacy | PSNR mean (dB) | PSNR min (dB) | s / image "
             "| meets bar |",
             "|:---|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['calls_per_image']:.1f} | {r['calls_per_step']:.2f} | "
                     f"{r['calls_vs_legacy']:.2f}x | {r['psnr_mean_db']:.1f} | {r['psnr_min_db']:.1f} | "
                     f"{r['sec_per_image']:.2f} | {'yes' if r['meets'] else 'no'} |")
    return "\n".join(lines)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path, help="held-out images (dataset root or manifest)")
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="model folder (default: the demo model)")
    ap.add_argument("--source", default=None, help="condition of the images inverted (default: the model's first)")
    ap.add_argument("--n", type=int, default=32, help="images (default 32)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tols", type=floats, default=floats("1e-3,3e-4,1e-4,5e-5,3e-5"),
                    help="fixed-point tolerances, for picard and anderson alike")
    ap.add_argument("--solvers", default="picard,anderson", help="fixed-point solvers to run at each tolerance")
    ap.add_argument("--skips", type=ints, default=ints("0,10,25,40"), help="EF-DDPM T_skip values (empty: none)")
    ap.add_argument("--cap", type=int, default=DEFAULT_ITERS, help="fixed-point: most calls per step after the guess")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="EF-DDPM noise (image i draws from seed + i)")
    # one thread: on a shared 2-core machine two threads wait for each other (3x slower measured)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default; default 1)")
    ap.add_argument("--min-db", type=float, default=MIN_DB)
    ap.add_argument("--max-calls", type=float, default=MAX_CALLS_PER_STEP)
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 1:
        raise SystemExit("--n must be at least 1")

    model = load_model_for(args.model, device="cpu")
    source = args.source or model.conditions[0]
    model.info.condition_index(source, "--source")
    raws = load_sources(args.data_dir, model, source, args.n)
    try:
        rows = build_rows(args.steps, args.tols, args.skips, args.cap,
                          tuple(s.strip() for s in args.solvers.split(",") if s.strip()))
    except ValueError as err:  # a solver, skip or step count InversionSettings refuses
        raise SystemExit(f"bench/inversion.py: {err}") from None
    sched = model.scheduler.config
    print(f"inversion bench: {len(raws)} {source!r} images of {args.data_dir}, model {args.model} "
          f"({model.info.method}, {model.info.image_size} px, prediction={sched.prediction_type}, "
          f"spacing={sched.timestep_spacing}), {args.steps} steps, fixed-point cap {args.cap}, "
          f"{torch.get_num_threads()} thread(s), batch {args.batch}")

    t_all = time.perf_counter()
    results = []
    for row in rows:
        results.append(bench_row(model, raws, source, row, args.batch, args.seed))
        r = results[-1]
        print(f"  {r['row']:>18}: {r['calls_per_image']:.1f} calls, {r['psnr_mean_db']:.1f} dB "
              f"(min {r['psnr_min_db']:.1f}), {r['sec_per_image']:.2f} s/img", file=sys.stderr, flush=True)
    legacy = next(r for r in results if r["row"] == "legacy")
    for r in results:
        r["calls_vs_legacy"] = r["calls_per_image"] / legacy["calls_per_image"]
        r["meets"] = meets(r, args.min_db, args.max_calls)

    print()
    print(format_table(results))
    print()
    print(f"bar: min PSNR >= {args.min_db:g} dB with <= {args.max_calls:g} inversion calls per step; "
          f"ratios against legacy ({legacy['calls_per_image']:.0f} calls, {legacy['psnr_mean_db']:.1f} dB mean, "
          f"{legacy['psnr_min_db']:.1f} min)")
    best = recommend(results, args.min_db, args.max_calls)
    if best is None:
        print("recommended fixed-point default: none of the rows meets the bar")
    else:
        print(f"recommended fixed-point default: {best['row']} (cap {args.cap}, warm start): "
              f"{best['calls_per_image']:.1f} calls/image = {best['calls_per_step']:.2f}/step "
              f"({best['calls_vs_legacy']:.2f}x legacy), PSNR mean {best['psnr_mean_db']:.1f} dB, "
              f"min {best['psnr_min_db']:.1f} dB")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.out:
        write_csv_atomic(args.out, [{k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v)
                                     for k, v in r.items()} for r in results], COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
