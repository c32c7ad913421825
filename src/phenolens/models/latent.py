"""The pretrained latent diffusion model Phen-LDiff starts from (a Stable Diffusion 2 pipeline).

Phen-LDiff (Bourou et al. 2024, §3.1.1) fine-tunes a pretrained text-conditioned latent diffusion
model rather than training one: a VAE (`AutoencoderKL`) that maps images to latents, a UNet
(`UNet2DConditionModel`) that denoises latents under a text embedding, and the CLIP text encoder and
tokenizer that make the embedding. This module

- loads those parts from a local diffusers pipeline directory (the layout
  `StableDiffusionPipeline.save_pretrained` writes) or a Hugging Face hub id (`load_base`), with
  one-line errors for the usual mistakes: a missing folder, a model of another kind, no network;
- embeds prompts the way Stable Diffusion 2 pipelines do (`encode_prompts`);
- builds a tiny random-weight pipeline of the same shape for tests and demos, without downloading
  anything (`build_tiny_base`), and gives the full-size Stable Diffusion 2 configurations for
  benchmarks with random weights (`sd2_unet_config`, `sd2_vae_config`).

The scheduler is always a `DDIMScheduler` made from the base's own scheduler config (whatever class
it was saved as), so the noise schedule and the prediction type (ε for 512-px "-base" models, v for
the 768-px ones) follow the base. Only `clip_sample` and `thresholding` are forced off: clipping x̂_0
is not invertible (and Stable Diffusion pipelines turn it off as well).

Hub ids: the local Hugging Face cache is tried first, so a cached model loads without any network. If
it is not there, `HF_HUB_OFFLINE=1` fails at once; otherwise one request to the hub (10 s timeout;
a failed DNS lookup answers in well under a second) decides between "unreachable", "no such model"
and downloading. Without that probe, huggingface_hub retries an unreachable hub for about 23 s per
file before giving up with a misleading "does not appear to have a file named config.json".
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from phenolens.errors import PhenolensError
from phenolens.models.unet import unet_downsample_factor

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what phenolens' DDIM sampler/inverter handles
HUB_EXAMPLE = "stabilityai/stable-diffusion-2-1-base"
LAYOUT = ("a Stable Diffusion 2 pipeline directory holds vae/, unet/, text_encoder/, tokenizer/ and scheduler/ "
          "(as StableDiffusionPipeline.save_pretrained writes them)")
HUB_PROBE_TIMEOUT_S = 10.0  # the one request that tells an unreachable hub from a missing model

# what each component folder must hold: (config file, accepted classes)
_EXPECTED: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "vae": ("config.json", ("AutoencoderKL",)),
    "unet": ("config.json", ("UNet2DConditionModel",)),
    "text_encoder": ("config.json", ("CLIPTextModel", "CLIPTextModelWithProjection")),
    "tokenizer": (None, ("CLIPTokenizer",)),
    "scheduler": ("scheduler_config.json", ()),  # any scheduler: only its noise schedule is used
}
_WHAT = {
    "vae": "the VAE (AutoencoderKL)",
    "unet": "a text-conditioned UNet (UNet2DConditionModel)",
    "text_encoder": "a CLIP text encoder (CLIPTextModel)",
    "tokenizer": "a CLIP tokenizer",
    "scheduler": "a diffusers scheduler config",
}


# ------------------------------------------------------------------------------------ the base
@dataclass
class LatentBase:
    """The parts of a pretrained latent diffusion pipeline; components not asked for are None."""

    vae: Any = None  # diffusers.AutoencoderKL
    unet: Any = None  # diffusers.UNet2DConditionModel
    text_encoder: Any = None  # transformers.CLIPTextModel
    tokenizer: Any = None  # transformers.CLIPTokenizer
    scheduler: Any = None  # diffusers.DDIMScheduler with the base's noise schedule
    source: str = ""  # the local directory or hub id it came from

    def _need(self, name: str):
        part = getattr(self, name)
        if part is None:
            raise ValueError(f"LatentBase from {self.source}: {name} was not loaded (pass it in components=)")
        return part

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for Stable Diffusion)."""
        return unet_downsample_factor(self._need("vae"))

    @property
    def scaling_factor(self) -> float:
        """s in z_0 = s·E(x): scales the VAE's latents to about unit variance."""
        return float(self._need("vae").config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self._need("vae").config.latent_channels)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" or "v_prediction" (from the base's scheduler config)."""
        return str(self._need("scheduler").config.prediction_type)


