"""Score saved checkpoints of a BBBC021 model with the stop rule's two measures, after the fact.

    python bench/bbbc021_score.py MODEL_DIR CHECKPOINT [CHECKPOINT ...] [--data DATA] [--out SCORES.csv]

bench/bbbc021_train.py scores its model after every sitting; a model trained with plain `phenolens
train` (for instance with the default recipe, which that script does not spell) can be scored here from
its checkpoints instead. Each CHECKPOINT is a checkpoint folder (MODEL_DIR/checkpoints/step-NNNNNNN,
holding ema.safetensors) or a copy of such an ema.safetensors named step-NNNNNNN.safetensors (the
trainer keeps only the last --keep-checkpoints folders, so copy the EMA weights out as training goes).
The EMA weights replace MODEL_DIR's UNet weights (same network: the shadows are saved in the order of
its parameters), and the model is scored like a sitting: held-out loss and sample distance
(bench/bbbc021_train.py). MODEL_DIR's own weights are scored as its `steps_done`. Then the stop rule
is applied to the scores in step order, with each checkpoint as one sitting.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from phenolens.atomic import write_csv_atomic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bbbc021_split import split  # noqa: E402
from bbbc021_train import (CONDITIONS, field_features, heldout_loss, load_images, rule_fires,  # noqa: E402
                           sample_distance)


def step_of(path: Path) -> int:
    m = re.search(r"step-(\d+)", path.name)
    if not m:
        raise SystemExit(f"{path}: cannot tell the step (expected a name step-NNNNNNN)")
    return int(m.group(1))


def load_ema_into(unet: torch.nn.Module, path: Path) -> None:
    """The trainer's EMA shadows (shadow.0 ... in the order of the UNet's parameters) into UNET."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "ema.safetensors" if path.is_dir() else path))
    params = list(unet.parameters())
    if len(tensors) != len(params):
        raise SystemExit(f"{path}: holds {len(tensors)} tensors, the model has {len(params)} parameters")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"shadow.{i}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/bbbc021-cycloheximide"))
    ap.add_argument("--split", type=Path, default=None, help="the split folder (default MODEL_DIR/../<name>_split)")
    ap.add_argument("--out", type=Path, default=None, help="scores CSV (default MODEL_DIR/../<name>_scores.csv)")
    args = ap.parse_args()

    from phenolens.methods.phendiff import PhenDiff

    split_dir = args.split or args.model_dir.parent / f"{args.model_dir.name}_split"
    _, held_csv = split(args.data, split_dir)
    images, conds = load_images(held_csv)
    real = {c: [field_features(im) for im, k in zip(images, conds) if k == c] for c in CONDITIONS}
    model = PhenDiff.from_pretrained(args.model_dir)
    final = {k: v.clone() for k, v in model.unet.state_dict().items()}
    scores = []
    for source in sorted(args.checkpoints, key=step_of):
        load_ema_into(model.unet, source)
        scores.append({"step": step_of(source), "heldout_loss": heldout_loss(model, images, conds),
                       "sample_distance": sample_distance(model, real)})
        print(scores[-1], flush=True)
    model.unet.load_state_dict(final)
    steps_done = int(model.info.training.get("steps_done") or model.info.training["config"]["steps"])
    if steps_done not in {s["step"] for s in scores}:
        scores.append({"step": steps_done, "heldout_loss": heldout_loss(model, images, conds),
                       "sample_distance": sample_distance(model, real)})
        print(scores[-1], flush=True)
    scores.sort(key=lambda r: r["step"])
    out = args.out or args.model_dir.parent / f"{args.model_dir.name}_scores.csv"
    write_csv_atomic(out, scores, list(scores[0]))
    for n in range(1, len(scores) + 1):  # bench/bbbc021_train.py's rule, from --min-steps 3000 on
        if scores[n - 1]["step"] >= 3000 and rule_fires(scores[:n]):
            print(f"the stop rule fires at step {scores[n - 1]['step']}")
            break
    else:
        print("the stop rule does not fire on these scores")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
