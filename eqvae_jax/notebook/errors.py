"""Errors a notebook user can cause (a wrong hub id, a file that is not an image, a failed job), and
`report_errors`, which shows them, and the package's other input errors, as one clear line instead of a trace."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class NotebookError(Exception):
    """An error whose message is the whole story: IPython shows the message without a traceback."""

    def _render_traceback_(self) -> list[str]:  # IPython's hook for custom exception display
        return [f"error: {self}"]


class HubError(NotebookError, ValueError):
    """A download from the Hugging Face hub or a URL failed, or the repository is not what was asked for."""


class NotAVAEError(HubError):
    """A hub repository (or directory) that holds something other than a diffusers AutoencoderKL."""


class NotAnImageError(NotebookError, ValueError):
    """Files that no image decoder can read (named in the message)."""


class JobFailed(NotebookError, RuntimeError):
    """A training job's process exited with an error; the message ends with its last log lines."""


# What bad input raises in the package: conversions, loads and config checks (ValueError, including
# KeyMismatchError and ConfigError; FileNotFoundError, FileExistsError), downloads and jobs (NotebookError).
EXPECTED = (NotebookError, ValueError, FileNotFoundError, FileExistsError)


@contextlib.contextmanager
def report_errors(stop: bool = True) -> Iterator[None]:
    """Show an expected error as `error: <message>` (no traceback). `stop=True` then ends the cell with a
    `NotebookError` (IPython prints only the message; "Run all" stops there); `stop=False` carries on, for cells
    that demonstrate bad input. Anything else (a bug) propagates with its traceback."""
    try:
        yield
    except EXPECTED as e:
        message = str(e) if isinstance(e, NotebookError) else f"{type(e).__name__}: {e}"
        if stop:
            raise NotebookError(message) from None
        print(f"error: {message}", file=sys.stdout)
