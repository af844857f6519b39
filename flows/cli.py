"""The `aced` command line: one face over storage, pipeline and flows.

Each area registers its own subcommands (`flows/cmd_*.py`, function `add_commands(subparsers)`),
so this file stays a short list instead of one argparse file that grows without end.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

# Areas in the order they appear in `aced --help`. A module that is missing is an error, not a skip.
_AREAS = ("flows.cmd_data", "flows.cmd_model", "flows.cmd_eval", "flows.cmd_train", "flows.cmd_flows")


def default_root() -> Path:
    """Workspace folder: $ACED_ROOT, else ./aced-work (see docs/interfaces.md)."""
    return Path(os.environ.get("ACED_ROOT", "aced-work"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aced", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="workspace folder (default: $ACED_ROOT or ./aced-work)")
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
    from storage.workspace import LockedError

    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, LockedError) as e:
        # Bad input, a missing/busy file, a refused overwrite: one line naming it (the traceback with -v).
        if args.verbose:
            raise
        print(f"aced {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