# ------------------------------------------------------------------------------------- loading
def load_base(base: str | Path, *, components: Sequence[str] = COMPONENTS,
              dtype: torch.dtype = torch.float32) -> LatentBase:
    """Load COMPONENTS of BASE: a local diffusers pipeline directory or a hub id.

    Raises PhenolensError (one line) for a missing directory or folder, a model of another kind, a
    hub that cannot be reached, or a model that is not on the hub.
    """
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {COMPONENTS}")
    components = [c for c in COMPONENTS if c in components]  # a fixed order: checks before big loads
    text = str(base)
    local = Path(text).expanduser()
    if local.is_dir():
        parts = _load_local(local, text, components, dtype)
        source = str(local)
    elif local.exists():
        raise PhenolensError(f"--base {text}: is a file, not a pipeline directory; {LAYOUT}")
    elif isinstance(base, Path) or _looks_like_path(text):
        raise PhenolensError(f"--base {text}: no such directory; pass a Stable Diffusion 2 pipeline directory "
                             f"(vae/, unet/, text_encoder/, tokenizer/, scheduler/) or a hub id such as {HUB_EXAMPLE}")
    else:
        parts = _load_hub(text, components, dtype)
        source = text
    lb = LatentBase(source=source, **parts)
    _check_compatible(lb, text)
    return lb


def _looks_like_path(text: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path."""
    return (text.startswith((".", "/", "~")) or os.path.isabs(text) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text) or (os.altsep is not None and os.altsep != "/" and os.altsep in text))


def _load_local(root: Path, text: str, components: Sequence[str], dtype: torch.dtype) -> dict[str, Any]:
    if (root / "phenolens.json").is_file():
        raise PhenolensError(f"--base {text}: is a phenolens model, not a pretrained pipeline; pass the Stable "
                             "Diffusion 2 pipeline (directory or hub id) it should start from")
    for comp in components:  # check every folder before loading anything big
        folder = root / comp
        if not folder.is_dir():
            raise PhenolensError(f"--base {text}: has no {comp}/ folder; {LAYOUT}")
        config_file, _ = _EXPECTED[comp]
        if config_file is None:
            if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                raise PhenolensError(f"--base {text}: {comp}/ holds neither tokenizer.json nor vocab.json; "
                                     f"it should hold {_WHAT[comp]}")
            continue
        if not (folder / config_file).is_file():
            raise PhenolensError(f"--base {text}: {comp}/ has no {config_file}; it should hold {_WHAT[comp]}")
        _check_config(_read_json(folder / config_file, text, comp), comp, text)
    parts = {}
    for comp in components:
        try:
            parts[comp] = _instantiate(str(root), comp, dtype, local_only=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise PhenolensError(f"--base {text}: cannot load {comp}/: {_first_line(exc)}") from exc
    return parts


def _read_json(path: Path, text: str, comp: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PhenolensError(f"--base {text}: {comp}/{Path(path).name} is not readable JSON: "
                             f"{_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise PhenolensError(f"--base {text}: {comp}/{Path(path).name} is not a JSON object")
    return data


def _check_config(config: dict[str, Any], comp: str, text: str) -> None:
    """Refuse a component of the wrong kind before loading its weights."""
    if comp == "scheduler":
        name = str(config.get("_class_name", ""))
        if not name.endswith("Scheduler") or ("num_train_timesteps" not in config and "beta_schedule" not in config):
            raise PhenolensError(f"--base {text}: scheduler/ holds {name or 'an unknown config'}, not a diffusers "
                                 "noise scheduler (e.g. DDIMScheduler, PNDMScheduler)")
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise PhenolensError(f"--base {text}: scheduler/ predicts {prediction!r}; phenolens handles "
                                 f"{', '.join(PREDICTION_TYPES)}")
        return
    accepted = _EXPECTED[comp][1]
    if comp == "text_encoder":
        arch = [str(a) for a in config.get("architectures") or []]
        if config.get("model_type") == "clip_text_model" or any(a in accepted for a in arch):
            return
        found = ", ".join(arch) or config.get("model_type") or "an unknown model"
    else:
        found = config.get("_class_name") or "an unknown model"
        if found in accepted:
            return
    raise PhenolensError(f"--base {text}: {comp}/ holds {found}, not {_WHAT[comp]}; is it a Stable Diffusion 2 "
                         "(text-to-image latent diffusion) pipeline?")


def _instantiate(source: str, comp: str, dtype: torch.dtype, local_only: bool):
    """`from_pretrained(source, subfolder=comp)` of the component's class."""
    if comp == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, local_files_only=local_only)
    if comp == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype,
                                                    local_files_only=local_only)
    if comp == "text_encoder":
        import transformers
        from transformers import CLIPTextModel

        # transformers 5 renamed `torch_dtype` to `dtype` (the old name still works, with a warning)
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        return CLIPTextModel.from_pretrained(source, subfolder="text_encoder", local_files_only=local_only,
                                             **{key: dtype})
    if comp == "tokenizer":
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
    from diffusers import DDIMScheduler

    config = dict(DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_only))
    config.update(clip_sample=False, thresholding=False)  # clipping x̂_0 is not invertible
    return DDIMScheduler.from_config(config)


