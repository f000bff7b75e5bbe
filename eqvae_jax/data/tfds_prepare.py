"""Preparing a TFDS dataset when other processes may be preparing the same one into the same data_dir.

TFDS builds a dataset in a private `incomplete.XXXXXX_<version>` directory and renames it to `<version>` when
done. When two processes prepare at once, the second rename fails (`OSError: [Errno 39] Directory not empty`,
or `FileExistsError`), although a complete copy is in place. `download_and_prepare` counts that as success
(TFDS removes the loser's private copy itself); any other failure, or a rename failure without a complete
dataset in place, is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)


def download_and_prepare(make_builder: Callable[[], tfds.core.DatasetBuilder], **kwargs: Any
                         ) -> tfds.core.DatasetBuilder:
    """`make_builder().download_and_prepare(**kwargs)` unless already prepared; a prepared builder.

    `make_builder` is called again after a lost race: a builder reads its dataset info at construction.
    """
    builder = make_builder()
    if builder.is_prepared():
        return builder
    try:
        builder.download_and_prepare(**kwargs)
    except OSError as e:
        again = make_builder()
        if not again.is_prepared():
            raise
        log.info("%s: another process finished preparing it first (%s); using that copy", again.data_dir, e)
        return again
    return builder
