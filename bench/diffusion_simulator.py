"""DIFFusion's minimal edit on simulated cells whose truth is known, beside PhenDiff on the same sources
(issue 13's must-show): success ratio at the minimal edit, where it flips, the distance to the source,
and the planted phenotypes it shows.

    python bench/diffusion_simulator.py WORK [--per-condition 300] [--size 48] [--steps 1500]
        [--render-steps 25] [--strengths 10] [--judge-steps 300] [--omega 2] [--mean-images 50]
        [--targets high,mid] [--omegas 0,0.5,1,2,3] [--omega-skip K] [--out FILE.md]

Every stage is the `phenolens` command a user would run, into WORK (re-running skips what is done and
resumes training from its checkpoints):

1. `phenolens simulate` a dose series control / mid / high (seed 0, training) and held-out images (seed 1);
2. `phenolens train --method diffusion` (DIFFusion's embedded model) and `phenolens train` (PhenDiff), the
   same data and steps;
3. for each model and target: `phenolens translate HELDOUT/control --minimal-edit --inversion ef-ddpm`
   (the same judges for both: an oracle ensemble trained on the training images, seed 0), then
   `phenolens measure` of the run against the held-out images;
4. a table per target: success ratio at the minimal edit (the judges' flip rate), the T_skip where it
   flips, SSIM / MSE / oracle-feature distance to the source, and each planted phenotype's translated
   effect against the real one (measure.planted.planted_by_target), with the source nuclei kept;
5. the ω sweep: control → high at each of --omegas from --omega-skip, the planted effects per ω.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffex_simulator import CHANNEL_NAMES, phenolens  # noqa: E402


def train_stage(data: Path, model: Path, method: str, steps: int) -> None:
    """Train unless finished (its train_log.csv reached STEPS, or it came without checkpoints); resume from
    checkpoints."""
    if (model / "phenolens.json").is_file():
        log = rows_of(model / "train_log.csv") if (model / "train_log.csv").is_file() else []
        if not (model / "checkpoints").is_dir() or (log and int(log[-1]["step"]) >= steps):
            return
    phenolens("train", data, model, "--method", method, "--steps", steps, "--checkpoint-every", 250,
              *(["--resume"] if (model / "checkpoints").is_dir() else []))


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summary(run: Path, target: str, held: Path) -> dict:
    """The minimal-edit columns of a run's translations and its planted-phenotype effects."""
    from phenolens.measure.planted import planted_by_target

    rows = [r for r in rows_of(run / "index.csv") if r["kind"] == "translation"]
    if not (run / "measure" / "stats.csv").is_file():
        phenolens("measure", run, "--reference", held, "--channel-names", CHANNEL_NAMES, "--no-judges")
    # measure names a run's target by its edit when the edit says more than to=TARGET (to=high,omega=2)
    key = target if rows[0]["edit"] == f"to={target}" else rows[0]["edit"]
    planted = {p["phenotype"]: p for p in planted_by_target(run / "measure", [key])}
    metrics = json.loads((run / "measure" / "metrics.json").read_text())
    ident = metrics["identity_nuclei_within_3px"].get(key, {}).get("fraction", float("nan"))
    skips = Counter(int(r["t_skip"]) for r in rows if r["flipped"] == "1")
    return dict(n=len(rows), success=np.mean([r["flipped"] == "1" for r in rows]),
                skips=", ".join(f"{k}: {v}" for k, v in sorted(skips.items(), reverse=True)),
                ssim=np.mean([float(r["ssim"]) for r in rows]), mse=np.mean([float(r["change_mse"]) for r in rows]),
                feature=np.mean([float(r["oracle_feature_distance"]) for r in rows]), planted=planted, identity=ident)


