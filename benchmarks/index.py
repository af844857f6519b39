"""The training index at DataComp scale (issue 11 item 2): build time, start-up time and peak memory of
`pipeline.data.PairIndex` + the first super-batch's ids (`EpochOrder`), for metadata-only datasets of
1M, 10M and 100M pairs (DataComp's 10k-pair shards; the tars are empty placeholders: the index never
opens them), and the fitted growth with the 128M-pair (DataComp medium) extrapolation.

Each size is measured in a fresh child process (its peak RSS is the index's, not the builder's):
  python benchmarks/index.py --root /tmp/aced-index --sizes 1e6 1e7 1e8 --repeats 3
The datasets are kept under --root and reused by later runs (delete the folder to rebuild).
Also measured: the cross-dataset duplicate check (two datasets of N/2 pairs: every uid column read and
sorted as 16-byte keys), the one part of start-up that reads per-pair metadata.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, markdown_table, summarise, write_report  # noqa: E402

SHARD_ROWS = 10_000
_HEX = (b"0123456789abcdef")


def _hex_uids(rng, n: int):
    """n random 32-hex uids as a pyarrow string array (vectorised: no Python object per uid)."""
    import numpy as np
    import pyarrow as pa

    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    table = np.frombuffer(_HEX, dtype=np.uint8)
    chars = np.empty((n, 32), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = table[raw >> 4], table[raw & 15]
    return pa.array(chars.view("S32").ravel(), type=pa.binary(32)).cast(pa.string())


def build(folder: Path, name: str, n: int, seed: int) -> float | None:
    """A metadata-only dataset of `n` pairs in `folder` (skipped if it exists); returns seconds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.shards import DATASET_FILE, METADATA_SCHEMA, shard_name

    if (folder / DATASET_FILE).exists():
        return None  # reused
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    fake_sha = "0" * 64
    for k in range(0, n, SHARD_ROWS):
        rows = min(SHARD_ROWS, n - k)
        sname = shard_name(len(shards))
        keys = pa.array([f"{k + i:09d}" for i in range(rows)])
        table = pa.table({
            "uid": _hex_uids(rng, rows), "key": keys, "image_id": keys,
            "caption": pa.array(["a photo"] * rows), "width": pa.array(np.full(rows, 64, np.int32)),
            "height": pa.array(np.full(rows, 64, np.int32)), "source": pa.array(["bench"] * rows),
            "noisy": pa.array(rng.random(rows) < 0.2), "label": pa.nulls(rows, pa.int32()),
            "split": pa.array(["train"] * rows)}, schema=METADATA_SCHEMA)
        table = table.replace_schema_metadata({"aced.dataset": name, "aced.shard": sname, "aced.tar_sha256": fake_sha})
        pq.write_table(table, folder / f"{sname}.parquet", compression="zstd")
        (folder / f"{sname}.tar").touch()  # never opened by the index; listed so the folder matches
        shards.append({"name": sname, "rows": rows, "sha256": fake_sha})
    doc = {"name": name, "source": "bench", "format_version": 1, "shards": shards, "rows": n, "skipped": 0,
           "created": "2026-12-02T00:00:00+00:00"}
    (folder / DATASET_FILE).write_text(json.dumps(doc))
    return time.perf_counter() - t0


def child(paths: list[str], batch: int, window: int) -> dict:
    """In a fresh process: time PairIndex + the first super-batch's ids; peak RSS before and after."""
    import numpy as np

    from pipeline.data import EpochOrder, PairIndex

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    index = PairIndex(paths)
    t1 = time.perf_counter()
    order = EpochOrder(index.rows, seed=0, epoch=0, window=window)
    ids = order.slice(0, batch)
    t2 = time.perf_counter()
    assert len(ids) == batch and len(np.unique(ids)) == batch
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"pairs": len(index), "index_s": t1 - t0, "first_batch_s": t2 - t1, "startup_s": t2 - t0,
            "rss_before_mib": base / 1024, "rss_peak_mib": peak / 1024, "index_mib": (peak - base) / 1024}


