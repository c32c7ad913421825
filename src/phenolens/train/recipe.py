"""The training recipe `phenolens train` uses by default, chosen by measurement.

`bench/recipe.py` (README "Training recipe") trained candidates at equal compute on the simulator's
five planted phenotypes, the punctate one included, against the diffusers examples' plain loop. At
3000 steps of 32 crops, ε-prediction with a peak learning rate of 1e-3 annealed to 0 by a cosine
schedule (plus phenolens' EMA, flips/rotations and condition dropout 0.1) showed the planted effects
closer to their real size than the plain loop (at guidance 2) while keeping more of the source nuclei.
The higher, annealed rate is what let the tiny network learn 1-2 px spots at all. The rate was
measured on the `tiny` preset only; the larger presets keep 2e-4, their rate before (unmeasured here).

No torch here: the command line reads these numbers to print its defaults.
"""
from __future__ import annotations

RECIPE_STEPS = 3000
RECIPE_BATCH_SIZE = 32
RECIPE_LR_SCHEDULE = "cosine"
RECIPE_PREDICTION_TYPE = "epsilon"  # models trained before the recipe: v_prediction
RECIPE_LR = {"tiny": 1e-3, "small": 2e-4, "paper": 2e-4}

