"""Input pipeline: super-batches of raw pairs zipped with cached embeddings (paper section 3.2, Appendix J).

Each training step reads one super-batch of B pairs (B = b for IID methods). Its content is a pure
function of (seed, epoch, index-in-epoch), so the data position of a run is just its step number and a
resumed run reads exactly the batches an uninterrupted one would have read.

Order within an epoch: shards are permuted, then grouped into windows of `shuffle_window` shards whose
samples are shuffled together (webdataset-style shard shuffling: memory stays bounded by the window while
the order is still well mixed). Decoding (JPEG -> tensor, tokenisation) runs in DataLoader worker processes.
Cached reference/teacher rows are zipped by uid and verified against the pair shard (storage.cache raises on
any mismatch): a stale, partial or foreign cache is never used silently.

A pair's caption is its metadata Parquet's `caption` (storage.shards.iter_samples: the one rule, which lets a
`storage.corrupt` copy swap captions without copying a tar). Its noise flag is the metadata's nullable `noisy`:
True/False where the dataset knows it (synthetic data, corrupted copies), null where it does not (imports);
`SuperBatch.noise_known` carries that, so the trainer reports an unknown noisy fraction as null, never as 0.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from storage import fs
from storage.cache import ModelMeta, read_cache_shard
from storage.workspace import dataset_identity
from storage.shards import (ImageError, ShardError, ShardRef, decode_image, iter_samples,
                            list_shards, load_dataset, read_metadata)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSpec:
    """One cached model to zip with the pairs: where its files are and what they must contain."""

    model_id: str
    cache_root: Path
    meta: ModelMeta

    def folder(self, dataset: str) -> Path:
        return self.cache_root / self.model_id / dataset


def dataset_name(dataset_dir: Path) -> str:
    """The dataset's identity, which is also its folder below each cache model: its path below
    `datasets/`, checked against `_dataset.json` (storage.workspace.dataset_identity: a copied or moved
    folder is refused exactly as the cache stage refuses it). A missing or broken `_dataset.json`, or
    one that does not match the folder's files, is a ShardError naming the file."""
    load_dataset(dataset_dir)
    return dataset_identity(dataset_dir)


def cached_model_meta(cache_root: Path, model_id: str, dataset_dirs: Sequence[str | Path]) -> ModelMeta:
    """The model metadata of a cache over the training datasets; every dataset must agree.

    Read from the first shard's cache file of each dataset; every other shard is then checked against
    it when it is opened (read_cache_shard(expect=...)), so a cache mixing two models fails loudly.
    """
    found: ModelMeta | None = None
    for d in dataset_dirs:
        d = fs.as_path(d)
        name = dataset_name(d)
        refs = list_shards(d)
        folder = fs.as_path(cache_root) / model_id / name
        if not folder.exists():
            raise FileNotFoundError(f"no cache of model {model_id!r} for dataset {name!r} (expected {folder}); "
                                    "run `aced cache` first")
        meta = read_cache_shard(folder, refs[0], expect=None).meta
        if found is not None and meta != found:
            raise ValueError(f"cache {folder} was written by another model than the rest: {meta} != {found}")
        found = meta
    if found is None:
        raise ValueError("no training datasets given")
    return found


