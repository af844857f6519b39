"""Summaries of what is on disk, for `aced inspect PATH`: a dataset folder, a cache folder, a folder
of several of either, or a whole workspace (ARCHITECTURE.md: "inspect shards/caches/selections").

Each summary is a plain dict (JSON-able), with a "problems" list for things that make the data
unusable or need a hand (missing or extra shards, non-finite embeddings, row counts that disagree,
hidden temporary files and folders left by an interrupted write) and "notes" for remarks.
`format_summary` renders one as text; `aced inspect` exits 1 when there is any problem.
`aced cache verify` is the strict check of caches; this module counts and describes, and with
`verify` runs that same per-shard check (`storage.cache.check_cache_shard`) on every cache it finds.
Any of these may be in an object store (`s3://...`): every listing, size and read goes through
storage.fs, so the checks are the same there.

(The module is `storage.inspect`; it is only ever imported as part of the package, so it does not
shadow the standard library's `inspect`.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import fs
from storage.atomic import is_temp_name
from storage.cache import (MANIFEST_FILE, CacheError, check_cache_shard, find_cache_folders, read_manifest,
                           unlisted_cache_folders)
from storage.workspace import Workspace
from storage.shards import (DATASET_FILE, ShardError, check_tar_sha256, dataset_file_problems, find_datasets,
                            iter_samples, list_shards, load_dataset, read_metadata, read_parquet)


def is_leftover_name(name: str) -> bool:
    """A hidden temporary name of an interrupted write: `storage.atomic.is_temp_name` (files, dataset,
    model and checkpoint work folders `.NAME.RANDOM.tmp`), or `.tmp-*`, the checkpoint work folders of
    workspaces written before checkpoints went through storage.atomic (still found on disk)."""
    return is_temp_name(name) or name.startswith(".tmp-")


def _leftover_problem(p: Path) -> str:
    link = not fs.is_url(p) and p.is_symlink()  # an object store has no links
    kind = "folder" if p.is_dir() and not link else "file"
    return f"{p}: leftover temporary {kind} of an interrupted write (delete it once no writer is running)"


def find_leftovers(top: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Hidden temporary files and folders (`is_leftover_name`) in `top` (and below, not inside them)."""
    found: list[Path] = []
    top = fs.as_path(top)
    if not top.is_dir():
        return found
    for dirpath, dirnames, filenames in fs.walk(top):
        for n in sorted(dirnames + filenames):
            if is_leftover_name(n):
                found.append(dirpath / n)
        dirnames[:] = sorted(d for d in dirnames if not is_leftover_name(d)) if recursive else []
    return found


def _dataset_leftovers(folder: Path) -> list[Path]:
    """Leftovers inside a dataset folder, and work folders of an interrupted (re)import of it beside it."""
    prefix = f".{folder.name}."  # not a glob pattern: a dataset may be named "*" or "[a]"
    try:
        _, dirnames, filenames = next(fs.walk(folder.parent))
        names = sorted(dirnames + filenames)
    except (OSError, StopIteration):
        names = []
    sibling = [folder.parent / n for n in names if n.startswith(prefix) and is_leftover_name(n)]
    return find_leftovers(folder, recursive=False) + sibling


