"""`phenolens demo`: simulate -> model -> translate held-out control cells -> measure -> report.

The demo model shipped in `phenolens/assets/demo_model` was made by the documented commands in
`DEMO_TRAIN_COMMANDS` (see README); `--train` re-runs them here instead of loading it.
Every figure in `summary.txt` is measured in this run.

OUT is a phenolens output folder (`phenolens.folders.OutputFolder`, kind "demo"): a non-empty
folder that phenolens did not write is refused, and `--overwrite` removes only what the demo
wrote there (each step clears only its own recorded outputs), never a user's files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from phenolens.atomic import write_json_atomic, write_text_atomic
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder, check_apart

DEMO_MODEL = Path(__file__).parent / "assets" / "demo_model"
DEMO_CONDITIONS = ["control", "low", "mid", "high"]
DEMO_SIZE = 48
DEMO_PER_CONDITION = 200
DEMO_TRAIN_STEPS = 10000
DEMO_LR = 5e-4
DEMO_TRAIN_COMMANDS = (
    f"phenolens simulate data/demo --size {DEMO_SIZE} --per-condition {DEMO_PER_CONDITION} --seed 0",
    f"phenolens train data/demo src/phenolens/assets/demo_model --size {DEMO_SIZE} --steps {DEMO_TRAIN_STEPS} "
    f"--batch-size 16 --lr {DEMO_LR} --preset tiny --prediction-type v_prediction --lr-schedule constant "
    "--cond-dropout 0",
)  # the demo model predates the training recipe and its condition dropout: its settings are spelled out
CHANNEL_NAMES = ["DNA", "tubulin", "actin", "Golgi"]
DEMO_MEASURE_REFERENCE = 100  # real images per condition measured as the reference
# what the demo writes into OUT itself; data/, heldout/, model/, translate/ are output folders of
# their own (simulate, train, translate), each with its own inventory
DEMO_FILES = ("grids.png", "report.html", "summary.txt", "summary.json")
DEMO_FOLDERS = ("data", "heldout", "model", "translate")


def _check_demo_options(steps: int, n_images: int, train_steps: int) -> None:
    """Refuse bad numbers before anything is written (the demo simulates 800 images first)."""
    for option, value in (("--n-images", n_images), ("--steps", steps), ("--train-steps", train_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PhenolensError(f"{option} must be at least 1 (got {value})")


def _open_demo_folder(out: Path, overwrite: bool) -> OutputFolder:
    """OUT as a demo folder; an earlier demo there needs --overwrite.

    A demo folder written by a phenolens before markers (summary.json, and nothing but what the demo
    writes) is adopted, so that `make demo` keeps working on it; its sub-folders are adopted by
    simulate / translate / train in turn, each recording only its own files.
    """
    def older(out: Path) -> list[str] | None:
        legacy = (out / "summary.json").is_file() and all(
            child.name in (*DEMO_FILES, *DEMO_FOLDERS) for child in out.iterdir())
        return [name for name in DEMO_FILES if (out / name).is_file()] if legacy else None

    folder = OutputFolder.open(out, "demo", older=older, option="OUT")
    earlier = [name for name in (*folder.files, *DEMO_FOLDERS) if (out / name).exists()]
    if earlier and not overwrite:
        raise PhenolensError(f"OUT {out}: holds an earlier demo ({', '.join(earlier[:3])}); pass --overwrite to "
                             "replace it (only what the demo wrote is removed) or choose another folder")
    if overwrite:
        folder.clear()
    folder.record(*DEMO_FILES)
    return folder


def run_demo(out: str | Path, *, train: bool = False, steps: int = 50, n_images: int = 24,
             overwrite: bool = False, train_steps: int = DEMO_TRAIN_STEPS, model: str | Path | None = None,
             progress: bool = True) -> str:
    from phenolens.data.normalize import load_normalized
    from phenolens.data.records import discover
    from phenolens.data.simulate import simulate
    from phenolens.methods.phendiff import PhenDiff, PhenDiffTrainSettings, train_phendiff
    from phenolens.models.classifier import predict, train_classifier
    from phenolens.report.grids import translation_grid
    from phenolens.run.index import read_index
    from phenolens.run.translate import TranslateSettings, run_translate
    from phenolens.train.trainer import TrainConfig

    out = Path(out)
    _check_demo_options(steps, n_images, train_steps)
    if model is not None:
        check_apart(out, models=[Path(model)], option="OUT")
    elif not train:
        check_apart(out, models=[DEMO_MODEL], option="OUT")
    _open_demo_folder(out, overwrite)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data = simulate(out / "data", conditions=DEMO_CONDITIONS, per_condition=DEMO_PER_CONDITION, size=DEMO_SIZE,
                    seed=0, progress=progress, overwrite=overwrite)
    heldout = simulate(out / "heldout", conditions=DEMO_CONDITIONS, per_condition=n_images, size=DEMO_SIZE,
                       seed=1, progress=progress, overwrite=overwrite)
    timings["simulate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if model is not None:
        model_dir = Path(model)
    elif train or not (DEMO_MODEL / "phenolens.json").is_file():
        model_dir = out / "model"
        train_phendiff(data, model_dir, PhenDiffTrainSettings(preset="tiny", size=DEMO_SIZE,
                                                              prediction_type="v_prediction"),
                       TrainConfig(steps=train_steps, batch_size=16, lr=DEMO_LR, lr_schedule="constant",
                                   cond_dropout=0.0), command=DEMO_TRAIN_COMMANDS[1],
                       overwrite=overwrite, progress=progress)
    else:
        model_dir = DEMO_MODEL
    timings["model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    settings = TranslateSettings(model_dir=str(model_dir), input=str(heldout / DEMO_CONDITIONS[0]), steps=steps,
                                 batch_size=n_images)
    index = run_translate(settings, out / "translate", overwrite=overwrite, progress=progress)
    timings["translate"] = time.perf_counter() - t0
    rows = read_index(index)

    phendiff = PhenDiff.from_pretrained(model_dir, device="cpu")
    norm, channels = phendiff.normalizer, phendiff.info.channels
    strongest = DEMO_CONDITIONS[-1]
    sources = sorted({r["source_path"] for r in rows})
    by = {(r["source_path"], r["target_condition"]): r for r in rows}
    tr = out / "translate"
    src_imgs = load_normalized(sources, norm, channels)
    per_target = {c: load_normalized([tr / by[(s, c)]["output_path"] for s in sources], norm, channels)
                  for c in DEMO_CONDITIONS}

    # --- grids: source | reconstruction | every condition | signed difference to the strongest
    grid_rows = [dict(source=src_imgs[i].numpy(), reconstruction=per_target[DEMO_CONDITIONS[0]][i].numpy(),
                      **{c: per_target[c][i].numpy() for c in DEMO_CONDITIONS}) for i in range(min(8, len(sources)))]
    grid = translation_grid(grid_rows, out / "grids.png", DEMO_CONDITIONS[1:], strongest, CHANNEL_NAMES)

    # --- figures: reconstruction vs change, and a classifier trained on the real images as judge
    recon_mse = np.array([float(by[(s, DEMO_CONDITIONS[0])]["recon_mse"]) for s in sources])
    recon_psnr = np.array([float(by[(s, DEMO_CONDITIONS[0])]["recon_psnr"]) for s in sources])
    change_mse = np.array([float(by[(s, strongest)]["change_mse"]) for s in sources])
    inversion_calls = np.array([float(by[(s, DEMO_CONDITIONS[0])].get("inversion_forwards") or "nan") for s in sources])
    t0 = time.perf_counter()
    train_recs = discover(data)
    x_train = load_normalized([r.path for r in train_recs], norm, channels)
    y_train = torch.tensor([DEMO_CONDITIONS.index(r.condition) for r in train_recs])
    clf = train_classifier(x_train, y_train, len(DEMO_CONDITIONS), progress=progress)
    held_recs = discover(heldout)
    x_held = load_normalized([r.path for r in held_recs], norm, channels)
    y_held = np.array([DEMO_CONDITIONS.index(r.condition) for r in held_recs])
    held_acc = float((predict(clf, x_held) == y_held).mean())
    k = DEMO_CONDITIONS.index(strongest)
    rate_translated = float((predict(clf, per_target[strongest]) == k).mean())
    rate_sources = float((predict(clf, src_imgs) == k).mean())
    timings["classifier"] = time.perf_counter() - t0

    # --- evidence: CellProfiler features of real and translated cells, judges, report
    t0 = time.perf_counter()
    from phenolens.measure.planted import format_planted_table, planted_table
    from phenolens.report.html import write_report
    from phenolens.run.measure import MeasureSettings, run_measure

    measure_dir = run_measure(tr, MeasureSettings(reference=str(data), channel_names=CHANNEL_NAMES,
                                                  max_reference=DEMO_MEASURE_REFERENCE),
                              overwrite=overwrite, progress=progress)
    metrics = json.loads((measure_dir / "metrics.json").read_text())
    planted = planted_table(measure_dir, DEMO_CONDITIONS)
    timings["measure"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = write_report(tr, out / "report.html", progress=progress)
    timings["report"] = time.perf_counter() - t0
    judged = metrics.get("judges", {}).get("targets", {}).get(f"{DEMO_CONDITIONS[0]} -> {strongest}", {})
    identity = metrics.get("identity_nuclei_within_3px", {})
    seg = metrics.get("segmentation_vs_ground_truth", {})

    lines = [
        "phenolens demo: PhenDiff on simulated cells (4 channels: DNA, tubulin, actin, Golgi)",
        f"model: {model_dir}  (conditions {', '.join(DEMO_CONDITIONS)}; {DEMO_SIZE} px)",
        f"translated {len(sources)} held-out {DEMO_CONDITIONS[0]} images to every condition, {steps} DDIM steps, "
        f"fixed-point inversion ({settings.solver}, tolerance {settings.inversion_tol:g}: "
        f"{np.nanmean(inversion_calls):.0f} network calls per image, {np.nanmean(inversion_calls) / steps:.2f} per step)",
        "",
        f"reconstruction PSNR: mean {recon_psnr.mean():.1f} dB (min {recon_psnr.min():.1f})",
        f"reconstruction MSE: mean {recon_mse.mean():.3g}; change MSE to {strongest}: mean {change_mse.mean():.3g}; "
        f"ratio {change_mse.mean() / max(recon_mse.mean(), 1e-20):.0f}x",
        f"classifier (ResNet from a config, trained on the real images): held-out accuracy {held_acc:.0%}",
        f"  assigned to {strongest}: translations {rate_translated:.0%}, their untranslated sources {rate_sources:.0%}",
        f"oracle ensemble ({', '.join(metrics.get('judges', {}).get('members', []))}): success ratio to {strongest} "
        f"{judged.get('success_ratio_translations', float('nan')):.0%}, untranslated sources "
        f"{judged.get('success_ratio_untranslated_sources', float('nan')):.0%}",
        "",
        f"planted phenotypes, real ({DEMO_CONDITIONS[0]} vs {strongest}, {DEMO_MEASURE_REFERENCE} real images each) "
        f"vs translated ({len(sources)} sources vs their translations); r: real vs translated means over the doses",
        format_planted_table(planted),
        "",
        "source nuclei found again (within 3 px) in the translation: "
        + ", ".join(f"{c} {v['fraction']:.0%}" for c, v in identity.items()),
        f"segmentation vs the simulator's masks: mean IoU nuclei {seg.get('nuclei_mean_iou', float('nan')):.2f}, "
        f"cells {seg.get('cells_mean_iou', float('nan')):.2f} ({seg.get('nuclei', 0)} nuclei)",
        "",
        "time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        f"grids: {grid}",
        f"report: {report}",
        f"features and statistics: {measure_dir}",
        f"index: {index}",
    ]
    summary = "\n".join(lines)
    write_text_atomic(out / "summary.txt", summary + "\n")
    figures = dict(recon_psnr_mean=float(recon_psnr.mean()), recon_psnr_min=float(recon_psnr.min()),
                   inversion_calls_per_image=float(np.nanmean(inversion_calls)), recon_mse_mean=float(recon_mse.mean()),
                   change_mse_strongest_mean=float(change_mse.mean()), classifier_heldout_accuracy=held_acc,
                   rate_translated_to_strongest=rate_translated, rate_sources_as_strongest=rate_sources,
                   planted=planted, identity=identity, segmentation=seg, judges=judged, timings=timings)
    write_json_atomic(out / "summary.json", figures)
    return summary
