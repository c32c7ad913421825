"""`python -m phenolens` (and `accelerate launch -m phenolens ...`) run the CLI."""

import sys

from phenolens.cli import main

sys.exit(main())