# -------------------------------------------------------------------------------------- hub ids
def _hub_offline_env() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _download_hint(repo: str, option: str = "--base") -> str:
    import huggingface_hub

    cli = "hf" if int(huggingface_hub.__version__.split(".")[0]) >= 1 else "huggingface-cli"
    return f"download the model first ({cli} download {repo} --local-dir DIR) and pass {option} DIR"


def _unreachable(repo: str, why: str, option: str = "--base") -> PhenolensError:
    return PhenolensError(f"{option} {repo}: not a local directory, and the Hugging Face hub cannot be reached "
                          f"({why}); {_download_hint(repo, option)}")


def _load_hub(repo: str, components: Sequence[str], dtype: torch.dtype) -> dict[str, Any]:
    return _from_hub(repo, "--base", f"(owner/name such as {HUB_EXAMPLE})",
                     lambda local_only: {comp: _load_hub_component(repo, comp, dtype, local_only=local_only)
                                         for comp in components})


def _from_hub(repo: str, option: str, not_an_id: str, load: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    """LOAD(local_only) the parts of hub model REPO: from the local cache first (no network; LOAD raises
    OSError / ValueError when something is not cached), at once an error under HF_HUB_OFFLINE, else after
    one quick probe that tells an unreachable hub from a missing model. NOT_AN_ID ends the error of an id
    the hub would reject."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise PhenolensError(f"{option} {repo}: no such directory, and not a Hugging Face hub id {not_an_id}") from None
    try:  # 1. the local cache: no network at all
        return load(True)
    except (OSError, ValueError):
        pass  # not (completely) in the cache
    if _hub_offline_env():
        raise _unreachable(repo, "HF_HUB_OFFLINE is set and the model is not in the local cache", option) from None
    _probe_hub(repo, option)  # 2. one quick request: is the hub there, and does it know the model?
    return load(False)


def _probe_hub(repo: str, option: str = "--base") -> None:
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        model_info(repo, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise PhenolensError(f"{option} {repo}: not a local directory, and no such model on the Hugging Face hub "
                             "(a private one needs `hf auth login`); check the id or pass a local pipeline "
                             "directory") from None
    except HfHubHTTPError as exc:
        raise _unreachable(repo, f"it answered: {_first_line(exc)}", option) from None
    except Exception:  # noqa: BLE001 - DNS, connection, TLS, proxy or timeout errors of the HTTP client
        raise _unreachable(repo, "offline?", option) from None


def _load_hub_component(repo: str, comp: str, dtype: torch.dtype, local_only: bool):
    """One component of a hub model, from the cache only (LOCAL_ONLY: any failure is OSError /
    ValueError, meaning "not cached") or downloading (failures are PhenolensError)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    config_file, _ = _EXPECTED[comp]
    try:
        if config_file is not None:
            path = hf_hub_download(repo, config_file, subfolder=comp, local_files_only=local_only)
            _check_config(_read_json(Path(path), repo, comp), comp, repo)
        return _instantiate(repo, comp, dtype, local_only=local_only)
    except EntryNotFoundError as exc:
        if local_only:
            raise OSError(str(exc)) from exc
        raise PhenolensError(f"--base {repo}: the hub model has no {comp}/{config_file}; {LAYOUT}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if local_only:
            raise
        raise PhenolensError(f"--base {repo}: cannot load {comp}/ from the Hugging Face hub: "
                             f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _check_compatible(lb: LatentBase, text: str) -> None:
    """The loaded parts must fit together as a plain text-to-image latent diffusion model."""
    unet = lb.unet
    if unet is not None:
        cfg = unet.config
        if cfg.get("addition_embed_type") or cfg.get("class_embed_type") or cfg.get("encoder_hid_dim_type"):
            raise PhenolensError(f"--base {text}: unet/ needs extra conditioning (an SDXL, upscaler or other variant); "
                                 "use a text-to-image Stable Diffusion 2 pipeline")
        if lb.vae is not None and int(cfg.in_channels) != lb.latent_channels:
            raise PhenolensError(f"--base {text}: unet/ takes {cfg.in_channels} input channels but vae/ makes "
                                 f"{lb.latent_channels}-channel latents (an inpainting or upscaling pipeline?); "
                                 "use a text-to-image Stable Diffusion 2 pipeline")
        cross = cfg.cross_attention_dim
        if lb.text_encoder is not None and isinstance(cross, int) and cross != lb.text_encoder.config.hidden_size:
            raise PhenolensError(f"--base {text}: unet/ attends to {cross}-dimensional text embeddings but "
                                 f"text_encoder/ makes {lb.text_encoder.config.hidden_size}-dimensional ones")


# ------------------------------------------------------------------- other pretrained repositories
PartLoader = Callable[[str, bool], Any]
"""(source, local_only) -> one component of a repository: `from_pretrained(source, subfolder=...)`.
With local_only it must raise OSError or ValueError when the component is not in the local cache."""


def load_parts(source: str | Path, option: str, parts: Mapping[str, PartLoader], *, what: str) -> dict[str, Any]:
    """Load PARTS (subfolder name -> loader) of SOURCE, a local directory or a hub id, by `load_base`'s
    rules: a local directory must hold every subfolder; a hub id is read from the local cache first, fails
    at once under HF_HUB_OFFLINE, and otherwise one probe of the hub tells "unreachable" from "no such
    model" before downloading. Every failure is one PhenolensError line naming OPTION and SOURCE; WHAT
    says what the directory should be (e.g. "a Kandinsky 2.2 decoder (unet/, movq/, scheduler/)").
    Why here: Kandinsky's decoder and prior repositories are not Stable Diffusion pipelines, but a user
    meets the same mistakes (a typo, no network, a model of another kind) and should read the same errors."""
    text = str(source)
    local = Path(text).expanduser()
    if local.is_dir():
        if (local / "phenolens.json").is_file():
            raise PhenolensError(f"{option} {text}: is a phenolens model, not a pretrained model; pass {what}")
        for name in parts:  # every folder before anything big is loaded
            if not (local / name).is_dir():
                raise PhenolensError(f"{option} {text}: has no {name}/ folder; pass {what}")
        return {name: _load_part(load, str(local), name, option, text, local_only=False)
                for name, load in parts.items()}
    if local.exists():
        raise PhenolensError(f"{option} {text}: is a file, not a directory; pass {what}")
    if isinstance(source, Path) or _looks_like_path(text):
        raise PhenolensError(f"{option} {text}: no such directory; pass {what}, as a directory or a hub id")

    def from_hub(local_only: bool) -> dict[str, Any]:
        if local_only:  # a part not in the cache raises OSError / ValueError, as _from_hub expects
            return {name: load(text, True) for name, load in parts.items()}
        return {name: _load_part(load, text, name, option, text, local_only=False) for name, load in parts.items()}

    return _from_hub(text, option, f"(owner/name); pass {what}", from_hub)


def _load_part(load: PartLoader, source: str, name: str, option: str, text: str, local_only: bool) -> Any:
    try:
        return load(source, local_only)
    except PhenolensError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PhenolensError(f"{option} {text}: cannot load {name}/: {_first_line(exc)}") from exc


def ddim_scheduler(source: str, local_only: bool = False):
    """The DDIMScheduler phenolens samples and inverts with, from SOURCE's scheduler/ config (any class)."""
    return _instantiate(source, "scheduler", torch.float32, local_only)


# --------------------------------------------------------------------------------------- prompts
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(n, tokenizer.model_max_length, hidden) embeddings of PROMPTS, as Stable Diffusion 2 pipelines
    make them: padded to the full length, truncated, the text encoder's last hidden state (no clip skip)."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


# ------------------------------------------------------------------------ a tiny base for tests
def _byte_characters() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet: one printable character per byte value, in CLIP's vocab order
    (the printable bytes as themselves first, then the others mapped to code points from 256 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


_TINY_MERGES = [("c", "e"), ("l", "l</w>"), ("ce", "ll</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>")]


def _write_tiny_vocab(folder: Path) -> dict[str, int]:
    """vocab.json + merges.txt of a tiny CLIP BPE: every byte character alone and with "</w>", a few
    merges, then <|startoftext|> and <|endoftext|> (the order of CLIP's own vocabulary)."""
    chars = _byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_MERGES),
                                       encoding="utf-8")
    return vocab


def _tiny_unet_config(latent_channels: int, cross_attention_dim: int) -> dict[str, Any]:
    return dict(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),  # per block, like SD2's (5, 10, 20, 20): heads of 16 channels each
        use_linear_projection=True,
        norm_num_groups=8,
    )


def _tiny_vae_config(latent_channels: int) -> dict[str, Any]:
    return dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )


