"""Edit strength on the demo's planted phenotypes: exact fixed-point DDIM against EF-DDPM at each T_skip.

    python bench/edit_strength.py WORK [--model MODEL_DIR] [--heldout DIR] [--reference DIR] [--n 24]
                                  [--steps 50] [--skips 0,10,25,40] [--guidance 1.5,2,3] [--guide-ef-ddpm]
                                  [--only fixed-point|ef-ddpm] [--to high]
                                  [--targets all]
                                  [--max-reference 100] [--judge-steps 300] [--no-judges] [--seed 0]
                                  [--workers 2] [--threads 1] [--out table.csv] [--overwrite]

Why: an exact inversion is only worth its cost if the edit it carries shows the phenotype. EF-DDPM
(`--inversion ef-ddpm --skip K`) reconstructs exactly by construction at one call per step, and its
restart point T_skip trades edit strength against staying close to the source; classifier-free
guidance (`--guidance`, for a model trained with condition dropout) strengthens the edit of the exact
inversion at two network calls per rendering step. This bench runs the
demo's protocol (`phenolens demo`) once per inversion on the same sources and targets and reads the
demo's own figures:

- sources: the first N control images of HELDOUT (default: simulated like the demo, seed 1);
- `phenolens translate` (`run_translate`) into WORK/runs/<inversion>, to every condition of the
  model (`--targets all`, as the demo: the oracles then judge among all four doses) or to the
  source and TO only (`--targets to`: cheaper, but the oracles judge between two conditions);
- `phenolens measure` (`run_measure`) against REFERENCE (default: the demo model's training data,
  simulated again with seed 0; 100 real images per condition like the demo);
- `measure.planted.planted_table`: per planted phenotype, the translated mean difference (sources ->
  translations to TO) over the real one (control -> TO), both on the real images' SD scale;
- metrics.json: source nuclei found again within 3 px in the translations to TO, the oracle
  ensemble's success ratio to TO, reconstruction PSNR; index.csv: change MSE and inversion calls.

Prints one markdown table, one row per inversion. Calls per image are inversion + the rendering of
one edit (the reconstruction costs one more rendering of the same length). Re-running with the same
WORK resumes: translations done are kept, measured rows reused (the oracles are trained again).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from phenolens.atomic import write_csv_atomic
from phenolens.data.records import discover
from phenolens.data.simulate import CHANNEL_NAMES, channel_names
from phenolens.errors import PhenolensError
from phenolens.measure.planted import PLANTED_FEATURES, SIMULATOR_NAMES, planted_table
from phenolens.methods.registry import load_model_for
from phenolens.run.index import read_index
from phenolens.run.measure import MeasureSettings, run_measure
from phenolens.run.translate import TranslateSettings, run_translate

DEMO_MODEL = Path(__file__).resolve().parents[1] / "src" / "phenolens" / "assets" / "demo_model"
# the demo's data (phenolens.demo): reference = its training set, sources = held-out control images
DEMO_SIZE, DEMO_REFERENCE_PER_CONDITION, DEMO_REFERENCE_SEED, DEMO_HELDOUT_SEED = 48, 200, 0, 1
SHORT = {"nuclear enlargement": "nuclear enlargement", "cell loss": "cell loss",
         "Golgi fragmentation": "Golgi fragmentation", "actin translocation": "actin translocation",
         "tubulin +10 % (subtle)": "tubulin +10 %", "LC3 puncta": "LC3 puncta"}


def run_name(inversion: str, skip: int, guidance: float = 1.0) -> str:
    name = inversion if inversion != "ef-ddpm" else f"ef-ddpm-skip{skip}"
    return name if guidance == 1 else f"{name}-g{guidance:g}"


def simulated(path: Path, per_condition: int, seed: int, conditions: list[str]) -> Path:
    """PATH as a simulated dataset of the demo's kind; made once (an existing one is reused as it is)."""
    from phenolens.data.simulate import simulate

    if (path / "manifest.csv").is_file():
        return path
    print(f"simulating {path} ({per_condition} per condition, seed {seed})", file=sys.stderr, flush=True)
    return simulate(path, conditions=conditions, per_condition=per_condition, size=DEMO_SIZE, seed=seed,
                    progress=False)


