"""The `aced` command line: one face over storage, pipeline and flows.

Each area registers its own subcommands (`flows/cmd_*.py`, function `add_commands(subparsers)`),
so this file stays a short list instead of one argparse file that grows without end.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
from pathlib import Path

from storage import fs

# Areas in the order they appear in `aced --help`. A module that is missing is an error, not a skip.
_AREAS = ("flows.cmd_data", "flows.cmd_model", "flows.cmd_eval", "flows.cmd_train", "flows.cmd_flows",
          "flows.cmd_report")


def expected_errors() -> tuple[type[BaseException], ...]:
    """What `main` reports as one line without a traceback: bad input, a missing or busy file, a refused
    overwrite (ShardError, CacheError and the other named input errors are ValueErrors)."""
    from storage.workspace import LockedError

    return (ValueError, OSError, LockedError)


def _bounded(kind: type, low: float, inclusive: bool):
    """An argparse `type=` for numbers of `kind` >= low (> low unless inclusive): `--actors 0` is refused
    while parsing, with the option named, not after minutes of Prefect and Ray start-up."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} {'>=' if inclusive else '>'} {low:g}"
    return parse


positive_int = _bounded(int, 1, inclusive=True)
"""argparse type: an integer >= 1."""
positive_float = _bounded(float, 0, inclusive=False)
"""argparse type: a finite number > 0."""


def default_root() -> Path:
    """Workspace folder: $ACED_ROOT, else ./aced-work (see docs/interfaces.md)."""
    return fs.as_path(os.environ.get("ACED_ROOT", "aced-work"))


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (`aced cache: error: argument --actors: must be >= 1, got 0`,
    exit code 2 as argparse's) instead of the whole usage block before it; -h still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aced", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=fs.as_path, default=None,
                        help="workspace folder or object-store URL s3://bucket/prefix (default: $ACED_ROOT or ./aced-work)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _AREAS:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = default_root()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    expected = expected_errors()
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except expected as e:
        # Bad input, a missing/busy file, a refused overwrite: one line naming it (the traceback with -v).
        if args.verbose:
            raise
        print(f"aced {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