@dataclass
class SuperBatch:
    """One training step's candidates (this rank's share of them), as the trainer's steps pass them on.

    images: uint8 [N, 3, H, W] (ModelBundle.pixels): cut into sub-batches and moved as bytes; the
        model's float input is made on the device (ModelBundle.normalize).
    tokens: int64 [N, L]; the student's tokenizer cuts L to the super-batch's longest caption where that is
        exact (pipeline.models.TrimmingTokenizer); a sub-batch keeps its super-batch's L.
    uids: the pairs' uids; noisy: bool [N], the caption-noise flags (False where unknown).
    noise_known: bool [N], True where the dataset records the pair's flag (metadata `noisy` not null);
        None means every flag is known (a batch built by hand).
    reference: cached reference (image, text) embeddings [N, d_ref] (None without a reference).
    teachers: cached teacher (image, text) embeddings [N, d_t], one pair per teacher.
    """

    step: int
    images: torch.Tensor
    tokens: torch.Tensor
    uids: np.ndarray
    noisy: torch.Tensor
    reference: tuple[torch.Tensor, torch.Tensor] | None
    teachers: list[tuple[torch.Tensor, torch.Tensor]]
    noise_known: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def subset(self, idx: torch.Tensor) -> "SuperBatch":
        """Rows `idx` (on any device): tensors are cut where they live, with no copy back to the host
        except the indices themselves (for the uids)."""
        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[idx.to(t.device)]

        return SuperBatch(step=self.step, images=cut(self.images), tokens=cut(self.tokens),
                          uids=self.uids[idx.cpu().numpy()], noisy=cut(self.noisy),
                          reference=None if self.reference is None else (cut(self.reference[0]), cut(self.reference[1])),
                          teachers=[(cut(i), cut(t)) for i, t in self.teachers],
                          noise_known=None if self.noise_known is None else cut(self.noise_known))

    def to(self, device: torch.device) -> "SuperBatch":
        """Tensors on `device` (non-blocking from pinned memory); uids stay on the host."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return dataclasses.replace(self, images=move(self.images), tokens=move(self.tokens), noisy=move(self.noisy),
                                   reference=None if self.reference is None else tuple(map(move, self.reference)),
                                   teachers=[(move(i), move(t)) for i, t in self.teachers],
                                   noise_known=None if self.noise_known is None else move(self.noise_known))

    def pin_memory(self) -> "SuperBatch":
        """Page-locked copies (the DataLoader calls this with pin_memory=True) for asynchronous copies."""
        def pin(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory()

        return dataclasses.replace(self, images=pin(self.images), tokens=pin(self.tokens), noisy=pin(self.noisy),
                                   reference=None if self.reference is None else tuple(map(pin, self.reference)),
                                   teachers=[(pin(i), pin(t)) for i, t in self.teachers],
                                   noise_known=None if self.noise_known is None else pin(self.noise_known))


_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def uid_keys(uids) -> np.ndarray:
    """32-hex uids (a sequence of str, or an Arrow string array / column) as 16-byte big-endian keys
    (numpy 'S16'): 16 bytes per pair instead of a ~100-byte Python string, and byte order = numeric
    order, so sorting finds duplicates without a set. Arrow input is converted without a Python object
    per uid (the hex digits are decoded from the column's value buffer)."""
    import pyarrow as pa

    if isinstance(uids, (pa.Array, pa.ChunkedArray)):
        arr = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
        arr = arr.cast(pa.string())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
        if arr.null_count or not np.all(np.diff(offsets) == 32):
            return uid_keys(arr.to_pylist())  # a bad uid: the slow path names it
        digits = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 32)
    else:
        if not len(uids):
            return np.zeros(0, "S16")
        if any(len(u) != 32 for u in uids):
            bad = next(u for u in uids if len(u) != 32)
            raise ValueError(f"uid {bad!r} is not 32 hex digits (DataComp's 128-bit uid)")
        digits = np.frombuffer("".join(uids).encode("ascii", "replace"), dtype=np.uint8).reshape(-1, 32)
    nib = _NIBBLE[digits]
    if (nib == 255).any():
        row = int(np.nonzero((nib == 255).any(axis=1))[0][0])
        raise ValueError(f"uid {bytes(digits[row]).decode('ascii', 'replace')!r} is not 32 hex digits "
                         "(DataComp's 128-bit uid)")
    return np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2]).view("S16").ravel()


def duplicate_uids(keys: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """The keys that occur more than once, by sorting (O(n log n) time; `in_place` sorts `keys` itself
    instead of a copy, so the check costs 16 bytes per pair plus one byte of mask)."""
    ordered = keys if in_place else keys.copy()
    ordered.sort()
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


class PairIndex:
    """Where every training pair is: per shard its ref, dataset and row count, from `_dataset.json` alone.

    Start-up reads no per-pair metadata (O(shards) memory and time: seconds at 10^8 pairs); a shard's uids
    and noise flags are read when the loader opens it. Pairs are unique within a dataset (its writer
    refuses duplicate uids); across several datasets the uids are checked once here, by sorting 16-byte
    keys (`duplicate_uids`), with every shard's uid column read once."""

    def __init__(self, dataset_dirs: Sequence[str | Path]):
        self.shards: list[ShardRef] = []
        self.datasets: list[str] = []
        for d in dataset_dirs:
            d = fs.as_path(d)
            name = dataset_name(d)
            refs = list_shards(d)
            if not refs:
                raise FileNotFoundError(f"{d}: dataset has no shards")
            self.shards += refs
            self.datasets += [name] * len(refs)
        self.rows = np.array([r.rows for r in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)])
        if len(set(self.datasets)) > 1:
            keys = np.empty(len(self), dtype="S16")  # filled shard by shard: one array, no concatenation copy
            for ref, start in zip(self.shards, self.offsets):
                part = uid_keys(read_metadata(ref).column("uid"))
                keys[start:start + len(part)] = part
            dup = duplicate_uids(keys, in_place=True)
            if len(dup):
                example = dup[0].ljust(16, bytes(1)).hex()  # 'S16' drops trailing zero bytes
                raise ValueError(f"{len(dup)} uid(s) occur in more than one training dataset (e.g. {example}): "
                                 "the same pairs are listed twice")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, gid: int) -> tuple[int, int]:
        """Global sample id -> (shard number, row in shard)."""
        shard = int(np.searchsorted(self.offsets, gid, side="right") - 1)
        return shard, int(gid - self.offsets[shard])


