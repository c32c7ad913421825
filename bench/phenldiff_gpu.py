"""Phen-LDiff at Stable Diffusion 2 size on one GPU: LoRA fine-tuning steps in bf16, then a 50-step
latent inversion + translation of a batch of 512x512 images. Peak GPU memory and images/s.

    python bench/phenldiff_gpu.py [--train-steps 20] [--batch-size 4] [--n-images 8] [--steps 50]
    python bench/phenldiff_gpu.py --tiny          # the same code path on the tiny pipeline (CPU smoke run)

The UNet and VAE are built from SD-2's published configs (`phenolens.models.latent.sd2_*_config`)
with random weights (nothing is downloaded): speed and memory do not depend on the weights. The text
encoder is not needed: conditions enter as embeddings (random, SD-2's 77 x 1024 shape), as they do
after `phenolens finetune` has encoded the prompts. Training runs through phenolens' own trainer (the
one `phenolens finetune` uses), so its bf16 autocast, EMA and checkpointing are what is measured.
Translation runs in bf16 (autocast) with the default fixed-point inversion (5 iterations per step),
and also reports the latent reconstruction error, which bf16 limits.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


class RandomImages:
    """A training set of random RGB images in [-1, 1], as the trainer's dataset protocol wants."""

    n_channels = 3
    augment = True

    def __init__(self, n: int, size: int, n_conditions: int):
        self.n, self.size, self.k = n, size, n_conditions

    def __len__(self) -> int:
        return self.n

    def batch(self, indices, generator):
        x = torch.rand(len(indices), 3, self.size, self.size, generator=generator) * 2 - 1
        return x, torch.tensor([i % self.k for i in indices])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random pipeline instead of SD-2 size (CPU smoke run)")
    ap.add_argument("--train-steps", type=int, default=20, help="LoRA fine-tuning steps (default 20)")
    ap.add_argument("--batch-size", type=int, default=4, help="training batch (default 4)")
    ap.add_argument("--n-images", type=int, default=8, help="images translated in one batch (default 8)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of inversion and rendering (default 50)")
    ap.add_argument("--iters", type=int, default=5, help="fixed-point iterations per inversion step (default 5)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from phenolens.diffusion.conditions import network_fn
    from phenolens.diffusion.ddim import invert, sample
    from phenolens.methods.phenldiff import ConditionedUNet, latent_loss, vae_decode, vae_encode
    from phenolens.models.adapters import count_parameters, prepare_unet
    from phenolens.models.latent import build_tiny_base, load_base, sd2_unet_config, sd2_vae_config
    from phenolens.train.trainer import TrainConfig, train

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="phenldiff_gpu_"))
    torch.manual_seed(0)
    if args.tiny:
        lb = load_base(build_tiny_base(work / "tiny"), components=("vae", "unet", "scheduler"))
        vae, unet, scheduler, size = lb.vae, lb.unet, lb.scheduler, 32
    else:
        unet = UNet2DConditionModel(**sd2_unet_config())
        vae = AutoencoderKL(**sd2_vae_config())
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="epsilon")
        size = 512
    n_cond = 2
    emb = torch.randn(n_cond + 1, 77, unet.config.cross_attention_dim) * 0.5
    prepare_unet(unet, "lora", rank=args.rank)
    model = ConditionedUNet(unet, emb)
    trainable, total = count_parameters(model)
    vae.to(device).eval()
    sf = float(vae.config.scaling_factor)
    mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"

    # ---- fine-tuning
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=1e-4, warmup_steps=0,
                         checkpoint_every=10 ** 9, keep_checkpoints=1, mixed_precision=mixed, log_every=5)
    t0 = time.perf_counter()
    trained = train(model, scheduler, RandomImages(64, size, n_cond), work / "ft", config, null_label=n_cond,
                    loss_fn=latent_loss(vae, sf), progress=False)
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0  # includes the final checkpoint write
    train_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None

    # ---- inversion + translation
    trained.eval().to(device)
    x = torch.rand(args.n_images, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    src = torch.zeros(args.n_images, dtype=torch.long, device=device)
    tgt = torch.ones_like(src)
    fn = network_fn(trained)
    src_cond = {"encoder_hidden_states": trained.context(src)}
    tgt_cond = {"encoder_hidden_states": trained.context(tgt)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=mixed == "bf16"):
        z0 = vae_encode(vae, x.to(device), sf)
        zT = invert(fn, z0, src_cond, scheduler, steps=args.steps, iters=args.iters).x
        z_rec = sample(fn, zT, src_cond, scheduler, steps=args.steps)
        z_tr = sample(fn, zT, tgt_cond, scheduler, steps=args.steps)
        out = vae_decode(vae, z_tr, sf, 3)
    if cuda:
        torch.cuda.synchronize()
    translate_s = time.perf_counter() - t0
    infer_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    rec_mse = (z_rec.float() - z0.float()).pow(2).mean().item()
    chg_mse = (z_tr.float() - z0.float()).pow(2).mean().item()

    figures = dict(
        machine=torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        torch=torch.__version__, model="tiny" if args.tiny else "SD-2 UNet + VAE (random weights)",
        image_size=size, mixed_precision=mixed, lora_rank=args.rank, trainable_parameters=trainable,
        total_parameters=total, train_steps=args.train_steps, train_batch=args.batch_size,
        train_seconds=round(train_s, 2), train_images_per_s=round(args.train_steps * args.batch_size / train_s, 3),
        train_peak_gib=None if train_peak is None else round(train_peak, 2), n_images=args.n_images, ddim_steps=args.steps,
        inversion_iters=args.iters, translate_seconds=round(translate_s, 2),
        translate_images_per_s=round(args.n_images / translate_s, 4), translate_peak_gib=None if infer_peak is None else round(infer_peak, 2),
        latent_recon_mse=rec_mse, latent_change_mse=chg_mse, output_shape=list(out.shape),
    )
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
