"""DIFFusion's minimal edit on simulated cells whose truth is known, beside PhenDiff on the same sources
(issue 13's must-show): success ratio at the minimal edit, where it flips, the distance to the source,
and the planted phenotypes it shows.

    python bench/diffusion_simulator.py WORK [--per-condition 300] [--size 48] [--steps 1500]
        [--render-steps 25] [--strengths 10] [--judge-steps 300] [--omega 2[,4]] [--guidances 1[,3,5]]
        [--mean-images 50] [--targets high,mid] [--omegas 0,0.5,1,2,3] [--omega-skip K] [--jobs N] [--out FILE.md]

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
5. the ω sweep: control → high at each of --omegas from --omega-skip, the planted effects per ω, once per
   guidance scale of --guidances (DIFFusion guides inversion and generation alike, paper App. B.3).

`--jobs N` runs the translate/measure chains side by side (on a GPU machine with many cores).
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


def train_stage(data: Path, model: Path, method: str, steps: int, *extra) -> None:
    """Train unless finished (its train_log.csv reached STEPS, or it came without checkpoints); resume from
    checkpoints. EXTRA: more `phenolens train` options."""
    if (model / "phenolens.json").is_file():
        log = rows_of(model / "train_log.csv") if (model / "train_log.csv").is_file() else []
        if not (model / "checkpoints").is_dir() or (log and int(log[-1]["step"]) >= steps):
            return
    phenolens("train", data, model, "--method", method, "--steps", steps, "--checkpoint-every", 250, *extra,
              *(["--resume"] if (model / "checkpoints").is_dir() else []))


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summary(run: Path, target: str, held: Path, jobs: int = 1) -> dict:
    """The minimal-edit columns of a run's translations and its planted-phenotype effects."""
    from phenolens.measure.planted import planted_by_target

    rows = [r for r in rows_of(run / "index.csv") if r["kind"] == "translation"]
    measure(run, held, jobs)
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


def measure(run: Path, held: Path, jobs: int) -> None:
    if not (run / "measure" / "stats.csv").is_file():
        phenolens("measure", run, "--reference", held, "--channel-names", CHANNEL_NAMES, "--no-judges",
                  *(["--workers", 1] if jobs > 1 else []))


def minimal_run(w: Path, held: Path, train: Path, method: str, target: str, guidance: float, omega: float,
                args) -> tuple[tuple, dict]:
    """One --minimal-edit translate run of METHOD (DIFFusion at GUIDANCE and OMEGA; PhenDiff unguided), measured."""
    tag = (f"-g{guidance:g}-w{omega:g}" if not args.omega_sweep else f"-g{guidance:g}-wsweep{args.omega_sweep}") \
        if method == "diffusion" else ""
    model = w / (dfn_name(args) if method == "diffusion" else method)
    run = w / f"min-{model.name}-{target}{tag}-s{args.render_steps}-n{args.strengths}"
    strength = ["--omega-sweep", args.omega_sweep] if args.omega_sweep else ["--omega", omega]
    extra = [*strength, "--mean-images", args.mean_images, "--mean-data", train, "--guidance-scale", guidance] \
        if method == "diffusion" else ["--guidance-scale", 1]
    if not (run / "index.csv").is_file() or not (run / "sweep.csv").is_file():
        phenolens("translate", model, held / "control", run, "--from", "control", "--to", target,
                  "--inversion", "ef-ddpm", "--steps", args.render_steps, "--minimal-edit", "--strengths",
                  args.strengths, "--judge-data", train, "--judge-steps", args.judge_steps, *extra)
    return (target, method, guidance, omega), summary(run, target, held, args.jobs)


def omega_run(w: Path, held: Path, guidance: float, omega: float, args) -> tuple[tuple, tuple]:
    """Control → high at one ω and guidance, from --omega-skip: its planted effects and the nuclei kept."""
    from phenolens.measure.planted import planted_by_target

    tag = "-clf" if args.diffusion_classifier else ""
    run = w / f"omega{tag}-{omega:g}-g{guidance:g}-s{args.render_steps}-k{args.omega_skip}"
    if not (run / "index.csv").is_file():
        phenolens("translate", w / dfn_name(args), held / "control", run, "--from", "control", "--to", "high",
                  "--inversion", "ef-ddpm", "--steps", args.render_steps, "--skip", args.omega_skip, "--omega",
                  omega, "--mean-images", args.mean_images, "--mean-data", w / "train", "--guidance-scale", guidance)
    measure(run, held, args.jobs)
    key = f"to=high,omega={omega:g}"
    metrics = json.loads((run / "measure" / "metrics.json").read_text())
    return (guidance, omega), ({p["phenotype"]: p for p in planted_by_target(run / "measure", [key])},
                               metrics["identity_nuclei_within_3px"].get(key, {}).get("fraction", float("nan")))