def write_sources(heldout: Path, source: str, n: int, manifest: Path) -> Path:
    """A manifest of the first N SOURCE images of HELDOUT: every inversion translates exactly these."""
    records = discover(heldout, condition=source)
    if len(records) < n:
        raise PhenolensError(f"--heldout {heldout}: {len(records)} {source!r} image(s), --n asks for {n}")
    rows = [dict(path=str(Path(r.path).resolve()), condition=source) for r in records[:n]]
    write_csv_atomic(manifest, rows, ["path", "condition"], only_if_changed=True)
    return manifest


def summarize(run_dir: Path, source: str, to: str, steps: int, skip: int) -> dict:
    """The bench's numbers for one translate run that `run_measure` has measured."""
    measure_dir = run_dir / "measure"
    metrics = json.loads((measure_dir / "metrics.json").read_text())
    conditions = json.loads((measure_dir / "measure.json").read_text())["conditions"]
    # the planted table reads the strongest (last) condition: hand it the series up to TO
    planted = {r["phenotype"]: r for r in planted_table(measure_dir, conditions[:conditions.index(to) + 1])}
    rows = read_index(run_dir / "index.csv")
    to_rows = [r for r in rows if r["target_condition"] == to]
    recon = metrics.get("reconstruction", {})
    judged = metrics.get("judges", {}).get("targets", {}).get(f"{source} -> {to}", {})
    kept = metrics.get("identity_nuclei_within_3px", {}).get(to, {})
    inv_calls = float(np.mean([float(r["inversion_forwards"]) for r in to_rows]))
    return dict(
        ratios={p: planted[p]["ratio"] if p in planted else math.nan for p in PLANTED_FEATURES},
        real_d={p: planted[p]["real_d"] if p in planted else math.nan for p in PLANTED_FEATURES},
        nuclei_kept=kept.get("fraction", math.nan),
        success=judged.get("success_ratio_translations", math.nan),
        success_sources=judged.get("success_ratio_untranslated_sources", math.nan),
        oracle_accuracy=metrics.get("judges", {}).get("heldout_accuracy", {}),
        psnr_mean=recon.get("psnr_mean", math.nan), psnr_min=recon.get("psnr_min", math.nan),
        change_mse=float(np.mean([float(r["change_mse"]) for r in to_rows])),
        inversion_calls=inv_calls, render_calls=steps - skip, n=len(to_rows))