def summarize_dataset(dataset_dir: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """Counts of a dataset folder; with `verify`, also tar checksums and a full decode of every image."""
    folder = fs.as_path(dataset_dir)
    out: dict[str, Any] = {"kind": "dataset", "path": str(folder), "problems": [], "notes": []}
    out["problems"] += [_leftover_problem(p) for p in _dataset_leftovers(folder)]
    try:
        info = load_dataset(folder, check_files=False)  # the file differences are listed below, with the counts
    except ShardError as e:
        out["problems"].append(str(e))
        return out
    out.update(name=info.name, source=info.source, created=info.created, shards=len(info.shards), rows=info.rows,
               skipped_at_write=info.skipped)
    if info.classnames:
        out["classnames"] = info.classnames
    out["problems"] += dataset_file_problems(info)  # missing or unlisted shard files
    tables, tar_bytes = [], 0
    for s in info.shards:
        try:
            tar_bytes += fs.size(s.tar_path)
            tar_here = True
        except FileNotFoundError:  # named by dataset_file_problems
            tar_here = False
        if tar_here:
            if verify:
                try:
                    check_tar_sha256(s)
                except ShardError as e:
                    out["problems"].append(str(e))
        try:
            tables.append(read_metadata(s))
        except ShardError as e:
            out["problems"].append(str(e))
            continue
        if verify and tar_here:
            stats: dict[str, int] = {}
            try:
                n = sum(1 for _ in iter_samples(s, on_error="skip", decode=True, stats=stats, check_sha256=False))
            except ShardError as e:
                out["problems"].append(str(e))
                continue
            if stats["skipped"]:
                out["problems"].append(f"{s.tar_path}: {stats['skipped']} bad sample(s) of {s.rows} (see log), {n} good")
    out["tar_bytes"] = tar_bytes
    if info.rows:
        out["tar_bytes_per_pair"] = round(tar_bytes / info.rows, 1)
    if tables:
        t = pa.concat_tables(tables)
        out["distinct_uid"] = pc.count_distinct(t["uid"]).as_py()
        out["distinct_image_id"] = pc.count_distinct(t["image_id"]).as_py()
        if out["distinct_uid"] != t.num_rows:
            out["problems"].append(f"{folder}: {t.num_rows - out['distinct_uid']} duplicate uid(s)")
        out["width_min_max"] = [pc.min(t["width"]).as_py(), pc.max(t["width"]).as_py()]
        out["height_min_max"] = [pc.min(t["height"]).as_py(), pc.max(t["height"]).as_py()]
        out["caption_chars_mean"] = round(pc.mean(pc.utf8_length(t["caption"])).as_py(), 1)
        # pairs flagged noisy; "n/a" where no pair's noise is recorded (a plain import), not 0
        out["noisy"] = (pc.sum(t["noisy"].fill_null(False)).as_py() or 0) if t["noisy"].null_count < t.num_rows else "n/a"
        splits = pc.value_counts(t["split"]).to_pylist()
        out["splits"] = {str(d["values"]): d["counts"] for d in splits}
        if t["label"].null_count < t.num_rows:
            out["labels"] = pc.count_distinct(t["label"]).as_py()
    return out


def _norm_stats(acc: dict, a: np.ndarray) -> None:
    finite = np.isfinite(a).all(axis=1)
    acc["nonfinite_rows"] += int((~finite).sum())
    if finite.any():
        n = np.linalg.norm(a[finite].astype(np.float32), axis=1)
        acc["min"] = min(acc["min"], float(n.min()))
        acc["max"] = max(acc["max"], float(n.max()))
        acc["sum"] += float(n.sum())
        acc["n"] += int(n.size)


def summarize_cache(folder: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """Counts, dims and embedding-norm statistics of one cache folder `<root>/cache/<model>/<dataset>`,
    with missing/extra shards against the pair dataset (found from the folder's place in the workspace).
    With `verify`, every shard also gets `storage.cache.check_cache_shard`, the one per-shard check that
    `aced cache verify` and the trainer's reader run (file sha256 against the manifest, the pair tar's
    sha256, uids in order, the file's label, finiteness); a folder whose pair dataset cannot be found
    cannot be verified, which is a problem too."""
    folder = fs.as_path(folder)
    out: dict[str, Any] = {"kind": "cache", "path": str(folder), "problems": [], "notes": []}
    out["problems"] += [_leftover_problem(p) for p in find_leftovers(folder, recursive=False)]
    try:
        doc = read_manifest(folder)
    except CacheError as e:
        out["problems"].append(str(e))
        return out
    if doc is None:
        out["problems"].append(f"{folder / MANIFEST_FILE}: missing")
        return out
    out.update(model_id=doc["model_id"], fingerprint=doc["fingerprint"], dim=doc["dim"], dtype=doc["dtype"],
               logit_scale=doc.get("logit_scale"), logit_bias=doc.get("logit_bias"), shards=len(doc["shards"]))
    dataset = doc.get("dataset")
    parts = fs.posix_parts(folder).parts
    k = len(dataset.split("/")) if dataset else 0
    pair = None
    if dataset and len(parts) > k + 2 and parts[-(k + 2)] == "cache" and "/".join(parts[-k:]) == dataset:
        root = fs.resolve(folder)
        for _ in range(k + 2):
            root = root.parent
        out["dataset"] = dataset
        try:
            pair = {s.name: s for s in list_shards(Workspace(root).dataset(dataset))}
        except ShardError as e:
            out["problems"].append(str(e))
        if pair is not None:
            out["missing_shards"] = sorted(set(pair) - set(doc["shards"]))
            out["extra_shards"] = sorted(set(doc["shards"]) - set(pair))
            out["stale_shards"] = sorted(n for n, e in doc["shards"].items()
                                         if n in pair and e.get("source_sha256") != pair[n].sha256)
            for key in ("missing_shards", "extra_shards", "stale_shards"):
                if out[key]:
                    out["problems"].append(f"{folder}: {key.replace('_', ' ')}: {out[key]}")
    else:
        out["notes"].append(f"{folder}: not inside a workspace's cache/<model>/<dataset>: pair shards not compared")
    if verify:
        if pair is None:
            out["problems"].append(f"{folder}: cannot verify: its pair dataset {dataset!r} was not found (the folder "
                                   f"must be a workspace's cache/<model>/<dataset>)")
        else:
            for name in sorted(set(doc["shards"]) & set(pair)):
                out["problems"] += check_cache_shard(folder, doc, pair[name])[1]
    listed = {f"{n}.parquet" for n in doc["shards"]}
    out["problems"] += [f"{folder / n}: not in the manifest (extra)" for n in sorted(fs.list_files(folder))
                        if n.endswith(".parquet") and n not in listed and not n.startswith(".")]
    rows, nbytes = 0, 0
    acc = {c: {"min": np.inf, "max": -np.inf, "sum": 0.0, "n": 0, "nonfinite_rows": 0} for c in ("image_emb", "text_emb")}
    for name in doc["shards"]:
        path = folder / f"{name}.parquet"
        try:
            nbytes += fs.size(path)
        except FileNotFoundError:
            out["problems"].append(f"{path}: in the manifest but missing")
            continue
        try:
            t = read_parquet(path)
        except Exception as e:
            out["problems"].append(f"{path}: unreadable Parquet ({type(e).__name__}: {e})")
            continue
        rows += t.num_rows
        for c in acc:
            arr = t[c].combine_chunks()
            width = getattr(arr.type, "list_size", None)
            if width != doc["dim"]:
                out["problems"].append(f"{path}: {c} has width {width}, manifest dim {doc['dim']}")
                continue
            _norm_stats(acc[c], arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), width))
    out["rows"], out["file_bytes"] = rows, nbytes
    if rows:
        out["bytes_per_sample"] = round(nbytes / rows, 1)
    for c, a in acc.items():
        out[f"{c}_norm"] = ({"min": round(a["min"], 4), "mean": round(a["sum"] / a["n"], 4), "max": round(a["max"], 4)}
                            if a["n"] else None)
        out[f"{c}_nonfinite_rows"] = a["nonfinite_rows"]
        if a["nonfinite_rows"]:
            out["problems"].append(f"{folder}: {a['nonfinite_rows']} row(s) with non-finite {c}")
    return out


