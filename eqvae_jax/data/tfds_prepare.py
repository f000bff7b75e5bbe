"""Preparing a TFDS dataset when other processes may be preparing the same one into the same data_dir.

TFDS builds a dataset in a private `incomplete.XXXXXX_<version>` directory and renames it to `<version>` when
done. When two processes prepare at once, the second rename fails (`OSError: [Errno 39] Directory not empty`,
or `FileExistsError`), although a complete copy is in place. `download_and_prepare` counts that as success
(TFDS removes the loser's private copy itself); any other failure, or a rename failure without a complete
dataset in place, is raised.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow_datasets as tfds

from eqvae_jax import storage

log = logging.getLogger(__name__)


def download_and_prepare(make_builder: Callable[[str], tfds.core.DatasetBuilder], data_dir: str, **kwargs: Any
                         ) -> tfds.core.DatasetBuilder:
    """`make_builder(data_dir).download_and_prepare(**kwargs)` unless already prepared; a prepared builder.

    `make_builder` is called again after a lost race: a builder reads its dataset info at construction. An
    object-store data_dir (gs://...) is prepared in a local staging directory and uploaded (`_prepare_remote`).
    """
    with _quiet_tfds():
        builder = make_builder(data_dir)
        if builder.is_prepared():
            return builder
        if storage.is_url(data_dir):
            return _prepare_remote(make_builder, data_dir, **kwargs)
        try:
            builder.download_and_prepare(**kwargs)
        except OSError as e:
            again = make_builder(data_dir)
            if not again.is_prepared():
                raise
            log.info("%s: another process finished preparing it first (%s); using that copy", again.data_dir, e)
            return again
    _remove_empty_tree(os.path.join(os.fspath(builder.data_dir).split(f"/{builder.name}/")[0], "downloads"))
    log.info("data: prepared %s in %s", builder.name, builder.data_dir)
    return builder


def _prepare_remote(make_builder: Callable[[str], tfds.core.DatasetBuilder], data_dir: str, **kwargs: Any
                    ) -> tfds.core.DatasetBuilder:
    """Prepare into a local directory, then upload the dataset's version directory to `data_dir` (gs://...):
    TFDS writes ArrayRecord shards with ArrayRecord's writer, which opens local files only. The upload puts
    dataset_info.json and features.json last (`storage.publish_tree`), and TFDS counts a version directory as
    prepared only when both exist, so a reader never takes a half-uploaded copy for a dataset, and what an
    interrupted upload left behind is replaced. Needs local disk space for the whole dataset."""
    with tempfile.TemporaryDirectory(prefix="eqvae_tfds_stage_") as stage:
        local = make_builder(stage)
        local.download_and_prepare(**kwargs)
        version_dir = os.fspath(local.data_dir)
        remote = f"{data_dir.rstrip('/')}/{os.path.relpath(version_dir, stage)}"
        if make_builder(data_dir).is_prepared():  # another process finished first
            log.info("%s: another process finished preparing it first; using that copy", remote)
        else:
            storage.publish_tree(version_dir, remote, overwrite=True)  # over an interrupted upload's leftovers
    builder = make_builder(data_dir)
    log.info("data: prepared %s in %s", builder.name, builder.data_dir)
    return builder


class _NoDatasetInfoWarning(logging.Filter):
    """TFDS warns 'Variant folder ... has no dataset_info.json' about the folder it is about to fill."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS's own progress on stdout ('Downloading and preparing dataset Unknown size ...', 'Dataset ...
    downloaded and prepared to ...') and its warning about the folder it is preparing are left out; our one
    line says what was prepared where. Temporary files go to a private directory removed afterwards: a builder
    of a dataset not prepared yet leaves an empty `tmpXXXXtfds` directory behind in $TMPDIR
    (`DatasetInfo.initialize_from_bucket`, TFDS 4.9.10)."""
    absl_logger, no_info = logging.getLogger("absl"), _NoDatasetInfoWarning()
    absl_logger.addFilter(no_info)
    previous, private = tempfile.tempdir, tempfile.mkdtemp(prefix="eqvae_jax_tfds_")
    tempfile.tempdir = private
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(private, ignore_errors=True)
        absl_logger.removeFilter(no_info)


def _remove_empty_tree(path: str) -> None:
    """Remove `path` if it holds nothing but empty directories (TFDS leaves `downloads/extracted` behind)."""
    if not os.path.isdir(path) or any(files for _, _, files in os.walk(path)):
        return
    for root, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
        os.rmdir(root)
