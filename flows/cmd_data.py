"""`aced import ...`, `aced data synth|corrupt`, `aced sql`, `aced inspect`: data in, and a look at what is on disk.

Thin layer over `storage.importers`, `storage.shards`, `storage.sql` and `storage.inspect`
(`aced cache verify` lives with `aced cache` in flows/cmd_flows.py and calls `storage.cache.verify_cache`).
Every command exits non-zero with a one-line error naming the file and sample on bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from storage import fs

log = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    imp = subparsers.add_parser("import", help="import real data as pair shards under <root>/datasets",
                                description="Turn a real layout into pair shards (webdataset tar + Parquet).")
    kinds = imp.add_subparsers(dest="kind", required=True, metavar="KIND")

    c = kinds.add_parser("captions", help="folder of images + caption table (CSV/TSV image,caption) [+ splits/]",
                         description="SRC holds images/, captions.csv (or .tsv) and optionally splits/<split>.txt; "
                                     "with split lists the datasets are NAME/<split> plus NAME/other.")
    c.add_argument("src", type=Path)
    c.add_argument("--images", type=Path, default=None, help="image folder (default SRC/images)")
    c.add_argument("--captions", type=Path, default=None, help="caption table (default SRC/captions.csv|.tsv)")
    c.add_argument("--splits", type=Path, default=None, help="folder of <split>.txt lists (default SRC/splits if present)")
    c.add_argument("--no-splits", action="store_true", help="ignore split lists: one dataset NAME")
    _common(c)
    c.set_defaults(func=_cmd_import_captions)

    k = kinds.add_parser("coco", help="COCO-captions JSON + image folder")
    k.add_argument("annotations", type=Path, help="captions_*.json with images[] and annotations[]")
    k.add_argument("--images", type=Path, required=True, help="folder the file_name entries are relative to")
    k.add_argument("--split", default=None, help="value for the split column (e.g. val2014)")
    _common(k)
    k.set_defaults(func=_cmd_import_coco)

    kp = kinds.add_parser("karpathy", help="one split of a Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json) "
                                           "as a retrieval set",
                          description="JSON: Karpathy's caption file ({'images': [{'filepath', 'filename', 'split', "
                                      "'sentences': [{'raw'}], 'cocoid'}]}); the images of --split, one pair per "
                                      "sentence, captions grouped by image for recall@k.")
    kp.add_argument("annotations", type=Path, metavar="JSON", help="dataset_coco.json / dataset_flickr30k.json / ...")
    kp.add_argument("--images", type=Path, required=True, help="folder the filepath/filename entries are relative to")
    kp.add_argument("--split", default="test", help="Karpathy split to import (default test: the field's 1k/5k test sets)")
    _common(kp)
    kp.set_defaults(func=_cmd_import_karpathy)

    w = kinds.add_parser("webdataset", help="existing webdataset / img2dataset tars (re-packed, images copied "
                                            "untouched; --in-place: used where they are)",
                         description="Re-packs the tars into the project's shard layout (image bytes untouched), or "
                                     "with --in-place registers them where they are: only metadata Parquet and "
                                     "_dataset.json are written, no image byte is copied.")
    w.add_argument("src", type=fs.as_path, help="folder (or s3://bucket/prefix) of *.tar (+ optional <shard>.parquet sidecars) or one tar")
    w.add_argument("--in-place", action="store_true",
                   help="register the tars where they are (no copy); each reader checks their sha256")
    _in_place_opts(w)
    _common(w)
    w.set_defaults(func=_cmd_import_webdataset)

    d = kinds.add_parser("datacomp", help="a DataComp / img2dataset pool, registered in place (no image byte copied)",
                         description="SRC is img2dataset's output folder (NNNNN.tar with key.jpg/.txt/.json, "
                                     "NNNNN.parquet sidecars). The tars are read once (sha256, every sample "
                                     "checked) and never copied or changed; <root>/datasets/NAME gets one metadata "
                                     "Parquet per tar and _dataset.json pointing at the tars. Every sample needs "
                                     "DataComp's 32-hex uid; failed downloads are counted and skipped.")
    d.add_argument("src", type=fs.as_path, help="img2dataset output folder, s3://bucket/prefix, or one tar")
    _in_place_opts(d)
    d.add_argument("--name", required=True, help="dataset name under <root>/datasets (may contain '/')")
    d.add_argument("--skip-bad", action="store_true",
                   help="skip (and count, and log) bad samples instead of stopping at the first")
    d.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    d.set_defaults(func=_cmd_import_datacomp)

    f = kinds.add_parser("classes", help="class folders <class>/<image> for zero-shot evaluation")
    f.add_argument("src", type=Path)
    _common(f)
    f.set_defaults(func=_cmd_import_classes)

    data = subparsers.add_parser("data", help="generate data (synthetic pairs / classes, noisy copies of pair sets)")
    dsub = data.add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    s = dsub.add_parser("synth", help="synthetic pairs with known caption noise (pipeline.synthetic)",
                        description="Writes generate_pairs(N, seed, noise_frac) as dataset NAME; with --classes, "
                                    "generate_classification(N, seed) (N images per class) as a class set.")
    s.add_argument("--name", required=True, help="dataset name under <root>/datasets")
    s.add_argument("--n", type=int, required=True, help="number of pairs (with --classes: images per class)")
    s.add_argument("--noise-frac", type=float, default=0.0, help="fraction of pairs with a mismatched caption")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--classes", nargs="?", const="shape", choices=("shape", "colour"), default=None,
                   help="write a zero-shot class set instead of pairs, labelled by shape (default) or colour")
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    s.set_defaults(func=_cmd_synth)

    x = dsub.add_parser("corrupt", help="copy of a pair dataset with a fraction of captions swapped (noisy=True)",
                        description="Writes dataset NAME: the pairs of SRC (a dataset name, or with --split one "
                                    "split of it) in which round(F * n) captions, chosen by --seed, are replaced by "
                                    "captions of other images of the same split (each chosen caption used once, "
                                    "never by a pair of its own image) and flagged noisy. The image bytes are not "
                                    "copied: NAME reads SRC's tars in place (their sha256 still checked).")
    x.add_argument("src", help="source dataset name under <root>/datasets (or a dataset folder)")
    x.add_argument("--name", required=True, help="name of the new dataset under <root>/datasets")
    x.add_argument("--swap-frac", type=float, required=True, help="fraction F of captions to swap, in [0, 1]")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--split", default=None,
                   help="only this split: the dataset SRC/SPLIT if there is one, else SRC's pairs whose split is SPLIT")
    x.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    x.set_defaults(func=_cmd_corrupt)

    q = subparsers.add_parser("sql", help="read-only SQL (DuckDB) over pairs, datasets, cache, manifest, metrics, selections",
                              description="Views: pairs, datasets, cache, manifest, metrics, selections "
                                          "(see storage/sql.py). Only one SELECT statement is accepted.")
    q.add_argument("query")
    q.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    q.add_argument("--out", type=fs.as_path, default=None,
                   help="write the result here, a file or an s3:// URL (required for parquet)")
    q.add_argument("--max-rows", type=int, default=50, help="rows shown by --format table on the terminal")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    q.add_argument("--allow-missing", action="store_true",
                   help="leave missing or mislabelled files out of the views (named on stderr) instead of failing")
    q.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="DuckDB memory limit, e.g. 512MB, 4GiB (default: half of this machine's memory)")
    q.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: every CPU this process may use)")
    q.set_defaults(func=_cmd_sql)

    i = subparsers.add_parser("inspect", help="summarise a dataset folder, a cache folder or a workspace")
    i.add_argument("path", type=fs.as_path, nargs="?", default=None,
                   help="a folder or an s3:// URL (default: the workspace root)")
    i.add_argument("--verify", action="store_true",
                   help="also check tar checksums, decode every image and check every cache shard as `aced cache "
                        "verify` does (exit code 1 on any problem, as without it)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_cmd_inspect)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="dataset name under <root>/datasets (may contain '/')")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count, and log) bad samples instead of stopping at the first")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")


def _in_place_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relative-paths", action="store_true",
                   help="record each tar's path relative to the dataset folder (a workspace and a pool that move "
                        "together), not absolute")
    p.add_argument("--header-only", action="store_true",
                   help="check image headers only, not every pixel (much faster on a large pool; a corrupt image "
                        "body is then found, and handled by on_bad_sample, when training reads it)")
    p.add_argument("--workers", type=int, default=1, help="read this many tars in parallel (processes)")


def _opts(args) -> dict:
    return {"samples_per_shard": args.samples_per_shard, "on_error": "skip" if args.skip_bad else "raise",
            "overwrite": args.overwrite}


def _report(infos: dict, t0: float) -> int:
    """One line per dataset, then the totals. "skipped" is every pair the import logged a "skipping"
    line for (importer + writer, and rows of a caption table once, not once per split), so the
    summary and the log always agree."""
    total = skipped = dups = 0
    for name, info in infos.items():
        total += info.rows
        n_skip = info.extra.get("skipped_at_import", 0) + info.skipped
        n_dup = info.extra.get("duplicate_captions_dropped", 0)
        skipped += n_skip
        dups += n_dup
        notes = [f"{n_skip} skipped"] * bool(n_skip) + [f"{n_dup} duplicate captions dropped"] * bool(n_dup)
        print(f"{info.name}: {info.rows} pairs in {len(info.shards)} shard(s) -> {info.path}"
              + (f" ({', '.join(notes)})" if notes else ""))
    table = next(iter(infos.values())).extra.get("skipped_rows_in_caption_table", 0) if infos else 0
    if table:
        print(f"caption table: {table} rows skipped")
        skipped += table
    notes = [f"{skipped} skipped"] * bool(skipped) + [f"{dups} duplicate captions dropped"] * bool(dups)
    print(f"{total} pairs in {time.perf_counter() - t0:.1f} s" + (f" ({', '.join(notes)})" if notes else ""))
    return 0


def _run(fn) -> int:
    """Run an import, turning the expected failures into one clear line and exit code 1 (OSError:
    a full disk, a permission problem, an unreadable source: each names its file)."""
    from storage.shards import ShardError

    try:
        return fn()
    except (ShardError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _cmd_import_captions(args) -> int:
    from storage.importers import import_captions

    t0 = time.perf_counter()
    return _run(lambda: _report({k: v for k, v in import_captions(
        args.src, args.root, args.name, images=args.images, captions=args.captions,
        splits=False if args.no_splits else args.splits,
        **_opts(args)).items()}, t0))


def _cmd_import_coco(args) -> int:
    from storage.importers import import_coco

    t0 = time.perf_counter()
    return _run(lambda: _report({"": import_coco(args.annotations, args.images, args.root, args.name,
                                                 split=args.split, **_opts(args))}, t0))


def _cmd_import_karpathy(args) -> int:
    from storage.importers import import_karpathy

    t0 = time.perf_counter()
    return _run(lambda: _report({"": import_karpathy(args.annotations, args.images, args.root, args.name,
                                                     split=args.split, **_opts(args))}, t0))


def _cmd_import_webdataset(args) -> int:
    from storage.importers import import_webdataset

    t0 = time.perf_counter()
    opts = _opts(args)
    if args.in_place:
        opts.pop("samples_per_shard")  # one shard per existing tar
        opts.update(in_place=True, relative=args.relative_paths, decode=not args.header_only, workers=args.workers)
    elif args.relative_paths or args.header_only or args.workers != 1:
        print("error: --relative-paths, --header-only and --workers apply only with --in-place", file=sys.stderr)
        return 2
    return _run(lambda: _report({"": import_webdataset(args.src, args.root, args.name, **opts)}, t0))


def _cmd_import_datacomp(args) -> int:
    from storage.importers import register_webdataset

    t0 = time.perf_counter()
    return _run(lambda: _report({"": register_webdataset(
        args.src, args.root, args.name, relative=args.relative_paths, decode=not args.header_only, require_uid=True,
        on_error="skip" if args.skip_bad else "raise", overwrite=args.overwrite, workers=args.workers)}, t0))


def _cmd_import_classes(args) -> int:
    from storage.importers import import_class_folders

    t0 = time.perf_counter()
    return _run(lambda: _report({"": import_class_folders(args.src, args.root, args.name, **_opts(args))}, t0))


def _cmd_synth(args) -> int:
    from storage.importers import dataset_dir
    from storage.shards import write_shards

    import pipeline.synthetic as synthetic  # lazy: pipeline/ is only needed for this command

    t0 = time.perf_counter()
    if args.classes:
        by = args.classes
        samples = synthetic.generate_classification(args.n, seed=args.seed, image_size=args.image_size, by=by)
        extra = {"classnames": list(synthetic.classnames(by)), "templates": list(synthetic.class_templates(by)),
                 "seed": args.seed}
        source = f"synthetic-classes:by={by},seed={args.seed},n_per_class={args.n}"
    else:
        samples = synthetic.generate_pairs(args.n, seed=args.seed, noise_frac=args.noise_frac,
                                           image_size=args.image_size)
        extra = {"seed": args.seed, "noise_frac": args.noise_frac}
        source = f"synthetic:seed={args.seed},n={args.n},noise_frac={args.noise_frac}"
    return _run(lambda: _report({"": write_shards(samples, dataset_dir(args.root, args.name), name=args.name,
                                                  source=source, samples_per_shard=args.samples_per_shard,
                                                  overwrite=args.overwrite, extra=extra)}, t0))


def _cmd_corrupt(args) -> int:
    from storage.corrupt import corrupt_dataset

    def run() -> int:
        t0 = time.perf_counter()
        info = corrupt_dataset(args.root, args.src, name=args.name, swap_frac=args.swap_frac, seed=args.seed,
                               split=args.split, overwrite=args.overwrite)
        swapped = info.extra["swapped"]
        print(f"{info.name}: {info.rows} pairs, {swapped} captions swapped ({100.0 * swapped / info.rows:.1f}%) "
              f"from {info.extra['corrupted_from']}, in {len(info.shards)} shard(s) -> {info.path} (the source's "
              f"tars, no image copied) in {time.perf_counter() - t0:.1f} s")
        return 0

    return _run(run)


def _cmd_sql(args) -> int:
    import duckdb

    from storage.sql import Limits, QueryRefused, SqlError, stream_query, write_result, write_stream

    if args.format == "parquet" and args.out is None:
        print("error: --format parquet needs --out FILE", file=sys.stderr)
        return 2
    if args.max_rows < 1:
        print(f"error: --max-rows must be >= 1, got {args.max_rows}", file=sys.stderr)
        return 2
    if not fs.as_path(args.root).is_dir():
        print(f"note: workspace {args.root} does not exist: every view is empty", file=sys.stderr)
    try:
        limits = Limits.for_machine(args.memory_limit, args.threads)
        with stream_query(args.root, args.query, allow_missing=args.allow_missing, limits=limits) as q:
            for item in q.left_out:
                print(f"note: left out of the views (--allow-missing): {item}", file=sys.stderr)
            if args.out is not None:
                n = write_result(q, args.format, args.out, overwrite=args.overwrite)
                print(f"{n} rows -> {args.out}", file=sys.stderr)
            else:
                write_stream(q, args.format, sys.stdout.buffer,
                             max_rows=args.max_rows if args.format == "table" else None)
                sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    except QueryRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except (SqlError, OSError) as e:  # OSError: --out exists, its folder does not, a full disk...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except duckdb.Error as e:  # DuckDB's texts run over several lines (hints, links): its first line names it
        print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr)
        return 1
    return 0


def _stdout_closed() -> int:
    """The reader of our stdout went away (`aced sql ... | head`): stop quietly, as `cat` does (exit
    141 = 128 + SIGPIPE), without a traceback or an error line; stdout is pointed at /dev/null so the
    interpreter's final flush of the dead pipe cannot complain either."""
    import os

    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141


def _cmd_inspect(args) -> int:
    """Print the summary; exit code 1 if it lists any problem (a check that finds one must fail)."""
    from storage.inspect import format_summary, inspect_path
    from storage.shards import ShardError

    path = args.path if args.path is not None else args.root
    try:
        summary = inspect_path(path, verify=args.verify)
    except (ShardError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    if summary["problems"]:
        print(f"{len(summary['problems'])} problem(s) found in {path}", file=sys.stderr)
        return 1
    return 0
