"""Phen-LDiff conditioning on the simulator: fixed prompt embeddings vs learned embeddings.

    OMP_NUM_THREADS=1 python bench/phenldiff_conditioning.py --out bench/phenldiff_conditioning.md [--work DIR] [--seed 0]

The question (`phenolens finetune --conditioning prompt|learned`): is a condition better given as the
base text encoder's embedding of its prompt, kept fixed, or as a trained embedding started from it?

What runs (one script, 19-23 min on one busy CPU thread):

1. `simulate` control vs high (strength 0 and 1): 150 training images per condition (seed S) and 48
   held-out per condition (seed S+1), 32 px. Channels 0,2,3 (DNA, actin, Golgi: nuclear enlargement,
   actin translocation, Golgi fragmentation) become the VAE's RGB, passed to finetune and every read.
   32 px is the tiny base's native size; 48 px made each UNet step 3x slower (self-attention over
   24x24 latent tokens), which did not fit two fine-tunings and two translations into 25 min.
2. There are no pretrained weights here: `build_tiny_base` writes a Stable-Diffusion-2-shaped pipeline
   with random VAE, UNet and text encoder, and a random VAE cannot reconstruct an image. So the VAE is
   pre-trained here, as an autoencoder on the training images (normalised as finetune does, same crops
   and flips/rotations; MSE + 1e-3 x KL per pixel, Adam one-cycle lr 2e-3, 400 steps of 16), its
   scaling factor set to 1/std of the training latents (how LDM chose SD's 0.18215; the tiny base's
   0.18215 would leave the scaled latents at std ~0.2), and saved back into BASE/vae with
   `save_pretrained`. It stands in for SD's pretrained VAE. The text encoder and the UNet stay random.
3. For each conditioning, `phenolens finetune --mode full` (a random UNet has nothing for LoRA, SVDiff
   or attention-only tuning to adapt, so the whole UNet trains), identical settings: 1500 steps, batch
   16, lr 1e-3 (the CLI's 1e-4 is meant for a pretrained UNet), warm-up 100, seed S, EMA 0.999; then
   `phenolens translate MODEL heldout/control OUT --to high` (50 steps, fixed-point inversion).
4. Scores. The judge is `phenolens.models.classifier` (a small ResNet) trained on the real normalised
   training images, control vs high (400 steps), checked on the 96 held-out images. Success = the
   fraction of translations it calls high (Wilson 95 % CI) and their mean p(high); the sources, the
   reconstructions and VAE-only round trips are scored as references. From index.csv:
   latent_recon_mse, latent_change_mse, recon_mse, autoencoder_mse, change_mse. Planted feature: mean
   nucleus area per image (`segment_nuclei` on DNA) of real control, real high, sources, translations.
   Embedding gap = |e_control - e_high| / mean |e|; moved = |e - e_prompt| / |e_prompt|. Paired
   learned-vs-prompt on the same sources: exact McNemar on success, Wilcoxon on p(high).

Measured (x86_64, 2 cores shared with other jobs, 1 thread; seed 0 = bench/phenldiff_conditioning.md,
1160 s wall; seed 1 = a full replicate with --seed 1, data, VAE, models and judge all redrawn, 1401 s;
train s varies by ~15 % with the machine's load):

    seed  conditioning  train s  translations->high  mean p(high)  latent_change_mse  nucleus area  emb. gap  moved
    0     prompt        425      43/48 = 0.90        0.859         0.0446             106.9 px²     0.179     0
    0     learned       438      44/48 = 0.92        0.900         0.0498             107.2 px²     0.229     0.053
    1     prompt        545      43/48 = 0.90        0.911         0.0855             107.7 px²     0.202     0
    1     learned       510      46/48 = 0.96        0.944         0.0919             106.6 px²     0.246     0.048

    references (seed 0 / seed 1): VAE held-out PSNR 30.9 / 30.2 dB (26.8 / 26.3 dB on stained pixels);
    judge held-out accuracy 1.00 / 1.00; sources -> high 0/48, through the VAE alone 0/48, real high
    through the VAE alone -> high 48/48; reconstructions -> high 0/48 for every model; latent_recon_mse
    ~1e-8 for every model (inversion exact), so recon_mse = autoencoder_mse (0.0031 / 0.0035);
    final training loss (mean of the last 10 %) 0.1158 / 0.1458, the same to 4 digits for both
    conditionings; nucleus area real control 98 / 97, real high 132 / 135, sources 95 / 92 px².

Conclusion: on the simulator, learned embeddings work marginally better than fixed prompt embeddings,
and the success ratio cannot tell them apart. Their translations are judged slightly more "high" in
both seeds (mean p(high) +0.040 ± 0.011 and +0.034 ± 0.013, higher for nearly every source, Wilcoxon
p < 1e-10 within each pair of models), with a 7-12 % larger latent change: the learned embeddings move
about 5 % from the prompts and 25 % further apart, so the same UNet makes a stronger edit. The hard
success ratio is equal within noise (0.90 vs 0.92 and 0.90 vs 0.96; discordant sources 1 vs 0 and
3 vs 0, McNemar p = 1 and 0.25, pooled 4 vs 0, p = 0.125), the training loss and the (exact)
reconstructions are identical, and the planted nuclear enlargement is reproduced equally and only in
part by both (sources 92-95 -> 107 px², real high 132-135). Caveats: a tiny random UNet trained from
scratch in full mode for 1500 steps, not LoRA on a pretrained SD-2; a random text encoder, so the
prompts carry no meaning (with a real CLIP a prompt could help or hurt more); a VAE pre-trained here
(30 dB); 32 px; 150 training images per condition, 48 translated sources, 2 seeds, one judge.

Prints the table and writes it to --out (markdown). With --work the data, base, models and runs are
kept there, and a rerun with the same settings reuses them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from phenolens.atomic import write_text_atomic
from phenolens.data.normalize import load_normalized
from phenolens.measure.image_metrics import psnr_from_mse

CONDITIONINGS = ("prompt", "learned")
SOURCE, TARGET = "control", "high"


# --------------------------------------------------------------------------------------- data
def make_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Training set (seed S) and a held-out set (seed S+1) of control and high, reused when present."""
    from phenolens.data.simulate import simulate

    train, held = work / "train", work / "heldout"
    for out, n, seed in ((train, args.per_condition, args.seed), (held, args.held_out, args.seed + 1)):
        if not (out / "manifest.csv").is_file():
            simulate(out, conditions=[SOURCE, TARGET], per_condition=n, size=args.size, seed=seed, progress=False,
                     workers=1, overwrite=True)
    return train, held


