"""Command line: python -m eqvae_jax.convert --kind KIND --src SRC --dst DST [--to T] [--extra K=V] [--overwrite].

Each kind lives in its own module `eqvae_jax.convert.<kind>` exposing `TARGETS` (the accepted `--to` values,
"flax" first), `OPTIONS` (the accepted `--extra` names) and `convert(src, dst, to, overwrite, **options) -> str`
(a one-line summary). Shared checks are in `eqvae_jax.convert.options`. SRC and DST may be gs://...: a remote
SRC is copied to a local temporary directory first, a remote DST is built locally and uploaded with its commit
markers last (`eqvae_jax.storage`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from eqvae_jax import cli, storage

KINDS = {
    "kl_vae": "eqvae_jax.convert.kl_vae",
    "vq_vae": "eqvae_jax.convert.vq_vae",
    "lpips": "eqvae_jax.convert.lpips",
    "discriminator": "eqvae_jax.convert.discriminator",
    "dit": "eqvae_jax.convert.dit",
    "dinov2": "eqvae_jax.convert.dinov2",
    "maskgit": "eqvae_jax.convert.maskgit",
    "inception": "eqvae_jax.convert.inception",
}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m eqvae_jax.convert", description=__doc__)
    p.add_argument("--kind", required=True, choices=sorted(KINDS))
    p.add_argument("--src", required=True, help="source weights (file or directory)")
    p.add_argument("--dst", required=True, help="output path; written atomically")
    p.add_argument("--to", default="flax", help="target format: flax (default) or a PyTorch layout of the kind")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="kind-specific option (e.g. lin=PATH for lpips)")
    return p


def main(argv: list[str] | None = None) -> int:
    from eqvae_jax.convert.options import UsageError, split_extra

    args = build_parser().parse_args(argv)
    if storage.is_url(args.dst) and (problem := storage.remote_problem(args.dst, "--dst")):
        print(f"error: {problem}", file=sys.stderr)  # before any weights are read
        return 2
    module = importlib.import_module(KINDS[args.kind])
    try:
        options = split_extra(args.extra)
        with storage.local_copy(args.src) as src:  # the readers of every format open local files
            summary = module.convert(src, args.dst, to=args.to, overwrite=args.overwrite, **options)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
