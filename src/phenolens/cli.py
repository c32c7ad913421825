"""The `phenolens` command: simulate, crop, train, finetune, translate, measure, report, teach, memorization,
classifier, directions, explain, demo.

Every subcommand takes `--config FILE` (a JSON file of option values, as written by
`--save-config FILE`), so a run can be saved and replayed; options given on the command line win
over the file. User mistakes (`PhenolensError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

from phenolens import __version__
from phenolens.cli_config import csv_list, parse_command, save_config, subcommands
from phenolens.errors import PhenolensError
from phenolens.launch import is_main_process
from phenolens.diffusion.inversion import DEFAULT_ITERS, DEFAULT_SOLVER, DEFAULT_TOL
from phenolens.logs import setup_cli_logging
from phenolens.methods.prompts import CONDITIONINGS, PROMPT_TEMPLATE
from phenolens.train.recipe import (RECIPE_BATCH_SIZE, RECIPE_LR, RECIPE_LR_SCHEDULE, RECIPE_PREDICTION_TYPE,
                                    RECIPE_STEPS)

INVERSION_CHOICES = ("fixed-point", "ddim", "ef-ddpm")
FINETUNE_MODES = ("lora", "svdiff", "attention", "full")  # = phenolens.models.adapters.MODES (no torch import here)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="read option values from a JSON file (written by --save-config), checked like the command "
                        "line; options given on the command line win")
    p.add_argument("--save-config", type=Path, metavar="FILE",
                   help="write this command's options to a JSON file (a missing parent folder is created), to replay "
                        "it later with --config")


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="simulate fluorescence images of cells with planted phenotypes",
                       description="Write OUT/<condition>/*.tif (16-bit, 4 channels: DNA, tubulin, actin, Golgi), "
                                   "a manifest and the ground truth (planted parameters, label masks) under OUT/_groundtruth/. "
                                   "Condition i plants every phenotype at strength i/(n-1) (--mode separate: one phenotype per condition). "
                                   "With --layout screen: a simulated high-content screen of whole fields instead "
                                   "(OUT/images/<plate>_<well>_s<site>_w<n>.tif, one file per channel, a CellProfiler "
                                   "OUT/load_data.csv, per-field and per-cell truth and masks under OUT/_groundtruth/), "
                                   "for testing screen -> crop -> train -> translate -> measure against known truth.")
    p.add_argument("out", type=Path, help="output folder (a dataset that `phenolens train OUT` reads as it is; "
                                          "with --layout screen, a screen that `phenolens crop` reads through OUT/load_data.csv)")
    p.add_argument("--layout", choices=["images", "screen"], default="images",
                   help="images: one small 4-channel image per field in one folder per condition (a training "
                        "dataset); screen: whole fields of a multi-plate screen, one TIFF per channel, with a "
                        "LoadData CSV, a per-plate gain and a vignette (default images)")
    p.add_argument("--conditions", type=csv_list, default=None,
                   help="comma-separated condition names, weakest first; the first is the untreated control "
                        "(default: control,low,mid,high; with --layout screen control,mid,high; not with --mode "
                        "separate, which names its own)")
    p.add_argument("--per-condition", type=int, default=None,
                   help="images per condition (default 100; --layout images only)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default 64, at least 32; --layout images only, see --field-size)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)")
    p.add_argument("--puncta", action="store_true",
                   help="add a fifth channel, LC3, with a punctate phenotype: 1-2 px spots gathering in the cytoplasm "
                        "(3 per cell in the control, 16 at strength 1, holding 10 %% -> 50 %% of the cell's LC3); the "
                        "other four channels are the same files as without it (default: 4 channels; --layout images only)")
    p.add_argument("--phenotypes", type=csv_list, default=None, metavar="A,B",
                   help="plant only these phenotypes (the others keep the control's value in every condition): "
                        "golgi-fragmentation, nuclear-enlargement, cell-loss, actin-translocation, tubulin-shift, "
                        "lc3-puncta (with --puncta); e.g. leave out cell-loss to score identity alone (default: all)")
    p.add_argument("--mode", choices=["together", "separate"], default="together",
                   help="together: every condition plants all the phenotypes at its strength (a dose series); "
                        "separate: the conditions are 'control' and one per phenotype, named after it, each "
                        "planting that phenotype alone at strength 1 and leaving the cell count alone (cell-loss "
                        "only if named in --phenotypes); for disentanglement and identity tests (default together; "
                        "separate: --layout images only)")
    screen = p.add_argument_group("screen options (--layout screen only)")
    screen.add_argument("--plates", type=int, default=None,
                        help="number of plates, P1, P2, ...; every plate holds every condition, so a plate effect "
                             "never looks like a phenotype (default 2)")
    screen.add_argument("--wells-per-condition", type=int, default=None,
                        help="wells of each condition on every plate, spread over the plate's inner wells (B02, "
                             "B03, ...) (default 2)")
    screen.add_argument("--sites", type=int, default=None, help="fields of view (sites) per well (default 2)")
    screen.add_argument("--field-size", type=int, default=None,
                        help="side of a field in pixels, at least 64; a field holds about 4.5 * (size/64)^2 cells in "
                             "the control (default 256)")
    screen.add_argument("--vignette", type=float, default=None,
                        help="uneven illumination: the share of light lost in the corners of every field, from 0 "
                             "(flat) to 0.9, falling off smoothly from the centre (default 0.2)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove the files phenolens wrote into OUT in an earlier run (listed in "
                        "OUT/.phenolens.json); files phenolens did not write are never touched")
    _add_config_options(p)
    p.set_defaults(func=cmd_simulate)


def _add_crop(sub) -> None:
    p = sub.add_parser("crop", help="cut single-cell crops out of a screen's whole fields (a dataset for train)",
                       description="Read a screen (a CellProfiler LoadData CSV, a folder of per-channel files with "
                                   "--pattern, or OME-TIFF / OME-Zarr / ND2 / CZI / LIF files), find the nuclei on the "
                                   "DNA channel, and write a 16-bit (C, Y, X) crop around each into OUT/<condition>/, "
                                   "with OUT/manifest.csv (condition, every metadata column, source files, the crop's "
                                   "window in its field) and OUT/fields.csv (nuclei found and kept per field). "
                                   "Resumable: run it again to finish an interrupted run.")
    p.add_argument("screen", type=Path, help="LoadData .csv, folder of per-channel files (with --pattern), or a "
                                             "vendor file / folder of vendor files")
    p.add_argument("out", type=Path, help="output folder for the crops (a dataset `phenolens train OUT` reads)")
    g = p.add_argument_group("reading the screen")
    g.add_argument("--pattern", default=None,
                   help="file-name pattern of a folder of per-channel files: {name} fields, one of them {channel}, "
                        "e.g. \"{plate}_{well}_s{site}_w{channel}.tif\" ({name:REGEX} gives a field its own regular "
                        "expression); the fields become Metadata_<Name> columns")
    g.add_argument("--channel-names", default=None, metavar="TOKEN=NAME,...",
                   help="pick, order and name the channels: TOKEN is a LoadData channel (FileName_<TOKEN>), a pattern's "
                        "{channel} value or a vendor file's channel name, e.g. w1=DNA,w2=Actin or D=DNA,F=FITC "
                        "(default: every channel, named as found, LoadData's in column order, a pattern's in natural "
                        "order)")
    g.add_argument("--condition-from", default=None, metavar="COL[,COL]",
                   help="metadata columns (or pattern fields) whose values, joined by _, name the condition, e.g. "
                        "Metadata_Compound,Metadata_Concentration (default: a Metadata_Condition or condition column)")
    g.add_argument("--condition", default=None, metavar="NAME", help="one condition for every field of the screen")
    g.add_argument("--platemap", type=Path, default=None, metavar="FILE",
                   help="a plate map (CSV or tab-separated, e.g. the Cell Painting Gallery's platemap.txt): a well "
                        "column (Metadata_Well, well_position, Well or well), optionally a plate column, and what is "
                        "in each well; joined on the well, its columns become Metadata_<column> for --condition-from "
                        "and the manifest")
    g.add_argument("--nuclei-channel", default=None, metavar="NAME",
                   help="the channel with the nuclear stain (default: the first named like DNA, DAPI or Hoechst)")
    g.add_argument("--scene", default=None,
                   help="vendor files: the scene to read, by index or name, or 'all' for one field per scene "
                        "(default: the first)")
    g.add_argument("--timepoint", type=int, default=0, help="vendor files: the timepoint to read (default 0)")
    g.add_argument("--z", default="0", help="vendor files: the z plane to read, or 'max' for a maximum projection "
                                            "(default 0)")
    g = p.add_argument_group("cutting crops")
    g.add_argument("--size", type=int, default=128,
                   help="crop side in px after --scale (default 128, the papers' BBBC021 crops at full resolution)")
    g.add_argument("--scale", type=float, default=1.0,
                   help="resolution of the crops relative to the fields: 0.5 cuts a 2*size window and bins it 2x2 "
                        "(default 1)")
    g.add_argument("--nucleus-diameter", type=float, default=15.0,
                   help="typical nucleus diameter in field px: sets the segmentation's smallest nucleus and how "
                        "close two nuclei may be (default 15)")
    g.add_argument("--labels", type=Path, default=None,
                   help="folder of your own nucleus label images instead of phenolens's segmentation: "
                        "<field>_nuclei.tif or <file stem>_nuclei.tif per field")
    g.add_argument("--border", choices=("skip", "pad"), default="skip",
                   help="a crop whose window leaves the field: skip it, or pad it with the field's median "
                        "(nuclei that touch the field's edge are always skipped) (default skip)")
    g.add_argument("--max-overlap", type=float, default=0.25,
                   help="skip a nucleus when more than this share of its outline touches another nucleus (a clump "
                        "the segmentation had to split); 1 keeps all (default 0.25)")
    g.add_argument("--illumination", action="store_true",
                   help="correct each plate's uneven illumination first: divide by a smooth flat-field, a quadratic "
                        "surface fitted to the mean of the plate's fields (CellProfiler's CorrectIlluminationCalculate "
                        "with polynomial smoothing); saved in OUT/_plates/ (needs about 10 or more fields per plate)")
    g.add_argument("--normalize", choices=("none", "plate"), default="none",
                   help="plate: rescale each channel so that the plate's 0.1th and 99.9th percentiles map to 0 and "
                        "50000, removing brightness drifts between plates; none: keep the files' units (default none)")
    p.add_argument("--workers", type=int, default=1, help="processes cropping fields side by side (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove the files phenolens wrote into OUT in an earlier run (listed in "
                        "OUT/.phenolens.json); files phenolens did not write are never touched")
    _add_config_options(p)
    p.set_defaults(func=cmd_crop)


def _add_loop_options(p: argparse.ArgumentParser, *, steps: int, lr: float | str, batch_size: int = 16,
                      lr_schedule: str = "constant", why: str = "") -> None:
    """The optimiser-loop options `train` and `finetune` share (one trainer, one set of options; each
    command its own defaults, WHY says where they come from). LR given as text is a rule the command
    applies itself (the option then defaults to None)."""
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps}{why})")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per step over all processes (default {batch_size}{why})")
    p.add_argument("--lr", type=float, default=None if isinstance(lr, str) else lr,
                   help=f"AdamW learning rate after warm-up, above 0 (default {lr if isinstance(lr, str) else f'{lr:g}'}"
                        f"{why})")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up steps (default 100)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=lr_schedule,
                   help="learning rate after the warm-up: constant (a run can be extended with --resume and more "
                        f"--steps) or cosine decay to 0 at --steps (default {lr_schedule}{why})")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA decay of the saved weights, in [0, 1) (default 0.999)")
    p.add_argument("--no-ema", action="store_true", help="save the raw weights instead of their EMA")
    p.add_argument("--no-augment", action="store_true",
                   help="train on the crops as they are, without the random flips and 90° rotations that make 8 "
                        "views of each image: for memorisation experiments (`phenolens memorization`), where a small "
                        "dataset should be seen image by image, or images whose orientation means something "
                        "(default: augment)")
    p.add_argument("--cond-dropout", type=float, default=None,
                   help="probability of replacing the condition by the null one while training, so that "
                        "`translate --guidance-scale` can strengthen an edit (classifier-free guidance; PhenDiff's "
                        "0.1; README \"Edit strength\"); 0 = never, and guidance is then refused. A run started "
                        "before this default (0) resumes with --cond-dropout 0 (default 0.1, --method diffusion included: its "
                        "null code is all zeros; 0 with --method diffex, which has no unconditional mode)")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="auto = bf16 on a GPU that supports it, else no (default auto)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="save a resumable checkpoint every N steps (default 500)")
    p.add_argument("--sample-every", type=int, default=0,
                   help="every N steps write MODEL_DIR/samples/step-N.png (a row of samples per condition, same "
                        "noise) and add it to TensorBoard when installed; 0 = never (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in MODEL_DIR; refused, saying what differs, when the data or "
                        "the training settings are not the checkpoint's")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove the model, checkpoints and logs phenolens wrote into MODEL_DIR in an earlier "
                        "run (listed in MODEL_DIR/.phenolens.json); files phenolens did not write are never touched")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them in MODEL_DIR/skipped_files.csv")


def _float_list(text: str) -> list[float]:
    """W1,W2,... as numbers (argparse names the option in its error)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _train_config(args: argparse.Namespace, lr: float | None = None, default_dropout: float = 0.1):
    """TrainConfig from the shared loop options, after checking them (LR: the rate when --lr is not given,
    DEFAULT_DROPOUT the condition dropout when --cond-dropout is not)."""
    from phenolens.train.trainer import TrainConfig

    mixed = args.mixed_precision
    if mixed == "auto":
        import torch

        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    for name in ("steps", "batch_size", "checkpoint_every", "grad_accum"):
        if getattr(args, name) < 1:
            raise PhenolensError(f"--{name.replace('_', '-')} must be at least 1")
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr if args.lr is not None else lr,
        warmup_steps=args.warmup_steps,
        grad_accum=args.grad_accum, ema=not args.no_ema, ema_decay=args.ema_decay,
        cond_dropout=args.cond_dropout if args.cond_dropout is not None else default_dropout,
        checkpoint_every=args.checkpoint_every, mixed_precision=mixed, seed=args.seed,
        sample_every=max(args.sample_every, 0), augment=not args.no_augment, lr_schedule=args.lr_schedule,
    )


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a diffusion model (PhenDiff, DiffEx's semantic model or DIFFusion's "
                                     "embedded model) on your images",
                       description="Train one class-conditional UNet on all conditions of DATA (PhenDiff), or with "
                                   "--method diffex a UNet conditioned on each image's semantic code [encoder(x), "
                                   "classifier scores] (DiffEx), or with --method diffusion a UNet conditioned on an "
                                   "image embedding learnt with it (DIFFusion's embedded default). Runs on CPU, one "
                                   "GPU, or several under `accelerate launch -m phenolens train ...`.")
    p.add_argument("data", type=Path, help="dataset root with a folder per condition, or a manifest CSV (path,condition,...)")
    p.add_argument("model_dir", type=Path, help="where the model, its checkpoints and train_log.csv go")
    p.add_argument("--method", choices=("phendiff", "diffex", "diffusion"), default="phendiff",
                   help="phendiff: the condition is the class label; diffex: a semantic diffusion autoencoder aware of "
                        "--classifier, whose learned directions explain it; diffusion: a diffusion autoencoder whose "
                        "condition is the image's own embedding (its code, L2-normalised), which `translate` moves "
                        "towards another condition's mean (DIFFusion) (default phendiff)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="with --method diffex: the classifier to explain, a folder from `phenolens classifier train` or "
                        "`classifier import`; its classes must be DATA's conditions and its channels --channels. "
                        "With --method diffusion (optional): its scores join the embedding")
    p.add_argument("--code-dim", type=int, default=64,
                   help="with --method diffex or diffusion: length of the encoder's code (default 64)")
    p.add_argument("--classifier-views", choices=("whole", "per-stain"), default="whole",
                   help="with --method diffex: the classifier's scores in z_sem. whole: its probabilities for the "
                        "image (the paper's); per-stain: also its probabilities with each stain alone (the others "
                        "blanked), one classifier-aware axis per stain, so that directions can separate the cues of "
                        "different stains (for a classifier trained with --channel-dropout) (default whole)")
    p.add_argument("--lambda-cls", type=float, default=None,
                   help="with --method diffex: weight λ₁ of the KL term that keeps the classifier's scores of the "
                        "model's denoised estimate equal to the image's (DiffEx eq. 3; the paper gives no value; "
                        "0 = none) (default 0.1)")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="tiny",
                   help="network size: tiny (1M parameters, CPU), small (27M), paper (65M, PhenDiff's U-Net) (default tiny)")
    p.add_argument("--size", type=int, default=None,
                   help="training crop side in pixels; larger images are cropped, smaller ones resized up to it (the "
                        "model then learns cells at that scale, and translate resizes its inputs the same way) "
                        "(default: the data's own size, the smallest image's short side rounded down to a multiple "
                        "of the network's downsampling, so nothing is resized)")
    p.add_argument("--channels", default=None, help="file channels to use, in order, e.g. 0,2,1 (default: all)")
    p.add_argument("--conditions", type=csv_list, default=None,
                   help="every condition in the order to keep, e.g. a dose series DMSO,CHX_5uM,CHX_50uM (default: the order of a manifest.csv beside the condition folders, else a control-like name such as DMSO first and then natural order, doses compared as numbers; the order used is printed)")
    why = ', README "Training recipe"'
    _add_loop_options(p, steps=RECIPE_STEPS, batch_size=RECIPE_BATCH_SIZE, lr_schedule=RECIPE_LR_SCHEDULE, why=why,
                      lr="; ".join(f"{lr:g} with --preset {name}" for name, lr in RECIPE_LR.items()))
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the network predicts; ε and v invert equally exactly in bench/schedules.py and learned "
                        "the simulator's small spots about equally at 3000 steps; v was the PhenDiff code's choice, the "
                        f"recipe was measured with ε (default {RECIPE_PREDICTION_TYPE}; v_prediction with "
                        f"--zero-terminal-snr{why})")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale betas to zero terminal SNR (as the PhenDiff code; slightly less exact inversion in "
                        "bench/schedules.py); implies --timestep-spacing trailing")
    p.add_argument("--timestep-spacing", choices=("leading", "trailing"), default="leading",
                   help="how DDIM picks its timesteps; leading inverts 2-5 dB more exactly in bench/schedules.py (default leading)")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained latent diffusion model (Phen-LDiff, or DIFFusion's "
                                        "Kandinsky 2.2) on your images",
                       description="Fine-tune a Stable Diffusion 2 family pipeline (VAE, text-conditioned UNet, CLIP "
                                   "text encoder) on all conditions of DATA with LoRA, SVDiff, attention-only or full "
                                   "fine-tuning (Phen-LDiff, the default); or, with --method kandinsky, LoRA on the "
                                   "Kandinsky 2.2 decoder conditioned on each image's CLIP embedding (DIFFusion's "
                                   "domain tuning; --prior names the CLIP image encoder). MODEL_DIR holds only what "
                                   "was trained (adapter/, the condition embeddings) and a phenolens.json naming BASE; "
                                   "`phenolens translate`, `measure` and `report` use it like a PhenDiff model. Runs on "
                                   "CPU, one GPU or several under `accelerate launch -m phenolens finetune ...`.")
    p.add_argument("data", type=Path, help="dataset root with a folder per condition, or a manifest CSV (path,condition,...)")
    p.add_argument("model_dir", type=Path, help="where the fine-tuned model, its checkpoints and train_log.csv go")
    p.add_argument("--method", choices=("phenldiff", "kandinsky"), default="phenldiff",
                   help="phenldiff: a Stable Diffusion 2 pipeline conditioned on a prompt per condition (Phen-LDiff); "
                        "kandinsky: DIFFusion's domain tuning of the Kandinsky 2.2 decoder conditioned on each image's "
                        "CLIP embedding (LoRA on its attention and added key/value projections; needs --prior; "
                        "translate it with --omega / --edit to=B,omega=W) (default phenldiff)")
    p.add_argument("--base", required=True,
                   help="the pretrained pipeline: a local diffusers directory (vae/, unet/, text_encoder/, tokenizer/, "
                        "scheduler/) or a hub id such as stabilityai/stable-diffusion-2-1-base (needs the hub or "
                        "the local Hugging Face cache); with --method kandinsky the decoder (unet/, movq/, scheduler/, "
                        "e.g. kandinsky-community/kandinsky-2-2-decoder)")
    p.add_argument("--prior", default=None,
                   help="--method kandinsky: the prior whose CLIP image encoder makes the embeddings (image_encoder/, "
                        "image_processor/; a directory or a hub id such as kandinsky-community/kandinsky-2-2-prior)")
    p.add_argument("--mode", choices=FINETUNE_MODES, default="lora",
                   help="what trains: lora (low-rank adapters on the attention and projection layers, paper eq. 4), "
                        "svdiff (shifts of the singular values of every weight matrix), attention (the attention "
                        "layers), full (the whole UNet) (default lora)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA scaling alpha; the update is (alpha/rank)·BA^T (default: alpha = rank)")
    p.add_argument("--conditioning", choices=CONDITIONINGS, default="prompt",
                   help="prompt: each condition is the text encoder's embedding of its prompt, fixed; learned: that "
                        "embedding is the starting point of a trained embedding per condition (default prompt)")
    p.add_argument("--prompt-template", default=PROMPT_TEMPLATE,
                   help=f"prompt of each condition, {{condition}} replaced by its name (default: {PROMPT_TEMPLATE!r})")
    p.add_argument("--prompt", action="append", default=[], metavar="COND=TEXT",
                   help="the prompt of one condition, overriding the template; repeat for several")
    p.add_argument("--size", type=int, default=None,
                   help="training crop side in pixels; larger images are cropped, smaller resized (default: the "
                        "base's native size, 512 for Stable Diffusion 2 base)")
    p.add_argument("--channels", default=None,
                   help="file channels to use, in order, at most 3 (they become the VAE's R, G, B); 1 channel is "
                        "copied to R, G and B, 2 fill R and G (default: all)")
    p.add_argument("--conditions", type=csv_list, default=None,
                   help="every condition in the order to keep, e.g. a dose series DMSO,CHX_5uM,CHX_50uM (default: the order of a manifest.csv beside the condition folders, else a control-like name such as DMSO first and then natural order, doses compared as numbers; the order used is printed)")
    _add_loop_options(p, steps=1000, lr=1e-4)
    _add_config_options(p)
    p.set_defaults(func=cmd_finetune)


