"""Which training recipe makes translations show the planted phenotypes? Candidates at equal compute
against a plain diffusers loop (issue 11).

    python bench/recipe.py WORK [--images 96000] [--candidates plain,before,dropout,...] [--n 48]
                           [--size 48] [--threads 1] [--sampled N] [--out table.csv]

Data (simulated once into WORK, `phenolens simulate --puncta --phenotypes ...`, 48 px, 5 channels):
`train` (seed 0, 200 images per condition), `heldout` (seed 1: the N control sources) and `reference`
(seed 2, 100 per condition: the real effect), two conditions, control (strength 0) and treated
(strength 1). Planted: every phenotype but cell loss (PHENOTYPES), the small LC3 puncta among them;
without cell loss a faithful translation keeps every cell, so "source nuclei found again" measures
identity alone.

Every candidate sees the same number of training images (`--images`, default 96 000 = the plain
loop's 3000 steps of 32; a batch of 16 gets 6000 steps), then the same evaluation: `phenolens
translate` (default settings: exact fixed-point inversion, 50 steps) of the held-out control images to
`treated`, `phenolens measure` (no oracles) against the reference, and the planted table: per
phenotype, translated / real mean difference (1 = the true effect), plus source nuclei found again
within 3 px and reconstruction PSNR.

Candidates (phenolens ones train with `train_phendiff`, i.e. `phenolens train`):

- `plain`: a plain diffusers loop written out here: the same tiny UNet, DDPMScheduler-style linear
  betas, ε-prediction, AdamW 3e-4, batch 32, no EMA, no augmentation, no warm-up, no dropout;
- `before`: phenolens' defaults before this issue (v-prediction, lr 2e-4, batch 16, EMA 0.999,
  flips and rotations, dropout 0), at the data's own size;
- one-change variants of `before`: `dropout` (condition dropout 0.1), `eps` (ε-prediction),
  `lr5e-4`, `noema`, `noaug`, `b32` (batch 32);
- `chosen`: the recipe the shipped BBBC021 model was trained with (CHOSEN);
- `eps-b32`: the plain loop's ε-prediction, AdamW 3e-4 and batch 32, plus phenolens' EMA,
  augmentation, warm-up and condition dropout 0.1;
- `v-b32`: `eps-b32` with v-prediction (phenolens' default before the recipe);
- `eps-b32-cos1e-3`: `eps-b32` with a peak lr of 1e-3 annealed by a cosine schedule: the recipe
  `phenolens train` now uses by default (src/phenolens/train/recipe.py);
- `default`: whatever `phenolens train` does by default (read from src/phenolens/train/recipe.py and
  TrainConfig), so that a later change of the defaults is measured by the same bench.

The translation is unguided unless `--guidance` names scales (translate's own default guides the
edits of a model trained with the default recipe by 2; give `--guidance 1,2` to see both).

Re-running with the same WORK resumes: trained models and measured runs are kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_strength import fmt, summarize, write_sources  # noqa: E402

from phenolens.atomic import write_json_atomic  # noqa: E402
from phenolens.data.simulate import channel_names, simulate  # noqa: E402
from phenolens.measure.planted import PLANTED_FEATURES, SIMULATOR_NAMES  # noqa: E402
from phenolens.methods.phendiff import PhenDiffTrainSettings, train_phendiff  # noqa: E402
from phenolens.run.measure import MeasureSettings, run_measure  # noqa: E402
from phenolens.run.translate import TranslateSettings, run_translate  # noqa: E402
from phenolens.train.recipe import (RECIPE_BATCH_SIZE, RECIPE_LR, RECIPE_LR_SCHEDULE,  # noqa: E402
                                    RECIPE_PREDICTION_TYPE)
from phenolens.train.trainer import TrainConfig  # noqa: E402

CONDITIONS = ["control", "treated"]
PHENOTYPES = ["nuclear-enlargement", "golgi-fragmentation", "actin-translocation", "tubulin-shift", "lc3-puncta"]
BEFORE = dict(prediction_type="v_prediction", lr=2e-4, batch=16, ema=True, augment=True, dropout=0.0,
              lr_schedule="constant")
VARIANTS = {
    "before": {},
    "dropout": dict(dropout=0.1),
    "eps": dict(prediction_type="epsilon"),
    "lr5e-4": dict(lr=5e-4),
    "noema": dict(ema=False),
    "noaug": dict(augment=False),
    "b32": dict(batch=32),
}
# the BBBC021 recipe (models/bbbc021-cycloheximide): compared here with the plain loop; README "Training recipe"
CHOSEN = dict(BEFORE, dropout=0.1, lr=5e-4)
# the plain loop's optimisation (ε, AdamW 3e-4, batch 32) with phenolens' additions (EMA, augmentation,
# warm-up, condition dropout 0.1 for guidance): do the additions cost identity or effect?
NAMED = {"chosen": CHOSEN, "eps-b32": dict(BEFORE, prediction_type="epsilon", lr=3e-4, batch=32, dropout=0.1)}
# eps-b32 with v-prediction: the ε model of 3000 steps draws no cells from noise (its ε is not yet precise
# enough at high noise, where x0 = (x_t - sqrt(1 - abar) ε) / sqrt(abar) magnifies every error); does v help?
NAMED["v-b32"] = dict(NAMED["eps-b32"], prediction_type="v_prediction")
# eps-b32 learning faster: its loss still falls ~20 % over the last 1000 of 3000 steps (undertrained), so a
# 3x higher peak lr, annealed to 0 by a cosine schedule so that the last steps settle what was learned
NAMED["eps-b32-cos1e-3"] = dict(NAMED["eps-b32"], lr=1e-3, lr_schedule="cosine")
# `phenolens train` without options (today: the same as eps-b32-cos1e-3)
NAMED["default"] = dict(prediction_type=RECIPE_PREDICTION_TYPE, lr=RECIPE_LR["tiny"], batch=RECIPE_BATCH_SIZE,
                        ema=TrainConfig.ema, augment=TrainConfig.augment, dropout=TrainConfig.cond_dropout,
                        lr_schedule=RECIPE_LR_SCHEDULE)
SHORT = {"nuclear enlargement": "nucleus", "cell loss": "cell loss", "Golgi fragmentation": "Golgi",
         "actin translocation": "actin transl.", "tubulin +10 % (subtle)": "tubulin", "LC3 puncta": "LC3 puncta"}


def recipe_of(name: str) -> dict:
    if name in NAMED:
        return dict(NAMED[name])
    if name in VARIANTS:
        return dict(BEFORE, **VARIANTS[name])
    raise SystemExit(f"unknown candidate {name!r}; choose among plain, {', '.join([*NAMED, *VARIANTS])}")


def command_line(recipe: dict, steps: int) -> str:
    """The `phenolens train` command a user would type for RECIPE."""
    parts = [f"phenolens train DATA MODEL --steps {steps} --batch-size {recipe['batch']} --lr {recipe['lr']:g}",
             f"--prediction-type {recipe['prediction_type']}"]
    if recipe["dropout"]:
        parts.append(f"--cond-dropout {recipe['dropout']:g}")
    if not recipe["ema"]:
        parts.append("--no-ema")
    if not recipe["augment"]:
        parts.append("--no-augment")
    if recipe["lr_schedule"] != "constant":
        parts.append(f"--lr-schedule {recipe['lr_schedule']}")
    return " ".join(parts)


def make_data(work: Path, size: int, n: int, phenotypes: list[str] = PHENOTYPES) -> tuple[Path, Path, Path]:
    made = []
    for name, per, seed in (("train", 200, 0), ("heldout", max(n, 8), 1), ("reference", 100, 2)):
        path = work / name
        if not (path / "manifest.csv").is_file():
            simulate(path, conditions=CONDITIONS, per_condition=per, size=size, seed=seed, progress=False,
                     puncta=True, phenotypes=phenotypes)
        with open(path / "_groundtruth" / "planted.csv", newline="") as fh:
            planted = next(csv.DictReader(fh)).get("phenotypes", "")
        if sorted(planted.split("+")) != sorted(phenotypes):
            raise SystemExit(f"{path}: simulated with phenotypes {planted}, this run asks for "
                             f"{'+'.join(phenotypes)}: use another WORK")
        made.append(path)
    return made[0], made[1], made[2]


def train_candidate(recipe: dict, data: Path, model_dir: Path, steps: int, seed: int) -> float:
    """Train (or resume) one phenolens candidate; returns the seconds spent now."""
    t0 = time.perf_counter()
    info = model_dir / "phenolens.json"
    if info.is_file() and json.loads(info.read_text()).get("training", {}).get("steps_done") == steps:
        return 0.0
    settings = PhenDiffTrainSettings(preset="tiny", prediction_type=recipe["prediction_type"])
    config = TrainConfig(steps=steps, batch_size=recipe["batch"], lr=recipe["lr"], ema=recipe["ema"],
                         augment=recipe["augment"], cond_dropout=recipe["dropout"], seed=seed,
                         lr_schedule=recipe["lr_schedule"],
                         checkpoint_every=min(max(steps // 4, 1), 500))  # a session may stop a long run
    resume = (model_dir / "checkpoints").is_dir()
    train_phendiff(data, model_dir, settings, config, resume=resume, progress=False,
                   command=command_line(recipe, steps))
    return time.perf_counter() - t0


def train_plain(data: Path, model_dir: Path, steps: int, seed: int, batch: int = 32, lr: float = 3e-4,
                checkpoint_every: int = 500) -> float:
    """The baseline: the training loop of the diffusers examples, nothing added (DDPM loss, PhenDiff eq. 4).
    Its state (weights, optimiser, random generator, step) is saved every CHECKPOINT_EVERY steps into
    MODEL_DIR/plain_state.pt, and a re-run continues from it exactly (a long budget spans sessions)."""
    from phenolens.data.dataset import ImageSet
    from phenolens.data.records import training_records
    from phenolens.diffusion.ddim import make_scheduler
    from phenolens.models.store import ModelInfo, save_model
    from phenolens.models.unet import build_unet, preset_downsample_factor

    if (model_dir / "phenolens.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    records, conditions = training_records(data, None)
    images = ImageSet(records, None, conditions, augment=False, progress=False,
                      size_multiple=preset_downsample_factor("tiny"))
    torch.manual_seed(seed)
    unet = build_unet("tiny", channels=images.n_channels, size=images.size, num_conditions=len(conditions))
    scheduler = make_scheduler(prediction_type="epsilon")  # linear betas 1e-4..0.02 over 1000 steps
    alphas = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    state_path, start = model_dir / "plain_state.pt", 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        if (state["steps"], state["batch"], state["lr"]) != (steps, batch, lr):
            raise SystemExit(f"{state_path}: a plain loop of {state['steps']} steps of {state['batch']} at lr "
                             f"{state['lr']:g}, not of this run: remove it or use another WORK")
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        start = int(state["step"])
        print(f"  plain loop: resumed at step {start}", flush=True)
    x_all = torch.stack(images.images)
    unet.train()
    for step in range(start, steps):
        if step > start and step % checkpoint_every == 0:
            model_dir.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            torch.save(dict(unet=unet.state_dict(), opt=opt.state_dict(), generator=g.get_state(), step=step,
                            steps=steps, batch=batch, lr=lr), tmp)
            os.replace(tmp, state_path)
        if step and step % 250 == 0:
            print(f"  plain loop: step {step} of {steps}, {time.perf_counter() - t0:.0f} s", flush=True)
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x0, y = x_all[idx], images.labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas), (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval()
    info = ModelInfo(conditions=list(conditions), n_channels=images.n_channels, image_size=images.size,
                     normalization=images.normalizer.to_dict(), prediction_type="epsilon", preset="tiny",
                     input_stats=dict(images.input_stats), cond_dropout=0.0, size_rule="own",
                     training=dict(command=f"bench/recipe.py plain loop: {steps} steps of {batch}, AdamW {lr:g}",
                                   steps_done=steps))
    save_model(model_dir, unet, scheduler, info)
    state_path.unlink(missing_ok=True)
    return time.perf_counter() - t0


def evaluate(model_dir: Path, sources: Path, reference: Path, run_dir: Path, steps: int = 50,
             guidance: float = 1.0) -> dict:
    """Translate the sources to `treated`, measure against the reference, read the planted table."""
    if not (run_dir / "measure" / "metrics.json").is_file():
        run_translate(TranslateSettings(model_dir=str(model_dir), input=str(sources), targets=["treated"],
                                        steps=steps, guidance_scale=guidance), run_dir, progress=False)
        run_measure(run_dir, MeasureSettings(reference=str(reference), channel_names=channel_names(True),
                                             judges=False, max_reference=100, workers=1))
    result = summarize(run_dir, "control", "treated", steps, 0)
    with open(run_dir / "index.csv", newline="") as fh:  # every row carries its source's reconstruction PSNR
        psnr = [float(r["recon_psnr"]) for r in csv.DictReader(fh) if r["target_condition"] == "treated"]
    result.update(psnr_mean=float(np.mean(psnr)), psnr_min=float(np.min(psnr)))
    return result


@torch.no_grad()
def sampled_ratios(model_dir: Path, reference: Path, n: int, phenotypes: list[str], steps: int = 50) -> dict[str, float]:
    """Does the model draw each planted phenotype from noise? Per phenotype: (treated - control) mean of
    N cells generated from the same fixed noise under each condition, over the real reference's (treated
    - control); 1 = the model draws the whole effect. A translation can hardly show what sampling from
    noise does not draw: this separates "not learned" from "not transferred" (issue 11)."""
    from phenolens.data.io import read_image
    from phenolens.measure.features import FeatureSettings, measure_image
    from phenolens.measure.segment import SegmentationSettings, segment
    from phenolens.methods.registry import load_model_for
    from phenolens.run.measure import estimate_nucleus_diameter

    with open(reference / "manifest.csv", newline="") as fh:
        ref = list(csv.DictReader(fh))
    paths = {c: [reference / r["path"] for r in ref if r["condition"] == c] for c in CONDITIONS}
    settings = FeatureSettings(channel_names=tuple(channel_names(True)))
    seg = SegmentationSettings(nuclei_channel=0, cell_channel=1,
                               nucleus_diameter=estimate_nucleus_diameter(paths["control"], None, 0))

    def features(raw: np.ndarray) -> dict[str, float]:  # as `phenolens measure` reads a 16-bit image
        img = np.clip(np.asarray(raw, dtype=np.float64), 0, 65535) / 65535.0
        return measure_image(img, *segment(img, seg), settings)

    real = {c: [features(read_image(p)[0]) for p in paths[c]] for c in CONDITIONS}
    model = load_model_for(model_dir, device="cpu")
    size = model.info.image_size
    noise = torch.randn((n, model.info.n_channels, size, size), generator=torch.Generator().manual_seed(5))
    drawn = {c: [features(r) for r in model._to_raw(model.generate(noise, [c] * n, steps=steps))]
             for c in CONDITIONS}
    out = {}
    for p in PLANTED_FEATURES:
        if SIMULATOR_NAMES[p] not in phenotypes:
            continue
        key = PLANTED_FEATURES[p][0]
        mean = {k: {c: np.nanmean([r.get(key, np.nan) for r in v[c]]) for c in CONDITIONS}
                for k, v in (("real", real), ("drawn", drawn))}
        real_diff = mean["real"]["treated"] - mean["real"]["control"]
        out[p] = float((mean["drawn"]["treated"] - mean["drawn"]["control"]) / real_diff) if real_diff else math.nan
    return out


def format_table(rows: list[dict], phenotypes: list[str] = PHENOTYPES) -> str:
    phen = [p for p in PLANTED_FEATURES if SIMULATOR_NAMES[p] in phenotypes]  # what the data plant
    head = (["candidate", "steps x batch"] + [f"{SHORT[p]}" for p in phen]
            + ["mean ratio", "mean abs(ratio-1)", "nuclei kept", "recon PSNR (dB)", "train min"])
    lines = ["| " + " | ".join(head) + " |", "|:---|---:|" + "---:|" * (len(head) - 2)]
    lines.append("| real control -> treated (Cohen's d) | | " + " | ".join(fmt(rows[0]["real_d"][p]) for p in phen)
                 + " | | | | | |")
    for r in rows:
        mean = np.nanmean([r["ratios"][p] for p in phen])
        dev = np.nanmean([abs(r["ratios"][p] - 1) for p in phen])
        lines.append(f"| {r['candidate']} | {r['steps']} x {r['batch']} | "
                     + " | ".join(fmt(r["ratios"][p]) for p in phen)
                     + f" | {fmt(mean)} | {fmt(dev)} | {fmt(100 * r['nuclei_kept'], '.0f')} % | {fmt(r['psnr_mean'], '.1f')} | "
                     f"{fmt(r['train_seconds'] / 60, '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--images", type=int, default=96000,
                    help="training images per candidate, the equal compute (default 96000 = 3000 steps of 32)")
    ap.add_argument("--candidates", default="plain,before,dropout,eps,lr5e-4,noema,noaug,b32,chosen")
    ap.add_argument("--n", type=int, default=48, help="held-out control sources translated (default 48)")
    ap.add_argument("--size", type=int, default=48, help="simulated image side (default 48)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: two benches share 2 cores)")
    ap.add_argument("--phenotypes", default=",".join(PHENOTYPES),
                    help="phenotypes planted in the simulated data (default: all but cell loss); one WORK per set")
    ap.add_argument("--guidance", default="1",
                    help="guidance scales the translations are evaluated at, comma-separated (default 1; "
                         "above 1 needs a candidate trained with condition dropout)")
    ap.add_argument("--sampled", type=int, default=0, metavar="N",
                    help="also generate N cells per condition from fixed noise and report how much of each "
                         "planted effect sampling draws (default 0: not measured)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    args = ap.parse_args(argv)
    phenotypes = [p.strip() for p in args.phenotypes.split(",") if p.strip()]
    scales = [float(g) for g in args.guidance.split(",") if g.strip()]
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train, heldout, reference = make_data(args.work, args.size, args.n, phenotypes)
    sources = write_sources(heldout, "control", args.n, args.work / "sources.csv")
    times_path = args.work / "train_seconds.json"
    rows = []
    for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        batch = 32 if name == "plain" else recipe_of(name)["batch"]
        steps = args.images // batch
        model_dir = args.work / "models" / f"{name}-{args.images}"
        print(f"{name}: {steps} steps of {batch}", flush=True)
        if name == "plain":
            spent = train_plain(train, model_dir, steps, args.seed)
        else:
            spent = train_candidate(recipe_of(name), train, model_dir, steps, args.seed)
        key = f"{name}-{args.images}"
        # read again just before writing: candidates run in parallel on one WORK share this file
        times = json.loads(times_path.read_text()) if times_path.is_file() else {}
        times[key] = times.get(key, 0.0) + spent
        write_json_atomic(times_path, times)
        if args.sampled:
            drawn = sampled_ratios(model_dir, reference, args.sampled, phenotypes)
            print(f"{name}: drawn from noise / real effect, {args.sampled} cells per condition: "
                  + ", ".join(f"{SHORT[p]} {fmt(v)}" for p, v in drawn.items()), flush=True)
        for g in scales:
            if g != 1 and not (name != "plain" and recipe_of(name)["dropout"]):
                print(f"{name}: trained without condition dropout, no guidance {g:g}", flush=True)
                continue
            guided = g != 1
            result = evaluate(model_dir, sources, reference, args.work / "runs" / (key + f"-g{g:g}" * guided),
                              guidance=g)
            result.update(candidate=name + f" (guidance {g:g})" * guided, steps=steps, batch=batch,
                          train_seconds=times[key])
            rows.append(result)
            print(format_table(rows, phenotypes).splitlines()[-1], flush=True)
    print(f"\nrecipe bench: {args.images} training images per candidate, {args.n} held-out control sources -> "
          f"treated, {torch.get_num_threads()} thread(s)\n")
    print(format_table(rows, phenotypes))
    if args.out:
        flat = []
        for r in rows:
            row = {k: v for k, v in r.items() if not isinstance(v, dict)}
            row.update({f"ratio {p}": r["ratios"][p] for p in PLANTED_FEATURES if SIMULATOR_NAMES[p] in phenotypes})
            flat.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