def _run_child(paths: list[Path], batch: int, window: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, paths), "--batch", str(batch),
                          "--window", str(window)], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    import numpy as np

    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/aced-index"))
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=160_000, help="super-batch size (the paper's B)")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--child", nargs="*")
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch, args.window)))
        return 0
    rows = []
    for size in (int(s) for s in args.sizes):
        one = args.root / "datasets" / f"n{size}"
        halves = [args.root / "datasets" / f"n{size}-half{i}" for i in (0, 1)]
        built = build(one, f"n{size}", size, seed=1)
        for i, h in enumerate(halves):
            build(h, h.name, size // 2, seed=10 + i)
        single = [_run_child([one], min(args.batch, size), args.window) for _ in range(args.repeats)]
        pair = [_run_child(halves, min(args.batch, size), args.window) for _ in range(max(1, args.repeats - 2))]
        row = {"pairs": size, "shards": -(-size // SHARD_ROWS), "build_s": built,
               "startup_s": summarise([r["startup_s"] for r in single]),
               "index_mib": summarise([r["index_mib"] for r in single]),
               "rss_peak_mib": summarise([r["rss_peak_mib"] for r in single]),
               "two_datasets_startup_s": summarise([r["startup_s"] for r in pair]),
               "two_datasets_index_mib": summarise([r["index_mib"] for r in pair]),
               "loadavg": os.getloadavg()}
        row["bytes_per_pair"] = row["index_mib"]["median"] * 2**20 / size
        row["two_datasets_bytes_per_pair"] = row["two_datasets_index_mib"]["median"] * 2**20 / size
        print(json.dumps(row), flush=True)
        rows.append(row)
    xs = [r["pairs"] for r in rows]
    fits = {}
    for key in ("startup_s", "index_mib", "two_datasets_startup_s", "two_datasets_index_mib"):
        a, b = _fit(xs, [r[key]["median"] for r in rows])
        fits[key] = {"intercept": a, "per_million": b * 1e6, "at_128M": a + b * 128e6}
    md_rows = [{"pairs": f"{r['pairs']:,}", "shards": f"{r['shards']:,}",
                "build": "reused" if r["build_s"] is None else f"{r['build_s']:.0f} s",
                "start-up": f"{r['startup_s']['median']:.2f} s [{r['startup_s']['min']:.2f}-{r['startup_s']['max']:.2f}]",
                "index memory": f"{r['index_mib']['median']:.0f} MiB ({r['bytes_per_pair']:.2f} B/pair)",
                "2 datasets: start-up": f"{r['two_datasets_startup_s']['median']:.1f} s",
                "2 datasets: memory": f"{r['two_datasets_index_mib']['median']:.0f} MiB "
                                      f"({r['two_datasets_bytes_per_pair']:.1f} B/pair)"} for r in rows]
    cols = [(c, c) for c in md_rows[0]] if md_rows else []
    note = ("Fitted (least squares over the sizes): " + "; ".join(
        f"{k}: {v['intercept']:.3g} + {v['per_million']:.3g} per 1M pairs -> {v['at_128M']:.3g} at 128M"
        for k, v in fits.items()))
    markdown = "\n".join([
        "# Training index at DataComp scale (PairIndex + the first super-batch's ids)", "",
        markdown_table(cols, md_rows), "", note, "",
        "Index memory = peak RSS of a fresh process after PairIndex and the first super-batch's ids minus its peak "
        "RSS before (python, numpy and pyarrow already imported). Two datasets of N/2 pairs each: start-up reads "
        "every uid column once and sorts 16-byte keys (the cross-dataset duplicate check); one dataset reads no "
        "per-pair metadata at start-up.", ""])
    write_report("index", {"batch": args.batch, "window": args.window, "raw": rows, "fits": fits,
                           "loadavg_end": os.getloadavg()}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
