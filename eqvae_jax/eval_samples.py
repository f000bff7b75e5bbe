"""Evaluate generated samples exactly like ADM's evaluator: FID, sFID, Inception Score, precision, recall.

    python -m eqvae_jax.eval_samples --samples S.npz --ref R.npz --inception DIR [--out results.json]
        [--batch_size N] [--cache_dir D | --no_cache] [--write_ref OUT.npz]
    python -m eqvae_jax.eval_samples --ref R.npz --inception DIR --write_ref OUT.npz   # reference statistics only

S and R are ADM batches (`arr_0`: uint8 (N, H, W, 3); `python -m eqvae_jax.sample` writes them). R is the
*reference* (ADM's first positional argument, e.g. VIRTUAL_imagenet256_labeled.npz); its precomputed
mu/sigma/mu_s/sigma_s are used for FID/sFID when present, its images for precision/recall. IS is computed on
S; precision = fraction of S inside R's manifold, recall = fraction of R inside S's manifold. DIR is the
Inception from `python -m eqvae_jax.convert --kind inception`.

Features are extracted on every device (the batch sharded over a ('data', 'fsdp') mesh; on a multi-host TPU
slice run the same command on every host) and cached beside each input (or in --cache_dir). Prints a table and
writes --out as JSON with the keys fid, sfid, inception_score, precision, recall (null when undefined).
`--write_ref OUT.npz` writes R's images with the statistics of their features, ADM's reference layout.
A bad input or option exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no TF/XLA C++ chatter

import numpy as np  # noqa: E402

from eqvae_jax import cli, storage  # noqa: E402
from eqvae_jax.eval import adm_metrics as adm  # noqa: E402

METRICS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
           ("recall", "Recall"))


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m eqvae_jax.eval_samples", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", help="generated batch (ADM .npz, arr_0 uint8 NHWC)")
    p.add_argument("--ref", required=True, help="reference batch (ADM .npz; mu/sigma/mu_s/sigma_s used if present)")
    p.add_argument("--inception", required=True, help="Inception weights dir (python -m eqvae_jax.convert)")
    p.add_argument("--out", help="write the five numbers as JSON here")
    p.add_argument("--batch_size", type=cli.non_negative_int, default=0, help="global batch (default 32 per device)")
    p.add_argument("--cache_dir", help="feature cache directory (default: beside each input)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write feature caches")
    p.add_argument("--write_ref", help="write R's images + the statistics of their features to this .npz")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="force/prevent jax.distributed.initialize() (default: when JAX detects several processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def format_table(results: dict[str, float]) -> str:
    return "\n".join(f"  {label:<16}{results[key]:>12.4f}" for key, label in METRICS)


def run(args: argparse.Namespace) -> dict[str, float] | None:
    """Extract, evaluate, print and write; returns the results (None for --write_ref only). gs:// inputs are
    read from a local copy (the npz readers open local files; their feature caches then never match)."""
    with contextlib.ExitStack() as stack:
        local = argparse.Namespace(**vars(args))
        for name in ("ref", "samples"):
            if getattr(args, name):
                setattr(local, name, stack.enter_context(storage.local_copy(getattr(args, name))))
        return _run(local)


def _run(args: argparse.Namespace) -> dict[str, float] | None:
    import jax

    from eqvae_jax.eval import inception
    from eqvae_jax.eval.features import InceptionExtractor
    from eqvae_jax.models.weights import KeyMismatchError

    if args.samples is None and args.write_ref is None:
        raise adm.BadInputError("--samples is required (unless only --write_ref is asked for).")
    ref_images = adm.NpzImages(args.ref)  # validate both inputs before the network is loaded
    sample_images = adm.NpzImages(args.samples) if args.samples else None
    ref_stats = adm.read_statistics(args.ref)
    sample_stats = adm.read_statistics(args.samples) if args.samples else None
    try:
        net = inception.load(args.inception)
    except (FileNotFoundError, ValueError, KeyMismatchError) as e:
        raise adm.BadInputError(f"--inception {args.inception}: {_one_line(e)}") from e
    cfg = net.config
    for flag, stats in (("--ref", ref_stats), ("--samples", sample_stats)):
        if stats is not None and (len(stats[0].mu), len(stats[1].mu)) != (cfg.pool_features, cfg.spatial_features):
            raise adm.BadInputError(
                f"{flag} carries statistics of {len(stats[0].mu)}/{len(stats[1].mu)}-dimensional features (mu/mu_s), "
                f"but this Inception gives {cfg.pool_features}/{cfg.spatial_features}.")
    try:
        extractor = InceptionExtractor(net, batch_size=args.batch_size or None)
    except ValueError as e:
        raise adm.BadInputError(f"--batch_size: {e}") from e
    main_process = jax.process_index() == 0
    cache = {"cache_dir": args.cache_dir, "use_cache": not args.no_cache, "progress": not args.quiet}
    ref = extractor.from_npz(ref_images.path, **cache)
    if args.write_ref and main_process:
        own = ref.statistics()
        adm.write_batch(args.write_ref, np.concatenate(list(ref_images.batches(4096))), own)
        print(f"wrote {args.write_ref}: {len(ref)} images + mu/sigma ({own[0].mu.shape[0]}), mu_s/sigma_s "
              f"({own[1].mu.shape[0]})")
    if sample_images is None:
        return None
    sample = extractor.from_npz(sample_images.path, **cache)
    results = adm.evaluate(ref, sample, ref_stats=ref_stats, sample_stats=sample_stats)
    if main_process:
        note = ", precomputed mu/sigma" if ref_stats is not None else ""
        print(f"samples {sample_images.path} ({len(sample)} images) vs reference {ref_images.path} "
              f"({len(ref)} images{note})")
        print(format_table(results))
        if args.out:
            payload = {key: (results[key] if math.isfinite(results[key]) else None) for key, _ in METRICS}
            storage.write_atomic(args.out, json.dumps(payload, indent=2).encode())  # local or gs://
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax  # deferred: after the log levels are set

    from eqvae_jax.parallel.coordination import failures_shared
    from eqvae_jax.parallel.distributed import maybe_initialize

    maybe_initialize(args.distributed)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", adm.EvaluationWarning)
        handled = (adm.BadInputError, FileNotFoundError)
        try:
            with failures_shared(handled):
                run(args)
        except handled as e:
            error = _one_line(e)
    for w in caught:
        if not issubclass(w.category, adm.EvaluationWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif jax.process_index() == 0:
            print(f"warning: {w.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