def image_sets(train: Path, held: Path, args: argparse.Namespace):
    """Normalised crops as `phenolens finetune` builds them (same records, size, channels, normaliser)."""
    from phenolens.data.dataset import ImageSet
    from phenolens.data.records import discover, training_records

    records, conditions = training_records(train)
    assert conditions == [SOURCE, TARGET], conditions
    train_set = ImageSet(records, args.size, conditions, channels=args.channel_list, augment=True, progress=False)
    held_set = ImageSet(discover(held), args.size, conditions, normalizer=train_set.normalizer,
                        channels=args.channel_list, augment=False, progress=False)
    return train_set, held_set


# -------------------------------------------------------------------------------- VAE stand-in
def pretrain_vae(base: Path, train_set, held_set, args: argparse.Namespace) -> dict:
    """Train the tiny base's random VAE as an autoencoder on the training images (MSE + small KL),
    set its scaling factor to 1/std of the training latents (as LDM/SD chose theirs), save it back."""
    from diffusers import AutoencoderKL

    from phenolens.methods.phenldiff import to_rgb

    done = base / "vae" / "pretrained.json"
    if done.is_file():
        return json.loads(done.read_text())
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae")
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.vae_lr, total_steps=args.vae_steps,
                                                pct_start=min(0.5, max(0.05, 4 / args.vae_steps)))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.vae_steps):
        idx = torch.randint(len(train_set), (args.vae_batch_size,), generator=gen).tolist()
        x, _ = train_set.batch(idx, gen)  # random crops, flips and 90° rotations, as fine-tuning sees them
        x = to_rgb(x)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        # per image: sum of squared errors + kl_weight * KL, divided by the pixel count (an MSE + small KL)
        loss = (recon - x).pow(2).mean() + args.vae_kl * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    vae.eval()
    with torch.no_grad():
        xt = to_rgb(torch.stack(train_set.images))
        std = float(torch.cat([vae.encode(xt[i:i + 64]).latent_dist.sample(generator=gen)
                               for i in range(0, len(xt), 64)]).std())
        xh = to_rgb(torch.stack(held_set.images))
        rh = torch.cat([vae.decode(vae.encode(xh[i:i + 64]).latent_dist.mode()).sample.clamp(-1, 1)
                        for i in range(0, len(xh), 64)])
        mse = float((rh - xh).pow(2).mean())
        fg = xh > -0.9  # stained pixels only (the dark background makes PSNR easy)
        fg_mse = float((rh - xh)[fg].pow(2).mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(str(base / "vae"), safe_serialization=True)
    summary = dict(steps=args.vae_steps, seconds=round(seconds, 1), latent_std=round(std, 4),
                   scaling_factor=round(1.0 / std, 4), heldout_mse=mse, heldout_psnr=round(float(psnr_from_mse(mse)), 2),
                   heldout_foreground_mse=fg_mse, heldout_foreground_psnr=round(float(psnr_from_mse(fg_mse)), 2),
                   heldout_images=len(xh), foreground_fraction=round(float(fg.float().mean()), 3))
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------------- finetune/translate
def finetune_and_translate(work: Path, base: Path, train: Path, held: Path, conditioning: str,
                           args: argparse.Namespace) -> dict:
    from phenolens.cli import main as cli

    model, run = work / f"model_{conditioning}", work / f"translate_{conditioning}"
    argv = ["finetune", str(train), str(model), "--base", str(base), "--mode", "full", "--conditioning", conditioning,
            "--channels", args.channels, "--size", str(args.size), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
            "--seed", str(args.seed), "--checkpoint-every", str(args.steps)]
    info_path = model / "phenolens.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    fresh = info is None or info["training"].get("command") != "phenolens " + shlex.join(argv + ["--overwrite"])
    timing_file = model / "bench_seconds.json"
    seconds = json.loads(timing_file.read_text()) if not fresh and timing_file.is_file() else {}
    if fresh:
        t0 = time.perf_counter()
        if cli(argv + ["--overwrite"]) != 0:
            raise SystemExit(f"phenolens finetune failed for --conditioning {conditioning}")
        seconds = dict(train=time.perf_counter() - t0)
    targv = ["translate", str(model), str(held / SOURCE), str(run), "--to", TARGET, "--steps", str(args.sample_steps),
             "--seed", str(args.seed)]
    previous = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    redo = fresh or "translate" not in seconds or any(
        previous.get(k) != v for k, v in (("steps", args.sample_steps), ("seed", args.seed), ("targets", [TARGET])))
    if redo:
        t0 = time.perf_counter()
    if cli(targv + (["--overwrite"] if redo else [])) != 0:  # a finished run is reused (translate resumes)
        raise SystemExit(f"phenolens translate failed for --conditioning {conditioning}")
    if redo:
        seconds["translate"] = time.perf_counter() - t0
    timing_file.write_text(json.dumps(seconds))
    train_s, translate_s = seconds.get("train", float("nan")), seconds["translate"]
    return dict(model=model, run=run, train_seconds=train_s, translate_seconds=translate_s)


def final_loss(model: Path, fraction: float = 0.1) -> float:
    with (model / "train_log.csv").open(newline="") as fh:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]
    last = max(s for s, _ in rows)
    tail = [v for s, v in rows if s > (1 - fraction) * last]
    return float(np.mean(tail))