def _sd2_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=prediction_type)


def build_tiny_base(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon",
                    latent_channels: int = 4, cross_attention_dim: int = 32) -> Path:
    """Write a tiny Stable-Diffusion-2-shaped pipeline with random weights (no download) to OUT_DIR.

    Loadable by `load_base` and by `StableDiffusionPipeline.from_pretrained(OUT_DIR)`. The VAE halves
    the resolution once (vae_scale_factor 2) and the UNet's sample size is 16, so the native image is
    32×32. The tokenizer is a byte-level CLIP BPE (see `_write_tiny_vocab`) whose pad token is "!"
    (id 0), as in Stable Diffusion 2's tokenizer (SD 1.x pads with <|endoftext|>). The same SEED gives
    the same weights, and the global random state is left as it was.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, __version__ as diffusers_version
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        vocab = _write_tiny_vocab(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token="!")
    tokenizer.save_pretrained(out / "tokenizer")
    _write_tiny_vocab(out / "tokenizer")  # the slow CLIPTokenizer of transformers < 5 reads these two files

    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=cross_attention_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=cross_attention_dim,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"],
    )
    # built on the CPU, so only its generator is seeded: torch.manual_seed would also seed (and, outside
    # fork_rng's devices=[], leave seeded) every GPU's generator
    cpu = torch.random.default_generator
    with torch.random.fork_rng(devices=[]):
        cpu.manual_seed(seed)
        vae = AutoencoderKL(**_tiny_vae_config(latent_channels))
        cpu.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**_tiny_unet_config(latent_channels, cross_attention_dim))
        cpu.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    _sd2_scheduler(prediction_type).save_pretrained(out / "scheduler")

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return out


# --------------------------------------------------------------------- full-size configurations
SD2_VARIANTS = ("base", "768-v")


def sd2_unet_config(variant: str = "base") -> dict[str, Any]:
    """UNet2DConditionModel kwargs of the published Stable Diffusion 2(.1) UNet (~866M parameters).

    "base": stable-diffusion-2(-1)-base, 512 px (64×64 latents), ε-prediction; "768-v":
    stable-diffusion-2(-1), 768 px (96×96 latents), v-prediction, attention computed in float32.
    """
    if variant not in SD2_VARIANTS:
        raise ValueError(f"variant {variant!r} must be one of {', '.join(SD2_VARIANTS)}")
    return dict(
        sample_size=64 if variant == "base" else 96,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=False,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),  # diffusers' historical name: these are head *counts* (64 ch each)
        dual_cross_attention=False,
        use_linear_projection=True,
        upcast_attention=variant == "768-v",
        num_class_embeds=None,
    )


def sd2_vae_config(variant: str = "base") -> dict[str, Any]:
    """AutoencoderKL kwargs of the published Stable Diffusion 2(.1) VAE (~84M parameters)."""
    if variant not in SD2_VARIANTS:
        raise ValueError(f"variant {variant!r} must be one of {', '.join(SD2_VARIANTS)}")
    return dict(
        sample_size=512 if variant == "base" else 768,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )


__all__ = ["LatentBase", "load_base", "load_parts", "ddim_scheduler", "encode_prompts", "build_tiny_base", "sd2_unet_config", "sd2_vae_config",
           "COMPONENTS", "SD2_VARIANTS"]
