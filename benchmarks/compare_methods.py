"""Compare two methods tables (benchmarks/methods.py results) and append the comparison to the newer one's .md.

Used for issue 10: the methods table re-run with the cheaper scoring forward must keep its order and its
values within noise of the table before it. For each method and metric: mean ± std over seeds before and
after, the difference, and whether it is within noise: |difference| <= 2 standard errors of a difference
of two means (sqrt(s_a^2 / n_a + s_b^2 / n_b); a single run (the reference) has no spread, so only equality
passes there). The
order is the methods ranked by each metric's mean (ties kept in table order); a swap between two methods
whose difference is itself within noise is reported as such, not as a changed order.

Run:  python benchmarks/compare_methods.py --before benchmarks/results/methods-before-issue10.json \\
          --after benchmarks/results/methods.json     (appends to benchmarks/results/methods.md)
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import json
import math
import statistics
from pathlib import Path

from storage.atomic import atomic_write_bytes

SECTION = "## Against the table before issue 10's scoring changes"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="methods .json of the earlier table")
    p.add_argument("--after", type=Path, required=True, help="methods .json of the new table (its .md gets the section)")
    return p.parse_args(argv)


def stats(row: dict, key: str) -> tuple[float, float, int] | None:
    """(mean, std, n) of a metric over the seeds of one method row, or None when no seed has it."""
    vals = [s[key] for s in row["seeds"].values() if s.get(key) is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def within_noise(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    return abs(b[0] - a[0]) <= 2 * se + 1e-12


def order(rows: dict, key: str) -> list[str]:
    have = [m for m in rows if stats(rows[m], key) is not None]
    return sorted(have, key=lambda m: -stats(rows[m], key)[0])


def compare(before: dict, after: dict) -> str:
    rb, ra = before["rows"], after["rows"]
    methods = [m for m in ra if m in rb]
    keys = sorted({k for r in ra.values() for s in r["seeds"].values() for k in s if k != "train_seconds"})
    lines = ["| method | metric | before (seeds) | after (seeds) | after - before | within noise |",
             "|---|---|---|---|---|---|"]
    outside = []
    for m in methods:
        for k in keys:
            a, b = stats(rb[m], k), stats(ra[m], k)
            if a is None or b is None:
                continue
            ok = within_noise(a, b)
            if not ok:
                outside.append(f"{m} {k}")
            lines.append(f"| {m} | {k} | {100 * a[0]:.2f} ± {100 * a[1]:.2f} ({a[2]}) | {100 * b[0]:.2f} ± "
                         f"{100 * b[1]:.2f} ({b[2]}) | {100 * (b[0] - a[0]):+.2f} | {'yes' if ok else 'NO'} |")
    text = [SECTION, "", f"Before: {before.get('commit', '?')} ({before.get('date', '?')}); after: "
            f"{after.get('commit', '?')} ({after.get('date', '?')}). Values in %, mean ± std over the seeds "
            "(n); within noise: |after - before| <= 2 standard errors of the difference.", "",
            "\n".join(lines), ""]
    order_lines = []
    for k in keys:
        students = [m for m in methods if m != "reference"]
        ob = [m for m in order({m: rb[m] for m in students}, k)]
        oa = [m for m in order({m: ra[m] for m in students}, k)]
        common = [m for m in ob if m in oa]
        ob, oa = [m for m in ob if m in common], [m for m in oa if m in common]
        if not common:  # a metric only one table has
            continue
        if ob == oa:
            order_lines.append(f"- {k}: same order ({' > '.join(oa)})")
            continue
        swaps = [(x, y) for i, x in enumerate(ob) for y in ob[i + 1:] if oa.index(x) > oa.index(y)]
        noisy = all(within_noise(stats(ra[x], k), stats(ra[y], k)) and within_noise(stats(rb[x], k), stats(rb[y], k))
                    for x, y in swaps)
        order_lines.append(f"- {k}: before {' > '.join(ob)}; after {' > '.join(oa)} "
                           + ("(the swapped methods are within noise of each other in both tables)" if noisy
                              else "(ORDER CHANGED beyond noise)"))
    missing = [f"{m} seed {s}" for m in rb for s in rb[m]["seeds"] if m in ra and s not in ra[m]["seeds"]]
    missing += [m for m in rb if m not in ra]
    text += ["Order of the student methods by each metric's mean:", "", *order_lines, ""]
    text.append(("Outside noise: " + ", ".join(outside) + ".") if outside else "Every compared value is within noise.")
    if missing:
        text.append(f" Not (yet) in the new table: {', '.join(missing)}.")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    section = compare(before, after)
    md_path = args.after.with_suffix(".md")
    md = md_path.read_text() if md_path.exists() else ""
    md = md.split("\n" + SECTION)[0].rstrip("\n") + "\n\n" + section  # replaces an earlier comparison
    atomic_write_bytes(md_path, md.encode())
    print(section)


if __name__ == "__main__":
    main()