def embedding_stats(model: Path, reference: Path) -> dict:
    """How far apart the two conditions' embeddings are, and how far learning moved them from the prompts'."""
    from safetensors.torch import load_file

    emb = load_file(str(model / "condition_embeddings.safetensors"))["conditions"]
    ref = load_file(str(reference / "condition_embeddings.safetensors"))["conditions"]
    gap = float((emb[0] - emb[1]).norm() / emb.norm(dim=(1, 2)).mean())
    moved = float((emb - ref).norm() / ref.norm())
    return dict(embedding_gap=gap, embedding_moved=moved)


# ------------------------------------------------------------------------------------ scoring


def nucleus_areas(images_raw: list[np.ndarray]) -> np.ndarray:
    """Mean nucleus area (px²) per image, DNA = channel 0; NaN where nothing is found."""
    from phenolens.measure.segment import segment_nuclei

    out = []
    for img in images_raw:
        labels = segment_nuclei(np.asarray(img[0], dtype=np.float64))
        n = int(labels.max())
        out.append(float(np.bincount(labels.ravel())[1:].mean()) if n else float("nan"))
    return np.asarray(out)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def mean_se(v: np.ndarray) -> str:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return f"{v.mean():.4g}" if len(v) else "n/a"
    return f"{v.mean():.4g} ± {v.std(ddof=1) / math.sqrt(len(v)):.2g}"


def fmt_frac(hits: np.ndarray) -> str:
    k, n = int(hits.sum()), len(hits)
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}]"