class EpochOrder:
    """Global sample ids of one epoch, read a slice at a time: shards permuted, then the samples of each
    window of `window` shards shuffled together. Memory is O(shards + window rows), not O(pairs).

    The order is the one a single generator gives when it permutes the shards and then shuffles window
    after window (runs resume into exactly the batches they would have read); reaching window k replays
    the shuffles of the windows before it on scratch arrays (a shuffle's draws depend only on its length),
    once per epoch and reader, as the reader moves forward."""

    def __init__(self, rows: np.ndarray, *, seed: int, epoch: int, window: int):
        self.rng = np.random.default_rng([seed, epoch, 0x5EED])
        self.offsets = np.concatenate([[0], np.cumsum(rows)])
        perm = self.rng.permutation(len(rows))
        self.windows = [perm[i:i + window] for i in range(0, len(perm), window)]
        sizes = np.array([int(np.sum(rows[w])) for w in self.windows], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._next = 0  # the window whose shuffle the generator draws next
        self._cache: dict[int, np.ndarray] = {}

    def _window(self, k: int) -> np.ndarray:
        if k in self._cache:
            return self._cache[k]
        if k < self._next:
            raise ValueError("EpochOrder reads forward only (a new one replays the epoch)")
        while self._next <= k:
            w = self._next
            ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in self.windows[w]])
            self.rng.shuffle(ids)
            if w == k:
                self._cache = {w: ids, **{j: v for j, v in self._cache.items() if j == w - 1}}
            self._next += 1
        return self._cache[k]

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Ids at epoch positions [start, stop)."""
        out = []
        k = int(np.searchsorted(self.starts, start, side="right") - 1)
        while start < stop:
            ids = self._window(k)
            lo, hi = start - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
            out.append(ids[lo:hi])
            start = int(self.starts[k] + hi)
            k += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class SuperBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item `step` is the super-batch of that training step: all `size` pairs, or
    with ``shard=(rank, world)`` (data-parallel training) only this rank's contiguous size/world of them,
    so each rank reads and decodes its own share of the same global order."""

    def __init__(self, index: PairIndex, *, size: int, seed: int, window: int,
                 preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
                 reference: CacheSpec | None = None, teachers: Sequence[CacheSpec] = (), on_bad_sample: str = "raise",
                 max_open_shards: int | None = None, shard: tuple[int, int] = (0, 1)):
        rank, world = shard
        if not 0 <= rank < world or size % world:
            raise ValueError(f"shard {shard}: need 0 <= rank < world and a super-batch ({size}) divisible by world")
        self.shard = (rank, world)
        if len(index) < size:
            raise ValueError(f"the training data holds {len(index)} pairs, fewer than one super-batch of {size}")
        self.index = index
        self.size = size
        self.seed = seed
        self.window = window
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.has_reference = reference is not None
        self.caches = ([reference] if reference is not None else []) + list(teachers)
        self.on_bad_sample = on_bad_sample
        self.per_epoch = len(index) // size  # drop the last partial super-batch of each epoch
        self._max_open = max_open_shards or window + 2
        self._open: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._order: EpochOrder | None = None
        self._order_epoch, self._order_pos = -1, 0
        self.skipped = 0

    def __len__(self) -> int:  # unbounded in steps; DataLoader only asks the sampler
        return 2**62

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, super-batch within epoch) read at a training step."""
        return divmod(step, self.per_epoch)

    def _ids(self, step: int) -> np.ndarray:
        epoch, k = self.position(step)
        rank, world = self.shard
        share = self.size // world
        start = k * self.size + rank * share
        if epoch != self._order_epoch or start < self._order_pos:  # a new epoch, or a reader sent backwards
            self._order = EpochOrder(self.index.rows, seed=self.seed, epoch=epoch, window=self.window)
            self._order_epoch = epoch
        self._order_pos = start
        return self._order.slice(start, start + share)

    def _shard(self, s: int) -> dict[str, Any]:
        """Raw bytes, captions and cached rows of one shard (kept in a small LRU)."""
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        ref = self.index.shards[s]
        dataset = self.index.datasets[s]
        meta = read_metadata(ref)
        expected = np.asarray(meta.column("uid").to_pylist(), dtype=object)
        flags = meta.column("noisy").to_pylist()  # null: the dataset does not know (a plain import)
        noisy = np.asarray([x is True for x in flags], dtype=bool)
        known = np.asarray([x is not None for x in flags], dtype=bool)
        rows: list[tuple[bytes, str] | None] = [None] * len(expected)
        position = {u: i for i, u in enumerate(expected)}
        # iter_samples checks the tar's sha256 first (a flipped bit in a JPEG may still decode).
        for sample in iter_samples(ref, on_error=self.on_bad_sample):
            rows[position[sample.uid]] = (sample.image_bytes, sample.caption)
        missing = sum(r is None for r in rows)
        if missing:
            self.skipped += missing
            log.warning("%s: %d bad samples skipped (on_bad_sample=skip)", ref.tar_path, missing)
        cached = []
        for spec in self.caches:
            c = read_cache_shard(spec.folder(dataset), ref, expect=spec.meta)
            if list(c.uids) != list(expected):  # storage checks this too; the trainer must never zip blindly
                raise ValueError(f"cache {spec.folder(dataset)} shard {ref.name}: uids differ from the pair shard")
            cached.append((c.image_emb, c.text_emb))
        entry = {"rows": rows, "cached": cached, "ref": ref, "uids": expected, "noisy": noisy, "known": known}
        self._open[s] = entry
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return entry

    def _decode(self, data: bytes, ref: ShardRef, uid: str) -> torch.Tensor | None:
        try:
            image = decode_image(data, where=f"{ref.tar_path}: sample uid={uid}")
        except ImageError as exc:
            if self.on_bad_sample == "skip":
                self.skipped += 1
                log.warning("skipping %s", exc)
                return None
            raise
        return self.preprocess(image)

    def __getitem__(self, step: int) -> SuperBatch:
        ids = self._ids(step)
        images, captions, uids, noisy, known = [], [], [], [], []
        cached: list[tuple[list, list]] = [([], []) for _ in self.caches]
        for gid in ids:
            s, r = self.index.locate(int(gid))
            entry = self._shard(s)
            row = entry["rows"][r]
            if row is None:
                continue
            uid = entry["uids"][r]
            image = self._decode(row[0], entry["ref"], uid)
            if image is None:
                continue
            images.append(image)
            captions.append(row[1])
            uids.append(uid)
            noisy.append(bool(entry["noisy"][r]))
            known.append(bool(entry["known"][r]))
            for (ci, ct), (img_emb, txt_emb) in zip(cached, entry["cached"]):
                ci.append(img_emb[r])
                ct.append(txt_emb[r])
        if not images:
            raise ShardError(f"step {step}: every sample of the super-batch was bad")
        embs = [(torch.from_numpy(np.stack(ci)).float(), torch.from_numpy(np.stack(ct)).float()) for ci, ct in cached]
        return SuperBatch(step=step, images=torch.stack(images), tokens=self.tokenizer(captions),
                          uids=np.asarray(uids, dtype=object), noisy=torch.tensor(noisy, dtype=torch.bool),
                          reference=embs[0] if self.has_reference else None,
                          teachers=embs[1:] if self.has_reference else embs,
                          noise_known=torch.tensor(known, dtype=torch.bool))


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def loader(dataset: SuperBatches, *, start_step: int, stop_step: int, num_workers: int,
           pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Super-batches for steps [start_step, stop_step), decoded ahead by worker processes (in page-locked
    memory with `pin_memory`, for asynchronous copies to a GPU)."""
    return torch.utils.data.DataLoader(
        dataset, sampler=_Steps(start_step, stop_step), batch_size=None, num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False,
        # Workers are forked: each keeps its own shard LRU. One torch thread each so decoding does not
        # fight the training step for the two cores.
        worker_init_fn=_worker_init if num_workers > 0 else None,
        # spawn, not fork: the trainer often runs inside a Prefect flow whose threads (API client, log
        # shipping) make a forked child unsafe; measured here as workers dying with exit code 1.
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