def _add_edit_strength_options(p: argparse.ArgumentParser) -> None:
    """How strong an edit is: the inversion, its restart point and guidance (`translate` and `validate`)."""
    _add_inversion_options(p)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance of the translations (needs a model trained with --cond-dropout); the "
                        "inversion and the reconstruction stay unguided and exact, except for DIFFusion models, which "
                        "guide inversion and generation alike (paper App. B.3; still exact with --inversion ef-ddpm); "
                        "1 = none (default: 2 for a PhenDiff "
                        "model trained with `train`'s default recipe and a fixed-point or ddim inversion, where it was "
                        "measured to help; else 1, e.g. with EF-DDPM; README \"Edit strength\")")


def _add_inversion_options(p: argparse.ArgumentParser) -> None:
    """How a real image is inverted, and from which step it is rendered again (`translate`, `validate`, `explain`)."""
    p.add_argument("--inversion", choices=INVERSION_CHOICES, default="fixed-point",
                   help="fixed-point: deterministic DDIM, each inversion step solved implicitly (exact); ddim: plain "
                        "DDIM inversion (one network call per step, inexact); ef-ddpm: edit-friendly DDPM inversion, "
                        "per-step noise maps drawn from --seed (exact by construction; see --skip) (default fixed-point)")
    p.add_argument("--skip", type=int, default=0, metavar="K",
                   help="T_skip: invert only to step K of --steps and render the last steps-K steps under the target; "
                        "larger K keeps more of the source image (weaker edits); 0 = the whole schedule (default 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of --inversion ef-ddpm's noise maps (each image's draw also depends on its pixels and "
                        "condition, so batching, resuming or moving the files do not change it); deterministic "
                        "inversions draw nothing (default 0)")