def omega_tables(table: dict, args) -> list[str]:
    """Embedding arithmetic over the dose series: the planted effects per ω (is the change monotonic in ω?)."""
    lines = []
    for guidance in floats(args.guidances):
        rows = {o: v for (g, o), v in table.items() if g == guidance}
        phenotypes = list(next(iter(rows.values()))[0])
        lines += [f"## ω sweep, control → high (EF-DDPM, T_skip {args.omega_skip} of {args.render_steps}, "
                  f"guidance {guidance:g})", "",
                  "| ω | " + " | ".join(phenotypes) + " | nuclei kept |", "|---:|" + "---:|" * len(phenotypes) + "---:|"]
        for omega, (planted, ident) in sorted(rows.items()):
            lines.append(f"| {omega:g} | " + " | ".join(f"{planted[p]['translated_d']:+.2f}" for p in phenotypes)
                         + f" | {100 * ident:.0f} % |")
        real = next(iter(rows.values()))[0]
        lines += ["| real | " + " | ".join(f"{real[p]['real_d']:+.2f}" for p in phenotypes) + " | |", ""]
    return lines


def dfn_name(args) -> str:
    """The DIFFusion model's folder: diffusion, or diffusion-clf when trained with --diffusion-classifier."""
    return "diffusion-clf" if args.diffusion_classifier else "diffusion"


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def in_parallel(tasks: list, jobs: int) -> dict:
    """Run the (function, args) TASKS, JOBS at a time (each a chain of phenolens commands); the (key, value)
    pairs they return, as a dict."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return dict(r for r in pool.map(lambda task: task[0](*task[1]), tasks) if r is not None)


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
    ap.add_argument("--omega", default="2", help="DIFFusion's ω of the minimal edits (a comma list: one run each)")
    ap.add_argument("--guidances", default="1",
                    help="DIFFusion's guidance scales (comma list; one minimal-edit run per ω and guidance, and one "
                         "ω sweep per guidance); PhenDiff runs unguided")
    ap.add_argument("--omega-sweep", default="", metavar="W1,W2,...",
                    help="DIFFusion's minimal edit over these ω as well as T_skip (translate --omega-sweep; "
                         "instead of --omega)")
    ap.add_argument("--mean-images", type=int, default=50)
    ap.add_argument("--targets", default="high,mid")
    ap.add_argument("--omegas", default="0,0.5,1,2,3",
                    help="the ω sweep: control → high at each ω (EF-DDPM from --omega-skip), planted effects per ω; "
                         "ω 0 is the reconstruction, the floor (the normalisation clips the brightest pixels)")
    ap.add_argument("--omega-skip", type=int, default=0, help="T_skip of the ω sweep's translations")
    ap.add_argument("--diffusion-classifier", type=Path, default=None,
                    help="train DIFFusion's model with this classifier's scores in its embedding (train --classifier; "
                         "into WORK/diffusion-clf, runs tagged diffusion-clf / omega-clf)")
    ap.add_argument("--dfn-steps", type=int, default=None, help="DIFFusion's training steps (default --steps)")
    ap.add_argument("--jobs", type=int, default=1, help="translate/measure runs side by side (a GPU machine: 8)")
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
    clf = ["--classifier", args.diffusion_classifier] if args.diffusion_classifier else []
    in_parallel([(train_stage, (train, w / dfn_name(args), "diffusion", args.dfn_steps or args.steps, *clf)),
                 (train_stage, (train, w / "phendiff", "phendiff", args.steps))], args.jobs)
    targets = [t for t in args.targets.split(",") if t]
    tasks = [(minimal_run, (w, held, train, "phendiff", t, 1.0, 0.0, args)) for t in targets]
    tasks += [(minimal_run, (w, held, train, "diffusion", t, g, o, args))
              for t in targets for g in floats(args.guidances) for o in floats(args.omega)]
    tasks += [(omega_run, (w, held, g, o, args)) for g in floats(args.guidances) for o in floats(args.omegas)]
    results = in_parallel(tasks, args.jobs)
    lines = [f"# DIFFusion's minimal edit on simulated cells, beside PhenDiff ({args.steps} training steps, "
             f"{args.render_steps} render steps, EF-DDPM, {args.strengths} T_skip values)", ""]
    for target in targets:
        runs = {key: s for key, s in results.items() if len(key) == 4 and key[0] == target}
        phenotypes = list(next(iter(runs.values()))["planted"])
        lines += [f"## control → {target}", "",
                  "| method | guidance | ω | images | success ratio at the minimal edit | flips at T_skip (images) "
                  "| SSIM | MSE | oracle-feature distance | " + " | ".join(phenotypes) + " | nuclei kept |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|" + "---:|" * len(phenotypes) + "---:|"]
        for (_, method, g, o), s in sorted(runs.items(), key=lambda kv: (kv[0][1] != "phendiff", kv[0][2:])):
            setting = (f"{g:g} | {args.omega_sweep or format(o, 'g')}") if method == "diffusion" else "1 | "
            name = dfn_name(args) if method == "diffusion" else method
            lines.append(f"| {name} | {setting} | {s['n']} | {s['success']:.2f} | {s['skips'] or 'none'} | "
                         f"{s['ssim']:.3f} | {s['mse']:.4f} | {s['feature']:.3f} | "
                         + " | ".join(f"{s['planted'][p]['translated_d']:+.2f}" for p in phenotypes)
                         + f" | {100 * s['identity']:.0f} % |")
        real = next(iter(runs.values()))["planted"]
        lines.append("| real | | | | | | | | | " + " | ".join(f"{real[p]['real_d']:+.2f}" for p in phenotypes) + " | |")
        lines.append("")
    if args.omegas:
        lines += omega_tables({k: v for k, v in results.items() if len(k) == 2}, args)
    text = "\n".join(lines) + "\n"
    out = args.out or w / "diffusion_simulator.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
