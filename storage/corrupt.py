"""Noise injection for real pair sets (`aced data corrupt`; issue 13): a copy of a pair dataset in which a
fraction of the captions is replaced by captions of other images, each swapped pair flagged ``noisy``.

Synthetic data knows which captions mismatch (pipeline.synthetic); real data does not, so the selection
statistics (noisy fraction of the super-batch vs the trained batch, paper Figs. 4-5) need noise that is
injected and recorded. `corrupt_dataset`:

- keeps the source's pairs and order (optionally one split of it) and chooses exactly
  ``round(swap_frac * n)`` of them from a seeded permutation (so a smaller fraction under the same seed
  swaps a subset of the pairs a larger one swaps);
- permutes the chosen pairs' captions among themselves within each split (a derangement: every chosen
  caption is used once, never by its own pair nor by another pair of the same image, as Flickr8k's five
  captions per image would otherwise allow), deterministic in (seed, swap_frac);
- flags swapped pairs ``noisy=True``. Pairs it leaves alone keep the source's flag, and where the source
  records none (a plain import) they are taken as matching their image (``noisy=False``): the copy's
  noise is known (see pipeline.data: an unknown flag makes the noisy-fraction metrics null);
- shares the image bytes: the copy is registered in place on the source's tars (storage.shards
  `register_shards`: metadata Parquet + `_dataset.json`, no tar written), so every reader still checks
  each tar against the sha256 the source recorded. Its metadata carries the swapped captions and, per
  pair, `tar_uid` (the source pair whose tar members it reads) and `caption_uid` (the source pair its
  caption comes from): storage.shards.PROVENANCE_FIELDS. The caption rule that lets a row's caption
  differ from its tar's `.txt` is written once, in `storage.shards.iter_samples`.

A swapped pair is a new pair, so it gets a new uid (its cached embeddings differ from the source pair's);
a pair left alone keeps its uid.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from storage.shards import (PROVENANCE_SCHEMA, DatasetInfo, ExternalShard, check_tar_sha256, load_dataset,
                            make_uid, read_metadata, read_provenance, register_shards)
from storage.workspace import Workspace

log = logging.getLogger(__name__)

MIX_ROUNDS = 10
"""Rounds of random valid transpositions applied to the constructed derangement (`derange`)."""


def swap_count(n: int, swap_frac: float) -> int:
    """round(swap_frac * n), halves rounded up (Python's round() rounds them to even)."""
    return int(math.floor(swap_frac * n + 0.5))


def derange(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation `donor` of range(m) with ``groups[donor[i]] != groups[i]`` for every i (a
    caption never goes to a pair of its own image). Exists iff no group holds more than half of the m
    items (ValueError otherwise).

    Constructed, then mixed: items are laid out group by group in random order and each takes the item
    s places further on (s = the largest group, so a group's block never reaches itself); then
    MIX_ROUNDS rounds of random disjoint transpositions of donors, each kept only where both items stay
    valid, so the result is valid by construction and no longer tied to the layout.
    """
    m = len(groups)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    codes, counts = np.unique(groups, return_inverse=True, return_counts=True)[1:]
    s = int(counts.max())
    if 2 * s > m:
        raise ValueError(f"cannot swap captions among {m} pairs when {s} of them show the same image "
                         f"(at most half may): choose a larger --swap-frac or more data")
    image_rank = rng.permutation(len(counts))[codes]
    layout = np.lexsort((rng.random(m), image_rank))  # grouped by image, images and items in random order
    donor = np.empty(m, dtype=np.int64)
    donor[layout] = layout[(np.arange(m) + s) % m]
    for _ in range(MIX_ROUNDS):
        p = rng.permutation(m)
        a, b = p[0:m - 1:2], p[1:m:2]
        ok = (codes[donor[b]] != codes[a]) & (codes[donor[a]] != codes[b])
        a, b = a[ok], b[ok]
        donor[a], donor[b] = donor[b], donor[a].copy()
    return donor


def corrupt_dataset(root: str | os.PathLike, src: str | os.PathLike, *, name: str, swap_frac: float, seed: int,
                    split: str | None = None, overwrite: bool = False) -> DatasetInfo:
    """Write dataset `name` in workspace `root`: a copy of dataset `src` (a name below `datasets/` or a
    dataset folder) with `swap_frac` of its captions swapped (module docstring). `split`: keep only that
    split, either the dataset `<src>/<split>` (an import that writes one dataset per split, e.g.
    `aced import captions` with split lists) or the pairs whose `split` column says so. Refuses to
    replace an existing dataset without `overwrite`, and to write over its own source."""
    if isinstance(swap_frac, bool) or not isinstance(swap_frac, (int, float)) or not 0.0 <= swap_frac <= 1.0:
        raise ValueError(f"swap_frac must be a number in [0, 1], got {swap_frac!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    ws = Workspace(root)
    out_dir = ws.dataset(name)
    src_dir, split_in_column = _source(ws, src, split)
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(f"dataset {name!r} is the source itself: the copy needs a new name")
    info = load_dataset(src_dir)
    for shard in info.shards:
        check_tar_sha256(shard)  # the copy records these checksums: the tars must still be the source's

    # Every kept pair of the source, in order (columns as lists: a pair is a few short strings).
    rows: list[dict[str, Any]] = []
    owner: list[int] = []  # source shard of each row
    for s, shard in enumerate(info.shards):
        table = read_metadata(shard)
        prov = read_provenance(shard)  # a copy of a copy: the tar members stay the first source's
        part = table.to_pylist()
        tar_uids = prov.column("tar_uid").to_pylist() if prov is not None else [r["uid"] for r in part]
        caption_uids = prov.column("caption_uid").to_pylist() if prov is not None else [r["uid"] for r in part]
        for r, t, c in zip(part, tar_uids, caption_uids):
            if split_in_column is not None and r["split"] != split_in_column:
                continue
            rows.append({**r, "tar_uid": t, "caption_uid": c})
            owner.append(s)
    if not rows:
        splits = sorted({str(r["split"]) for shard in info.shards for r in read_metadata(shard).select(["split"]).to_pylist()})
        raise ValueError(f"dataset {info.name!r} has no pair of split {split_in_column!r} (its splits: {', '.join(splits)})")

    n = len(rows)
    k = swap_count(n, float(swap_frac))
    rng = np.random.default_rng([seed, 0xC0FFEE])
    chosen = np.sort(rng.permutation(n)[:k])  # a prefix of one permutation: nested in swap_frac
    new_caption: dict[int, int] = {}  # row -> row whose caption it takes
    split_of = np.array([str(rows[i]["split"]) for i in chosen], dtype=object)
    for value in sorted(set(split_of.tolist())):  # captions move within their split only
        members = chosen[split_of == value]
        images = np.array([rows[i]["image_id"] for i in members], dtype=object)
        try:
            donor = derange(images, rng)
        except ValueError as e:
            raise ValueError(f"dataset {info.name!r}, split {value}: {e}") from None
        new_caption.update(zip(members.tolist(), members[donor].tolist()))

    out_rows: list[list[dict[str, Any]]] = [[] for _ in info.shards]
    for i, r in enumerate(rows):
        d = new_caption.get(i)
        if d is None:
            row = {**r, "noisy": r["noisy"] if r["noisy"] is not None else False}
        else:
            donor = rows[d]
            # The pair (this pair's image, that pair's caption), named by the two source pairs it joins.
            uid = make_uid("aced.corrupt", r["tar_uid"], donor["caption_uid"], 0)
            row = {**r, "uid": uid, "caption": donor["caption"], "caption_uid": donor["caption_uid"], "noisy": True}
        out_rows[owner[i]].append(row)

    # Tars inside the workspace are recorded relative to the copy (a workspace moves as one folder);
    # a pool registered from elsewhere keeps its absolute path.
    tars = [Path(os.path.abspath(shard.tar_path)) for shard in info.shards]
    inside = all(_is_below(t.resolve(), ws.root.resolve()) for t in tars)
    externals = [ExternalShard(tar=t, sha256=shard.sha256, rows=part)
                 for t, shard, part in zip(tars, info.shards, out_rows) if part]
    extra = {"corrupted_from": info.name, "swap_frac": float(swap_frac), "seed": seed,
             "split": split_in_column if split_in_column is not None else split, "swapped": k}
    out = register_shards(externals, out_dir, name=name, relative=inside, overwrite=overwrite, extra=extra,
                          source=f"corrupt:{info.name}:swap_frac={float(swap_frac)},seed={seed}",
                          schema=PROVENANCE_SCHEMA)
    log.info("wrote %s: %d pairs, %d captions swapped (%.1f%%), on the tars of %s", name, n, k,
             100.0 * k / max(1, n), info.name)
    return out


def _source(ws: Workspace, src: str | os.PathLike, split: str | None) -> tuple[Path, str | None]:
    """(source dataset folder, split value to filter its `split` column by, or None)."""
    if split is not None:
        try:
            return ws.resolve_dataset(f"{src}/{split}"), None  # one dataset per split
        except FileNotFoundError:
            pass
    return ws.resolve_dataset(src), split


def _is_below(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False