def _add_translate(sub) -> None:
    p = sub.add_parser("translate", help="invert real images and regenerate them under other conditions",
                       description="For every source image: invert it under its own condition, render it under each target, "
                                   "and write the reconstruction, the translations and OUT/index.csv "
                                   "(one row per source x target, with the manifest's columns).")
    p.add_argument("model_dir", type=Path, help="a model written by `phenolens train` or `phenolens finetune`")
    p.add_argument("input", type=Path,
                   help="a folder of one condition (its name is the source condition), a dataset root with a folder "
                        "per condition, or a manifest CSV")
    p.add_argument("out", type=Path, help="run folder for the outputs and index.csv")
    p.add_argument("--to", nargs="+", default=None, metavar="COND",
                   help="target condition(s) (default: every condition of the model); index.csv's edit column "
                        "writes each as to=COND")
    p.add_argument("--edit", action="append", default=None, metavar="EDIT",
                   help="an edit as index.csv's edit column writes it, e.g. to=high (repeat for several): the same "
                        "as --to; for a DIFFusion model also to=high,omega=2 (the same as --to high --omega 2; one "
                        "ω per run)")
    p.add_argument("--from", dest="source", default=None, metavar="COND",
                   help="source condition: names the condition of a single folder, or keeps only that condition of a dataset")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of inversion and rendering (default 50)")
    p.add_argument("--omega", type=float, default=None, metavar="W",
                   help="DIFFusion models (`train --method diffusion`, `finetune --method kandinsky`): the edit moves "
                        "each image's embedding by W "
                        "times the difference of the target's and the source's mean embeddings, ĉ = c + W·Δc "
                        "(eq. 6; index.csv's edit writes to=COND,omega=W) (default 2, the paper's)")
    p.add_argument("--mean-images", type=int, default=None, metavar="N",
                   help="DIFFusion models: images per condition whose mean embedding gives Δc (eq. 7), spread evenly "
                        "over each condition; stored in OUT/class_means.* (default 50: the paper's means stop "
                        "improving near 50)")
    p.add_argument("--mean-data", default=None, metavar="DATA",
                   help="DIFFusion models: the images the class means come from (default: the data the model was "
                        "trained on, as its phenolens.json records it, else INPUT)")
    p.add_argument("--minimal-edit", action="store_true",
                   help="keep, per image and target, the weakest edit that the judges (an oracle ensemble trained "
                        "on real images) assign to the target: the edit is rendered from --strengths T_skip values, "
                        "highest first, all from one inversion (DIFFusion §4.2); index.csv gets its t_skip, "
                        "flip_probability, flipped, ssim and oracle_feature_distance, OUT/sweep.csv every T_skip "
                        "tried. Any model and --inversion")
    p.add_argument("--strengths", type=int, default=10,
                   help="--minimal-edit: T_skip values tried, evenly from 90%% of --steps down to 0 (default 10, "
                        "the paper's)")
    p.add_argument("--judge-data", default=None, metavar="DATA",
                   help="--minimal-edit: real images of every condition to train the judges on (default: the "
                        "model's training data, as its phenolens.json records it, else INPUT)")
    p.add_argument("--judge-steps", type=int, default=300,
                   help="--minimal-edit: training steps of each judge (default 300)")
    p.add_argument("--max-reference", type=int, default=200,
                   help="--minimal-edit: at most this many real images per condition train the judges (default 200)")
    p.add_argument("--omega-sweep", type=_float_list, default=None, metavar="W1,W2,...",
                   help="--minimal-edit on a DIFFusion model: also try each ω, weakest first; per image the first "
                        "edit the judges flip, by ω and then by T_skip from the highest down, is kept (index.csv's "
                        "omega column; the edit column names the strongest ω; instead of --omega)")
    _add_edit_strength_options(p)
    p.add_argument("--inversion-iters", type=int, default=DEFAULT_ITERS,
                   help="fixed-point: at most this many network calls per step after the first guess, at least 1 "
                        f"(default {DEFAULT_ITERS})")
    p.add_argument("--inversion-tol", type=float, default=DEFAULT_TOL, metavar="TOL",
                   help="fixed-point: an image's iteration stops when its residual (root mean square, model units) "
                        f"falls below TOL; 0 = always --inversion-iters calls (default {DEFAULT_TOL:g}; chosen in "
                        "bench/inversion.py)")
    p.add_argument("--solver", choices=("anderson", "picard"), default=DEFAULT_SOLVER,
                   help=f"fixed-point: anderson (accelerated) or picard (plain iteration) (default {DEFAULT_SOLVER})")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="fixed-point: start each step from plain DDIM inversion (one more call per step) instead of "
                        "from the previous step's noise estimate")
    p.add_argument("--max-clipped", type=float, default=0.5, metavar="FRACTION",
                   help="refuse (or with --skip-bad skip) an image with more than this fraction of its pixel values "
                        "outside the model's training range, e.g. an 8-bit or 0-1 float image into a 16-bit model; "
                        "above 5%% a warning names the file; index.csv's clipped_fraction gives every image's "
                        "fraction, 0 to 1 (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N or mps; refused when this machine lacks it "
                        "(default: cuda if available)")
    p.add_argument("--workers", type=int, default=1,
                   help="on the CPU: processes translating batches side by side, sharing the torch threads "
                        "(each loads the model; worth it where torch's threads use the cores poorly, time it: "
                        "bench/translate.py --workers-only); the outputs are the same (default 1)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them in OUT/skipped.csv")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove the outputs phenolens wrote into OUT in an earlier run (listed in "
                        "OUT/.phenolens.json); files phenolens did not write are never touched")
    p.add_argument("--render-precision", choices=("fp32", "bf16"), default="fp32",
                   help="precision of the target renders: bf16 runs the network under bfloat16 autocast (faster on a "
                        "GPU); the inversion and the reconstruction stay fp32, so recon_mse still measures exactness "
                        "(bf16 moved translations by 0.002 mean, 57 dB PSNR, on the demo model: README "
                        "\"Many processes\") (default fp32)")
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing: print the number of images, UNet forwards and the estimated time on this "
                        "device (from a short timing of the model here; under `accelerate launch`, for that many "
                        "processes), then stop")
    _add_config_options(p)
    p.set_defaults(func=cmd_translate)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="simulate -> model -> translate -> measure -> report, in minutes on a CPU",
                       description="Simulate a dose series, load the demo model shipped with phenolens (or train one "
                                   "with --train), translate held-out control images to every condition, measure them "
                                   "(phenolens measure) and write PNG grids, report.html and summary.txt with the "
                                   "measured figures.")
    p.add_argument("out", type=Path, nargs="?", default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--train", action="store_true", help="train the model here instead of loading the shipped one")
    p.add_argument("--model", type=Path, default=None,
                   help="use this model (trained on `phenolens simulate --size 48` data) instead of the shipped one")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--n-images", type=int, default=24,
                   help="held-out control images to translate, at least 1 (default 24)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove the files phenolens wrote into OUT in an earlier demo (listed in "
                        "OUT/.phenolens.json); files phenolens did not write are never touched")
    _add_config_options(p)
    p.set_defaults(func=cmd_demo)


