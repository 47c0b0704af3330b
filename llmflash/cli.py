"""The ``llmflash`` command line: a thin layer over the Python API.

Each command lives in the module that owns its concept and registers itself here through ``register(subparsers)``;
the handler takes the parsed arguments and returns an exit code. User errors (``LLMFlashError``) end with one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import LLMFlashError

# Modules that add subcommands, in help order. A module that is missing (work in progress) is skipped.
COMMAND_MODULES = (
    "llmflash.commands",  # convert, generate, eval-ppl, demo
    "research.profile_io",  # profile-io
    "llmflash.relufy",  # relufy
    "predictors.cli",  # collect, train-predictors, eval-predictors
    "research.reproduce",  # reproduce
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmflash", description="Run LLMs larger than DRAM from flash (LLM in a flash).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        return int(args.func(args) or 0)
    except LLMFlashError as err:
        print(f"llmflash {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmflash {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
