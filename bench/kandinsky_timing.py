"""DIFFusion on Kandinsky 2.2 at full size: images/s of invert (EF-DDPM) + edit + render, and peak GPU memory,
in fp32 and bf16 measured in the same run (so their ratio holds on whatever machine runs it).

    python bench/kandinsky_timing.py [--batch 4] [--size 512] [--steps 50] [--guidance-scale 4] [--json PATH]
    python bench/kandinsky_timing.py --tiny      # the same code path on tiny components, on CPU, in seconds
                                                 # (defaults then: batch 2, 32 px, 20 steps)

What is timed: one `Kandinsky.translate` call on a batch of N random 3-channel images (the path `phenolens
translate --inversion ef-ddpm --edit to=B,omega=2 --guidance-scale G` takes): MoVQ encoding, the CLIP image
embeddings, the edit-friendly DDPM inversion over --steps steps, the rendering of the reconstruction and of
the edit ĉ = c + ω·Δc (eqs. 6-8), MoVQ decoding. With G ≠ 1 guidance applies to inversion and generation
alike (paper 004 App. B.3), so every step is one batched UNet call on 2N latents. A warm-up translation
(2 steps) comes first; peak memory is the CUDA allocator's maximum over the timed call. bf16 means the
networks' weights and activations in bfloat16; the EF-DDPM arithmetic stays in float32. The last column,
the worst latent reconstruction error, shows what bf16 costs: EF-DDPM reconstructs exactly only when rendering
recomputes the inversion's network outputs, and a bf16 network amplifies the float32 rounding of its inputs.

The networks are built from configs with random weights (nothing is downloaded; speed and memory do not
depend on the weights). Where the numbers come from (`phenolens.models.kandinsky`, written from the
published model as best known, not read from the files):
- decoder UNet (`full_unet_config`): kandinsky-community/kandinsky-2-2-decoder unet/config.json —
  block_out_channels (384, 768, 1152, 1536), layers_per_block 3, ResnetDownsample/SimpleCrossAttn blocks,
  attention_head_dim 64, cross_attention_dim 768, encoder_hid_dim 1280 (image_proj), addition_embed_type
  "image", out_channels 8 (ε + learned variance), sample_size 64 (512 px / 8); 1253M parameters as built;
- MoVQ (`full_movq_config`): the same repository's movq/config.json — block_out_channels (128, 256, 256,
  512), layers_per_block 2, attention in the last encoder / first decoder block, spatial norm, 4 latent
  channels, 16384 codes; 67.8M parameters;
- CLIP image encoder (`full_clip_config`): OpenCLIP ViT-bigG/14 as kandinsky-community/kandinsky-2-2-prior
  image_encoder/ holds it — width 1664, 48 layers, 16 heads, MLP 8192, patch 14 at 224 px, projection
  1280 (the decoder's encoder_hid_dim); 1845M parameters;
- scheduler (`kandinsky_scheduler_config`): 1000 steps, linear β 0.00085 -> 0.012, ε-prediction.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def build_model(tiny: bool, dtype: torch.dtype, device: str):
    """A Kandinsky DIFFusion model with random weights, full size or tiny, for 3-channel images in [0, 1]."""
    from phenolens.methods.kandinsky import Kandinsky
    from phenolens.models import kandinsky as kd
    from phenolens.models.store import ModelInfo

    if tiny:
        configs = kd.tiny_unet_config(), kd.tiny_movq_config(), kd.tiny_clip_config()
    else:
        configs = kd.full_unet_config(), kd.full_movq_config(), kd.full_clip_config()
    parts = kd.build_parts(*configs, dtype=dtype, device=device)
    info = ModelInfo(conditions=["a", "b"], n_channels=3, image_size=parts.native_size,
                     normalization=dict(low=[0.0] * 3, high=[1.0] * 3), method="kandinsky", cond_dropout=0.1)
    return Kandinsky.from_parts(parts, info, device=device)


def time_one(tiny: bool, dtype: torch.dtype, device: str, batch: int, size: int, steps: int,
             guidance: float, omega: float) -> dict:
    """Build, warm up, and time one translation of BATCH images; the figures of one precision."""
    from phenolens.diffusion.inversion import InversionSettings
    from phenolens.methods.diffusion_embedding import ClassMeans

    model = build_model(tiny, dtype, device)
    dim = int(model.image_encoder.config.projection_dim)
    g = torch.Generator().manual_seed(0)
    means = {k: torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0) for k in ("a", "b")}
    model.use_class_means(ClassMeans(means), omega=omega)
    rng = np.random.default_rng(0)
    raws = [rng.random((3, size, size), dtype=np.float32) for _ in range(batch)]
    edit = f"to=b,omega={omega:g}"

    def run(n_steps: int):
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]  # CPU: EF-DDPM draws its maps there
        return model.translate(raws, "a", [edit], inversion=InversionSettings(method="ef-ddpm", steps=n_steps),
                               guidance_scale=guidance, generator=gens)

    run(2)  # warm-up: kernels, allocator, the zero-image embedding
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run(steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    figures = dict(
        precision="bf16" if dtype == torch.bfloat16 else "fp32", batch=batch, size=size, steps=steps,
        guidance_scale=guidance, seconds=seconds, images_per_s=batch / seconds,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        # inversion, reconstruction and edit: one UNet evaluation per step each, two under guidance
        unet_evals_per_image=3 * steps * (2 if guidance != 1 else 1),
        latent_recon_mse=float(np.max(result.latent_recon_mse)),
        latent_change_mse=float(np.mean(result.latent_change_mse[edit])),
        parameters=dict(unet=sum(p.numel() for p in model.unet.parameters()),
                        movq=sum(p.numel() for p in model.movq.parameters()),
                        image_encoder=sum(p.numel() for p in model.image_encoder.parameters())),
    )
    return figures


def markdown(rows: list[dict], ratios: dict) -> str:
    head = ("| precision | batch | px | steps | guidance | UNet evals/image | s/batch | images/s | peak GPU GiB "
            "| latent recon MSE (max) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mem = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {r['precision']} | {r['batch']} | {r['size']} | {r['steps']} | {r['guidance_scale']:g} | "
                     f"{r['unet_evals_per_image']} | {r['seconds']:.2f} | {r['images_per_s']:.3g} | {mem} | "
                     f"{r['latent_recon_mse']:.2e} |")
    if ratios:
        lines.append("")
        lines.append(", ".join(f"{k}: {v:.3g}" for k, v in ratios.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random components on CPU (a smoke run, seconds)")
    ap.add_argument("--batch", type=int, default=None, help="images per translation (default 4; 2 with --tiny)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default 512; 32 with --tiny)")
    ap.add_argument("--steps", type=int, default=None,
                    help="EF-DDPM steps of inversion and rendering (default 50; 20 with --tiny)")
    ap.add_argument("--guidance-scale", type=float, default=4.0,
                    help="classifier-free guidance in inversion and generation (default 4, Kandinsky's default)")
    ap.add_argument("--omega", type=float, default=2.0, help="edit strength ω (default 2, the paper's)")
    ap.add_argument("--precisions", default="fp32,bf16", help="which to time, in order (default fp32,bf16)")
    ap.add_argument("--device", default=None, help="default: cuda when available (never with --tiny), else cpu")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--strict-fp32", action="store_true",
                    help="turn TF32 off (cuDNN convolutions and matmuls): fp32 then reconstructs exactly on a GPU, "
                         "at a cost this run measures (bench/kandinsky_timing.md)")
    args = ap.parse_args()
    if args.strict_fp32:
        torch.backends.cudnn.allow_tf32 = False  # PyTorch's default lets cuDNN convolutions use TF32
        torch.backends.cuda.matmul.allow_tf32 = False

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its warning about casting a model to bf16 with .to() is expected here
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    size = args.size or (32 if args.tiny else 512)
    args.batch = args.batch or (2 if args.tiny else 4)
    args.steps = args.steps or (20 if args.tiny else 50)  # --tiny: under a minute on 2 CPU cores (bf16 is slow there)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for name in args.precisions.split(","):
        rows.append(time_one(args.tiny, dtypes[name.strip()], device, args.batch, size, args.steps,
                             args.guidance_scale, args.omega))
        gc.collect()  # the model of this precision is gone: free its memory before the next is built
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"{name}: {rows[-1]['images_per_s']:.3g} images/s", flush=True)
    by = {r["precision"]: r for r in rows}
    ratios = {}
    if "fp32" in by and "bf16" in by:
        ratios["bf16/fp32 speed-up"] = by["bf16"]["images_per_s"] / by["fp32"]["images_per_s"]
        if by["fp32"]["peak_gpu_gib"]:
            ratios["bf16/fp32 peak memory"] = by["bf16"]["peak_gpu_gib"] / by["fp32"]["peak_gpu_gib"]
    machine = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"\nKandinsky 2.2 DIFFusion ({'tiny' if args.tiny else 'full-size'}, random weights) on {device} "
          f"({machine}, torch {torch.__version__}{', TF32 off' if args.strict_fp32 else ''})\n")
    print(markdown(rows, ratios))
    if args.json:
        args.json.write_text(json.dumps(dict(tiny=args.tiny, device=device, machine=machine, rows=rows,
                                             strict_fp32=args.strict_fp32,
                                             ratios=ratios), indent=1) + "\n")


if __name__ == "__main__":
    main()
