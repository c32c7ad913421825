"""One Accelerate training loop shared by every method (EMA, checkpoints, exact resume).

Why it looks the way it does:
- **Exact resume.** There is no DataLoader (its sampler and worker RNG are hidden state). At global
  optimiser step k every random draw — batch indices, augmentation, condition dropout, timesteps,
  noise — comes from a CPU `torch.Generator` seeded by a hash of (seed, k, process, micro-step), so a
  run killed at any point and resumed from its last checkpoint replays the identical sequence. On a
  GPU the timesteps and noise are drawn there, from a GPU generator seeded by one draw of the CPU one
  (`device_generator`): still a function of (seed, k, process, micro-step), and no noise crosses the bus.
- **No host sync per step.** The loss stays on the device; it is read back (one transfer for all the
  steps since the last read) only where it is logged, sampled or checkpointed, or at least every
  `log_every` steps (`SYNC_EVERY` when logging is off). The non-finite check still names the first
  bad step, and nothing is logged, sampled or saved after it. Batches travel pinned and non-blocking.
- **Data parallel.** Under `accelerate launch --num_processes N` the global batch of `batch_size`
  indices is drawn once per micro-step (same on every process) and each process takes its own slice of
  `batch_size // N`; augmentation and noise use a per-process generator.
- **Atomic checkpoints.** `accelerator.save_state` writes into `checkpoints/.tmp-step-XXXXXXX/`, then
  `state.json` (written last) marks it complete and `os.replace` gives it its final name, so a kill
  mid-save never leaves a folder that looks complete.
- **No unpickling of the EMA.** The EMA shadow weights are saved as `ema.safetensors` (+ scalars in
  `state.json`) instead of accelerate's pickled custom-object file, which it loads with
  `weights_only=False` (DESIGN.md: loading never unpickles).
- **Pluggable loss.** `loss_fn(unet, noise_scheduler, x0, labels, generator)`; the default is the
  DDPM loss of PhenDiff eq. 4. A latent method passes its own (e.g. encode with a VAE first).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from phenolens.atomic import write_csv_atomic
from phenolens.diffusion.conditions import network_fn
from phenolens.errors import PhenolensError
from phenolens.folders import OutputFolder, check_apart
from phenolens.launch import accelerate_on_cpu, is_main_process, launched_world
from phenolens.models.store import INFO_FILE, apply_umask

CHECKPOINTS = "checkpoints"
LOG_NAME = "train_log.csv"
LOG_FIELDS = ["step", "loss", "lr", "seconds"]
SYNC_EVERY = 10  # with logging off, the loss is still read back (and checked) this often
STATE_NAME = "state.json"
EMA_NAME = "ema.safetensors"
TENSORBOARD = "tensorboard"
_CKPT_RE = re.compile(r"^step-(\d{7,})$")
MODEL_KIND = "model"  # the OutputFolder kind of a model folder (train and finetune)
# Everything a phenolens before output-folder markers wrote into a model folder. When such a folder
# is adopted, these (and only these) are recorded, so that --overwrite can replace them.
LEGACY_OUTPUTS = (CHECKPOINTS, LOG_NAME, TENSORBOARD, "samples", "unet", "scheduler", "phenolens.json", "adapter",
                  "condition_embeddings.safetensors", "skipped_files.csv")


@dataclass
class TrainConfig:
    """Optimiser-loop settings shared by every method (method-specific ones live with the method)."""

    steps: int = 2000
    batch_size: int = 16  # global batch per micro-step, split over processes
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    grad_accum: int = 1
    ema: bool = True
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # probability a label is replaced by the null label (classifier-free; PhenDiff's 0.1)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"; the caller picks "bf16" when a GPU is present
    seed: int = 0
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"  # "constant" | "cosine", both after a linear warm-up
    # random flips / 90° rotations of the training crops (8 views per image). Off for tiny datasets or
    # memorisation experiments, where the model should see exactly its training images. Configs saved
    # before this field existed trained with augmentation: a missing value means True.
    augment: bool = True


class TrainDataset(Protocol):
    """What `train` needs from a dataset (see `phenolens.data.dataset.ImageSet`)."""

    n_channels: int

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


LossFn = Callable[[Any, Any, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
ModelHook = Callable[[Any, int], None]


# ------------------------------------------------------------------------------------------ loss
def diffusion_loss(unet, noise_scheduler, x0: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator,
                   condition: Callable[[Any, torch.Tensor], dict] | None = None) -> torch.Tensor:
    """DDPM training loss, PhenDiff eq. 4: E_{x0,t,eps} ||eps - eps_theta(x_t, t, y)||^2.

    The network is called with the condition as keyword tensors: `condition(unet, labels)` builds them
    (default `{"class_labels": labels}`, a class-conditional UNet's own argument).

    t ~ U{0..T-1} and eps ~ N(0, I) come from `generator` (CPU) so the draw is replayable; when x0
    lives elsewhere (a GPU) they are drawn there, from `device_generator(generator, x0.device)`. The
    target follows `noise_scheduler.config.prediction_type`: eps (eq. 4), v = sqrt(abar) eps -
    sqrt(1-abar) x0 (`get_velocity`), or x0 ("sample").
    """
    b = x0.shape[0]
    num_t = int(noise_scheduler.config.num_train_timesteps)
    gen = device_generator(generator, x0.device)
    t = torch.randint(0, num_t, (b,), generator=gen, device=gen.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device, dtype=torch.float32).to(x0.device, x0.dtype)
    # forward process q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    x_t = noise_scheduler.add_noise(x0, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise PhenolensError(f"prediction_type {kind!r} is not supported; use epsilon, v_prediction or sample")
    kwargs = condition(unet, labels) if condition is not None else {"class_labels": labels}
    pred = network_fn(unet)(x_t, t, kwargs)
    return F.mse_loss(pred.float(), target.float())


# ------------------------------------------------------------------------------------- seeding
def step_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple, stable across processes, machines and Python runs (no `hash()`)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(step_seed(*parts))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def device_generator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator that draws on DEVICE and replays with GENERATOR.

    GENERATOR itself when it already lives there (on CPU: the very draws of earlier versions, bit for
    bit). Otherwise a new generator on DEVICE seeded by one 63-bit draw from GENERATOR, so its stream
    is a function of GENERATOR's state (exact resume holds) and each call gets a fresh seed. Where
    DEVICE cannot hold a generator, GENERATOR is returned and the caller draws on the CPU and copies.
    """
    device = torch.device(device)
    if _same_device(generator.device, device):
        return generator
    try:
        on_device = torch.Generator(device=device)
    except RuntimeError:  # a device without its own generator: GENERATOR untouched, as before
        return generator
    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    return on_device.manual_seed(int(seed[0]))


# --------------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (final name and a `state.json`), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so tuples/lists and FrozenDicts compare equal to what was saved."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _public(cfg: Any) -> Any:
    """A config without its private keys, at every depth: diffusers' `_use_default_values` is a list
    built from a set, in an order that changes with the process's hash seed, so it must not decide
    whether a checkpoint matches (a DiffEx model nests two diffusers configs)."""
    if isinstance(cfg, Mapping):
        return {k: _public(v) for k, v in cfg.items() if not str(k).startswith("_")}
    return cfg


def _model_config(model) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {"parameters": sum(p.numel() for p in model.parameters())}
    return _jsonable(_public(dict(cfg)))


def fingerprint(unet, noise_scheduler, dataset, config: TrainConfig, null_label: int,
                num_processes: int) -> dict[str, Any]:
    """What must not change between a checkpoint and its resumption for the replay to be exact.

    Besides the network and the loop, that is the data (which files, what they hold), how they
    are normalised and cropped, the learning-rate schedule and the condition dropout: a resume
    that changed any of them would continue another run than the one checkpointed (issue 9, item 8).
    `steps` counts only where it shapes the schedule (cosine); a constant schedule may be extended.
    """
    sched_cfg = getattr(noise_scheduler, "config", {})
    normalizer = getattr(dataset, "normalizer", None)
    return _jsonable(dict(
        model=_model_config(unet),
        n_channels=getattr(dataset, "n_channels", None),
        num_conditions=null_label,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        num_processes=num_processes,
        seed=config.seed,
        ema=config.ema,
        augment=config.augment,
        prediction_type=sched_cfg.get("prediction_type") if hasattr(sched_cfg, "get") else None,
        num_train_timesteps=sched_cfg.get("num_train_timesteps") if hasattr(sched_cfg, "get") else None,
        data=getattr(dataset, "data_fingerprint", None),
        normalization=normalizer.to_dict() if hasattr(normalizer, "to_dict") else None,
        crop_size=getattr(dataset, "size", None),
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        lr_schedule=config.lr_schedule,
        schedule_steps=None if config.lr_schedule == "constant" else config.steps,
        weight_decay=config.weight_decay,
        cond_dropout=config.cond_dropout,
        ema_decay=config.ema_decay if config.ema else None,
    ))


# fingerprint keys added after checkpoints were first written, with the value those older runs used;
# other keys a checkpoint lacks were not recorded then and are not compared
FINGERPRINT_DEFAULTS: dict[str, Any] = {"augment": True}

# how a difference is said, for the keys whose name alone would not tell a user what to do
_LABELS = {"crop_size": "--size (the training crop)", "schedule_steps": "--steps (the length of the cosine schedule)",
           "lr": "--lr", "warmup_steps": "--warmup-steps", "lr_schedule": "--lr-schedule",
           "cond_dropout": "--cond-dropout", "ema_decay": "--ema-decay", "weight_decay": "weight_decay"}


def _data_difference(a: Any, b: Any) -> str:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return f"the training images differ ({a!r} -> {b!r})"
    if a.get("n_images") != b.get("n_images"):
        return f"the training images differ ({a.get('n_images')} at the checkpoint, {b.get('n_images')} now)"
    if a.get("files") != b.get("files"):
        return "the training images differ (other files, or files in another order or condition)"
    return "the training images differ (same files, changed content)"


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    saved = {**FINGERPRINT_DEFAULTS, **saved}
    out = []
    for key in sorted(set(saved) | set(now)):
        if key not in saved:
            continue  # written by a phenolens that did not record it: unknown, not different
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "data":
            out.append(_data_difference(a, b))
        elif isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(", ".join(f"{key}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sub[:4]))
        else:
            out.append(f"{_LABELS.get(key, key)} {a!r} -> {b!r}")
    return out


def _save_ema(ema, folder: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({f"shadow.{i}": p.detach().to("cpu").contiguous() for i, p in enumerate(shadow)},
              str(folder / EMA_NAME))
    return {k: v for k, v in state.items() if isinstance(v, (int, float, bool)) or v is None}


def _load_ema(ema, folder: Path, scalars: dict[str, Any], device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / EMA_NAME))
    shadow = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
    if len(shadow) != len(ema.shadow_params):
        raise PhenolensError(f"{folder}: {EMA_NAME} holds {len(shadow)} tensors, the model has "
                             f"{len(ema.shadow_params)}")
    ema.load_state_dict({**scalars, "shadow_params": shadow})
    ema.to(device=device)


# -------------------------------------------------------------------------------- model folder
_SAMPLE_RE = re.compile(r"^step-\d{7,}\.png$")


class _Unwritten(OutputFolder):
    """The model folder as a process other than the main one sees it: it never writes the marker."""

    def _save(self) -> None:
        pass

    def clear(self) -> None:
        self.files = []


def holds_model(model_dir: Path) -> bool:
    """Whether MODEL_DIR holds a phenolens model or training checkpoints (of any phenolens version)."""
    model_dir = Path(model_dir)
    return (model_dir / INFO_FILE).is_file() or (model_dir / CHECKPOINTS).is_dir()


def _legacy_outputs(model_dir: Path) -> list[str] | None:
    """The files an older phenolens wrote into MODEL_DIR (see LEGACY_OUTPUTS; samples/ and
    tensorboard/ only when they hold nothing but what phenolens puts there), or None when MODEL_DIR
    holds no model of an older phenolens."""
    if not holds_model(model_dir):
        return None
    found = []
    for name in LEGACY_OUTPUTS:
        p = model_dir / name
        if not (p.exists() or p.is_symlink()):
            continue
        if name == "samples" and not (p.is_dir() and all(_SAMPLE_RE.match(c.name) for c in p.iterdir())):
            continue
        if name == TENSORBOARD and not (p.is_dir() and all(c.name.startswith("events.out.tfevents")
                                                            for c in p.iterdir())):
            continue
        found.append(name)
    return found


def open_model_folder(model_dir: str | Path, *, inputs: Sequence[str | Path] = (), resume: bool = False,
                      overwrite: bool = False, main: bool | None = None, option: str = "MODEL_DIR") -> OutputFolder:
    """MODEL_DIR as the output folder of `train` / `finetune`, checked before anything is written.

    - refused if it is, contains or lies inside an input (the data root or manifest, the training
      files): training into the data would delete or pollute it (issue 9, items 1 and 3);
    - refused if it holds checkpoints or a model and neither `resume` nor `overwrite` says what to
      do with them;
    - a folder that holds a model written before output-folder markers existed is adopted, its
      phenolens files recorded; any other non-empty folder is refused (it is the user's).

    Nothing is cleared here: the caller clears (`folder.clear()`) for `overwrite` once the data
    have been read and checked, so a failed start never costs the old model.
    """
    model_dir = Path(model_dir)
    main = is_main_process() if main is None else main
    if resume and overwrite:
        raise PhenolensError("pass either --resume or --overwrite, not both")
    check_apart(model_dir, inputs=inputs, option=option)
    if model_dir.exists() and not model_dir.is_dir():
        raise PhenolensError(f"{option} {model_dir}: exists and is not a folder")
    if not resume and not overwrite:
        existing = list_checkpoints(model_dir)
        if existing:
            raise PhenolensError(f"{model_dir / CHECKPOINTS} already holds checkpoints ({existing[-1][1].name}); pass "
                                 "--resume to continue them or --overwrite to start again")
        if (model_dir / INFO_FILE).is_file():
            raise PhenolensError(f"{option} {model_dir}: already holds a trained model ({INFO_FILE}); pass --overwrite "
                                 "to replace it, or choose another folder")
    if not main:
        return _Unwritten(model_dir, MODEL_KIND)
    return OutputFolder.open(model_dir, MODEL_KIND, older=_legacy_outputs, option=option)


# ----------------------------------------------------------------------------------------- log
class _Log:
    """`train_log.csv` on the main process: appended and flushed each row, truncated on resume."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        write_csv_atomic(path, rows, LOG_FIELDS)
        self.file = path.open("a", newline="")
        self.writer = csv.writer(self.file)

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{seconds:.2f}"])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _tensorboard(out_dir: Path):
    """A SummaryWriter when `tensorboard` is installed; None otherwise (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or tensorboard present but broken
        return None
    return SummaryWriter(log_dir=str(out_dir / TENSORBOARD))


# ---------------------------------------------------------------------------------------- train
@contextlib.contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """Put the global random states (Python, NumPy, torch, CUDA) back as they were: accelerate's
    load_state restores those it saved with a checkpoint, but the trainer draws nothing from them
    (every draw has its own generator, see `_generator`), so a resume must not change the caller's."""
    import random

    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _fresh_copy(model):
    """An unwrapped copy of `model` (for EMA weights) that does not share the training parameters."""
    if hasattr(model, "from_config") and hasattr(model, "config"):
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten at once: the caller's RNG is untouched
            copy = type(model).from_config(model.config)
        copy.load_state_dict(model.state_dict())
        return copy.to(next(model.parameters()).device)
    import copy as _copy

    return _copy.deepcopy(model)


def train(unet, noise_scheduler, dataset: TrainDataset, out_dir: Path, config: TrainConfig, *,
          null_label: int, resume: bool = False, overwrite: bool = False, loss_fn: LossFn = diffusion_loss,
          on_save: ModelHook | None = None, sample_fn: ModelHook | None = None, progress: bool = True,
          out_folder: OutputFolder | None = None):
    """Train `unet` on `dataset` into `out_dir` (checkpoints, train_log.csv); returns the trained model.

    `out_folder` is `out_dir` opened by `open_model_folder` (the caller's, when it writes there too);
    without it the folder is opened here. Everything written is recorded in it, and `overwrite`
    removes only what it recorded. `null_label` is the label that condition dropout substitutes. `on_save(model, step)` is called once
    at the end, on the main process, with an unwrapped copy holding the EMA weights (raw weights when
    `config.ema` is off); `sample_fn(model, step)` likewise every `config.sample_every` steps. The
    returned model (every process) is the unwrapped model with its raw, non-EMA final weights.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    check_config(config)
    if resume and overwrite:
        raise PhenolensError("pass either --resume or --overwrite, not both")
    if len(dataset) == 0:
        raise PhenolensError("the training set is empty: no images to train on")
    if getattr(dataset, "augment", config.augment) != config.augment:
        raise PhenolensError(f"the dataset was built with augment={dataset.augment}, the config says "
                             f"augment={config.augment}; build it with the config's value")

    accelerator = _new_accelerator(config)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % n_proc:
        raise PhenolensError(f"--batch-size {config.batch_size} must be divisible by the number of processes "
                             f"({n_proc})")
    per_proc = config.batch_size // n_proc
    main = accelerator.is_main_process
    ckpt_root = out_dir / CHECKPOINTS
    opened_here = out_folder is None
    if opened_here:
        records = getattr(dataset, "records", None) or []
        out_folder = open_model_folder(out_dir, inputs=[r.path for r in records], resume=resume, overwrite=overwrite,
                                   main=main)

    # ---- what to start from (every process reads the same files, so all raise alike)
    existing = list_checkpoints(out_dir)
    fp = fingerprint(unet, noise_scheduler, dataset, config, null_label, n_proc)
    resume_from: tuple[int, Path, dict[str, Any]] | None = None
    if resume:
        if not existing:
            raise PhenolensError(f"nothing to resume in {out_dir}: no complete checkpoint under {ckpt_root}")
        step0, folder = existing[-1]
        state = json.loads((folder / STATE_NAME).read_text())
        diffs = _differences(_public(state.get("fingerprint", {})), fp)  # older checkpoints kept private keys
        if diffs:
            raise PhenolensError(f"checkpoint {folder} does not match this run ({'; '.join(diffs)}); "
                                 "resume with the same settings or pass --overwrite")
        resume_from = (step0, folder, state)
    elif existing and not overwrite:
        raise PhenolensError(f"{ckpt_root} already holds checkpoints ({existing[-1][1].name}); pass --resume to "
                             "continue them or --overwrite to start again")
    accelerator.wait_for_everyone()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and opened_here:  # a caller that opened the folder has cleared it already
            out_folder.clear()  # only what phenolens recorded here; a user's own files stay
        out_folder.record(CHECKPOINTS, LOG_NAME, TENSORBOARD)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for p in ckpt_root.glob(".tmp-*"):  # left by a kill mid-save or mid-prune: never complete
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()

    # ---- optimiser, schedule, EMA
    # only what trains: a fine-tuned model (adapters, spectral shifts) keeps its frozen base out of
    # the optimiser state and the EMA
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=config.lr, weight_decay=config.weight_decay)
    # the prepared scheduler steps once per process per optimiser step (accelerate convention)
    lr_scheduler = get_scheduler("constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule,
                                 optimizer=optimizer, num_warmup_steps=config.warmup_steps * n_proc,
                                 num_training_steps=config.steps * n_proc)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    base = accelerator.unwrap_model(unet)
    ema = None
    if config.ema:
        # foreach: a few fused kernels per step instead of three per tensor; on CPU the per-tensor
        # update of earlier versions (its rounding differs from the fused one) keeps CPU runs bit-identical
        ema = EMAModel(trainable_parameters(base), decay=config.ema_decay,
                       foreach=accelerator.device.type == "cuda")
        ema.to(device=accelerator.device)

    start, seconds0 = 0, 0.0
    if resume_from is not None:
        start, folder, state = resume_from
        with _caller_rng_kept():
            accelerator.load_state(str(folder))
        if ema is not None:
            _load_ema(ema, folder, state.get("ema", {}), accelerator.device)
        seconds0 = float(state.get("seconds", 0.0))
        if start != int(state["step"]):
            raise PhenolensError(f"{folder}: {STATE_NAME} says step {state['step']}, the folder name {start}")

    log = _Log(out_dir / LOG_NAME, start if resume_from else None) if main else None
    tb = _tensorboard(out_dir) if main else None
    bar = tqdm(total=config.steps, initial=start, disable=None if (progress and main) else True, desc="train",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    last_saved = start if resume_from else -1

    def save(step: int) -> None:
        _save_checkpoint(accelerator, ema, ckpt_root, step, fp, config,
                         seconds0 + time.perf_counter() - t0)

    # losses of the steps since the loss was last read back: read (one host sync) only where it is used
    pending: list[tuple[int, torch.Tensor]] = []
    sync_every = config.log_every if config.log_every > 0 else SYNC_EVERY

    def check_losses() -> None:
        """Raise at the first non-finite loss of the pending steps; show the last one in the bar."""
        if not pending:
            return
        values = torch.stack([v for _, v in pending]).tolist()  # the one host sync
        steps_read = [s for s, _ in pending]
        pending.clear()
        for s, v in zip(steps_read, values):
            if not math.isfinite(v):
                raise PhenolensError(f"the loss became {v} at step {s}; lower --lr or use "
                                     "--mixed-precision no")
        bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)

    for k in range(start, config.steps):
        unet.train()
        losses = []
        for m in range(config.grad_accum):
            # one global index draw per micro-step, identical on every process; this process's slice
            idx = torch.randint(len(dataset), (config.batch_size,), generator=_generator(config.seed, k, "idx", m))
            idx = idx[rank * per_proc:(rank + 1) * per_proc].tolist()
            g = _generator(config.seed, k, rank, m)  # augmentation, dropout, t, noise
            x0, labels = dataset.batch(idx, g)
            x0 = _to_device(x0.to(torch.float32), accelerator.device)
            labels = labels.to(torch.long)
            # classifier-free condition dropout: a label becomes the null label with p = cond_dropout
            drop = torch.rand(labels.shape[0], generator=g) < config.cond_dropout
            labels = _to_device(torch.where(drop, torch.full_like(labels, null_label), labels), accelerator.device)
            with accelerator.accumulate(unet):
                loss = loss_fn(unet, noise_scheduler, x0, labels, g)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        if ema is not None:
            ema.step(trainable_parameters(base))
        step = k + 1
        local = torch.stack(losses).mean()  # stays on the device
        pending.append((step, local))
        bar.update(1)
        log_now = config.log_every > 0 and (step % config.log_every == 0 or step == config.steps)
        sampling = sample_fn is not None and config.sample_every > 0 and step % config.sample_every == 0
        saving = config.checkpoint_every > 0 and step % config.checkpoint_every == 0
        if log_now or sampling or saving or step == config.steps or step % sync_every == 0:
            check_losses()  # before anything is written from this step on
        if log_now:
            mean = accelerator.gather(local.reshape(1)).mean().item()  # every process joins
            if main:
                lr = float(lr_scheduler.get_last_lr()[0])
                secs = seconds0 + time.perf_counter() - t0
                log.write(step, mean, lr, secs)
                if tb is not None:
                    tb.add_scalar("train/loss", mean, step)
                    tb.add_scalar("train/lr", lr, step)
        if sampling:
            if main:
                sample_fn(_ema_copy(base, ema), step)
            accelerator.wait_for_everyone()
        if saving:
            save(step)
            last_saved = step
    bar.close()
    final = max(start, config.steps)
    if last_saved != final:
        save(final)
    if main:
        log.close()
        if tb is not None:
            tb.close()
        if on_save is not None:
            on_save(_ema_copy(base, ema), final)
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(unet, keep_fp32_wrapper=False)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """X (on the CPU) on DEVICE; to a GPU through pinned memory and without waiting for the GPU
    (a pageable copy would block until every queued kernel has run: a host sync per step)."""
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _new_accelerator(config: TrainConfig):
    """An Accelerator for this run, even when an earlier `train` in this process used other settings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if launched_world() <= 1:
        # accelerate keeps process-wide singletons and refuses a second Accelerator with another
        # mixed_precision; in a single process (CLI, notebook, tests) nothing else depends on them
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                       cpu=accelerate_on_cpu())


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters that train (all of them for a model trained from scratch), in a fixed order."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PhenolensError("the model has no trainable parameters")
    return params


def _ema_copy(base, ema):
    model = _fresh_copy(base)
    if ema is not None:
        ema.copy_to(trainable_parameters(model))
    model.eval()
    return model


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, each with one line naming the option (before any file is read)."""
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise PhenolensError(f"--lr {config.lr}: the learning rate must be a positive number, e.g. 2e-4")
    if not (isinstance(config.ema_decay, (int, float)) and 0.0 <= config.ema_decay < 1.0):
        raise PhenolensError(f"--ema-decay {config.ema_decay}: must be in [0, 1), e.g. 0.999 (1 would never "
                             "update the saved weights)")
    if config.warmup_steps < 0:
        raise PhenolensError(f"--warmup-steps {config.warmup_steps}: must be 0 or more")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise PhenolensError(f"weight_decay {config.weight_decay}: must be 0 or more")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise PhenolensError(f"--mixed-precision {config.mixed_precision!r}: choose no, bf16 or fp16")
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PhenolensError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if config.lr_schedule not in ("constant", "cosine"):
        raise PhenolensError(f"--lr-schedule {config.lr_schedule!r}: choose constant or cosine")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise PhenolensError(f"--{name.replace('_', '-')} must be at least 1")
    if config.keep_checkpoints < 1:
        raise PhenolensError("--keep-checkpoints must be at least 1 (resume needs one)")
    if not 0.0 <= config.cond_dropout < 1.0:
        raise PhenolensError(f"--cond-dropout {config.cond_dropout} must be in [0, 1)")




def _save_checkpoint(accelerator, ema, root: Path, step: int, fp: dict[str, Any], config: TrainConfig,
                     seconds: float) -> None:
    """accelerate state + EMA into a temporary folder, `state.json` last, then an atomic rename."""
    tmp = root / f".tmp-{checkpoint_name(step)}"
    final = root / checkpoint_name(step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model (safetensors), optimiser, LR scheduler, RNG states, step
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(step=step, seconds=seconds, fingerprint=fp, config=asdict(config))
        if ema is not None:
            state["ema"] = _save_ema(ema, tmp)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1, default=str))
        apply_umask(tmp)  # accelerate's and the EMA's safetensors come out 0600
        if final.exists():  # only an older, overwritten run could have left it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root.parent)[:-config.keep_checkpoints]:
            doomed = root / f".tmp-del-{old.name}"  # rename first: a kill mid-delete leaves no half checkpoint
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()