def _add_feature_options(p: argparse.ArgumentParser,
                         workers_help: str = "processes for measuring (default: CPU count, at most 8; 1 per process under "
                                              "`accelerate launch`)") -> None:
    """How images are segmented and measured: the options `measure` and `validate` share."""
    p.add_argument("--channel-names", type=csv_list, default=None,
                   help="comma-separated channel names for feature columns, e.g. DNA,tubulin,actin (default ch0,ch1,...)")
    p.add_argument("--nuclei-channel", type=int, default=0,
                   help="channel index with the nuclear stain, 0 to channels-1 (default 0)")
    p.add_argument("--cell-channel", type=int, default=1,
                   help="channel index used to find cell bodies around the nuclei (default 1)")
    p.add_argument("--nucleus-diameter", type=float, default=None,
                   help="typical nucleus diameter in px (default: estimated from the reference images)")
    p.add_argument("--masks", type=Path, default=None,
                   help="folder of your own label masks for the real images: <stem>_nuclei.tif and optionally "
                        "<stem>_cells.tif, flat or in a sub-folder per condition")
    p.add_argument("--profile", choices=("standard", "full"), default="standard",
                   help="feature set: standard (size/shape, intensity, granularity, radial distribution, "
                        "correlation) or full (adds texture, Zernike, Costes; ~10x slower)")
    p.add_argument("--no-judges", dest="judges", action="store_false",
                   help="skip the oracle classifiers (success ratio, classifier-feature FID/KID)")
    p.add_argument("--judge-steps", type=int, default=300,
                   help="training steps for each oracle classifier (default 300)")
    p.add_argument("--workers", type=int, default=None, help=workers_help)


