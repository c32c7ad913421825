"""Which class loads a model folder: the method name in its `phenolens.json`, looked up here.

Adding a method is one module plus one line in `METHODS` (or a call to `register` from outside the
package, e.g. a plug-in or a test). No method's module and no base class needs to know the others,
so the base (`methods.core`) never imports a method.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from phenolens.errors import PhenolensError
from phenolens.models.store import INFO_FILE, load_info

if TYPE_CHECKING:
    from phenolens.methods.core import CounterfactualModel

Loader = Callable[..., "CounterfactualModel"]

# method name (as phenolens.json records it) -> "module:Class" whose from_pretrained(model_dir, device=) loads it
METHODS: dict[str, Union[str, Loader]] = {
    "phendiff": "phenolens.methods.phendiff:PhenDiff",
    "phenldiff": "phenolens.methods.phenldiff:PhenLDiff",
    "diffex": "phenolens.methods.diffex:DiffEx",
    "diffusion": "phenolens.methods.diffusion_embedding:DIFFusion",
    "kandinsky": "phenolens.methods.kandinsky:Kandinsky",
}


def register(name: str, loader: Union[str, Loader]) -> None:
    """Make `load_model_for` load folders whose phenolens.json says `method: NAME` with LOADER: a
    "module:Class" string (imported on first use) or a callable `(model_dir, device=None) -> model`."""
    METHODS[name] = loader


def _resolve(loader: Union[str, Loader]) -> Loader:
    if callable(loader):
        return loader
    module, _, attr = loader.partition(":")
    return getattr(importlib.import_module(module), attr).from_pretrained


def load_model_for(model_dir: str | Path, device: str | None = None) -> "CounterfactualModel":
    """Whichever method made MODEL_DIR (its phenolens.json says), loaded for translation."""
    method = load_info(Path(model_dir)).method
    if method not in METHODS:
        raise PhenolensError(f"{Path(model_dir) / INFO_FILE}: method {method!r} is not one this phenolens knows "
                             f"({', '.join(sorted(METHODS))})")
    return _resolve(METHODS[method])(model_dir, device=device)
