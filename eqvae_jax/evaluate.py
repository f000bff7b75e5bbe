"""Former name of `python -m eqvae_jax.eval_samples` (ADM-evaluator metrics of generated samples), kept for one
release so existing commands keep working; it runs the same CLI with the same arguments and exit status."""

from __future__ import annotations

import sys

from eqvae_jax.eval_samples import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