# --------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace, work: Path) -> tuple[str, dict]:
    from phenolens.data.io import read_image
    from phenolens.data.normalize import Normalizer
    from phenolens.methods.phenldiff import PhenLDiff
    from phenolens.models.classifier import predict, predict_proba, train_classifier
    from phenolens.models.latent import build_tiny_base

    upstream = {k: getattr(args, k) for k in ("size", "per_condition", "held_out", "channels", "vae_steps",
                                              "vae_batch_size", "vae_lr", "vae_kl", "seed")}
    marker = work / "bench_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) != upstream:
        raise SystemExit(f"--work {work}: holds data or a VAE made with other settings "
                         f"({marker.read_text().strip()}); choose another --work")
    marker.write_text(json.dumps(upstream))
    timings = {}
    t0 = time.perf_counter()
    train, held = make_data(work, args)
    train_set, held_set = image_sets(train, held, args)
    timings["data"] = time.perf_counter() - t0

    base = work / "base"
    if not (base / "model_index.json").is_file():
        build_tiny_base(base, seed=args.seed)
    t0 = time.perf_counter()
    vae_summary = pretrain_vae(base, train_set, held_set, args)
    timings["vae"] = time.perf_counter() - t0
    print(f"VAE: {json.dumps(vae_summary)}", flush=True)

    # the judge: trained on the real, normalised training images; checked on the held-out ones
    t0 = time.perf_counter()
    xs_train = torch.stack(train_set.images)
    clf = train_classifier(xs_train, train_set.labels, 2, steps=args.classifier_steps, seed=args.seed, progress=False)
    xs_held = torch.stack(held_set.images)
    held_pred = predict(clf, xs_held)
    clf_acc = float((held_pred == held_set.labels.numpy()).mean())
    timings["classifier"] = time.perf_counter() - t0
    print(f"classifier held-out accuracy {clf_acc:.3f} ({len(held_pred)} images)", flush=True)

    results = {c: finetune_and_translate(work, base, train, held, c, args) for c in CONDITIONINGS}
    t_score = time.perf_counter()

    # the sources, raw and normalised, in the order of the first run's index
    normalizer = train_set.normalizer
    rows_by = {}
    for c in CONDITIONINGS:
        with (results[c]["run"] / "index.csv").open(newline="") as fh:
            rows_by[c] = sorted(csv.DictReader(fh), key=lambda r: r["source_path"])
    sources = [r["source_path"] for r in rows_by[CONDITIONINGS[0]] if r["kind"] == "translation"]
    for c in CONDITIONINGS:
        assert [r["source_path"] for r in rows_by[c] if r["kind"] == "translation"] == sources
        saved = Normalizer.from_dict(json.loads((results[c]["model"] / "phenolens.json").read_text())["normalization"])
        assert np.allclose(saved.low, normalizer.low) and np.allclose(saved.high, normalizer.high)
    src_raw = [read_image(p, channels=args.channel_list)[0] for p in sources]
    src_x = torch.from_numpy(np.stack([normalizer.to_model(r) for r in src_raw]))
    src_high = predict(clf, src_x) == 1

    # references through the VAE alone: real control (the sources) and real high, encoded and decoded
    ref_model = PhenLDiff.from_pretrained(results[CONDITIONINGS[0]]["model"], device="cpu")
    held_high_raw = [read_image(r.path, channels=args.channel_list)[0] for r in held_set.records
                     if r.condition == TARGET]
    with torch.no_grad():
        ae_src = ref_model.decode(ref_model.encode(src_x)).clamp(-1, 1)
        high_x = torch.from_numpy(np.stack([normalizer.to_model(r) for r in held_high_raw]))
        ae_high = ref_model.decode(ref_model.encode(high_x)).clamp(-1, 1)
    ae_src_high = predict(clf, ae_src) == 1
    ae_high_high = predict(clf, ae_high) == 1
    real_high_high = predict(clf, high_x) == 1

    train_ctrl_raw = [read_image(r.path, channels=args.channel_list)[0] for r in train_set.records if r.condition == SOURCE]
    train_high_raw = [read_image(r.path, channels=args.channel_list)[0] for r in train_set.records if r.condition == TARGET]
    area = dict(real_control=nucleus_areas(train_ctrl_raw), real_high=nucleus_areas(train_high_raw),
                sources=nucleus_areas(src_raw), heldout_high=nucleus_areas(held_high_raw),
                autoencoded_sources=nucleus_areas(list(normalizer.from_model(ae_src.numpy()))))

    per = {}
    for c in CONDITIONINGS:
        run_dir = results[c]["run"]
        rows = rows_by[c]
        trans = [r for r in rows if r["kind"] == "translation"]
        recon_paths = [run_dir / r["reconstruction_path"] for r in trans]
        out_paths = [run_dir / r["output_path"] for r in trans]
        tx = load_normalized(out_paths, normalizer)
        rx = load_normalized(recon_paths, normalizer)
        t_high = predict(clf, tx) == 1
        p_high = predict_proba(clf, tx)[:, 1]
        r_high = predict(clf, rx) == 1
        t_raw = [read_image(p)[0] for p in out_paths]
        r_raw = [read_image(p)[0] for p in recon_paths]
        f = lambda key: np.array([float(r[key]) for r in trans])  # noqa: E731
        per[c] = dict(
            train_seconds=results[c]["train_seconds"], translate_seconds=results[c]["translate_seconds"],
            final_loss=final_loss(results[c]["model"]), high=t_high, p_high=p_high, recon_high=r_high,
            latent_recon_mse=f("latent_recon_mse"), latent_change_mse=f("latent_change_mse"),
            recon_mse=f("recon_mse"), autoencoder_mse=f("autoencoder_mse"), change_mse=f("change_mse"),
            area_translations=nucleus_areas(t_raw), area_reconstructions=nucleus_areas(r_raw),
            **embedding_stats(results[c]["model"], results["prompt"]["model"]),
        )

    # paired comparison of the success (same sources): exact McNemar test on the discordant pairs
    from scipy.stats import binomtest, wilcoxon

    a, b = per["prompt"]["high"], per["learned"]["high"]
    only_learned, only_prompt = int((b & ~a).sum()), int((a & ~b).sum())
    mcnemar = binomtest(only_learned, only_learned + only_prompt).pvalue if only_learned + only_prompt else 1.0
    dp = per["learned"]["p_high"] - per["prompt"]["p_high"]
    wil_p = float(wilcoxon(dp).pvalue) if np.any(dp != 0) else 1.0
    da = per["learned"]["area_translations"] - per["prompt"]["area_translations"]
    da = da[np.isfinite(da)]

    timings["scoring"] = time.perf_counter() - t_score
    table = render(args, vae_summary, clf_acc, len(held_pred), src_high, ae_src_high, ae_high_high, real_high_high,
                   area, per, dict(only_learned=only_learned, only_prompt=only_prompt, mcnemar_p=mcnemar,
                                   p_high_diff=dp, p_high_wilcoxon_p=wil_p, area_diff=da), len(sources))
    return table, timings


