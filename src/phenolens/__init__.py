"""phenolens: see the same cells under another condition with diffusion models."""

__version__ = "0.1.0"

from phenolens.errors import PhenolensError

__all__ = ["PhenolensError", "__version__"]