def omega_sweep(w: Path, held: Path, args) -> list[str]:
    """Embedding arithmetic over the dose series: control → high at several ω, the planted effects of each
    (is the change monotonic in ω?)."""
    from phenolens.measure.planted import planted_by_target

    table = {}
    for omega in [float(v) for v in args.omegas.split(",")]:
        run = w / f"omega-{omega:g}-s{args.render_steps}-k{args.omega_skip}"
        if not (run / "index.csv").is_file():
            phenolens("translate", w / "diffusion", held / "control", run, "--from", "control", "--to", "high",
                      "--inversion", "ef-ddpm", "--steps", args.render_steps, "--skip", args.omega_skip, "--omega",
                      omega, "--mean-images", args.mean_images)
        if not (run / "measure" / "stats.csv").is_file():
            phenolens("measure", run, "--reference", held, "--channel-names", CHANNEL_NAMES, "--no-judges")
        key = f"to=high,omega={omega:g}"
        metrics = json.loads((run / "measure" / "metrics.json").read_text())
        table[omega] = ({p["phenotype"]: p for p in planted_by_target(run / "measure", [key])},
                        metrics["identity_nuclei_within_3px"].get(key, {}).get("fraction", float("nan")))
    phenotypes = list(next(iter(table.values()))[0])
    lines = [f"## ω sweep, control → high (EF-DDPM, T_skip {args.omega_skip} of {args.render_steps})", "",
             "| ω | " + " | ".join(phenotypes) + " | nuclei kept |", "|---:|" + "---:|" * len(phenotypes) + "---:|"]
    for omega, (planted, ident) in table.items():
        lines.append(f"| {omega:g} | " + " | ".join(f"{planted[p]['translated_d']:+.2f}" for p in phenotypes)
                     + f" | {100 * ident:.0f} % |")
    real = next(iter(table.values()))[0]
    lines += ["| real | " + " | ".join(f"{real[p]['real_d']:+.2f}" for p in phenotypes) + " | |", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--per-condition", type=int, default=300)
    ap.add_argument("--heldout-per-condition", type=int, default=48)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--steps", type=int, default=1500, help="training steps of both models")
    ap.add_argument("--render-steps", type=int, default=25)
    ap.add_argument("--strengths", type=int, default=10)
    ap.add_argument("--judge-steps", type=int, default=300)
    ap.add_argument("--omega", type=float, default=2.0)
    ap.add_argument("--mean-images", type=int, default=50)
    ap.add_argument("--targets", default="high,mid")
    ap.add_argument("--omegas", default="0,0.5,1,2,3",
                    help="the ω sweep: control → high at each ω (EF-DDPM from --omega-skip), planted effects per ω; "
                         "ω 0 is the reconstruction, the floor (the normalisation clips the brightest pixels)")
    ap.add_argument("--omega-skip", type=int, default=0, help="T_skip of the ω sweep's translations")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train, held = w / "train", w / "heldout"
    conditions = ["control", "mid", "high"]
    for folder, n, seed in ((train, args.per_condition, 0), (held, args.heldout_per_condition, 1)):
        if not (folder / "manifest.csv").is_file():
            phenolens("simulate", folder, "--conditions", ",".join(conditions), "--per-condition", n, "--size",
                      args.size, "--seed", seed)
    for method in ("diffusion", "phendiff"):
        train_stage(train, w / method, method, args.steps)
    lines = [f"# DIFFusion's minimal edit on simulated cells, beside PhenDiff ({args.steps} training steps, "
             f"{args.render_steps} render steps, EF-DDPM, {args.strengths} T_skip values, ω {args.omega:g})", ""]
    for target in [t for t in args.targets.split(",") if t]:
        runs = {}
        for method in ("diffusion", "phendiff"):
            run = w / f"min-{method}-{target}-s{args.render_steps}-n{args.strengths}"
            extra = ["--omega", args.omega, "--mean-images", args.mean_images] if method == "diffusion" \
                else ["--guidance-scale", 1]
            if not (run / "index.csv").is_file() or not (run / "sweep.csv").is_file():
                phenolens("translate", w / method, held / "control", run, "--from", "control", "--to", target,
                          "--inversion", "ef-ddpm", "--steps", args.render_steps, "--minimal-edit", "--strengths",
                          args.strengths, "--judge-data", train, "--judge-steps", args.judge_steps, *extra)
            runs[method] = summary(run, target, held)
        phenotypes = list(next(iter(runs.values()))["planted"])
        lines += [f"## control → {target}", "",
                  "| method | images | success ratio at the minimal edit | flips at T_skip (images) | SSIM | MSE "
                  "| oracle-feature distance | " + " | ".join(phenotypes) + " | nuclei kept |",
                  "|---|---:|---:|---|---:|---:|---:|" + "---:|" * len(phenotypes) + "---:|"]
        for method, s in runs.items():
            lines.append(f"| {method} | {s['n']} | {s['success']:.2f} | {s['skips'] or 'none'} | {s['ssim']:.3f} | "
                         f"{s['mse']:.4f} | {s['feature']:.3f} | "
                         + " | ".join(f"{s['planted'][p]['translated_d']:+.2f}" for p in phenotypes)
                         + f" | {100 * s['identity']:.0f} % |")
        real = next(iter(runs.values()))["planted"]
        lines.append("| real | | | | | | | " + " | ".join(f"{real[p]['real_d']:+.2f}" for p in phenotypes) + " | |")
        lines.append("")
    if args.omegas:
        lines += omega_sweep(w, held, args)
    text = "\n".join(lines) + "\n"
    out = args.out or w / "diffusion_simulator.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
