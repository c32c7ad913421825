"""What a Phen-LDiff fine-tuning trains in the pretrained Stable Diffusion UNet, and how it is saved.

Four modes (`MODES`), each applied in place by `prepare_unet`, which first freezes every base
parameter and then makes trainable only what the mode trains:

``lora``
    Low-rank adapters (Phen-LDiff §3.1.2, eq. 4: W' = W + B Aᵀ) on every attention projection
    (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of the self- and cross-attention) and on the
    transformer blocks' projection layers (``proj_in``, ``proj_out``, the feed-forward
    ``ff.net.0.proj`` and ``ff.net.2``), injected with peft (`UNet2DConditionModel.add_adapter`).
    Only ``lora_A`` / ``lora_B`` train. peft computes W x + (α/r)·B(A x), i.e. eq. 4 with the usual
    α/r scale (its ``lora_A.weight`` is the paper's Aᵀ); B starts at zero, so a fresh adapter is the
    base model exactly.
``svdiff``
    Spectral shifts (Phen-LDiff §3.1.3, W = U Σ Vᵀ; the SVDiff paper's W_δ = U diag(ReLU(σ + δ)) Vᵀ)
    on the weight of every ``nn.Linear`` and ``nn.Conv2d`` (conv kernels read as
    (out, in·kh·kw) matrices). The SVD is computed once; only the shift vector δ (one entry per
    singular value, zeros at first) trains. See `SpectralShift`.
``attention``
    The paper's "attention fine-tuning": every parameter of the attention modules of the
    transformer blocks (``attn1`` self-attention and ``attn2`` cross-attention: ``to_q``, ``to_k``,
    ``to_v``, ``to_out.0``, weights and biases). The transformer blocks' LayerNorms, feed-forward
    layers and ``proj_in`` / ``proj_out`` stay frozen: the paper trains "only the attention layers".
``full``
    Every UNet parameter.

`trained_state_dict` returns only what trained (for a fine-tuned SD-2 UNet a rank-4 LoRA is
about 0.2 % of the UNet's bytes), and `save_adaptation` / `load_adaptation` write and read it as
``adapter.safetensors`` + ``adapter.json``. `load_trained` rebuilds the adaptation on a fresh base
UNet and reproduces the fine-tuned model's outputs bit for bit on the same device.

Speed (svdiff): a parametrized weight is recomputed at every access, i.e. one extra
(out × k) · (k × in·kh·kw) matmul per layer per forward pass. In training that is the price of
training δ; at inference wrap the whole sampling loop in ``with frozen_weights(unet):`` (under
``torch.no_grad()``) so each weight is computed once and reused for every step of the loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from phenolens.atomic import write_json_atomic
from phenolens.errors import PhenolensError

MODES = ("lora", "svdiff", "attention", "full")

# Layer names (suffixes of module paths) LoRA adapts; all exist in diffusers' UNet2DConditionModel
# (BasicTransformerBlock: attn1/attn2.to_q/to_k/to_v/to_out.0, ff.net.0.proj (GEGLU), ff.net.2;
# Transformer2DModel: proj_in/proj_out, nn.Linear with use_linear_projection, 1x1 conv otherwise).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
ADAPTER_NAME = "default"  # the peft adapter name
STATE_FILE = "adapter.safetensors"
DESCRIPTION_FILE = "adapter.json"
_METADATA_KEY = "phenolens_adaptation"
_MARKER = "_phenolens_adaptation"  # attribute set on a prepared UNet: its description


# ----------------------------------------------------------------------------------- helpers
def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of MODULE."""
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def size_in_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors of STATE hold (works on meta tensors too)."""
    return sum(t.numel() * t.element_size() for t in state.values())


@contextlib.contextmanager
def _pinned_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread while computing an SVD: LAPACK's result depends (in the last bits) on the
    number of threads, and `load_trained` must recompute the very same U, σ, Vᵀ as training did."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SpectralShift(nn.Module):
    """SVDiff parametrization of one weight: W ↦ W + U diag(ReLU(σ + δ) − σ) Vᵀ.

    W = U diag(σ) Vᵀ (Phen-LDiff §3.1.3) is computed once, in float32, for the weight read as an
    (out, in·kh·kw) matrix; U, σ, Vᵀ are non-persistent buffers and δ (zeros) is the only
    parameter. The result is the SVDiff weight U diag(ReLU(σ + δ)) Vᵀ (SVDiff eq. for W_δ), written
    as a correction of the frozen W: with δ = 0, ReLU(σ) − σ is exactly 0 (σ ≥ 0), so the weight
    is W bit for bit instead of a float32 reconstruction of it.
    """

    def __init__(self, weight: torch.Tensor, svd_device: torch.device | str | None = None):
        super().__init__()
        device = weight.device
        svd_device = torch.device(svd_device) if svd_device is not None else device
        matrix = weight.detach().reshape(weight.shape[0], -1).to(device=svd_device, dtype=torch.float32)
        with _pinned_threads(svd_device), torch.no_grad():
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("U", u.to(device), persistent=False)
        self.register_buffer("S", s.to(device), persistent=False)
        self.register_buffer("Vh", vh.to(device), persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(self.S))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # U diag(ReLU(σ + δ) − σ) Vᵀ, added to W: = U diag(ReLU(σ + δ)) Vᵀ up to the SVD's rounding
        shift = torch.relu(self.S + self.delta) - self.S
        update = (self.U * shift) @ self.Vh
        return weight + update.reshape(weight.shape).to(weight.dtype)


@contextlib.contextmanager
def frozen_weights(unet: nn.Module) -> Iterator[nn.Module]:
    """Inside this block every parametrized (svdiff) weight is computed once and then reused.

    Use it around a whole inference loop (many UNet calls, under ``torch.no_grad()``): otherwise
    each call recomputes U diag(·) Vᵀ for every layer. The outputs are the same bit for bit. Do not
    train inside it (the cached weights would not follow δ). A no-op for the other modes.
    """
    with parametrize.cached():
        yield unet


def _is_prepared(unet: nn.Module) -> bool:
    if getattr(unet, _MARKER, None) is not None or getattr(unet, "peft_config", None):
        return True
    return any(parametrize.is_parametrized(m) for m in unet.modules())


def _spectral_layers(unet: nn.Module) -> dict[str, SpectralShift]:
    """Layer name -> its SpectralShift, for every svdiff-parametrized weight."""
    out = {}
    for name, module in unet.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, SpectralShift):
                    out[name] = p
    return out


def _attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks' attention modules (attn1 self-, attn2 cross-attention)."""
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - older/newer diffusers layout
        Attention = ()
    return {name: m for name, m in unet.named_modules()
            if (Attention and isinstance(m, Attention)) or name.rsplit(".", 1)[-1] in ("attn1", "attn2")}


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise PhenolensError(f"--mode {mode!r} is unknown: choose one of {', '.join(MODES)}")
    return mode


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PhenolensError(f"--rank must be a whole number >= 1 (got {rank!r}): pass e.g. --rank 4")
    return rank


