"""Command line: ``eym <command> ...`` (also ``python -m eym``).

A thin layer over the library: each command fills the same config dataclasses and calls the
same functions as the Gradio app. Errors a user can fix (:class:`eym.EymError`) print as one
line, ``error: ...``, with exit code 2; nothing else is caught.

Each command has one section below: ``_add_<name>(sub)`` declares its arguments and
``_run_<name>(args) -> int`` runs it. Library imports happen inside ``_run_*`` so that
``eym --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from eym.errors import EymError

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def _command(name: str, help: str):
    """Register ``_add_<name>``/``_run_<name>`` pairs in declaration order."""

    def register(add: Callable[[argparse.ArgumentParser], None]):
        _COMMANDS[name] = (add, None, help)  # type: ignore[assignment]
        return add

    return register


def _runner(name: str):
    def register(run: Callable[[argparse.Namespace], int]):
        add, _, help = _COMMANDS[name]
        _COMMANDS[name] = (add, run, help)
        return run

    return register


# ---------------------------------------------------------------------------------------------
# tiny: build the tiny random-weight bundle (issue 2, models)
# ---------------------------------------------------------------------------------------------
@_command("tiny", "build the tiny random-weight SD-1.5-shaped bundle (tests, offline demo)")
def _add_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write the bundle to (hub layout)")
    p.add_argument("--seed", type=int, default=0)


@_runner("tiny")
def _run_tiny(args: argparse.Namespace) -> int:
    from eym.models import build_tiny_bundle

    path = build_tiny_bundle(args.out, seed=args.seed)
    logging.getLogger("eym").info("tiny bundle written to %s", path)
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------
# (further commands are added below, one section each)
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eym", description="Edit-Your-Motion: one-shot video motion editing")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _run, help) in _COMMANDS.items():
        add(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _add, run, _help = _COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except EymError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
