"""The ``llmflash`` command line: a thin layer over the Python API.

Each command lives in the module that owns its concept and registers itself here through ``register(subparsers)``;
the handler takes the parsed arguments and returns an exit code. User errors end with one line on stderr and a
non-zero exit, never a traceback: ``LLMFlashError`` and bad arguments exit 2 (argparse's usage block is left out:
``--help`` has it), Ctrl-C exits 130 (also while the first imports run). Every default is shown in ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Any, NoReturn, Optional

from .errors import LLMFlashError

# Modules that add subcommands, in help order. A module that is missing (work in progress) is skipped.
COMMAND_MODULES = (
    "llmflash.commands",  # convert, generate, eval-ppl, demo
    "research.profile_io",  # profile-io
    "predictors.cli",  # collect, train-predictors, eval-predictors
    "research.reproduce",  # reproduce
)


class _ShowDefaults:
    """Formatter mixin: appends ``(default: X)`` to an option's help unless it has no default (None, False, empty)
    or its help already states it."""

    @staticmethod
    def _has_default(action: argparse.Action) -> bool:
        d = action.default
        return bool(action.option_strings) and d is not None and d is not False and d != "" and d is not argparse.SUPPRESS

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._has_default(action):  # argparse leaves out the help line of an option without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)  # type: ignore[misc]

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        help = action.help or ""
        if not self._has_default(action) or "default" in help.lower():
            return help
        return f"{help} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse`` with every default in ``--help`` (for subcommands too) and one-line errors."""

    def __init__(self, *args, **kwargs) -> None:
        base = kwargs.get("formatter_class", argparse.HelpFormatter)
        if not issubclass(base, _ShowDefaults):
            kwargs["formatter_class"] = type(f"ShowDefaults{base.__name__}", (_ShowDefaults, base), {})
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmflash", description="Run LLMs larger than DRAM from flash (LLM in a flash).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)  # subparsers are ``Parser``s too
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def _close_progress_bars() -> None:
    """End open tqdm bars (each with its newline) so that a message after them starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot draw any more: nothing to end
            pass


def _command(argv: list[str]) -> str:
    """``llmflash COMMAND`` from the raw arguments (before they are parsed), for messages."""
    words = [a for a in argv if not a.startswith("-")]
    return f"llmflash {words[0]}" if words else "llmflash"


class _Interrupts:
    """Ctrl-C as usual (``KeyboardInterrupt``), remembered: one that lands inside a C extension's import can surface
    as another error (numpy: "cannot load module more than once"), which is then reported as the interrupt it was, or
    be swallowed by a dependency's import, which ``check`` raises again once the imports are done."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    with _Interrupts() as interrupts:
        try:
            parser = build_parser()
            interrupts.check()
            args = parser.parse_args(argv)
            command = f"llmflash {args.command}"
            _setup_logging(args.verbose)
            return int(args.func(args) or 0)
        except LLMFlashError as err:
            _close_progress_bars()
            print(f"{command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            _close_progress_bars()
            print(f"{command}: interrupted", file=sys.stderr)
            return 130
        except Exception:
            if not interrupts.seen:
                raise
            _close_progress_bars()
            print(f"{command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