# ----------------------------------------------------------------------------------- prepare
def prepare_unet(unet: nn.Module, mode: str, *, rank: int = 4, alpha: float | None = None,
                 svd_device: torch.device | str | None = None,
                 targets: Sequence[str] = LORA_TARGETS) -> dict[str, Any]:
    """Freeze UNET's base parameters and make trainable only what MODE trains (in place).

    rank / alpha: LoRA rank r and scale numerator α (default α = r, scale α/r = 1); ignored by
    the other modes. svd_device: where svdiff computes its SVDs (default: each weight's device);
    `load_trained` uses it to recompute them where training did. targets: the layer names LoRA
    adapts (default `LORA_TARGETS`; Kandinsky's decoder adds its added key/value projections).

    Returns a JSON-able description for phenolens.json (and `load_trained`): mode, rank, alpha,
    target_modules, layers (how many modules adapted), trainable, total (parameter counts after
    preparation), base_total (before) and, for svdiff, svd_device.
    """
    mode = _check_mode(mode)
    rank = _check_rank(rank)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise PhenolensError(f"--lora-alpha must be a number > 0 (got {alpha!r}): leave it out to use the rank")
    if _is_prepared(unet):
        raise PhenolensError("the UNet already has an adaptation: prepare_unet / load_adaptation need a fresh "
                             "base UNet (load the base again)")
    _, base_total = count_parameters(unet)
    unet.requires_grad_(False)
    description: dict[str, Any] = {"mode": mode, "rank": None, "alpha": None}

    if mode == "lora":
        from peft import LoraConfig

        alpha = float(rank if alpha is None else alpha)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                            target_modules=list(targets))
        try:
            unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # peft: no target module found
            raise PhenolensError(f"--mode lora: the UNet has none of the layers {', '.join(targets)} ({exc})")
        layers = 0
        for name, p in unet.named_parameters():
            is_lora = ".lora_A." in name or ".lora_B." in name
            p.requires_grad_(is_lora)
            layers += is_lora and ".lora_A." in name
        description.update(rank=rank, alpha=alpha, target_modules=list(targets), layers=layers)

    elif mode == "svdiff":
        targets = [(name, m) for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        devices = set()
        for _, module in targets:
            shift = SpectralShift(module.weight, svd_device)
            devices.add((torch.device(svd_device) if svd_device is not None else module.weight.device).type)
            parametrize.register_parametrization(module, "weight", shift)
        for name, p in unet.named_parameters():
            p.requires_grad_(name.endswith(".parametrizations.weight.0.delta"))
        description.update(target_modules=["Linear.weight", "Conv2d.weight"], layers=len(targets),
                           svd_device=",".join(sorted(devices)) or None)

    elif mode == "attention":
        modules = _attention_modules(unet)
        for module in modules.values():
            module.requires_grad_(True)
        description.update(target_modules=["attn1", "attn2"], layers=len(modules))

    else:  # full
        unet.requires_grad_(True)
        description.update(target_modules=["*"],
                           layers=sum(1 for m in unet.modules() if any(True for _ in m.parameters(recurse=False))))

    trainable, total = count_parameters(unet)
    description.update(trainable=trainable, total=total, base_total=base_total)
    setattr(unet, _MARKER, dict(description))
    return description


# ----------------------------------------------------------------------------------- state
def _export(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _raw_trained_state(unet: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The trained tensors (live, on their device), keyed as saved."""
    if mode == "lora":
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    if mode == "svdiff":
        return {name: shift.delta for name, shift in _spectral_layers(unet).items()}
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def trained_state_dict(unet: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """Only what MODE trained in UNET, detached CPU copies ready for safetensors.

    lora: peft's adapter state dict (``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight``);
    svdiff: δ of each layer keyed by the layer's name; attention / full: the trained parameters.
    """
    mode = _check_mode(mode)
    prepared = getattr(unet, _MARKER, None)
    if prepared is None:
        raise PhenolensError("the UNet has no adaptation to save: call prepare_unet (or load_adaptation) first")
    if prepared["mode"] != mode:
        raise PhenolensError(f"--mode {mode!r} does not match the UNet, which was prepared for mode "
                             f"{prepared['mode']!r}: pass --mode {prepared['mode']}")
    return {k: _export(v) for k, v in _raw_trained_state(unet, mode).items()}


def _describe_keys(keys: set[str]) -> str:
    shown = sorted(keys)[:5]
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def load_trained(unet: nn.Module, description: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Apply a saved adaptation to a FRESH base UNET: prepare it as DESCRIPTION says, then fill
    every trained tensor from STATE. Strict: a key of STATE that is not used, a trained tensor
    STATE lacks, or a shape that differs is a PhenolensError naming the keys."""
    if not isinstance(description, Mapping) or "mode" not in description:
        raise PhenolensError(f"the adaptation description has no 'mode' (got {description!r}): save the model again")
    mode = _check_mode(description["mode"])
    rank = description.get("rank") or 4
    svd_device = None
    if mode == "svdiff":
        # recompute the SVDs where training computed them, so U, σ, Vᵀ (hence the weights) are the same
        recorded = description.get("svd_device")
        if recorded and "," not in recorded and recorded != "meta":
            if recorded == "cpu" or (recorded == "cuda" and torch.cuda.is_available()):
                svd_device = recorded
            else:
                warnings.warn(f"svdiff: the spectral decompositions were computed on {recorded!r}, which is not "
                              "available; recomputing them here gives the fine-tuned weights only up to rounding")
    # the layers LoRA adapted, as recorded (descriptions from before `targets` hold LORA_TARGETS)
    targets = description.get("target_modules") if mode == "lora" else None
    prepare_unet(unet, mode, rank=rank, alpha=description.get("alpha"), svd_device=svd_device,
                 targets=tuple(targets) if targets else LORA_TARGETS)

    expected = _raw_trained_state(unet, mode)
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_describe_keys(unexpected)}")
        raise PhenolensError(f"the saved {mode} adaptation does not fit this base UNet ({'; '.join(parts)}): "
                             "use the base the model was fine-tuned from, or save the model again")
    wrong = {k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)}
    if wrong:
        raise PhenolensError(f"the saved {mode} adaptation does not fit this base UNet (shape differs for "
                             f"{_describe_keys(wrong)}): use the base the model was fine-tuned from")

    if mode == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(unet, dict(state), adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise PhenolensError(f"the saved lora adaptation does not fit this base UNet (unexpected keys "
                                 f"{_describe_keys(set(result.unexpected_keys))}): save the model again")
        # check that peft filled every adapter tensor (it maps key names internally)
        loaded = _raw_trained_state(unet, mode)
        bad = {k for k in loaded if not torch.equal(loaded[k].detach().cpu(), state[k].to(loaded[k].dtype).cpu())}
        if bad:
            raise PhenolensError(f"the saved lora adaptation could not be loaded into {_describe_keys(bad)}: "
                                 "save the model again")
    else:
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(state[key])


# ----------------------------------------------------------------------------------- files
def _jsonable(description: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(description), default=str))


def save_adaptation(folder: str | Path, unet: nn.Module, description: Mapping[str, Any]) -> int:
    """Write what UNET's fine-tuning trained to FOLDER/adapter.safetensors and DESCRIPTION to
    FOLDER/adapter.json (each written to a temporary file, then renamed). Returns the bytes saved."""
    from safetensors.torch import save_file

    if not isinstance(description, Mapping) or "mode" not in description:
        raise PhenolensError(f"the adaptation description has no 'mode' (got {description!r}): pass the "
                             "dictionary prepare_unet returned")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = trained_state_dict(unet, description["mode"])
    meta = _jsonable(description)
    path = folder / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata={_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    write_json_atomic(folder / DESCRIPTION_FILE, meta)
    return size_in_bytes(state)


def load_adaptation(folder: str | Path, unet: nn.Module) -> dict[str, Any]:
    """Apply the adaptation saved in FOLDER to the fresh base UNET (see `load_trained`); returns
    its description. For svdiff, move UNET to its device before loading to get exact outputs
    there (the SVDs are recomputed where training computed them, then kept on UNET's device)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    json_path, state_path = folder / DESCRIPTION_FILE, folder / STATE_FILE
    for p in (json_path, state_path):
        if not p.is_file():
            raise PhenolensError(f"{p}: not found; a fine-tuned model's {folder.name}/ folder holds "
                                 f"{DESCRIPTION_FILE} and {STATE_FILE} (save or train the model again)")
    try:
        description = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise PhenolensError(f"{json_path}: not readable JSON ({exc}): save the model again")
    try:
        with safe_open(str(state_path), framework="pt") as f:
            saved_meta = (f.metadata() or {}).get(_METADATA_KEY)
        state = load_file(str(state_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise PhenolensError(f"{state_path}: not a readable safetensors file ({exc}): save the model again")
    if saved_meta is not None and json.loads(saved_meta) != _jsonable(description):
        raise PhenolensError(f"{folder}: {DESCRIPTION_FILE} and {STATE_FILE} come from different saves "
                             "(an interrupted save?): save the model again")
    load_trained(unet, description, state)
    return description


__all__ = [
    "MODES", "LORA_TARGETS", "SpectralShift", "count_parameters", "frozen_weights", "load_adaptation",
    "load_trained", "prepare_unet", "save_adaptation", "size_in_bytes", "trained_state_dict",
]
