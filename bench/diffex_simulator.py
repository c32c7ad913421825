"""DiffEx on simulated cells whose truth is known (issue 12's must-show): reconstruction, directions,
and which planted phenotype each ranked direction moves.

    python bench/diffex_simulator.py WORK [--mode together|separate] [--per-condition 400] [--size 48]
        [--classifier-steps 600] [--steps 3000] [--lambda-cls 0.1] [--ablate] [--k 10] [--channel-dropout P]
        [--direction-steps 2000] [--no-standardize] [--n-samples 32] [--threshold 0.1] [--keep-explained] [--alpha A] [--out FILE.md]

Every stage is the `phenolens` command a user would run, into WORK (re-running resumes what resumes and
skips what is finished):

1. `phenolens simulate` the training and the held-out data (--mode together: control vs high, every
   phenotype planted at once; --mode separate: control and one condition per phenotype, cell count kept);
2. `phenolens classifier train` on the training data (held-out accuracy; `--channel-dropout` passed on), and its
   accuracy on the held-out images with each stain alone and without it (`classifier evaluate --per-stain`);
3. `phenolens train --method diffex` with --lambda-cls (and with 0 when --ablate: what the KL term does);
4. reconstruction of the held-out images (exact inversion given z_sem): SSIM, MSE, and the classifier's
   accuracy on the reconstructions against the real images, and on renders of each image's z_sem from
   random x_T (what the KL term changes); where the first and last classes differ in z_sem (encoder part
   vs the classifier's probabilities);
5. `phenolens directions`, then `phenolens explain` towards each non-control class and `phenolens measure`
   of its run: for every ranked direction, the translated effect of each planted phenotype on the real
   scale (measure.planted.planted_by_target), the phenotype it moves most and by how much more than the
   next, and the source nuclei found again within 3 px (identity).

Writes the tables as Markdown (--out, default WORK/diffex_<mode>[-cd<P>]-l<λ₁>[-ps][-raw][-kK]<explain tags>.md,
the tags those of the explain folders: -aALPHA, -sSKIP, -ef, -all) and prints them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CHANNEL_NAMES = "DNA,tubulin,actin,Golgi"


def phenolens(*args: str) -> None:
    cmd = [sys.executable, "-m", "phenolens", *map(str, args)]
    print("$ phenolens " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def add_stage_options(ap: argparse.ArgumentParser, n_samples: int) -> None:
    """The options of the classifier, DiffEx, directions and explain stages (shared by the DiffEx benches)."""
    ap.add_argument("--classifier-steps", type=int, default=600)
    ap.add_argument("--channel-dropout", type=float, default=0.0, help="classifier train's --channel-dropout")
    ap.add_argument("--steps", type=int, default=3000, help="DiffEx training steps")
    ap.add_argument("--lambda-cls", type=float, default=0.1)
    ap.add_argument("--classifier-views", choices=("whole", "per-stain"), default="whole",
                    help="train's --classifier-views (per-stain models are tagged -ps)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--direction-steps", type=int, default=2000)
    ap.add_argument("--no-standardize", action="store_true",
                    help="directions' --no-standardize (folders tagged -raw)")
    ap.add_argument("--whiten", action="store_true", help="directions' --whiten (folders tagged -w)")
    ap.add_argument("--n-samples", type=int, default=n_samples)
    ap.add_argument("--render-steps", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.1, help="explain's --threshold")
    ap.add_argument("--keep-explained", action="store_true", help="explain's --keep-explained")
    ap.add_argument("--alpha", type=float, default=None, help="explain's --alpha (default: the directions' own)")
    ap.add_argument("--skip", type=int, default=0, help="explain's --skip (T_skip; folders tagged -sK)")
    ap.add_argument("--inversion", choices=("fixed-point", "ef-ddpm"), default="fixed-point",
                    help="explain's --inversion (ef-ddpm folders tagged -ef)")
    ap.add_argument("--out", type=Path, default=None)


def views_tag(args) -> str:
    """-ps for a model trained with --classifier-views per-stain (its folder and its directions')."""
    return "-ps" if args.classifier_views == "per-stain" else ""


def directions_tag(args) -> str:
    """The directions options that change what they are, as a name suffix (-ps, -raw, -w, -kK)."""
    return (views_tag(args) + ("-raw" if args.no_standardize else "") + ("-w" if args.whiten else "")
            + (f"-k{args.k}" if args.k != 10 else ""))


def explain_tag(args) -> str:
    """The explain options that change what an explanation holds, as a name suffix (-aALPHA, -sSKIP, -ef, -all)."""
    return ((f"-a{args.alpha:g}" if args.alpha else "") + (f"-s{args.skip}" if args.skip else "")
            + ("-ef" if args.inversion == "ef-ddpm" else "") + ("-all" if args.keep_explained else ""))


def train_stage(train: Path, model: Path, clf: Path, lam: float, args, *extra) -> None:
    """`phenolens train --method diffex` into MODEL, resumed from its checkpoints when there are some. A
    finished model without checkpoints (bench/diffex_gpu_train.py's, trained on a GPU) is used as it is."""
    if (model / "phenolens.json").is_file() and not (model / "checkpoints").is_dir():
        return
    phenolens("train", train, model, "--method", "diffex", "--classifier", clf, "--lambda-cls", lam,
              "--classifier-views", args.classifier_views, *extra,
              "--steps", args.steps, "--checkpoint-every", 250,
              *(["--resume"] if (model / "checkpoints").is_dir() else []))


def explain_stage(model: Path, dirs: Path, data: Path, base: Path, target: str, args) -> Path:
    """Run `phenolens explain` towards TARGET unless done, in BASE + `explain_tag`."""
    expl = base.parent / (base.name + explain_tag(args))
    if not (expl / "ranking.csv").is_file():
        phenolens("explain", model, dirs, data, expl, "--target", target, "--n-samples", args.n_samples,
                  "--steps", args.render_steps, "--threshold", args.threshold, "--skip", args.skip,
                  "--inversion", args.inversion,
                  *(["--keep-explained"] if args.keep_explained else []),
                  *(["--alpha", args.alpha] if args.alpha else []))
    return expl


def reconstruction_table(model_dir: Path, heldout: Path, steps: int) -> dict:
    """SSIM / MSE of held-out reconstructions and the classifier's accuracy on them vs on the real images,
    and on renders of each image's z_sem from random noise (`semantic_renders`)."""
    table = _cached(model_dir, heldout, steps, "reconstruction", _reconstruct)
    return {**table, **_cached(model_dir, heldout, steps, "semantic-renders", semantic_renders)}


def _cached(model_dir: Path, heldout: Path, steps: int, what: str, compute) -> dict:
    """COMPUTE(model_dir, heldout, steps), kept beside the model (keyed by its encoder's digest, the data
    and the steps), so that a re-run of the bench does not render again."""
    from phenolens.atomic import write_json_atomic
    from phenolens.methods.diffex_directions import model_identity

    key = dict(model=model_identity(model_dir), heldout=str(heldout), steps=steps)
    cache = model_dir.parent / f"{what}-{model_dir.name}-{steps}.json"
    if cache.is_file() and json.loads(cache.read_text())["key"] == key:
        return json.loads(cache.read_text())["table"]
    table = compute(model_dir, heldout, steps)
    write_json_atomic(cache, dict(key=key, table=table))
    return table


def semantic_renders(model_dir: Path, heldout: Path, steps: int) -> dict:
    """The classifier's accuracy on images rendered from random x_T under each held-out image's z_sem:
    how much of the classifier's opinion the semantic code alone carries (what eq. 2's KL term is for;
    an exact inversion makes reconstructions right whatever λ₁ is)."""
    import torch

    from phenolens.data.io import read_image
    from phenolens.data.records import discover
    from phenolens.diffusion.code import Code
    from phenolens.methods.diffex import DiffEx, classifier_input

    model = DiffEx.from_pretrained(model_dir)
    records = discover(heldout)
    clf = model.classifier
    gen = torch.Generator().manual_seed(0)
    ok = []
    with torch.no_grad(), model.inference():
        for start in range(0, len(records), 16):
            chunk = records[start:start + 16]
            raws = [read_image(r.path, channels=model.info.channels)[0] for r in chunk]
            x0, frame = model.to_model_space(raws)
            noise = torch.randn(x0.shape, generator=gen).to(model.device)
            out = model.render(Code(noise, steps), model.condition(x0, [r.condition for r in chunk]))
            out = model.crop_back(model.decode(out), frame).float().cpu().clamp(-1, 1)
            proba = clf.predict_proba(classifier_input(out, model.normalizer, clf))
            ok += list(proba.argmax(1) == np.array([clf.class_index(r.condition) for r in chunk]))
    return dict(accuracy_semantic_renders=float(np.mean(ok)))


def _reconstruct(model_dir: Path, heldout: Path, steps: int) -> dict:
    import torch

    from phenolens.data.io import read_image
    from phenolens.data.records import discover
    from phenolens.measure.image_metrics import ssim
    from phenolens.methods.diffex import DiffEx

    model = DiffEx.from_pretrained(model_dir)
    records = discover(heldout)
    clf = model.classifier
    ssims, mses, real_ok, recon_ok = [], [], [], []
    for start in range(0, len(records), 16):
        chunk = records[start:start + 16]
        raws = [read_image(r.path, channels=model.info.channels)[0] for r in chunk]
        t = model.translate(raws, [r.condition for r in chunk], edits=[], steps=steps)
        x = torch.from_numpy(np.stack([model.normalizer.to_model(r) for r in raws]))
        y = torch.from_numpy(np.stack([model.normalizer.to_model(r) for r in t.reconstructions]))
        ssims += [ssim(a.numpy(), b.numpy()) for a, b in zip(x, y)]
        mses += [float(v) for v in t.recon_mse]
        truth = np.array([clf.class_index(r.condition) for r in chunk])
        real_ok += list(clf.predict_proba(clf.prepare(raws)).argmax(1) == truth)
        recon_ok += list(clf.predict_proba(clf.prepare(t.reconstructions)).argmax(1) == truth)
    return dict(images=len(records), ssim=float(np.mean(ssims)), mse=float(np.mean(mses)),
                accuracy_real=float(np.mean(real_ok)), accuracy_reconstructions=float(np.mean(recon_ok)))


def code_split(model_dir: Path, data: Path, per_class: int = 200) -> dict:
    """Where the classes differ in z_sem = [encoder(x), classifier probabilities]: the distance between
    the class means in each part, against the spread of one class's codes. When nearly all of it is in
    the probabilities, a binary classifier leaves one axis for every class-changing direction."""
    from phenolens.data.records import discover
    from phenolens.methods.diffex import DiffEx
    from phenolens.run.directions import encode_codes

    model = DiffEx.from_pretrained(model_dir)
    records = discover(data)
    n_code = int(model.encoder.config.code_dim)  # z_sem = [code, classifier probabilities (one or more views)]
    codes = [encode_codes(model, [r for r in records if r.condition == cls][:per_class], progress=False)
             for cls in (model.classifier.classes[0], model.classifier.classes[-1])]  # the two the table compares
    first, last = codes
    d = last.mean(0) - first.mean(0)
    return dict(dim=int(d.numel()), between_classes=float(d.norm()), encoder_part=float(d[:n_code].norm()),
                probability_part=float(d[n_code:].norm()),
                within_first_class=float((first - first.mean(0)).pow(2).sum(-1).mean().sqrt()))


def stain_table(clf: Path, held: Path) -> list[str]:
    """The classifier's held-out accuracy with each stain alone and without it (`classifier evaluate
    --per-stain`): the cues it uses, so the phenotypes an explanation of it can find."""
    from phenolens.run.classifier import evaluate_classifier

    ev, _ = evaluate_classifier(clf, held, per_stain=True, progress=False)
    names = CHANNEL_NAMES.split(",")
    return ["| held-out accuracy | all stains | " + " | ".join(f"{n} alone | without {n}" for n in names) + " |",
            "|---|---:|" + "---:|---:|" * len(names),
            f"| {ev['images']} images | {100 * ev['accuracy']:.1f} % | "
            + " | ".join(f"{100 * v['only']:.1f} % | {100 * v['without']:.1f} %" for v in ev["stains"].values())
            + " |", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--mode", choices=("together", "separate"), default="together")
    ap.add_argument("--per-condition", type=int, default=400)
    ap.add_argument("--heldout-per-condition", type=int, default=48)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--ablate", action="store_true", help="also train with --lambda-cls 0")
    add_stage_options(ap, n_samples=32)
    args = ap.parse_args()

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train, held = w / f"train-{args.mode}", w / f"heldout-{args.mode}"
    common = ["--size", args.size, "--mode", args.mode]
    if args.mode == "together":
        common += ["--conditions", "control,high"]
    if not (train / "manifest.csv").is_file():
        phenolens("simulate", train, "--per-condition", args.per_condition, "--seed", 0, *common)
    if not (held / "manifest.csv").is_file():
        phenolens("simulate", held, "--per-condition", args.heldout_per_condition, "--seed", 1, *common)
    cd = f"-cd{args.channel_dropout:g}" if args.channel_dropout else ""
    clf = w / f"classifier-{args.mode}{cd}"
    if not (clf / "phenolens_classifier.json").is_file():
        phenolens("classifier", "train", train, clf, "--steps", args.classifier_steps,
                  "--channel-dropout", args.channel_dropout)
    lines = [f"# DiffEx on simulated cells ({args.mode}, classifier --channel-dropout {args.channel_dropout:g})", "",
             f"classifier: {json.loads((clf / 'phenolens_classifier.json').read_text())['evaluation']}", ""]
    lines += stain_table(clf, held)
    lambdas = [args.lambda_cls] + ([0.0] if args.ablate and args.lambda_cls != 0 else [])
    lines += ["| λ₁ | held-out images | SSIM | MSE ([-1, 1]) | classifier accuracy, real | on reconstructions "
              "| on renders of z_sem from random x_T |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    models = {}
    for lam in lambdas:
        model = w / f"diffex-{args.mode}{cd}-l{lam:g}{views_tag(args)}"
        train_stage(train, model, clf, lam, args)
        models[lam] = model
        rec = reconstruction_table(model, held, args.render_steps)
        lines.append(f"| {lam:g} | {rec['images']} | {rec['ssim']:.4f} | {rec['mse']:.2e} | "
                     f"{100 * rec['accuracy_real']:.1f} % | {100 * rec['accuracy_reconstructions']:.1f} % | "
                     f"{100 * rec['accuracy_semantic_renders']:.1f} % |")
    model = models[args.lambda_cls]
    split = code_split(model, train)
    classes = classes_of(clf)
    lines += ["", f"z_sem ({split['dim']} numbers): the class means ({classes[0]}, {classes[-1]}) are "
              f"{split['between_classes']:.2f} apart, {split['encoder_part']:.2f} in the encoder's part and "
              f"{split['probability_part']:.2f} in the classifier's probabilities; codes of one class spread "
              f"{split['within_first_class']:.2f} (RMS from their mean)."]
    tag = f"{args.mode}{cd}-l{args.lambda_cls:g}{directions_tag(args)}"
    dirs = w / f"directions-{tag}"
    phenolens("directions", model, train, dirs, "-k", args.k, "--steps", args.direction_steps,
              *(["--no-standardize"] if args.no_standardize else []), *(["--whiten"] if args.whiten else []))
    for target in classes[1:]:
        expl = explain_stage(model, dirs, held, w / f"explain-{tag}-{target}", target, args)
        lines += ["", *direction_table(expl, held, classes, target)]
    text = "\n".join(lines) + "\n"
    out = args.out or w / f"diffex_{tag}{explain_tag(args)}.md"
    out.write_text(text)
    print(text)


def direction_table(expl: Path, held: Path, classes: list[str], target: str, workers: int | None = None) -> list[str]:
    """`phenolens measure` of an explanation's run (unless measured), then its table: for every ranked
    direction, the translated effect of each planted phenotype on the real scale
    (measure.planted.planted_by_target), the one it moves most and by how much more than the next, and the
    source nuclei found again within 3 px."""
    from phenolens.measure.planted import planted_by_target, planted_in, separation

    ranking = list(csv_rows(expl / "ranking.csv"))
    lines = [f"## towards {target}: {len(ranking)} direction(s) kept", ""]
    if not ranking:
        return lines
    if not (expl / "run" / "measure" / "stats.csv").is_file():
        phenolens("measure", expl / "run", "--reference", held, "--channel-names", CHANNEL_NAMES, "--no-judges",
                  *(["--workers", workers] if workers else []))
    table = planted_by_target(expl / "run" / "measure", [r["edit"] for r in ranking], planted_in(classes))
    metrics = json.loads((expl / "run" / "measure" / "metrics.json").read_text())
    phenotypes = list(dict.fromkeys(r["phenotype"] for r in table))
    lines += ["| rank | direction | p(target) rise | " + " | ".join(phenotypes)
              + " | moves most | × next | nuclei found again |",
              "|---:|---|---:|" + "---:|" * len(phenotypes) + "---|---:|---:|"]
    for r in ranking:
        cells = {t["phenotype"]: t["translated_d"] for t in table if t["target"] == r["edit"]}
        sep = separation(table, r["edit"])
        ident = metrics["identity_nuclei_within_3px"].get(r["edit"], {}).get("fraction", float("nan"))
        lines.append(f"| {r['rank']} | {r['edit']} | {float(r['mean_change']):+.3f} | "
                     + " | ".join(f"{cells.get(p, float('nan')):+.2f}" for p in phenotypes)
                     + f" | {sep['largest']} | {sep['ratio_to_next']:.1f} | {100 * ident:.0f} % |")
    real = {t["phenotype"]: t["real_d"] for t in table if t["target"] == ranking[0]["edit"]}
    lines.append("| real | control → " + target + " | | " + " | ".join(f"{real.get(p, float('nan')):+.2f}"
                                                                     for p in phenotypes) + " | | | |")
    return lines


def classes_of(clf: Path) -> list[str]:
    return json.loads((clf / "phenolens_classifier.json").read_text())["training"]["conditions"]


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)


if __name__ == "__main__":
    main()