def summarize_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Per run folder: metric and selection row counts and the last step logged."""
    ws = Workspace(root)
    try:
        _, names, _ = next(fs.walk(ws.runs))
    except (OSError, StopIteration):
        names = []
    logs = {kind: ws.run_logs(kind) for kind in ("metrics", "selections")}
    out = []
    for name in sorted(n for n in names if not n.startswith(".")):
        r: dict[str, Any] = {"run": name}
        for kind in ("metrics", "selections"):
            n, last = 0, None
            for f in logs[kind].get(name, []):
                try:
                    steps = read_parquet(f, columns=["step"])["step"]
                except Exception as e:
                    r.setdefault("problems", []).append(f"{f}: unreadable ({type(e).__name__}: {e})")
                    continue
                n += len(steps)
                if len(steps):
                    m = pc.max(steps).as_py()
                    last = m if last is None else max(last, m)
            r[f"{kind}_rows"], r[f"{kind}_last_step"] = n, last
        out.append(r)
    return out


def summarize_workspace(root: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    ws = Workspace(root)
    datasets = [summarize_dataset(p, verify=verify) for p in ws.find_datasets().values()]
    caches = [summarize_cache(p, verify=verify) for p in find_cache_folders(root).values()]
    runs = summarize_runs(root)
    problems = [p for d in datasets + caches for p in d["problems"]] + [p for r in runs for p in r.get("problems", [])]
    problems += [f"{f}: holds cache files but no {MANIFEST_FILE}: no reader can use them" for f in unlisted_cache_folders(root)]
    # every other leftover (checkpoints, model exports, run logs, hidden dataset work folders); not
    # state/, which belongs to Prefect
    leftovers = [p for top in (ws.datasets, ws.cache, ws.models, ws.runs) for p in find_leftovers(top)]
    problems += _new_leftover_problems(leftovers, problems)
    return {"kind": "workspace", "path": str(ws.root), "datasets": datasets, "caches": caches, "runs": runs,
            "problems": problems, "notes": [n for d in datasets + caches for n in d["notes"]]}


def _new_leftover_problems(leftovers: list[Path], problems: list[str]) -> list[str]:
    """Problems for the leftovers that no per-item summary has named yet."""
    named = {p.split(": ", 1)[0] for p in problems}
    return [_leftover_problem(p) for p in leftovers if str(p) not in named]


def inspect_path(path: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """Summarise whatever `path` is: dataset folder, cache folder, workspace, or a folder of datasets/caches."""
    path = fs.as_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder")
    if (path / DATASET_FILE).exists():
        return summarize_dataset(path, verify=verify)
    if (path / MANIFEST_FILE).exists():
        return summarize_cache(path, verify=verify)
    if any((path / d).is_dir() for d in ("datasets", "cache", "runs")):
        return summarize_workspace(path, verify=verify)
    datasets = find_datasets(path)
    caches = [dp for dp, _, files in fs.walk(path) if MANIFEST_FILE in files and "/." not in str(dp)]
    leftovers = find_leftovers(path)
    if not datasets and not caches and not leftovers:
        raise FileNotFoundError(f"{path}: no dataset ({DATASET_FILE}), cache ({MANIFEST_FILE}) or workspace here")
    items = ([summarize_dataset(p, verify=verify) for p in datasets.values()]
             + [summarize_cache(p, verify=verify) for p in sorted(caches, key=str)])
    problems = [p for d in items for p in d["problems"]]
    problems += _new_leftover_problems(leftovers, problems)
    return {"kind": "folder", "path": str(path), "items": items,
            "problems": problems, "notes": [n for d in items for n in d["notes"]]}


def format_summary(s: Any, indent: int = 0) -> str:
    """Indented text of a summary dict (problems and notes listed last)."""
    pad = "  " * indent
    if isinstance(s, dict):
        lines = []
        keys = [k for k in s if k not in ("problems", "notes")] + [k for k in ("problems", "notes") if k in s]
        for k in keys:
            v = s[k]
            if isinstance(v, (dict, list)) and v and not (isinstance(v, list) and all(isinstance(x, (int, float, str)) for x in v) and len(str(v)) < 100):
                lines.append(f"{pad}{k}:")
                lines.append(format_summary(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {v}")
        return "\n".join(lines)
    if isinstance(s, list):
        parts = []
        for x in s:
            if isinstance(x, dict):
                body = format_summary(x, indent + 1).lstrip()
                parts.append(f"{pad}- {body}")
            else:
                parts.append(f"{pad}- {x}")
        return "\n".join(parts)
    return f"{pad}{s}"
