"""What every absl command line does with a mistake in its flags or config: a few `error:` lines, exit status 2.

absl parses the flags, and with them ml_collections' `--config=FILE:VARIANT` and `--config.a.b=v` overrides,
before a command's `main` runs, and reports a mistake there badly: a typo'd override key as a 60-line chained
traceback with exit status 1, a config file's ConfigError one character per line. `run(main)` parses the flags
itself and reports each such mistake as `error: ...` (with "did you mean" where a close name exists) and exit
status 2, as the commands do for the config problems their own checks find (`fail`). The argparse commands
(convert, eval_samples) use `ArgumentParser`, which reports its mistakes the same way.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags

from eqvae_jax import storage
from eqvae_jax.typed_config import ConfigError

# Should a command import TensorFlow (the jobs do not; TFDS may, preparing some datasets): no TF C++ INFO lines and
# no oneDNN notice, which TF prints before its log level applies.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# matplotlib (imported by TF's keras, and by the commands that draw) logs "generated new fontManager" at INFO through
# absl's handler on a machine without its font cache, before a command sets the library log levels.
logging.getLogger("matplotlib").setLevel(logging.WARNING)
USAGE_ERROR = 2  # exit status of a mistake in the command line or its config


def fail(problems: Sequence[str] | str) -> NoReturn:
    """Print the problems (`error: ...`, one per line) and exit with status 2."""
    problems = [problems] if isinstance(problems, str) else list(problems)
    if len(problems) == 1:
        print(f"error: {problems[0]}", file=sys.stderr)
    else:
        print("error: invalid config:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(USAGE_ERROR)


def workdir_problem(path: str) -> str | None:
    """Why a command cannot write its workdir `path`, found by creating it and a probe file in it (None: it can).
    Creates a local directory as a side effect; a gs://... workdir is probed with an object written and deleted
    (`storage.remote_problem`: a missing bucket or missing write permission)."""
    if storage.is_url(path):
        return storage.remote_problem(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--workdir={path} is a file, not a directory"
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and os.path.abspath(e.filename) != os.path.abspath(path) else ""
        return f"--workdir={path} is not writable: {e.strerror or e}{where}"
    return None


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with mistakes in the flags and the config reported by `describe`, exit status 2."""
    app.run(main, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """flags.FLAGS(argv); a mistake ends the command with its description (exit 2)."""
    try:
        rest = flags.FLAGS(argv)
        for name in list(flags.FLAGS):  # ml_collections defers a config file's load error to the first read
            if "config_flags" in type(flags.FLAGS[name]).__module__:
                value = getattr(flags.FLAGS, name)
                if hasattr(value, "_ReportError"):  # a load error's stand-in (raises it on any lookup)
                    value._ReportError()
        return rest
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many kinds; all are the user's input
        fail(describe(e, argv))


def describe(error: BaseException, argv: Sequence[str] = ()) -> list[str]:
    """The problems a flag-parsing error stands for, in one line each."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    config_errors = [x for x in chain if isinstance(x, ConfigError)]
    if config_errors:  # the innermost one is the config file's own (ml_collections re-wraps it in a string)
        return config_errors[-1].problems
    if isinstance(chain[-1], KeyError | AttributeError):  # an unknown --config.a.b override
        key = _text(chain[-1]).strip("'\"")
        hints = [m for x in chain if (m := re.search(r"Did you mean \"([\w.]+)\"", _text(x)))]
        flag = _override_flag(argv, key)
        dotted = flag.removeprefix("config.") or key
        hint = f" (did you mean '{dotted.rpartition('.')[0] + '.' if '.' in dotted else ''}{hints[0].group(1)}'?)" \
            if hints else ""
        return [f"unknown config key '{dotted}'{hint}"]
    text = _text(error)
    if isinstance(error, flags.UnrecognizedFlagError) and "Did you mean" in text:
        name, close = re.search(r"flag '([^']+)'", text), re.search(r"Did you mean: ([\w.,\s]+?)\s*\?", text)
        if name and close:
            return [f"unknown flag --{name.group(1)} (did you mean --{close.group(1).split(',')[0].strip()}?)"]
    if isinstance(chain[-1], OSError) and "config" in text.lower():
        return [f"cannot load the config file: {_last_line(chain[-1])}"]
    return [" ".join(_text(x) for x in (error,)).replace("\n", " ")]


def _override_flag(argv: Sequence[str], key: str) -> str:
    """The `config.a.b` name of the `--config.a.b=v` flag whose last part is `key` ('' if none)."""
    names = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    exact = [n for n in names if n.rsplit(".", 1)[-1] == key]
    return exact[0] if exact else (difflib.get_close_matches(key, names, n=1) or [""])[0]


def _text(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' error style: `error: ...` with "did you mean" for an unknown option or an
    invalid choice, exit status 2, no usage dump (`--help` still prints it)."""

    def error(self, message: str) -> NoReturn:
        fail(self._with_hint(message))

    def _with_hint(self, message: str) -> str:
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for action in self._actions for o in action.option_strings]
            named = []
            for arg in unknown.group(1).split():
                close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1) if arg.startswith("-") else []
                named.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
            return f"unknown argument{'s' if len(named) > 1 else ''}: {', '.join(named)}"
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            close = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1)
            if close:
                return f"{message} (did you mean '{close[0]}'?)"
        return message


def non_negative_int(text: str) -> int:
    """argparse type of a count where 0 means "the default": "must be >= 0" for a negative one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: the default), got {value}")
    return value