def real_count_ratio(measure_dir: Path, source: str, to: str) -> float:
    """Mean nuclei per real TO image over mean per real SOURCE image: what 'nuclei kept' would be if the
    translation removed exactly the cells the treatment removes (and kept the rest in place)."""
    with open(measure_dir / "features.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["role"] == "reference"]
    count = lambda c: np.nanmean([float(r["Image_Count_Nuclei"]) for r in rows if r["condition"] == c])  # noqa: E731
    return float(count(to) / count(source))


def fmt(v: float, spec: str = ".2f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def planted_in(reference: Path) -> list[str]:
    """The phenotypes the reference data plant (its ground truth names them when `--phenotypes` chose
    some); a phenotype not planted has no real effect to compare with, so it gets no column."""
    table = reference / "_groundtruth" / "planted.csv"
    names = None
    if table.is_file():
        with open(table, newline="") as fh:
            first = next(csv.DictReader(fh), {})
        if first.get("phenotypes"):
            names = set(first["phenotypes"].split("+"))
    has = lambda p: (names is None and p != "LC3 puncta") or (names is not None and SIMULATOR_NAMES[p] in names)  # noqa: E731
    return [p for p in PLANTED_FEATURES if has(p) or (names is None and p == "LC3 puncta" and _has_lc3(table))]


def _has_lc3(table: Path) -> bool:
    if not table.is_file():
        return False
    with open(table, newline="") as fh:
        return "lc3_puncta" in (csv.DictReader(fh).fieldnames or [])


def format_table(results: list[dict], to: str, phen: list[str] | None = None) -> str:
    phen = phen or list(PLANTED_FEATURES)
    head = (["inversion", "skip", "guidance"] + [f"{SHORT[p]} ratio" for p in phen]
            + ["mean abs(ratio-1)", f"source nuclei kept ({to})", f"oracle success ({to})",
               "recon PSNR mean / min (dB)", f"change MSE ({to})", "calls / image (inversion + edit)"])
    lines = ["| " + " | ".join(head) + " |", "|:---|---:|" + "---:|" * (len(head) - 2)]
    real = results[0]["real_d"]
    lines.append("| real control -> " + to + " (Cohen's d) | | | " + " | ".join(fmt(real[p]) for p in phen)
                 + " | | | | | | |")
    for r in results:
        dev = np.nanmean([abs(r["ratios"][p] - 1) for p in phen])
        lines.append(
            f"| {r['inversion']} | {r['skip']} | {r.get('guidance', 1.0):g} | " + " | ".join(fmt(r["ratios"][p]) for p in phen)
            + f" | {fmt(dev)} | {fmt(100 * r['nuclei_kept'], '.0f')} % | {fmt(100 * r['success'], '.0f')} % | "
            f"{fmt(r['psnr_mean'], '.1f')} / {fmt(r['psnr_min'], '.1f')} | {r['change_mse']:.3g} | "
            f"{r['inversion_calls']:.0f} + {r['render_calls']} = {r['inversion_calls'] + r['render_calls']:.0f} |")
    return "\n".join(lines)


def csv_rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        row = {k: v for k, v in r.items() if not isinstance(v, dict)}
        row.update({f"ratio {p}": r["ratios"][p] for p in PLANTED_FEATURES})
        out.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="folder for the simulated data, the translate runs and their measures")
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="model folder (default: the demo model)")
    ap.add_argument("--heldout", type=Path, default=None,
                    help="held-out images (default: WORK/heldout, simulated like the demo's: seed 1)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="real images of every condition (default: WORK/reference, the demo model's training data "
                         "simulated again: seed 0, 200 per condition)")
    ap.add_argument("--n", type=int, default=24, help="source images (default 24, as the demo)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skips", default="0,10,25,40", help="EF-DDPM T_skip values")
    ap.add_argument("--guidance", default="",
                    help="classifier-free guidance scales above 1 for the exact fixed-point inversion, e.g. 1.5,2,3 "
                         "(needs a model trained with --cond-dropout; default: none)")
    ap.add_argument("--guide-ef-ddpm", action="store_true",
                    help="also run every EF-DDPM T_skip at every --guidance scale (default: EF-DDPM unguided)")
    ap.add_argument("--only", choices=("fixed-point", "ef-ddpm"), default=None,
                    help="run one inversion's rows only (two processes can then share WORK; default: both)")
    ap.add_argument("--source", default=None, help="source condition (default: the first of the simulated series)")
    ap.add_argument("--to", default=None, help="the edit judged (default: the last of the simulated series)")
    ap.add_argument("--targets", choices=("all", "to"), default="all",
                    help="translate to every condition (as the demo) or to TO only")
    ap.add_argument("--max-reference", type=int, default=100, help="real images per condition measured (demo: 100)")
    ap.add_argument("--judge-steps", type=int, default=300, help="oracle training steps (measure's default)")
    ap.add_argument("--no-judges", action="store_true", help="skip the oracles (no success ratio; faster)")
    ap.add_argument("--seed", type=int, default=0, help="EF-DDPM noise draw (translate --seed)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2, help="measure processes")
    # one thread: on a shared 2-core machine two threads wait for each other (3x slower measured)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    ap.add_argument("--overwrite", action="store_true", help="redo the translate runs and measures in WORK")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skips = [int(s) for s in args.skips.split(",") if s.strip()]
    scales = [float(g) for g in args.guidance.split(",") if g.strip() and float(g) != 1]

    model = load_model_for(args.model, device="cpu")
    series = ["control", "low", "mid", "high"]  # the simulator's dose series (phenolens.data.simulate)
    conditions = [c for c in series if c in model.conditions] + [c for c in model.conditions if c not in series]
    source, to = args.source or conditions[0], args.to or conditions[-1]
    model.info.condition_index(source, "--source")
    model.info.condition_index(to, "--to")
    names = channel_names(model.info.n_channels == len(CHANNEL_NAMES) + 1)
    args.work.mkdir(parents=True, exist_ok=True)
    heldout = args.heldout or simulated(args.work / "heldout", args.n, DEMO_HELDOUT_SEED, conditions)
    reference = args.reference or simulated(args.work / "reference", DEMO_REFERENCE_PER_CONDITION,
                                            DEMO_REFERENCE_SEED, conditions)
    sources = write_sources(heldout, source, args.n, args.work / "sources.csv")
    targets = None if args.targets == "all" else [source, to]
    print(f"edit-strength bench: {args.n} {source!r} images of {heldout} -> {to!r}, model {args.model}, "
          f"{args.steps} steps, reference {reference} ({args.max_reference} per condition), targets "
          f"{'all conditions' if targets is None else ', '.join(targets)}, {torch.get_num_threads()} thread(s)")

    # every inversion at every strength: fixed-point at each guidance scale, EF-DDPM at each T_skip and scale
    plans = ([("fixed-point", 0, g) for g in [1.0, *scales]]
             + [("ef-ddpm", k, g) for k in skips for g in ([1.0, *scales] if args.guide_ef_ddpm else [1.0])])
    plans = [p for p in plans if args.only in (None, p[0])]
    results, t_all = [], time.perf_counter()
    for inversion, skip, guidance in plans:
        run_dir = args.work / "runs" / run_name(inversion, skip, guidance)
        t0 = time.perf_counter()
        settings = TranslateSettings(model_dir=str(args.model), input=str(sources), targets=targets,
                                     steps=args.steps, inversion=inversion, skip=skip, seed=args.seed,
                                     batch_size=args.batch, guidance_scale=guidance)
        run_translate(settings, run_dir, overwrite=args.overwrite, device="cpu", progress=False)
        t_translate = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_measure(run_dir, MeasureSettings(reference=str(reference), channel_names=names,
                                             max_reference=args.max_reference, judges=not args.no_judges,
                                             judge_steps=args.judge_steps, workers=args.workers),
                    overwrite=args.overwrite, progress=False)
        t_measure = time.perf_counter() - t0
        r = summarize(run_dir, source, to, args.steps, skip)
        r.update(inversion=inversion, skip=skip, guidance=guidance, translate_s=t_translate, measure_s=t_measure)
        if guidance != 1:
            r["render_calls"] *= 2  # a guided step calls the network with and without the condition
        results.append(r)
        print(f"  {run_name(inversion, skip, guidance):>16}: translate {t_translate:.0f} s, measure {t_measure:.0f} s; "
              f"ratios {', '.join(fmt(v) for v in r['ratios'].values())}", file=sys.stderr, flush=True)

    print()
    print(format_table(results, to, planted_in(reference)))
    print()
    first = args.work / "runs" / run_name(*plans[0]) / "measure"
    print(f"ratio: translated mean difference (sources -> their translations to {to}) over the real one "
          f"(real {source} -> real {to}), both in the real images' pooled SD; 1 = the real effect size. "
          f"Real {to} images hold {100 * real_count_ratio(first, source, to):.0f} % as many nuclei as real "
          f"{source} ones (what 'source nuclei kept' would be if exactly the treated cells were removed).")
    if not args.no_judges:
        acc = results[0]["oracle_accuracy"]
        print(f"oracle success: fraction of translations the oracle ensemble (trained on the real images; held-out "
              f"accuracy {', '.join(f'{k} {v:.0%}' for k, v in acc.items()) if isinstance(acc, dict) else acc}) "
              f"assigns to {to}; their untranslated sources: "
              + ", ".join(f"{run_name(r['inversion'], r['skip'], r['guidance'])} {fmt(100 * r['success_sources'], '.0f')} %"
                          for r in results))
    print("time (s): " + ", ".join(f"{run_name(r['inversion'], r['skip'], r['guidance'])} translate {r['translate_s']:.0f} + "
                                    f"measure {r['measure_s']:.0f}" for r in results)
          + f"; total {time.perf_counter() - t_all:.0f}")
    if args.out:
        rows = csv_rows(results)
        write_csv_atomic(args.out, rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
