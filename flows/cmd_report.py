"""`aced report`: one self-contained HTML page of what the curation of one or more runs did.

Thin layer over `pipeline.html_report` (evaluation side by side, noisy-fraction curves, score
distributions of the selected vs all candidates, thumbnails of the highest- and lowest-scored candidates).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flows.cli import positive_int

MAX_NAME = 120  # characters of a default file name made of run names


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="HTML page of runs: what the curation selected, noise curves, evaluation side by side",
        description="Writes one self-contained HTML file (images and plots inline, nothing fetched) for RUN... "
                    "(names below <root>/runs or run folders). Default output: <run folder>/report.html for one "
                    "run, <root>/report-<run>+<run>....html for several.")
    p.add_argument("runs", metavar="RUN", nargs="+")
    p.add_argument("--out", type=Path, default=None, help="the HTML file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--steps", type=positive_int, default=3,
                   help="logged steps whose highest/lowest-scored candidates are shown (default 3, evenly spaced)")
    p.add_argument("--per-step", dest="per_step", type=positive_int, default=6,
                   help="candidates shown per step and end (default 6)")
    p.set_defaults(func=_cmd_report)


def default_output(root: Path, run_dirs: list[Path]) -> Path:
    """<run>/report.html for one run; <root>/report-<a>+<b>.html for several (shortened when long)."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "report.html"
    names = [d.name for d in run_dirs]
    stem = "+".join(names)
    if len(stem) > MAX_NAME:
        stem = f"{names[0][:MAX_NAME // 2]}-and-{len(names) - 1}-more"
    return Path(root) / f"report-{stem}.html"


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.html_report import write_html_report
    from storage.workspace import Workspace

    ws = Workspace(args.root)
    run_dirs = [ws._resolve(r, ws.run, lambda p: (p / "config.json").is_file(), "run",
                            ("holds a config.json", "holds no config.json")) for r in args.runs]
    if len(set(map(Path.resolve, run_dirs))) < len(run_dirs):
        raise ValueError(f"a run is given twice: {' '.join(args.runs)}")
    out = args.out if args.out is not None else default_output(ws.root, run_dirs)
    write_html_report(run_dirs, out, overwrite=args.overwrite, steps=args.steps, per_step=args.per_step)
    print(f"wrote {out} ({Path(out).resolve().as_uri()})")
    return 0