def _add_measure(sub) -> None:
    p = sub.add_parser("measure", help="CellProfiler features, statistics and image metrics of a translate run",
                       description="Segment nuclei and cells in the sources, reconstructions, translations and real "
                                   "reference images of every condition, measure CellProfiler features (cp_measure), "
                                   "compare real and translated effects, and write RUN_DIR/measure/ (features.csv, "
                                   "stats.csv, ranked.csv, dose_correlation.csv, metrics.json).")
    p.add_argument("run_dir", type=Path, help="the OUT folder of `phenolens translate` (holds index.csv)")
    p.add_argument("--reference", type=Path, default=None,
                   help="real images of every condition (folder per condition or manifest CSV); default: the data "
                        "the model was trained on, as its phenolens.json records")
    _add_feature_options(p)
    p.add_argument("--max-reference", type=int, default=200,
                   help="real images per condition to measure, at least 1 (default 200)")
    p.add_argument("--overwrite", action="store_true",
                   help="measure again from scratch: remove what phenolens wrote into RUN_DIR/measure earlier (listed "
                        "in its .phenolens.json); files phenolens did not write are never touched (default: reuse "
                        "the features already measured with the same settings)")
    _add_config_options(p)
    p.set_defaults(func=cmd_measure)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of a translate run (and its measurements)",
                       description="Write one HTML file with every image embedded: the run's settings, galleries "
                                   "(source | reconstruction | translation | signed difference), flicker GIFs and a "
                                   "click-to-toggle view, a dose-series strip per image and, when `phenolens measure` "
                                   "has been run, feature box plots and the ranked-feature, dose-correlation and "
                                   "metric tables. Opens from disk in a browser; nothing is fetched from the network.")
    p.add_argument("run_dir", type=Path, help="the OUT folder of `phenolens translate` (holds index.csv)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="where to write the page (default RUN_DIR/report.html)")
    p.add_argument("--max-images", type=int, default=12, metavar="N",
                   help="source images shown in the galleries, flicker and dose views (default 12)")
    p.add_argument("--top-features", type=int, default=6, metavar="K",
                   help="features from measure/ranked.csv to box-plot for the strongest target (default 6)")
    p.add_argument("--order", type=csv_list, default=None, metavar="A,B,C",
                   help="condition order for the dose strip, weakest first, e.g. DMSO,low,high; the last is the "
                        "strongest target (default: the model's condition order)")
    _add_config_options(p)
    p.set_defaults(func=cmd_report)


def _add_teach(sub) -> None:
    p = sub.add_parser("teach", help="DIFFusion's teaching pages: study counterfactuals, then a quiz on real images",
                       description="Turn a `phenolens translate` run into two self-contained HTML pages (images "
                                   "embedded, nothing fetched from the network), as DIFFusion's user study taught "
                                   "(paper 004, section 4.3): OUT/study.html shows, per source -> target condition, each "
                                   "image and its counterfactual as a flicker pair, a transition animation (blend there "
                                   "and back; also saved in OUT/animations/ as GIF, and as MP4 when imageio_ffmpeg is "
                                   "installed) and the difference overlay (counterfactual minus original, red = more "
                                   "signal, blue = less, on the grey original; Fig. 4b). With --quiz-data, "
                                   "OUT/quiz.html is a self-test on held-out real images: pick a condition per image, "
                                   "Score shows k / n correct, and the answers download as CSV "
                                   "(item,image,answer,truth,correct); OUT/quiz_key.csv holds the truth.")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the OUT folder of `phenolens translate` (holds index.csv)")
    p.add_argument("out", type=Path, metavar="OUT",
                   help="a new or empty folder for the pages (may lie inside RUN, e.g. RUN/teach)")
    p.add_argument("--all", dest="keep_all", action="store_true",
                   help="a --minimal-edit run: show every edit, not only those the judges flipped to the target "
                        "(default: per source -> target, only the flipped ones when any flipped)")
    p.add_argument("--max-pairs", type=int, default=12, metavar="N",
                   help="at most N image pairs per source -> target condition on the study page, spread evenly "
                        "over the run (default 12)")
    p.add_argument("--frames", type=int, default=8, metavar="N",
                   help="blend steps from the original to the counterfactual in the transition animation, both "
                        "ends included; it plays there and back (default 8)")
    p.add_argument("--quiz-data", type=Path, default=None, metavar="DIR",
                   help="held-out real images for quiz.html, one sub-folder per condition (or a manifest CSV); "
                        "the conditions found are the answers offered, at least 2; the run's own source images "
                        "are left out (default: no quiz)")
    p.add_argument("--quiz-items", type=int, default=20, metavar="N",
                   help="images in the quiz, taken in turn from each condition of --quiz-data (default 20)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the quiz's choice and order of images: the same seed gives the same quiz "
                        "(default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the pages of an earlier `phenolens teach` in OUT: removes only the files phenolens "
                        "wrote there (listed in OUT/.phenolens.json); other files are never touched")
    _add_config_options(p)
    p.set_defaults(func=cmd_teach)


def _add_memorization(sub) -> None:
    p = sub.add_parser("memorization", help="does a model copy its training images? (Phen-LDiff Fig. 4)",
                       description="Split DATA into two disjoint halves (same size per condition), train one model "
                                   "per half with the same settings (or take --model-a/--model-b), generate from both "
                                   "with the same noises, and score generalisation (cosine between the two models' "
                                   "images) against memorisation (cosine to the nearest image of the model's own "
                                   "training half). Writes memorization.csv/.json, histograms.png and pairs.png. "
                                   "Rerunning with the same OUT reuses or resumes the models trained there.")
    p.add_argument("data", type=Path, help="dataset root with a folder per condition, or a manifest CSV (path,condition,...)")
    p.add_argument("out", type=Path, help="output folder: half_a.csv, half_b.csv, model_a/, model_b/ and the results")
    p.add_argument("--model-a", type=Path, default=None, metavar="DIR",
                   help="an already-trained model for half A (with --model-b); its training data as recorded in its "
                        "phenolens.json is the memorisation reference, else OUT/half_a.csv")
    p.add_argument("--model-b", type=Path, default=None, metavar="DIR",
                   help="an already-trained model for half B (with --model-a)")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="tiny",
                   help="network size of the models trained here (default tiny)")
    p.add_argument("--base", default=None,
                   help="fine-tune this pretrained latent pipeline per half (as `phenolens finetune --base`) instead "
                        "of training PhenDiff models from scratch, to compare --mode lora/svdiff/attention/full on "
                        "your data (Phen-LDiff Fig. 4)")
    p.add_argument("--mode", choices=FINETUNE_MODES, default="lora",
                   help="what fine-tuning trains, with --base (default lora)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank, with --base --mode lora (default 4)")
    p.add_argument("--channels", default=None,
                   help="file channels to use, in order, e.g. 0,2,3 (at most 3 with --base) (default: all)")
    p.add_argument("--size", type=int, default=32, help="training crop side in pixels of the models trained here (default 32)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps per model trained here (default 2000)")
    p.add_argument("--batch-size", type=int, default=16, help="training images per step (default 16)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up (default 2e-4)")
    p.add_argument("--n-per-condition", type=int, default=16,
                   help="generations per condition and per model, each pair from the same noise (default 16)")
    p.add_argument("--sample-steps", type=int, default=50, help="deterministic DDIM steps per generation (default 50)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="a generation whose nearest-training cosine exceeds this counts as memorised (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the training and the noises (default 0)")
    p.add_argument("--no-augment", action="store_true",
                   help="train the models here without random flips/90° rotations, so that a small half is learnt "
                        "image by image, not as 8 views of each (as `phenolens train --no-augment`); the nearest "
                        "training image is still searched over all 8 flips/rotations (default: augment)")
    p.add_argument("--device", default=None,
                   help="torch device for generation: cpu, cuda, cuda:N or mps; refused when this machine lacks it "
                        "(default: cuda if available)")
    _add_config_options(p)
    p.set_defaults(func=cmd_memorization)


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="does the model show the real phenotype on held-out cells?",
                       description="Translate the held-out cells of the control condition to every condition, measure "
                                   "them against all held-out real cells (PhenDiff's Fig. 4 protocol) and score: for "
                                   "the features the real treatment changes most, the direction, the effect ratio "
                                   "(translated / real mean difference) and the real-vs-translated dose response; the "
                                   "control -> control null; reconstruction PSNR; source nuclei found again. Writes "
                                   "OUT/validation.md, .json, .csv, the translate run OUT/run and its measure/.")
    p.add_argument("model_dir", type=Path, help="a model written by `phenolens train` or `phenolens finetune`")
    p.add_argument("heldout", type=Path,
                   help="real cells of every condition that training never saw (folder per condition or manifest CSV)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--source", default=None, metavar="COND",
                   help="the control condition, translated to every other (default: the model's first condition)")
    p.add_argument("--max-sources", type=int, default=None, metavar="N",
                   help="translate at most N control cells (default: all)")
    p.add_argument("--top", type=int, default=10, help="features scored: the largest significant real |d| (default 10)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of inversion and rendering (default 50)")
    _add_edit_strength_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    _add_feature_options(p, workers_help="processes for translating on the CPU (as translate --workers; default 1) "
                                         "and for measuring (default: CPU count, at most 8)")
    p.add_argument("--device", default=None, help="torch device for translation (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove what phenolens wrote into OUT earlier (listed in OUT/.phenolens.json); "
                        "files phenolens did not write are never touched (default: resume)")
    _add_config_options(p)
    p.set_defaults(func=cmd_validate)


def _add_classifier(sub) -> None:
    p = sub.add_parser("classifier", help="train, import or evaluate a classifier of the conditions (what DiffEx explains)",
                       description="Classifiers of the conditions: `train` one on your images, `import` your own, "
                                   "`evaluate` one on labelled images.")
    actions = p.add_subparsers(dest="subcommand", metavar="ACTION")
    actions.required = True
    t = actions.add_parser("train", help="train a small CNN on the images and their conditions, report its held-out "
                                         "accuracy",
                           description="Train a classifier of DATA's conditions (a small network of one of the oracle "
                                       "ensemble's shapes, from scratch) and score it on a held-out share of each "
                                       "condition. OUT gets config.json + model.safetensors (transformers; class "
                                       "names in id2label), phenolens_classifier.json (channels, normalisation, crop "
                                       "size, accuracy) and heldout.csv (one row per held-out image).")
    t.add_argument("data", type=Path, help="images: a folder with one sub-folder per condition, or a manifest CSV")
    t.add_argument("out", type=Path, help="output folder for the classifier (new, or one phenolens wrote)")
    t.add_argument("--conditions", type=csv_list, default=None,
                   help="every condition of DATA, in the order of the classifier's classes (default: DATA's order)")
    t.add_argument("--channels", default=None, help="file channels to use, in order, e.g. 0,2,1 (default: all)")
    t.add_argument("--shape", choices=["resnet18", "mobilenet_v2", "efficientnet_b0"], default="resnet18",
                   help="network shape, narrowed for small crops as in the oracle ensemble (default resnet18)")
    t.add_argument("--steps", type=int, default=600, help="optimiser steps (default 600)")
    t.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    t.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, one-cycle schedule (default 2e-3)")
    t.add_argument("--heldout", type=float, default=0.2,
                   help="share of each condition kept out of training and scored, 0 to below 1 (default 0.2)")
    t.add_argument("--seed", type=int, default=0, help="random seed: the held-out draw and the training (default 0)")
    t.add_argument("--channel-dropout", type=float, default=0.0,
                   help="chance of blanking each channel of a training image, one always kept (default 0): the "
                        "classifier then learns the cue of every stain, not only the easiest one, so that DiffEx has "
                        "more than one cue to explain")
    t.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    t.add_argument("--overwrite", action="store_true",
                   help="train again into an OUT that holds a classifier: remove what phenolens wrote there (listed "
                        "in OUT/.phenolens.json); files phenolens did not write are never touched")
    _add_config_options(t)
    t.set_defaults(func=cmd_classifier_train)

    i = actions.add_parser("import", help="declare your own classifier (a transformers folder or a TorchScript file)",
                           description="Copy a classifier you trained elsewhere into OUT with what phenolens needs to "
                                       "run it on raw files: class names, file channels, crop size and the input "
                                       "transform input = (raw - offset) / scale, per channel. The declaration is "
                                       "checked by running the network once.")
    i.add_argument("source", type=Path, help="a transformers image-classifier folder (config.json + model.safetensors) "
                                             "or a TorchScript file whose forward takes (B, C, H, W) and returns logits")
    i.add_argument("out", type=Path, help="output folder for the declared classifier")
    i.add_argument("--size", type=int, required=True, help="the crop side in pixels it reads (larger images are "
                                                           "centre-cropped, smaller ones refused)")
    i.add_argument("--classes", type=csv_list, default=None,
                   help="its class names in output order, e.g. DMSO,CHX (default: a transformers config's labels)")
    i.add_argument("--channels", default=None,
                   help="file channels it reads, in order, e.g. 0,2,1 (default: all; required for TorchScript, whose "
                        "channel count is not recorded)")
    i.add_argument("--offset", type=csv_list, default=["0"], metavar="V[,V...]",
                   help="input = (raw - offset) / scale: one value or one per channel (default 0)")
    i.add_argument("--scale", type=csv_list, default=["65535"], metavar="V[,V...]",
                   help="... one value or one per channel, above 0 (default 65535: 16-bit images to [0, 1])")
    i.add_argument("--overwrite", action="store_true",
                   help="replace a classifier in OUT: remove what phenolens wrote there (listed in "
                        "OUT/.phenolens.json); files phenolens did not write are never touched")
    _add_config_options(i)
    i.set_defaults(func=cmd_classifier_import)

    e = actions.add_parser("evaluate", help="a classifier's accuracy on labelled images",
                           description="Classify DATA's images and compare with their conditions (each must be one of "
                                       "the classifier's classes): accuracy overall and per class.")
    e.add_argument("classifier", type=Path, help="a classifier folder (`classifier train` or `classifier import`)")
    e.add_argument("data", type=Path, help="images: a folder with one sub-folder per condition, or a manifest CSV")
    e.add_argument("--out", type=Path, default=None,
                   help="also write one row per image (condition, predicted, probability of each class) to this CSV; "
                        "an existing file is not replaced")
    e.add_argument("--per-stain", action="store_true",
                   help="also score it with each stain alone (the other channels set to 0) and without each stain: "
                        "which stains the classifier uses, so which cues DiffEx can find in it")
    _add_config_options(e)
    e.set_defaults(func=cmd_classifier_evaluate)


def _add_directions(sub) -> None:
    p = sub.add_parser("directions", help="learn DiffEx's directions in a DiffEx model's semantic space",
                       description="Encode DATA's images into the semantic codes z_sem of MODEL (a DiffEx model) and "
                                   "learn K directions in that space by contrastive learning (DiffEx eqs. 4-10; "
                                   "codes only, no UNet: minutes on a CPU). OUT gets directions.safetensors and "
                                   "directions.json; re-running resumes, or extends with more --steps.")
    p.add_argument("model_dir", type=Path, help="a DiffEx model folder (`phenolens train --method diffex`)")
    p.add_argument("data", type=Path, help="images: a folder with one sub-folder per condition, or a manifest CSV")
    p.add_argument("out", type=Path, help="output folder for the directions")
    p.add_argument("-k", "--n-directions", dest="k", type=int, default=10,
                   help="number of directions K, at least 2 (default 10, as in the paper's examples)")
    p.add_argument("--alpha", type=float, default=None,
                   help="shift α used in training, in units of the codes' spread per number (in z_sem units with "
                        "--no-standardize) (default: the codes' spread, the RMS distance of a code from their mean)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="learn the directions in z_sem as it is, instead of with each number scaled by its spread "
                        "over DATA's codes (default: scaled, so that a direction is not drawn to the classifier's "
                        "probabilities, whose scale is ten times the encoder's)")
    p.add_argument("--whiten", action="store_true",
                   help="learn the directions in the codes' principal components, each scaled to unit spread (PCA "
                        "whitening of the standardised codes): a unit step is one spread of the codes along any "
                        "direction, and steps stay within the codes' span (default: per-number scaling only)")
    p.add_argument("--tau", type=float, default=0.5, help="temperature τ of the contrastive loss, eq. 8 (default 0.5, "
                                                          "LatentCLR's; the paper gives none)")
    p.add_argument("--lambda-reg", type=float, default=1.0,
                   help="weight λ₂ of the covariance penalty, eq. 10 (default 1, VICReg's; the paper gives none)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="codes per step, at least 2 (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed: initial weights and batches (default 0)")
    p.add_argument("--device", default=None, help="torch device for encoding (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: remove what phenolens wrote into OUT (listed in OUT/.phenolens.json); files "
                        "phenolens did not write are never touched (default: resume)")
    _add_config_options(p)
    p.set_defaults(func=cmd_directions)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="rank DiffEx's directions by how much they move the classifier, show them on cells",
                       description="For a target class, invert a sample of DATA's other images once (given their "
                                   "semantic codes), render them along every direction of DIRECTIONS at ±alpha, keep the "
                                   "directions that raise the classifier's probability of the target (DiffEx "
                                   "Algorithm 1), and draw for each a strip of the same cells from -alpha to +alpha. "
                                   "OUT gets ranking.csv, changes.csv, strips/*.png and explain.json.")
    p.add_argument("model_dir", type=Path, help="a DiffEx model folder (`phenolens train --method diffex`)")
    p.add_argument("directions", type=Path, help="its directions (`phenolens directions MODEL DATA OUT`)")
    p.add_argument("data", type=Path, help="images: a folder with one sub-folder per condition, or a manifest CSV")
    p.add_argument("out", type=Path, help="output folder for the explanation")
    p.add_argument("--target", default=None, help="the class to move images towards (default: the classifier's last)")
    p.add_argument("--alpha", type=float, default=None,
                   help="shift along a direction, above 0 (default: the α the directions were learnt with)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="mean rise of p(target) a direction must exceed to be kept, and an image's own rise to count "
                        "as explained by it (default 0.1; the paper gives none)")
    p.add_argument("--n-samples", type=int, default=32, help="images moved along each direction (default 32)")
    p.add_argument("--max-directions", type=int, default=None, help="keep at most this many (default: all that pass)")
    p.add_argument("--keep-explained", action="store_true",
                   help="score every direction on the whole sample instead of removing the images a kept direction "
                        "explained (Algorithm 1 removes them; when one direction explains most images the others "
                        "are then judged on the few left)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of inversion and rendering (default 50)")
    _add_inversion_options(p)  # DiffEx's own stochastic encoding is --inversion fixed-point --skip 0
    p.add_argument("--batch-size", type=int, default=8, help="images inverted together (default 8)")
    p.add_argument("--strip-images", type=int, default=4, help="cells in each strip (default 4)")
    p.add_argument("--strip-points", type=int, default=5, help="alpha values in a strip, -alpha to +alpha (default 5)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo an explanation in OUT: remove what phenolens wrote there (listed in OUT/.phenolens.json); "
                        "files phenolens did not write are never touched")
    _add_config_options(p)
    p.set_defaults(func=cmd_explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phenolens",
        description="Reveal subtle phenotypes in microscopy images: see the same cells under another condition.",
    )
    parser.add_argument("--version", action="version", version=f"phenolens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_simulate, _add_crop, _add_train, _add_finetune, _add_translate, _add_measure, _add_validate, _add_report, _add_teach, _add_memorization,
                _add_classifier, _add_directions, _add_explain, _add_demo):
        add(sub)
    return parser


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a device torch does not know, or one this machine does not have, before any work."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise PhenolensError(f"{option} {device}: not a torch device; use e.g. cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PhenolensError(f"{option} {device}: CUDA is not available here (no GPU, or a torch built "
                                 "without CUDA); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PhenolensError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise PhenolensError(f"{option} {device}: Apple MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise PhenolensError(f"{option} {device}: phenolens runs on cpu, cuda or mps, not {dev.type}")


# ------------------------------------------------------------------------------- commands
def cmd_simulate(args: argparse.Namespace) -> None:
    screen_only = {"--plates": args.plates, "--wells-per-condition": args.wells_per_condition,
                   "--sites": args.sites, "--field-size": args.field_size, "--vignette": args.vignette}
    if args.layout == "screen":
        sized = "a screen is sized by --plates, --wells-per-condition, --sites and --field-size"
        images_only = [("--per-condition", args.per_condition is not None, sized),
                       ("--size", args.size is not None, sized),
                       ("--puncta", args.puncta, "a screen has the four channels DNA, tubulin, actin, Golgi"),
                       ("--mode separate", args.mode == "separate",
                        "a screen plants every chosen phenotype in every condition, at the condition's strength")]
        given = [(k, why) for k, on, why in images_only if on]
        if given:
            raise PhenolensError(f"{given[0][0]} applies only to --layout images ({given[0][1]})")
        from phenolens.data.simulate_screen import simulate_screen

        chosen = {k: v for k, v in (("plates", args.plates), ("wells_per_condition", args.wells_per_condition),
                                    ("sites", args.sites), ("field_size", args.field_size),
                                    ("vignette", args.vignette)) if v is not None}
        out = simulate_screen(args.out, conditions=args.conditions, seed=args.seed, overwrite=args.overwrite,
                              phenotypes=args.phenotypes, **chosen)
        print(f"simulated screen in {out} (image table: {out / 'load_data.csv'})")
        return
    given = [k for k, v in screen_only.items() if v is not None]
    if given:
        raise PhenolensError(f"{given[0]} applies only to --layout screen (see --size and --per-condition for "
                             "--layout images)")
    from phenolens.data.simulate import simulate

    out = simulate(args.out, conditions=args.conditions,
                   per_condition=100 if args.per_condition is None else args.per_condition,
                   size=64 if args.size is None else args.size, seed=args.seed, overwrite=args.overwrite,
                   puncta=args.puncta, phenotypes=args.phenotypes, mode=args.mode)
    print(f"simulated dataset in {out}")


def cmd_crop(args: argparse.Namespace) -> None:
    from phenolens.run.crop import CropRun, crop_screen
    from phenolens.screen.cells import CropSettings
    from phenolens.screen.conditions import parse_condition_rule
    from phenolens.screen.fields import VendorSelection, parse_channel_map
    from phenolens.screen.sources import ScreenSpec, open_screen

    z = args.z if str(args.z).lower() == "max" else _int_option("--z", args.z)
    scene = args.scene
    if scene is not None and scene != "all" and scene.lstrip("-").isdigit():
        scene = int(scene)
    spec = ScreenSpec(args.screen, parse_condition_rule(args.condition, args.condition_from), args.pattern,
                      parse_channel_map(args.channel_names), VendorSelection(scene, args.timepoint, z), args.platemap)
    screen = open_screen(spec)
    print(f"screen: {screen.source}; {len(screen.fields)} field(s), channels {', '.join(screen.channels)}, "
          f"conditions {', '.join(dict.fromkeys(f.condition for f in screen.fields))}")
    run = CropRun(CropSettings(size=args.size, scale=args.scale, nucleus_diameter=args.nucleus_diameter,
                               border=args.border, max_overlap=args.max_overlap),
                  illumination=args.illumination, normalize=args.normalize,
                  labels=str(args.labels) if args.labels else None, workers=args.workers)
    s = crop_screen(screen, args.out, run, nuclei_channel=args.nuclei_channel, overwrite=args.overwrite)
    print(f"{s['crops']} crops of {s['nuclei']} nuclei from {s['fields']} field(s) "
          f"({s['skipped_border']} at the border, {s['skipped_overlap']} pressed against a neighbour, "
          f"{s['empty_fields']} field(s) without nuclei) in {args.out}; manifest: {args.out / 'manifest.csv'}")


def _int_option(option: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise PhenolensError(f"{option} {value!r}: expected a whole number") from None


def cmd_train(args: argparse.Namespace) -> None:
    from phenolens.data.io import parse_channels
    from phenolens.methods.phendiff import PhenDiffTrainSettings, train_phendiff

    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        raise PhenolensError("--zero-terminal-snr needs --prediction-type v_prediction (an ε-model cannot predict "
                             "the image from pure noise)")
    prediction_type = args.prediction_type or ("v_prediction" if args.zero_terminal_snr else RECIPE_PREDICTION_TYPE)
    command = "phenolens " + " ".join(shlex.quote(a) for a in args.invocation)
    if args.method in ("diffex", "diffusion"):
        _train_semantic(args, prediction_type, command)
        return
    for option in ("classifier",):
        if getattr(args, option) is not None:
            raise PhenolensError(f"--{option} is for --method diffex or diffusion")
    settings = PhenDiffTrainSettings(
        preset=args.preset, size=args.size, channels=parse_channels(args.channels), conditions=args.conditions,
        prediction_type=prediction_type, zero_terminal_snr=args.zero_terminal_snr,
        timestep_spacing="trailing" if args.zero_terminal_snr else args.timestep_spacing, skip_bad=args.skip_bad,
    )
    config = _train_config(args, lr=RECIPE_LR[args.preset])  # --preset's choices are RECIPE_LR's
    train_phendiff(args.data, args.model_dir, settings, config, resume=args.resume, overwrite=args.overwrite,
                   command=command)
    if is_main_process():
        print(f"model saved in {args.model_dir}")


def _train_semantic(args: argparse.Namespace, prediction_type: str, command: str) -> None:
    """--method diffex (DiffEx's semantic model) or diffusion (DIFFusion's embedded model): one trainer."""
    from phenolens.data.io import parse_channels
    from phenolens.methods.diffex import DEFAULT_LAMBDA_CLS, DiffExTrainSettings, train_diffex

    if args.method == "diffusion" and args.lambda_cls is not None and args.lambda_cls != 0:
        raise PhenolensError("--lambda-cls is DiffEx's KL term; DIFFusion's model has none (--method diffusion)")
    if args.zero_terminal_snr or args.timestep_spacing != "leading":
        raise PhenolensError("--zero-terminal-snr and --timestep-spacing are for --method phendiff")
    settings = DiffExTrainSettings(classifier=str(args.classifier or ""), preset=args.preset, size=args.size,
                                   conditions=args.conditions, code_dim=args.code_dim,
                                   lambda_cls=DEFAULT_LAMBDA_CLS if args.lambda_cls is None else args.lambda_cls,
                                   classifier_views=args.classifier_views,
                                   prediction_type=prediction_type, skip_bad=args.skip_bad)
    # DIFFusion's embedded model learns a null code for classifier-free guidance; DiffEx has none
    config = _train_config(args, lr=RECIPE_LR[args.preset], default_dropout=0.1 if args.method == "diffusion" else 0.0)
    train_diffex(args.data, args.model_dir, settings, config, channels=parse_channels(args.channels),
                 resume=args.resume, overwrite=args.overwrite, command=command, method=args.method)
    if is_main_process():
        print(f"model saved in {args.model_dir}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from phenolens.data.io import parse_channels
    from phenolens.methods.phenldiff import FinetuneSettings, finetune

    if args.method == "kandinsky":
        _finetune_kandinsky(args)
        return
    if args.prior is not None:
        raise PhenolensError("--prior is for --method kandinsky")
    prompts = {}
    for item in args.prompt:
        cond, sep, text = item.partition("=")
        if not sep or not cond.strip() or not text.strip():
            raise PhenolensError(f"--prompt {item!r}: expected COND=TEXT, e.g. --prompt 'DMSO=untreated MCF-7 cells'")
        prompts[cond.strip()] = text.strip()
    if args.rank < 1:
        raise PhenolensError("--rank must be at least 1")
    settings = FinetuneSettings(base=args.base, mode=args.mode, rank=args.rank, lora_alpha=args.lora_alpha,
                                size=args.size,
                                channels=parse_channels(args.channels), conditions=args.conditions,
                                conditioning=args.conditioning, prompt_template=args.prompt_template,
                                prompts=prompts, skip_bad=args.skip_bad)
    config = _train_config(args)
    command = "phenolens " + " ".join(shlex.quote(a) for a in args.invocation)
    finetune(args.data, args.model_dir, settings, config, resume=args.resume, overwrite=args.overwrite,
             command=command)
    if is_main_process():
        print(f"model saved in {args.model_dir}")


def _finetune_kandinsky(args: argparse.Namespace) -> None:
    """--method kandinsky: DIFFusion's domain tuning of the Kandinsky 2.2 decoder (`methods.kandinsky`)."""
    from phenolens.data.io import parse_channels
    from phenolens.methods.kandinsky import KandinskyFinetuneSettings, finetune_kandinsky

    if not args.prior:
        raise PhenolensError("--method kandinsky needs --prior (e.g. kandinsky-community/kandinsky-2-2-prior or a "
                             "directory with image_encoder/ and image_processor/)")
    if args.prompt or args.prompt_template != PROMPT_TEMPLATE or args.conditioning != "prompt":
        raise PhenolensError("--prompt, --prompt-template and --conditioning are for --method phenldiff; a Kandinsky "
                             "model is conditioned on each image's own embedding")
    if args.rank < 1:
        raise PhenolensError("--rank must be at least 1")
    settings = KandinskyFinetuneSettings(base=args.base, prior=args.prior, mode=args.mode, rank=args.rank,
                                         lora_alpha=args.lora_alpha, size=args.size,
                                         channels=parse_channels(args.channels), conditions=args.conditions,
                                         skip_bad=args.skip_bad)
    command = "phenolens " + " ".join(shlex.quote(a) for a in args.invocation)
    finetune_kandinsky(args.data, args.model_dir, settings, _train_config(args), resume=args.resume,
                       overwrite=args.overwrite, command=command)
    if is_main_process():
        print(f"model saved in {args.model_dir}")


def _targets_with_edits(targets: list[str] | None, edits: list[str] | None,
                        omega: float | None = None) -> tuple[list[str] | None, float | None]:
    """--to and --edit together: edits by condition (to=COND), and DIFFusion's to=COND,omega=W (one ω
    per run, the same as --omega W)."""
    from phenolens.methods.edits import parse_fields, target_of

    out = list(targets or [])
    for text in edits or []:
        try:
            fields = parse_fields(text)
            if "omega" in fields and set(fields) == {"to", "omega"}:
                w = float(fields["omega"])
                if omega is not None and w != omega:
                    raise ValueError(f"edit {text!r}: one ω per run (--omega {omega:g} or another edit's); run "
                                     "once per ω")
                omega = w
                text = f"to={fields['to']}"
            out.append(target_of(text))
        except ValueError as err:
            raise PhenolensError(f"--edit: {err}") from None
    return out or None, omega


def cmd_translate(args: argparse.Namespace) -> None:
    from phenolens.run.translate import TranslateSettings, run_translate

    if args.inversion == "fixed-point" and args.inversion_iters < 1:
        raise PhenolensError(f"--inversion-iters {args.inversion_iters}: fixed-point inversion needs at least 1 "
                             "iteration (0 would be plain DDIM inversion: use --inversion ddim)")
    if args.inversion_iters < 0:
        raise PhenolensError(f"--inversion-iters {args.inversion_iters}: must be 0 or more")
    if args.batch_size < 1:
        raise PhenolensError("--batch-size must be at least 1")
    targets, omega = _targets_with_edits(args.to, args.edit, args.omega)
    settings = TranslateSettings(
        model_dir=str(args.model_dir.resolve()), input=str(args.input.resolve()),
        targets=targets,
        source=args.source, steps=args.steps, seed=args.seed, inversion=args.inversion,
        inversion_iters=args.inversion_iters, batch_size=args.batch_size, guidance_scale=args.guidance_scale,
        max_clipped=args.max_clipped, skip=args.skip, inversion_tol=args.inversion_tol, solver=args.solver,
        warm_start=args.warm_start, omega=omega, mean_images=args.mean_images,
        mean_data=str(Path(args.mean_data).resolve()) if args.mean_data else None,
        minimal_edit=args.minimal_edit, strengths=args.strengths,
        judge_data=str(Path(args.judge_data).resolve()) if args.judge_data else None, judge_steps=args.judge_steps,
        max_reference=args.max_reference, omega_sweep=args.omega_sweep, render_precision=args.render_precision,
    )
    if args.dry_run:
        from phenolens.run.plan import format_plan, plan_translate
        from phenolens.launch import launched_world

        if is_main_process():  # a launch's other processes have nothing to add
            print(format_plan(plan_translate(settings, device=args.device, world_size=launched_world(),
                                             skip_bad=args.skip_bad)))
        return
    index = run_translate(settings, args.out, overwrite=args.overwrite, skip_bad=args.skip_bad, device=args.device,
                          workers=args.workers)
    if is_main_process():
        print(f"wrote {index}")


def cmd_measure(args: argparse.Namespace) -> None:
    from phenolens.run.measure import run_measure

    out = run_measure(args.run_dir, _measure_settings(args, args.reference, args.max_reference),
                      overwrite=args.overwrite)
    if is_main_process():  # under `accelerate launch` the first process wrote the results
        print(f"wrote {out}")


def _measure_settings(args: argparse.Namespace, reference=None, max_reference: int = 200):
    from phenolens.run.measure import MeasureSettings

    return MeasureSettings(reference=str(reference) if reference else None,
                           channel_names=args.channel_names, nuclei_channel=args.nuclei_channel,
                           cell_channel=args.cell_channel, nucleus_diameter=args.nucleus_diameter,
                           masks=str(args.masks) if args.masks else None, profile=args.profile,
                           max_reference=max_reference, judges=args.judges, judge_steps=args.judge_steps,
                           workers=args.workers)


def cmd_validate(args: argparse.Namespace) -> None:
    from phenolens.measure.validation import Criteria, format_validation
    from phenolens.run.validate import ValidateSettings, run_validate

    for name in ("steps", "batch_size", "top"):
        if getattr(args, name) < 1:
            raise PhenolensError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_sources is not None and args.max_sources < 3:
        raise PhenolensError("--max-sources must be at least 3")
    settings = ValidateSettings(source=args.source, steps=args.steps, batch_size=args.batch_size,
                                guidance_scale=args.guidance_scale, inversion=args.inversion, skip=args.skip,
                                seed=args.seed, max_sources=args.max_sources, workers=args.workers or 1,
                                measure=_measure_settings(args), criteria=Criteria(top=args.top))
    summary = run_validate(args.model_dir, args.heldout, args.out, settings, overwrite=args.overwrite,
                           device=args.device)
    from phenolens.report.validation import write_validation_figures

    for path in write_validation_figures(args.out, summary, args.channel_names):
        print(f"wrote {path}")
    print(format_validation(summary))
    print(f"wrote {Path(args.out) / 'validation.md'}")


def cmd_classifier_train(args: argparse.Namespace) -> None:
    from phenolens.data.io import parse_channels
    from phenolens.run.classifier import ClassifierSettings, format_evaluation, train_condition_classifier

    settings = ClassifierSettings(shape=args.shape, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  heldout=args.heldout, seed=args.seed, channel_dropout=args.channel_dropout)
    ev = train_condition_classifier(args.data, args.out, settings, conditions=args.conditions,
                                    channels=parse_channels(args.channels), overwrite=args.overwrite,
                                    device=args.device, invocation=["phenolens", *args.invocation])
    print(format_evaluation(ev))
    print(f"wrote the classifier to {args.out}")


def _numbers(values: list[str], option: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise PhenolensError(f"{option} {','.join(values)}: expected numbers, e.g. 0 or 100,120,90") from None


def cmd_classifier_import(args: argparse.Namespace) -> None:
    from phenolens.data.io import parse_channels
    from phenolens.run.classifier import import_classifier

    clf = import_classifier(args.source, args.out, size=args.size, classes=args.classes,
                            channels=parse_channels(args.channels), offset=_numbers(args.offset, "--offset"),
                            scale=_numbers(args.scale, "--scale"), overwrite=args.overwrite)
    print(f"wrote the classifier to {args.out}: {clf.info.format}, classes {', '.join(clf.classes)}, "
          f"{clf.info.n_channels} channel(s), {clf.info.image_size} px")


def cmd_classifier_evaluate(args: argparse.Namespace) -> None:
    from phenolens.atomic import write_csv_atomic
    from phenolens.run.classifier import evaluate_classifier, format_evaluation

    if args.out is not None and args.out.exists():
        raise PhenolensError(f"--out {args.out}: exists; phenolens does not replace it: choose a new file name")
    ev, rows = evaluate_classifier(args.classifier, args.data, per_stain=args.per_stain)
    print(format_evaluation(ev).replace("held-out accuracy", "accuracy"))
    if args.out is not None:
        write_csv_atomic(args.out, rows, list(rows[0]))
        print(f"wrote {args.out}")


def cmd_directions(args: argparse.Namespace) -> None:
    from phenolens.methods.diffex_directions import DirectionSettings
    from phenolens.run.directions import directions_summary, learn_directions

    settings = DirectionSettings(k=args.k, alpha=args.alpha, tau=args.tau, lambda_reg=args.lambda_reg,
                                 steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                 standardize=args.standardize, whiten=args.whiten)
    info = learn_directions(args.model_dir, args.data, args.out, settings, overwrite=args.overwrite,
                            device=args.device)
    print(directions_summary(info))
    print(f"wrote {Path(args.out) / 'directions.json'}")


def cmd_explain(args: argparse.Namespace) -> None:
    from phenolens.run.explain import ExplainSettings, run_explain

    settings = ExplainSettings(target=args.target, alpha=args.alpha, threshold=args.threshold,
                               n_samples=args.n_samples, max_directions=args.max_directions, steps=args.steps,
                               skip=args.skip, inversion=args.inversion, seed=args.seed,
                               batch_size=args.batch_size, strip_images=args.strip_images,
                               strip_points=args.strip_points, remove_explained=not args.keep_explained)
    from phenolens.report.grids import translation_grid

    rows = run_explain(args.model_dir, args.directions, args.data, args.out, settings, draw=translation_grid,
                       overwrite=args.overwrite, device=args.device)
    if not rows:
        print(f"no direction raised the probability of the target by more than --threshold {args.threshold}")
    for r in rows:
        print(f"{r['rank']}. {r['edit']}: p({r['target']}) +{float(r['mean_change']):.3f} on average, "
              f"explains {r['explained']} image(s)")
    print(f"wrote {Path(args.out) / 'ranking.csv'}")


def cmd_report(args: argparse.Namespace) -> None:
    from phenolens.report.html import write_report

    path = write_report(args.run_dir, args.out, max_images=args.max_images, top_features=args.top_features,
                        order=args.order)
    print(f"wrote {path}")


def cmd_teach(args: argparse.Namespace) -> None:
    from phenolens.teach import TeachSettings, write_teaching

    settings = TeachSettings(keep_all=args.keep_all, max_pairs=args.max_pairs, frames=args.frames,
                             quiz_data=args.quiz_data, quiz_items=args.quiz_items, seed=args.seed)
    result = write_teaching(args.run_dir, args.out, settings, overwrite=args.overwrite)
    for note in result.notes:
        print(note)
    print(f"wrote {result.study} ({result.pairs} pair(s)) and {len(result.animations)} animation(s) in "
          f"{Path(args.out) / 'animations'}")
    if result.quiz is not None:
        print(f"wrote {result.quiz} ({result.quiz_items} item(s)) and {result.key}")


def cmd_memorization(args: argparse.Namespace) -> None:
    from phenolens.data.io import parse_channels
    from phenolens.run.memorization import memorization_check

    summary = memorization_check(args.data, args.out, preset=args.preset, size=args.size, steps=args.steps,
                                 batch_size=args.batch_size, lr=args.lr, n_per_condition=args.n_per_condition,
                                 sample_steps=args.sample_steps, seed=args.seed, threshold=args.threshold,
                                 augment=not args.no_augment, base=args.base, mode=args.mode, rank=args.rank,
                                 channels=parse_channels(args.channels),
                                 model_a=args.model_a, model_b=args.model_b, device=args.device)
    g, m = summary["generalization"], summary["memorization"]
    print(f"generalisation cosine: mean {g['mean']:.3f}, median {g['median']:.3f} ({summary['n_pairs']} pairs)")
    print(f"memorisation cosine:   mean {m['mean']:.3f}, median {m['median']:.3f}; "
          f"{100 * m['fraction_memorized']:.0f}% of {summary['n_generations']} generations > {m['threshold']:g}")
    print(f"wrote {Path(args.out) / 'memorization.json'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from phenolens.demo import run_demo

    summary = run_demo(args.out, train=args.train, steps=args.steps, n_images=args.n_images, overwrite=args.overwrite,
                       model=args.model)
    print(summary)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError that escaped a command: which file, and what the system said.

    Why here: a full disk, a read-only mount or a permission problem can strike any write, deep in
    any library; the user needs the file and the reason, not a traceback.
    """
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space or choose another output folder)"
    verb = ("write" if err.errno in _WRITE_ERRNOS else "read" if err.errno in (errno.ENOENT, errno.EIO)
            else "access")
    names = [str(f) for f in (err.filename, getattr(err, "filename2", None)) if f is not None]
    where = f" {' -> '.join(names)}" if names else (" a file" if verb != "access" else "")
    return f"cannot {verb}{where}: {reason}"


def _is_out_of_memory(err: BaseException) -> bool:
    """MemoryError, torch's (CUDA) OutOfMemoryError, or torch's CPU allocator failing (a RuntimeError)."""
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)))


def describe_memory_error(err: BaseException, args: argparse.Namespace | None) -> str:
    """One line for running out of memory: which memory, and the options that use less."""
    detail = str(err).splitlines()[0] if str(err) else ""
    gpu = type(err).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError / torch.OutOfMemoryError
    what = "out of GPU memory" if gpu else "out of memory (RAM)"
    hints = []
    if getattr(args, "batch_size", None) is not None:
        hints.append("a smaller --batch-size")
    if gpu and getattr(args, "device", "") != "cpu" and hasattr(args, "device"):
        hints.append("--device cpu")
    hint = f"; try {' or '.join(hints)}" if hints else "; images this large may need a machine with more memory"
    return f"{what}{' (' + detail + ')' if detail else ''}{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_cli_logging()
    parser = build_parser()
    # the command's name before parsing, for messages about --config itself
    command = next((a for a in argv if a in subcommands(parser)), "?")
    args: argparse.Namespace | None = None
    try:
        args = parse_command(argv, parser)
        command = args.command
        check_device(getattr(args, "device", None))
        save_config(args)
        func: Callable[[argparse.Namespace], None] = args.func
        func(args)
    except PhenolensError as err:
        print(f"phenolens {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phenolens {command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, read-only, permission denied ... anywhere in a command
        if os.environ.get("PHENOLENS_DEBUG"):
            raise
        print(f"phenolens {command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if os.environ.get("PHENOLENS_DEBUG") or not _is_out_of_memory(err):
            raise  # any other RuntimeError is a bug: keep its traceback
        print(f"phenolens {command}: error: {describe_memory_error(err, args)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
