"""Benchmark: pair-shard and embedding-cache throughput, and cache bytes per sample per model.

Measures (each repeated; median [min-max] over the repeats, every repeat from scratch in a temporary folder):
  - shard write: `write_shards` of N generated 64x64 JPEG pairs (tar + Parquet + _dataset.json);
  - shard read: `iter_samples` over all shards (header check), and with `decode=True` (full decode);
  - cache write: `CacheWriter.write_shard` for every shard at d (float16 and float32);
  - cache read: `read_cache_shard` for every shard (checksum, uid order, finiteness checks, float32 out);
  - cache bytes per sample per model at d for several Parquet encodings, against the raw payload
    (2 x d x 2 bytes float16 + a 32-char uid) and against float32 `.pt` shards (torch.save).
Throughput: pairs/s and MB/s (MB = 10^6 bytes of the files written or read).

The issue's goal: cache bytes per sample <= 1.1 x (2,048 + 32) at d = 512 float16.
Parquet choices measured here and used by storage/cache.py: no dictionary encoding, statistics only on
`uid`, zstd. BYTE_STREAM_SPLIT compresses float16 further but DuckDB 2.0 cannot read it for float16
columns (so the SQL views would break); it is listed for reference only.

Run:  .venv/bin/python benchmarks/storage.py                 (writes benchmarks/results/storage.{json,md})
      .venv/bin/python benchmarks/storage.py --pairs 2000 --repeats 3
"""
from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from _common import RESULTS, fmt_range, markdown_table, rate, repeat, summarise, write_report

from storage.cache import CacheWriter, ModelMeta, encode_table, read_cache_shard, write_table
from storage.shards import Sample, iter_samples, list_shards, make_uid, write_shards