def render(args, vae, clf_acc, n_held, src_high, ae_src_high, ae_high_high, real_high_high, area, per, paired,
           n_sources) -> str:
    cols = ["conditioning", "train s", "final loss", "translate s", f"translations -> {TARGET} (95% CI)",
            f"mean p({TARGET})", f"reconstructions -> {TARGET}", "latent_recon_mse", "latent_change_mse",
            "recon_mse", "autoencoder_mse", "change_mse", "nucleus area, translations (px²)",
            "nucleus area, reconstructions (px²)", "embedding gap", "embedding moved"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in CONDITIONINGS:
        p = per[c]
        cells = [c, f"{p['train_seconds']:.0f}", f"{p['final_loss']:.4f}", f"{p['translate_seconds']:.0f}",
                 fmt_frac(p["high"]), mean_se(p["p_high"]), fmt_frac(p["recon_high"]),
                 mean_se(p["latent_recon_mse"]), mean_se(p["latent_change_mse"]), mean_se(p["recon_mse"]),
                 mean_se(p["autoencoder_mse"]), mean_se(p["change_mse"]), mean_se(p["area_translations"]),
                 mean_se(p["area_reconstructions"]), f"{p['embedding_gap']:.3f}", f"{p['embedding_moved']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    refs = [
        f"- VAE stand-in ({vae['steps']} steps, {vae['seconds']:.0f} s): held-out reconstruction PSNR "
        f"{vae['heldout_psnr']:.1f} dB (MSE {vae['heldout_mse']:.2g}, {vae['heldout_images']} images); on stained "
        f"pixels only (x > -0.9, {100 * vae['foreground_fraction']:.0f} % of pixels) {vae['heldout_foreground_psnr']:.1f} dB; "
        f"latent std {vae['latent_std']:.3f} -> scaling factor {vae['scaling_factor']:.3f}",
        f"- classifier (real images, {args.classifier_steps} steps): held-out accuracy {clf_acc:.3f} ({n_held} images); "
        f"held-out real {TARGET} -> {TARGET} {fmt_frac(real_high_high)}",
        f"- sources (held-out real {SOURCE}) -> {TARGET}: {fmt_frac(src_high)}; the same through the VAE alone: "
        f"{fmt_frac(ae_src_high)}; held-out real {TARGET} through the VAE alone -> {TARGET}: {fmt_frac(ae_high_high)}",
        f"- mean nucleus area (px², mean per image ± s.e.): real {SOURCE} (train) {mean_se(area['real_control'])}, "
        f"real {TARGET} (train) {mean_se(area['real_high'])}, held-out {TARGET} {mean_se(area['heldout_high'])}, "
        f"sources {mean_se(area['sources'])}, sources through the VAE {mean_se(area['autoencoded_sources'])}",
        f"- paired, learned vs prompt on the same {n_sources} sources: -> {TARGET} only under learned "
        f"{paired['only_learned']}, only under prompt {paired['only_prompt']} (exact McNemar p = {paired['mcnemar_p']:.3g}); "
        f"p({TARGET}) difference {mean_se(paired['p_high_diff'])} (Wilcoxon p = {paired['p_high_wilcoxon_p']:.3g}); "
        f"nucleus-area difference {mean_se(paired['area_diff'])} px²",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(refs) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the table and settings here (markdown)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep data, base and models here; a rerun reuses what matches (default: a temporary folder)")
    ap.add_argument("--size", type=int, default=32,
                    help="image side, a multiple of 4; 32 is the tiny base's native size (default 32)")
    ap.add_argument("--per-condition", type=int, default=150, help="training images per condition (default 150)")
    ap.add_argument("--held-out", type=int, default=48,
                    help="held-out images per condition: the control ones are translated (default 48)")
    ap.add_argument("--channels", default="0,2,3", help="simulator channels for the VAE's RGB (default 0,2,3: "
                                                         "DNA, actin, Golgi)")
    ap.add_argument("--vae-steps", type=int, default=400, help="VAE pre-training steps (default 400)")
    ap.add_argument("--vae-batch-size", type=int, default=16, help="VAE pre-training batch (default 16)")
    ap.add_argument("--vae-lr", type=float, default=2e-3, help="VAE pre-training peak lr, one-cycle (default 2e-3)")
    ap.add_argument("--vae-kl", type=float, default=1e-3,
                    help="KL weight relative to the summed squared error (default 1e-3)")
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps of each model (default 1500)")
    ap.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch (default 16)")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    ap.add_argument("--warmup-steps", type=int, default=100, help="fine-tuning lr warm-up (default 100)")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of translate (default 50)")
    ap.add_argument("--classifier-steps", type=int, default=400, help="judge training steps (default 400)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, VAE, fine-tuning and judge (default 0)")
    args = ap.parse_args(argv)
    if args.size % 4:
        ap.error("--size must be a multiple of 4 (VAE factor 2 x UNet factor 2)")
    from phenolens.data.io import parse_channels

    args.channel_list = parse_channels(args.channels)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        table, timings = run(args, work)
    total = time.perf_counter() - t0
    head = ["# Phen-LDiff conditioning: prompt vs learned embeddings (bench/phenldiff_conditioning.py)", "",
            f"`{' '.join(['python', 'bench/phenldiff_conditioning.py'] + (argv if argv is not None else sys.argv[1:]))}`  ",
            f"python {sys.version.split()[0]}, torch {torch.__version__}, {platform.machine()}, "
            f"{torch.get_num_threads()} thread(s); total wall time {total:.0f} s", "",
            f"Settings: simulator {SOURCE} vs {TARGET}, {args.size} px, channels {args.channels}, "
            f"{args.per_condition} training + {args.held_out} held-out images per condition (seeds {args.seed}, "
            f"{args.seed + 1}); tiny SD-2-shaped base (random UNet and text encoder) with its VAE pre-trained here "
            f"({args.vae_steps} steps, batch {args.vae_batch_size}, lr {args.vae_lr:g}, KL weight {args.vae_kl:g}); "
            f"finetune --mode full, {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}, warm-up "
            f"{args.warmup_steps}, seed {args.seed}, EMA 0.999 (the defaults); translate {SOURCE} -> {TARGET}, "
            f"{args.sample_steps} steps, fixed-point inversion.", ""]
    head.append("Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
                + "; fine-tuning and translation per model in the table.")
    head.append("")
    text = "\n".join(head) + "\n" + table
    print(text)
    if args.out is not None:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
