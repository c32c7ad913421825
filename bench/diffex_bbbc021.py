"""DiffEx on the real BBBC021 cycloheximide cells: what does a DMSO-vs-50 µM classifier see?

    python bench/diffex_bbbc021.py WORK [--data ../shared/data/bbbc021-cycloheximide] [--size 68]
        [--classifier-steps 600] [--steps 3000] [--lambda-cls 0.1] [--k 10] [--direction-steps 2000]
        [--n-samples 48] [--threshold 0.1] [--out FILE.md]

Every stage is the `phenolens` command a user would run, into WORK (re-running resumes what resumes and
skips what is finished):

1. the held-out split of bench/bbbc021_split.py (a third of each condition, never trained on), kept to
   DMSO and CHX_50uM;
2. `phenolens classifier train` on the training cells, `classifier evaluate` on the held-out ones;
3. `phenolens train --method diffex` (its reconstruction of the held-out cells: SSIM, MSE, the
   classifier's accuracy on them against the real cells);
4. `phenolens directions` on the training cells, `phenolens explain` towards CHX_50uM on held-out DMSO
   cells, `phenolens measure` and `phenolens report` of its run.

The table: for each ranked direction, how much it raises p(CHX_50uM), and its translated effect (on the
real contrast's pooled-SD scale) on the 10 features with the largest real |d| between held-out DMSO and
CHX_50uM cells, with the source nuclei found again within 3 px.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bbbc021_split import split  # noqa: E402
from diffex_simulator import (add_stage_options, csv_rows, directions_tag, explain_stage,  # noqa: E402
                             phenolens, reconstruction_table, train_stage, views_tag)

CONDITIONS = ("DMSO", "CHX_50uM")
CHANNEL_NAMES = "DNA,tubulin,actin"


def keep_conditions(manifest: Path, out: Path) -> Path:
    """MANIFEST's rows of CONDITIONS, with absolute paths, as OUT (written once)."""
    if not out.is_file():
        rows = [r for r in csv_rows(manifest) if r["condition"] in CONDITIONS]
        for r in rows:
            r["path"] = str((manifest.parent / r["path"]).resolve())
        tmp = out.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        tmp.replace(out)
    return out


def top_real_features(stats: list[dict], target: str, n: int = 10) -> list[dict]:
    """The N features with the largest real |d| (source vs TARGET, q < 0.05), as measure computed them."""
    rows = [r for r in stats if r["target_condition"] == target and r["real_q"] not in ("", "nan")
            and float(r["real_q"]) < 0.05]
    return sorted(rows, key=lambda r: -abs(float(r["real_d"])))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/bbbc021-cycloheximide"))
    ap.add_argument("--size", type=int, default=68)
    add_stage_options(ap, n_samples=48)
    args = ap.parse_args()

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train_all, held_all = split(args.data, w / "split")
    train = keep_conditions(train_all, w / "train-dmso-chx50.csv")
    held = keep_conditions(held_all, w / "heldout-dmso-chx50.csv")
    clf = w / "classifier"
    if not (clf / "phenolens_classifier.json").is_file():
        phenolens("classifier", "train", train, clf, "--steps", args.classifier_steps,
                  "--conditions", ",".join(CONDITIONS), "--channel-dropout", args.channel_dropout)
    evaluation = w / "classifier-heldout.csv"
    if not evaluation.is_file():
        phenolens("classifier", "evaluate", clf, held, "--out", evaluation)
    rows = list(csv_rows(evaluation))
    accuracy = sum(r["condition"] == r["predicted"] for r in rows) / len(rows)
    model = w / f"diffex{views_tag(args)}"
    train_stage(train, model, clf, args.lambda_cls, args, "--size", args.size)
    rec = reconstruction_table(model, held, args.render_steps)
    lines = ["# DiffEx on BBBC021 (DMSO vs CHX_50uM)", "",
             f"classifier on the {len(rows)} held-out cells: {100 * accuracy:.1f} % correct", "",
             "| held-out cells | SSIM | MSE ([-1, 1]) | classifier accuracy, real | on reconstructions "
             "| on renders of z_sem from random x_T |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {rec['images']} | {rec['ssim']:.4f} | {rec['mse']:.2e} | {100 * rec['accuracy_real']:.1f} % | "
             f"{100 * rec['accuracy_reconstructions']:.1f} % | {100 * rec['accuracy_semantic_renders']:.1f} % |", ""]
    dirs = w / f"directions{directions_tag(args)}"
    phenolens("directions", model, train, dirs, "-k", args.k, "--steps", args.direction_steps,
              *(["--no-standardize"] if args.no_standardize else []))
    expl = explain_stage(model, dirs, held, w / f"explain{directions_tag(args)}", CONDITIONS[-1], args)
    ranking = list(csv_rows(expl / "ranking.csv"))
    lines += [f"## towards {CONDITIONS[-1]}: {len(ranking)} direction(s) kept", ""]
    if ranking:
        measure = expl / "run" / "measure"
        if not (measure / "stats.csv").is_file():
            phenolens("measure", expl / "run", "--reference", held, "--channel-names", CHANNEL_NAMES, "--no-judges")
        if not (expl / "run" / "report.html").is_file():
            phenolens("report", expl / "run")
        stats = list(csv_rows(measure / "stats.csv"))
        metrics = json.loads((measure / "metrics.json").read_text())
        top = top_real_features(stats, ranking[0]["edit"])
        by = {(r["target_condition"], r["feature"]): r for r in stats}
        lines += ["Translated d (real pooled-SD scale) of each kept direction on the 10 features with the largest "
                  "real |d|, held-out DMSO vs CHX_50uM:", "",
                  "| feature | real d | " + " | ".join(f"#{r['rank']} {r['edit']}" for r in ranking) + " |",
                  "|:---|---:|" + "---:|" * len(ranking)]
        for f in top:
            cells = [by.get((r["edit"], f["feature"]), {}).get("trans_d_common", "") for r in ranking]
            lines.append(f"| {f['feature']} | {float(f['real_d']):+.2f} | "
                         + " | ".join(f"{float(c):+.2f}" if c not in ("", "nan") else "" for c in cells) + " |")
        lines += ["", "| rank | direction | p(CHX_50uM) rise | images explained | same direction as real (of 10) | "
                  "source nuclei found again |", "|---:|---|---:|---:|---:|---:|"]
        for r in ranking:
            same = sum(1 for f in top if (c := by.get((r["edit"], f["feature"]), {}).get("trans_d_common", ""))
                       not in ("", "nan") and float(c) * float(f["real_d"]) > 0)
            ident = metrics["identity_nuclei_within_3px"].get(r["edit"], {}).get("fraction", float("nan"))
            lines.append(f"| {r['rank']} | {r['edit']} | {float(r['mean_change']):+.3f} | {r['explained']} | "
                         f"{same} | {100 * ident:.0f} % |")
    text = "\n".join(lines) + "\n"
    out = args.out or w / "diffex_bbbc021.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