def make_samples(n: int, size: int, seed: int = 0) -> list[Sample]:
    """Smooth random scenes (8x8 noise upsampled plus grain) as JPEG q=90: about the size of the
    64x64 Flickr8k JPEGs, unlike pure noise, which compresses far worse than photos."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        caption = f"a generated scene number {i} with some colours and shapes"
        out.append(Sample(key=f"{i:08d}", uid=make_uid("bench", str(i), caption, 0), image_bytes=buf.getvalue(),
                          caption=caption, image_id=str(i), width=size, height=size, source="bench"))
    return out


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def folder_bytes(p: Path, suffix: str) -> int:
    return sum(f.stat().st_size for f in p.rglob(f"*{suffix}"))


def bench_shards(samples, tmp: Path, args) -> tuple[list[dict], Path]:
    out = tmp / "datasets" / "bench"
    reset = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    n = len(samples)
    t_write = summarise(repeat(lambda: write_shards(samples, out, name="bench", source="bench",
                                                    samples_per_shard=args.samples_per_shard),
                               repeats=args.repeats, setup=reset))
    nbytes = folder_bytes(out, ".tar") + folder_bytes(out, ".parquet")
    refs = list_shards(out)
    rows = [{"case": "shard write (tar + parquet)", "time": t_write, "bytes": nbytes}]
    for decode in (False, True):
        t = summarise(repeat(lambda: sum(1 for r in refs for _ in iter_samples(r, decode=decode)),
                             repeats=args.repeats, warmup=1))
        rows.append({"case": f"shard read ({'full decode' if decode else 'header check'})", "time": t, "bytes": nbytes})
    for r in rows:
        r["pairs_per_s"], r["mb_per_s"] = rate(n, r["time"]), rate(r["bytes"] / 1e6, r["time"])
    return rows, out


def bench_cache(refs, tmp: Path, args) -> list[dict]:
    d, n = args.dim, sum(r.rows for r in refs)
    uids = {r.name: [s.uid for s in iter_samples(r)] for r in refs}
    embs = {r.name: (unit(r.rows, d, 2 * i), unit(r.rows, d, 2 * i + 1)) for i, r in enumerate(refs)}
    rows = []
    for dtype in ("float16", "float32"):
        meta = ModelMeta(f"m-{dtype}", "fp", d, 10.0, -10.0)
        root = tmp / "cache"
        folder = root / meta.model_id / "bench"

        def write():
            w = CacheWriter(root, "bench", meta, dtype=dtype)
            for r in refs:
                w.write_shard(r, uids[r.name], *embs[r.name])

        t = summarise(repeat(write, repeats=args.repeats, setup=lambda: shutil.rmtree(folder, ignore_errors=True)))
        nbytes = folder_bytes(folder, ".parquet")
        rows.append({"case": f"cache write {dtype} d={d}", "time": t, "bytes": nbytes})
        t = summarise(repeat(lambda: [read_cache_shard(folder, r, expect=meta) for r in refs],
                             repeats=args.repeats, warmup=1))
        rows.append({"case": f"cache read {dtype} d={d}", "time": t, "bytes": nbytes})
    for r in rows:
        r["pairs_per_s"], r["mb_per_s"] = rate(n, r["time"]), rate(r["bytes"] / 1e6, r["time"])
    return rows


def bench_encodings(tmp: Path, args) -> list[dict]:
    n, d = args.pairs, args.dim
    uids = [make_uid("bench", str(i), "c", 0) for i in range(n)]
    img, txt = unit(n, d, 100), unit(n, d, 101)
    raw = 2 * d * 2 + 32
    cases = {
        "float16 zstd, no dict, uid stats (storage/cache.py)": ("float16", None),
        "float16 uncompressed, no dict": ("float16", dict(compression="none", use_dictionary=False, write_statistics=["uid"])),
        "float16 pyarrow defaults (snappy, dict, stats)": ("float16", dict()),
        "float16 zstd + BYTE_STREAM_SPLIT (DuckDB cannot read)": (
            "float16", dict(compression="zstd", use_dictionary=False, write_statistics=["uid"],
                            use_byte_stream_split=["image_emb.list.element", "text_emb.list.element"])),
        "float32 zstd, no dict, uid stats": ("float32", None),
    }
    rows = []
    for name, (dtype, kw) in cases.items():
        table = encode_table(uids, img, txt, dim=d, dtype=dtype, kv={"model_id": "m"})
        path = tmp / "enc.parquet"

        def write():
            if kw is None:
                write_table(table, path)
            else:
                pq.write_table(table, path, **kw)

        t = summarise(repeat(write, repeats=args.repeats))
        size = path.stat().st_size
        tr = summarise(repeat(lambda: pq.read_table(path), repeats=args.repeats, warmup=1))
        rows.append({"case": name, "bytes_per_sample": size / n, "vs_raw_f16": size / n / raw,
                     "write_mb_s": rate(size / 1e6, t), "read_mb_s": rate(size / 1e6, tr)})
    try:
        import torch
    except Exception as e:  # reported in the table, not hidden
        rows.append({"case": f"float32 .pt (torch unavailable: {type(e).__name__})", "bytes_per_sample": float("nan")})
    else:
        path = tmp / "emb.pt"
        obj = {"uid": uids, "emb": torch.from_numpy(np.stack([img, txt], axis=1))}  # [N, 2, d] float32
        t = summarise(repeat(lambda: torch.save(obj, path), repeats=args.repeats))
        size = path.stat().st_size
        tr = summarise(repeat(lambda: torch.load(path), repeats=args.repeats, warmup=1))
        rows.append({"case": "float32 .pt (torch.save: uid list + [N, 2, d] tensor)", "bytes_per_sample": size / n,
                     "vs_raw_f16": size / n / raw, "write_mb_s": rate(size / 1e6, t), "read_mb_s": rate(size / 1e6, tr)})
    return rows


def to_markdown(report: dict) -> str:
    a = report["args"]
    lines = ["# Storage: pair shards and embedding cache", "",
             f"N = {a['pairs']} pairs of {a['image_size']}x{a['image_size']} JPEG ({report['jpeg_bytes_mean']:.0f} bytes mean), "
             f"{a['samples_per_shard']} per shard, d = {a['dim']}, {a['repeats']} repeats: median [min-max].", "",
             "## Throughput", ""]
    rows = [{"case": r["case"], "pairs": fmt_range(r["pairs_per_s"]), "mb": fmt_range(r["mb_per_s"], 1),
             "t": fmt_range(r["time"], 3), "spread": f"{100 * r['time']['spread']:.0f}%", "size": f"{r['bytes'] / 1e6:.1f}"}
            for r in report["throughput"]]
    lines.append(markdown_table([("case", "case"), ("pairs", "pairs/s"), ("mb", "MB/s"), ("t", "time (s)"),
                                 ("spread", "spread (max-min)/median"), ("size", "files (MB)")], rows))
    raw = 2 * a["dim"] * 2 + 32
    lines += ["", f"## Cache bytes per sample per model (d = {a['dim']}; raw float16 payload + uid = {raw} bytes, "
                  f"goal <= {1.1 * raw:.0f})", ""]
    rows = [{"case": r["case"], "b": f"{r['bytes_per_sample']:.1f}",
             "x": f"{r['vs_raw_f16']:.3f}" if "vs_raw_f16" in r else "",
             "w": fmt_range(r["write_mb_s"], 0) if "write_mb_s" in r else "",
             "r": fmt_range(r["read_mb_s"], 0) if "read_mb_s" in r else ""} for r in report["encodings"]]
    lines.append(markdown_table([("case", "encoding"), ("b", "bytes/sample"), ("x", "x raw float16"),
                                 ("w", "write MB/s"), ("r", "read MB/s")], rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    samples = make_samples(args.pairs, args.image_size)
    with tempfile.TemporaryDirectory(prefix="aced-bench-storage-") as tmp:
        tmp = Path(tmp)
        shard_rows, ds = bench_shards(samples, tmp, args)
        cache_rows = bench_cache(list_shards(ds), tmp, args)
        enc_rows = bench_encodings(tmp, args)
    report = {"args": vars(args) | {"out": str(args.out)},
              "jpeg_bytes_mean": float(np.mean([len(s.image_bytes) for s in samples])),
              "throughput": shard_rows + cache_rows, "encodings": enc_rows}
    md = to_markdown(report)
    write_report("storage", report, md, out=args.out)
    print(md)


if __name__ == "__main__":
    main()
