"""bench/recipe.py names the recipe `phenolens train` uses by default: the README's table row of the
defaults (`eps-b32-cos1e-3`) must stay what `phenolens train` does, or be measured again."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "recipe.py"


def _load_bench():
    sys.path.insert(0, str(BENCH.parent))  # it imports edit_strength beside it
    spec = importlib.util.spec_from_file_location("bench_recipe", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_the_default_candidate_is_the_measured_recipe_and_the_train_command():
    bench = _load_bench()
    default = bench.recipe_of("default")
    assert default == bench.recipe_of("eps-b32-cos1e-3")
    # the command line the bench records is what a user types for it, and it parses to the same config
    line = bench.command_line(default, 3000)
    assert "--lr-schedule cosine" in line and "--prediction-type epsilon" in line and "--batch-size 32" in line
    from phenolens.cli import build_parser, _train_config
    from phenolens.train.recipe import RECIPE_LR

    args = build_parser().parse_args(["train", "D", "M"])
    config = _train_config(args, lr=RECIPE_LR[args.preset])
    assert (config.steps, config.batch_size, config.lr, config.lr_schedule, config.cond_dropout) == \
        (3000, default["batch"], default["lr"], default["lr_schedule"], default["dropout"])
