"""Stage 1 of the pipeline: embed pair shards with the reference and teacher models into the cache.

Paper Appendix J ("offline" reference/teacher): the reference scores and the teacher targets only
depend on the frozen models and the data, so they are computed once per (shard, model) and cached
as Parquet (`storage.cache`); training then never runs these models. This module plans that work,
runs it, and writes each finished shard through `storage.cache.CacheWriter` (atomic file, then
manifest), so an interrupted run leaves only complete shards and a rerun redoes nothing done.

Two engines compute the same numbers with the same code (`MultiModelEmbedder.embed_chunk`):
- `embed_shards_ray`: ONE Ray Data pipeline over all pending shards, models in an actor pool
  (`map_batches(MultiModelEmbedder, compute=ActorPoolStrategy(size=n))`), the same code on a laptop
  (`ray.init()` local) or a cluster (`ray.init(address=...)`, GPU actors);
- `embed_shards_plain`: one process, a plain loop (the baseline of benchmarks/cache.py, and handy
  for debugging).

Design choices (why):
- One actor holds *every* model of the run (reference AND teacher) instead of one chained
  `map_batches` per model: each JPEG is decoded once and each distinct preprocessing applied once,
  and no decoded tensors travel through the object store between stages (at 224 px they would
  outweigh the JPEG bytes ~30x). It costs flexibility (one pool size for all models; every actor
  must fit every model): the reference and teacher of this project fit on one GPU together.
- A Ray *row* is a *chunk* of up to `chunk_size` consecutive samples of one shard, and a model
  always sees exactly one chunk per forward. Batch composition is then fixed by the data alone,
  not by how Ray happens to block or batch rows, so the Ray and plain engines run identical
  forwards (same inputs, same batch shapes) and can write byte-identical caches.
- The driver (the caller of `embed_shards_ray`) writes the shards: the manifest update of
  `CacheWriter` is a read-modify-write, so a single writer process keeps it race free, and the
  object store only carries embeddings, never half-written files. Ray Data's own writers are
  not used (`write_parquet` is not atomic and names files at random: STACK.md).
- Rows of a shard are put back in shard order by (chunk start) before writing; with
  `preserve_order` shards also complete, and are committed, in plan order.

This is the one `pipeline/` module that imports Ray (ARCHITECTURE.md). It never imports Prefect:
progress goes to a callback (the flow logs it) and to `logging`.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from storage import fs
from storage.cache import CacheError, CacheWriter, ModelMeta, cache_dir, read_cache_shard
from storage.shards import ShardRef, decode_image, iter_samples, list_shards
from storage.workspace import Workspace, dataset_identity

# torch, PIL and the models are imported where they are used: the Ray read tasks import this
# module too, and a worker process that only reads shards should not pay seconds for torch.

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")

__all__ = [
    "ModelSpec", "PlanItem", "CachePlan", "ShardWritten", "EmbedResult", "MultiModelEmbedder",
    "resolve_models", "resolve_datasets", "model_meta", "plan_cache", "verify_plan", "cache_lock",
    "embed_shards_plain", "embed_shards_ray", "ray_session",
]


# --------------------------------------------------------------------------------------------
# the plan: which (shard, model) pairs are missing from the cache


@dataclass(frozen=True)
class ModelSpec:
    """One model of a cache run."""

    model_dir: Path
    """Folder written by `pipeline.models.save_model`."""
    meta: ModelMeta
    """What the cache records about it: model_id (= folder name), fingerprint, dim, scale, bias."""

    @property
    def model_id(self) -> str:
        return self.meta.model_id


@dataclass(frozen=True)
class PlanItem:
    """One pair shard and the models whose cache of it is missing (or stale)."""

    dataset: str
    """Dataset name relative to `<root>/datasets` (may contain '/')."""
    shard: ShardRef
    model_ids: tuple[str, ...]
    """Subset of the plan's models, in plan order; never empty."""


@dataclass(frozen=True)
class CachePlan:
    """The work of one cache run: pending (shard, models) items in dataset then shard order."""

    root: Path
    """Workspace folder (`<root>/datasets`, `<root>/cache`)."""
    models: tuple[ModelSpec, ...]
    datasets: tuple[str, ...]
    """Every dataset of the run (also those with nothing pending): what `verify_plan` checks."""
    items: tuple[PlanItem, ...]
    dtype: str = "float16"
    """Embedding dtype stored in the cache ("float16" | "float32")."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        ids = [m.model_id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        for it in self.items:
            if not it.model_ids or not set(it.model_ids) <= set(ids):
                raise ValueError(f"plan item {it.dataset}/{it.shard.name}: bad model ids {it.model_ids}")

    @property
    def cache_dir(self) -> Path:
        return Workspace(self.root).cache

    @property
    def pairs(self) -> int:
        """Rows to read (each pending shard once, whatever the number of models)."""
        return sum(it.shard.rows for it in self.items)

    @property
    def embeddings(self) -> int:
        """(row, model) pairs to compute."""
        return sum(it.shard.rows * len(it.model_ids) for it in self.items)

    def fingerprints(self) -> dict[str, str]:
        return {m.model_id: m.meta.fingerprint for m in self.models}

    def spec(self, model_id: str) -> ModelSpec:
        for m in self.models:
            if m.model_id == model_id:
                return m
        raise KeyError(model_id)

    def writer(self, dataset: str, model_id: str) -> CacheWriter:
        return CacheWriter(self.cache_dir, dataset, self.spec(model_id).meta, dtype=self.dtype)

    def refresh(self) -> "CachePlan":
        """The same plan minus what is done by now (a retried or resumed run skips it)."""
        items = []
        for it in self.items:
            left = tuple(m for m in it.model_ids if not self.writer(it.dataset, m).done(it.shard))
            if left:
                items.append(PlanItem(it.dataset, it.shard, left))
        return CachePlan(self.root, self.models, self.datasets, tuple(items), self.dtype)

    def summary(self) -> dict:
        return {"shards": len(self.items), "pairs": self.pairs, "embeddings": self.embeddings,
                "models": [m.model_id for m in self.models], "dtype": self.dtype}


def resolve_models(root: Path, models: Sequence[str | os.PathLike]) -> list[Path]:
    """Model folders from ids (`<root>/models/<id>`) or paths; a clear error for anything else."""
    if not models:
        raise ValueError("no models given: name at least one model id (under <root>/models) or model folder")
    from pipeline.models import local_model_dir

    out = [local_model_dir(Workspace(root).resolve_model(m)).resolve() for m in models]  # an s3:// one: its copy
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two model folders share a name (the model id): {[str(p) for p in out]}")
    return out


def resolve_datasets(root: Path, datasets: Sequence[str] | None) -> dict[str, Path]:
    """{name: folder} for the given datasets under `<root>/datasets`, or for all of them when None.

    Each entry is a dataset name ("flickr8k/train") or its folder; a folder outside `<root>/datasets`
    is refused, since the cache layout names datasets by their path below it, and so is a folder whose
    `_dataset.json` names another dataset (copied or moved: storage.workspace.dataset_identity, the
    same check the trainer makes).
    """
    ws = Workspace(root)
    base = fs.resolve(ws.datasets)
    found = ws.find_datasets()
    if datasets is None:
        if not found:
            raise FileNotFoundError(f"no datasets under {base}")
        wanted = list(found)
    else:
        wanted = []
        for d in datasets:
            name, p = str(d), fs.as_path(d)
            if name not in found and p.is_dir():
                try:
                    name = fs.posix_parts(p).relative_to(fs.posix_parts(base)).as_posix()
                except ValueError:
                    raise ValueError(f"dataset folder {p} is not under {base}: the cache names datasets by "
                                     f"their path below <root>/datasets") from None
            if name not in found:
                raise FileNotFoundError(f"dataset {str(d)!r} not found under {base} (have: {sorted(found)})")
            wanted.append(name)
    for name in wanted:
        dataset_identity(found[name])
    return {name: found[name] for name in wanted}


def model_meta(model_dir: Path) -> ModelMeta:
    """Load a model once to learn what the cache records about it (model_id = folder name).

    `dim` is read off a real forward (one caption), so it is the width actually written.
    """
    import torch

    from pipeline.models import fingerprint, load_model

    bundle = load_model(model_dir)
    with torch.inference_mode():
        dim = int(bundle.encode_text(bundle.tokenizer(["a"])).shape[-1])
    return ModelMeta(model_id=Path(model_dir).name, fingerprint=fingerprint(bundle), dim=dim,
                     logit_scale=float(bundle.logit_scale), logit_bias=float(bundle.logit_bias))


def plan_cache(root: str | os.PathLike, datasets: Sequence[str] | None, models: Sequence[str | os.PathLike],
               *, dtype: str = "float16") -> CachePlan:
    """Pair every shard of `datasets` with every model whose `_manifest.json` lacks it (`CacheWriter.done`)."""
    root = fs.as_path(root)
    specs = tuple(ModelSpec(d, model_meta(d)) for d in resolve_models(root, models))
    folders = resolve_datasets(root, datasets)
    draft = CachePlan(root, specs, tuple(folders), (), dtype)
    items = []
    for name, folder in folders.items():
        writers = {s.model_id: draft.writer(name, s.model_id) for s in specs}
        for shard in list_shards(folder):
            left = tuple(mid for mid, w in writers.items() if not w.done(shard))
            if left:
                items.append(PlanItem(name, shard, left))
    return CachePlan(root, specs, tuple(folders), tuple(items), dtype)


def verify_plan(plan: CachePlan) -> tuple[int, list[str]]:
    """Post-condition of a run: every shard of the plan's datasets is cached for every model, and
    reads back through `read_cache_shard` (uids = the shard's, same model, fresh, finite).

    Returns (files checked, problems). Unlike `storage.cache.verify_cache` it looks only at this
    run's datasets and models, so an unrelated half-cached dataset does not fail the run.
    """
    problems, checked = [], 0
    for name, folder in resolve_datasets(plan.root, list(plan.datasets)).items():
        shards = list_shards(folder)
        for spec in plan.models:
            cdir = cache_dir(plan.root, spec.model_id, name)
            for shard in shards:
                checked += 1
                try:
                    read_cache_shard(cdir, shard, expect=spec.meta)
                except CacheError as e:
                    problems.append(str(e))
    return checked, problems


@contextlib.contextmanager
def cache_lock(root: str | os.PathLike) -> Iterator[None]:
    """One cache run per workspace at a time (a nightly schedule may meet a manual `aced cache`).

    Two runs would both read-modify-write the same `_manifest.json`. An advisory `flock` on
    `<root>/state/cache.lock` is released by the kernel when its holder dies, so a killed run
    never blocks the next one.
    """
    path = Workspace(root).state / "cache.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RuntimeError(f"another cache run holds {path} (pid {holder}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


# --------------------------------------------------------------------------------------------
# the math: one actor / one process holding every model of the run


def _preprocess_key(preprocess) -> str:
    """Models whose preprocessing prints the same (torchvision Compose: sizes, crops, mean/std)
    share one preprocessed tensor; a false 'different' only costs a second preprocessing."""
    return repr(preprocess)


class MultiModelEmbedder:
    """Every model of a cache run in one process: decode each image once, preprocess once per
    distinct preprocessing, run each model on the chunk, return L2-normalised float32 embeddings.

    Used as the Ray Data actor class (`__call__` on pyarrow batches of chunk rows) and directly by
    the plain engine (`embed_chunk`). Inference is float32, eval mode, `torch.inference_mode`.
    """

    def __init__(self, model_dirs: Sequence[str], *, torch_threads: int | None = None, device: str = "auto",
                 expect_fingerprints: dict[str, str] | None = None):
        import torch

        from pipeline.models import fingerprint, load_model, resolve_device

        if torch_threads is not None:
            # Ray pins OMP_NUM_THREADS=1 in actors with fractional CPUs; say how many we may use.
            torch.set_num_threads(int(torch_threads))
        self.device = resolve_device(device)
        self.models: dict[str, object] = {}
        for d in model_dirs:
            bundle = load_model(Path(d))
            want = (expect_fingerprints or {}).get(Path(d).name)
            if want is not None and fingerprint(bundle) != want:
                # the folder changed after planning: its cache files would carry a wrong fingerprint
                raise RuntimeError(f"model {d} changed since the run was planned (fingerprint {fingerprint(bundle)[:12]} "
                                   f"!= {want[:12]}); re-run to re-plan")
            bundle.model.to(self.device).eval()
            self.models[Path(d).name] = bundle
        self.model_ids = tuple(self.models)
        self._pre_key = {mid: _preprocess_key(b.preprocess) for mid, b in self.models.items()}

    def embed_chunk(self, images: Sequence[bytes], captions: Sequence[str], model_ids: Iterable[str],
                    *, where: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{model_id: (image_emb [n, d] float32, text_emb [n, d] float32)} for one chunk.

        `where` names the chunk (dataset/shard:start) in decode errors.
        """
        import torch

        model_ids = list(model_ids)
        # ImageError (a ValueError) names the chunk and row
        pil = [decode_image(data, where=f"{where} row {i}") for i, data in enumerate(images)]
        pixels: dict[str, "torch.Tensor"] = {}
        out = {}
        with torch.inference_mode():
            for mid in model_ids:
                b = self.models[mid]
                key = self._pre_key[mid]
                if key not in pixels:
                    pixels[key] = torch.stack([b.preprocess(im) for im in pil]).to(self.device, torch.float32)
                img = b.encode_image(pixels[key])
                txt = b.encode_text(b.tokenizer(list(captions)).to(self.device))
                out[mid] = (img.float().cpu().numpy(), txt.float().cpu().numpy())
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data entry: chunk rows in, one row per chunk out with raw float32 embedding bytes,
        and where it was computed (the Ray node id and this actor's pid: `EmbedResult.nodes`)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        cols: dict[str, list] = {"item": [], "start": [], "uids": [], "node": [], "pid": []}
        for mid in self.model_ids:
            cols[f"{mid}/img"], cols[f"{mid}/txt"] = [], []
        for row in batch.to_pylist():
            need = row["models"]
            where = f"{row['where']}:{row['start']}"
            res = self.embed_chunk(row["images"], row["captions"], need, where=where)
            cols["item"].append(row["item"])
            cols["start"].append(row["start"])
            cols["uids"].append(row["uids"])
            cols["node"].append(node)
            cols["pid"].append(os.getpid())
            for mid in self.model_ids:
                img, txt = res.get(mid, (None, None))
                cols[f"{mid}/img"].append(None if img is None else np.ascontiguousarray(img).tobytes())
                cols[f"{mid}/txt"].append(None if txt is None else np.ascontiguousarray(txt).tobytes())
        return pa.table(cols, schema=_chunk_out_schema(self.model_ids))


def _chunk_out_schema(model_ids: Sequence[str]) -> pa.Schema:
    fields = [pa.field("item", pa.int32()), pa.field("start", pa.int32()), pa.field("uids", pa.list_(pa.string())),
              pa.field("node", pa.string()), pa.field("pid", pa.int64())]
    for mid in model_ids:
        fields += [pa.field(f"{mid}/img", pa.binary()), pa.field(f"{mid}/txt", pa.binary())]
    return pa.schema(fields)


_CHUNK_SCHEMA = pa.schema([
    pa.field("item", pa.int32()),            # index into CachePlan.items
    pa.field("where", pa.string()),          # "dataset/shard" for error messages
    pa.field("start", pa.int32()),           # first row of the chunk within its shard
    pa.field("models", pa.list_(pa.string())),
    pa.field("uids", pa.list_(pa.string())),
    pa.field("images", pa.list_(pa.binary())),
    pa.field("captions", pa.list_(pa.string())),
])


def _shard_chunks(item: PlanItem, chunk_size: int) -> Iterator[tuple[int, list, list, list]]:
    """(start, uids, image bytes, captions) for consecutive chunks of one shard, in shard order.

    Reads through `storage.shards.iter_samples` (on_error="raise": the cache must have exactly the
    shard's rows, so a bad sample is an error naming the tar and the key, never a skip).
    """
    # iter_samples checks the tar against its recorded sha256, which the cache then records as its source.
    uids, images, captions, start = [], [], [], 0
    for s in iter_samples(item.shard, on_error="raise"):
        uids.append(s.uid)
        images.append(s.image_bytes)
        captions.append(s.caption)
        if len(uids) == chunk_size:
            yield start, uids, images, captions
            start += len(uids)
            uids, images, captions = [], [], []
    if uids:
        yield start, uids, images, captions
    if start + len(uids) != item.shard.rows:
        raise ValueError(f"{item.shard.tar_path}: read {start + len(uids)} samples, _dataset.json says {item.shard.rows}")


# --------------------------------------------------------------------------------------------
# writing shards back


@dataclass(frozen=True)
class ShardWritten:
    """Progress record: one pending plan item committed (all its models)."""

    dataset: str
    shard: str
    model_ids: tuple[str, ...]
    rows: int
    done: int
    """Plan items committed so far in this run (this one included)."""
    total: int
    pairs_done: int
    """Rows committed so far in this run."""
    elapsed_s: float
    nodes: tuple[str, ...] = ()
    """Ray node ids whose actors embedded this shard's chunks (empty for the plain engine)."""

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_done / self.elapsed_s if self.elapsed_s > 0 else float("nan")


@dataclass
class EmbedResult:
    """What a run did."""

    engine: str
    shards: int = 0
    """Plan items committed (a shard with two pending models counts once)."""
    pairs: int = 0
    """Rows read and embedded (each shard once)."""
    embeddings: int = 0
    """(row, model) pairs written."""
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)
    """'model_id:dataset/shard' per file written."""
    nodes: dict[str, int] = field(default_factory=dict)
    """Ray engine: pairs embedded per Ray node id (where the work ran; empty for the plain engine)."""
    actors: dict[str, int] = field(default_factory=dict)
    """Ray engine: pairs embedded per actor, keyed '<node id[:12]>/<pid>'."""

    def to_dict(self) -> dict:
        return {"engine": self.engine, "shards": self.shards, "pairs": self.pairs,
                "embeddings": self.embeddings, "seconds": round(self.seconds, 3),
                "pairs_per_s": round(self.pairs / self.seconds, 2) if self.seconds > 0 else None,
                "written": list(self.written), "nodes": dict(self.nodes), "actors": dict(self.actors)}


class _ShardCommitter:
    """Collects chunk embeddings per plan item; writes an item's models once all its rows are in."""

    def __init__(self, plan: CachePlan, result: EmbedResult, on_shard: Callable[[ShardWritten], None] | None):
        self.plan, self.result, self.on_shard = plan, result, on_shard
        self.parts: dict[int, dict[int, tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]]] = {}
        self.nodes: dict[int, set[str]] = {}
        self.writers: dict[tuple[str, str], CacheWriter] = {}
        self.t0 = time.perf_counter()

    def add(self, item_idx: int, start: int, uids: list[str], embs: dict[str, tuple[np.ndarray, np.ndarray]],
            *, node: str | None = None, pid: int | None = None) -> None:
        """One chunk's embeddings; `node`/`pid`: the Ray node and actor process that computed it."""
        parts = self.parts.setdefault(item_idx, {})
        if start in parts:
            raise RuntimeError(f"chunk {start} of plan item {item_idx} arrived twice")
        parts[start] = (uids, embs)
        if node is not None:
            self.nodes.setdefault(item_idx, set()).add(node)
            self.result.nodes[node] = self.result.nodes.get(node, 0) + len(uids)
            actor = f"{node[:12]}/{pid}"
            self.result.actors[actor] = self.result.actors.get(actor, 0) + len(uids)
        item = self.plan.items[item_idx]
        if sum(len(u) for u, _ in parts.values()) == item.shard.rows:
            self._commit(item_idx)

    def _commit(self, item_idx: int) -> None:
        item = self.plan.items[item_idx]
        parts = self.parts.pop(item_idx)
        chunks = [parts[s] for s in sorted(parts)]  # back in shard order
        uids = [u for c, _ in chunks for u in c]
        for mid in item.model_ids:
            img = np.concatenate([e[mid][0] for _, e in chunks])
            txt = np.concatenate([e[mid][1] for _, e in chunks])
            key = (item.dataset, mid)
            if key not in self.writers:
                self.writers[key] = self.plan.writer(item.dataset, mid)
            self.writers[key].write_shard(item.shard, uids, img, txt)
            self.result.written.append(f"{mid}:{item.dataset}/{item.shard.name}")
        self.result.shards += 1
        self.result.pairs += item.shard.rows
        self.result.embeddings += item.shard.rows * len(item.model_ids)
        rec = ShardWritten(item.dataset, item.shard.name, item.model_ids, item.shard.rows,
                           self.result.shards, len(self.plan.items), self.result.pairs,
                           time.perf_counter() - self.t0, tuple(sorted(self.nodes.pop(item_idx, ()))))
        log.info("cached %s/%s for %s (%d rows; %d/%d)%s", rec.dataset, rec.shard, ",".join(rec.model_ids),
                 rec.rows, rec.done, rec.total,
                 f"; embedded on node(s) {', '.join(n[:12] for n in rec.nodes)}" if rec.nodes else "")
        if self.on_shard is not None:
            self.on_shard(rec)

    def check_finished(self) -> None:
        if self.parts:
            left = [f"{self.plan.items[i].dataset}/{self.plan.items[i].shard.name}" for i in self.parts]
            raise RuntimeError(f"pipeline ended with incomplete shards {left} (rows lost in transit)")
        if self.result.shards != len(self.plan.items):
            raise RuntimeError(f"pipeline ended after {self.result.shards} of {len(self.plan.items)} shards")


# --------------------------------------------------------------------------------------------
# engine 1: plain single-process loop


def embed_shards_plain(plan: CachePlan, *, chunk_size: int = 64, torch_threads: int | None = None,
                       device: str = "auto", on_shard: Callable[[ShardWritten], None] | None = None) -> EmbedResult:
    """Embed every pending item of `plan` in this process, shard after shard, chunk after chunk.

    Same chunking and same `embed_chunk` as the Ray engine, hence the same cache files when both
    run torch on the same number of threads (float32 CPU results differ in the last bits between
    thread counts and between batch sizes: measured). `torch_threads` applies for the duration of
    the call (torch's setting is process-wide; it is restored afterwards).
    """
    import torch

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    result = EmbedResult("plain")
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    try:
        if plan.items:
            embedder = MultiModelEmbedder([str(m.model_dir) for m in plan.models], torch_threads=torch_threads,
                                          device=device, expect_fingerprints=plan.fingerprints())
            committer = _ShardCommitter(plan, result, on_shard)
            for idx, item in enumerate(plan.items):
                where = f"{item.dataset}/{item.shard.name}"
                for start, uids, images, captions in _shard_chunks(item, chunk_size):
                    embs = embedder.embed_chunk(images, captions, item.model_ids, where=f"{where}:{start}")
                    committer.add(idx, start, uids, embs)
            committer.check_finished()
    finally:
        torch.set_num_threads(threads_before)
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# engine 2: Ray Data


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                object_store_memory: int | None = None, root: str | os.PathLike | None = None) -> Iterator[None]:
    """Connect to Ray for the duration of the block; shut down only what this call started.

    - Ray already initialised in this process (tests, notebooks): reuse it.
    - `address` or `$RAY_ADDRESS`: join that cluster (the same code runs on a cluster); a
      `host:port` that does not answer is a ConnectionError within seconds (`ray.init` alone
      retries for minutes). The cluster is left running: only this driver disconnects.
    - else a local instance: `num_cpus`, `object_store_memory`, no dashboard; token auth off and a
      short `RAY_TMPDIR` (Unix socket paths are limited to 107 bytes) unless already set; a
      temporary folder made here is removed after a clean shutdown (kept, and named in the log,
      after an error: it holds Ray's logs). With `root` (the workspace) its processes die with this one even after a SIGKILL, and a run
      after a killed one reaps what that left (`pipeline.children.supervise`): Ray's own fate
      sharing ends gcs_server and the raylet, but the raylet's agents outlive it (Ray 2.60).
    """
    import ray

    from pipeline.children import supervise

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    made_tmp = None
    try:
        if address:
            _check_ray_address(address)
            ray.init(address=address, log_to_driver=True)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            log.info("joined the Ray cluster at %s: %d node(s), %s", address, len(nodes),
                     {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            if "RAY_TMPDIR" not in os.environ:
                made_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
            if root is not None:
                supervise(root)
            ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
                     log_to_driver=True)
        yield
    except BaseException:
        if made_tmp:
            log.error("Ray's session logs are kept in %s", made_tmp)
            made_tmp = None
        raise
    finally:
        ray.shutdown()
        if made_tmp:
            os.environ.pop("RAY_TMPDIR", None)
            shutil.rmtree(made_tmp, ignore_errors=True)


def _check_ray_address(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the address, when nothing listens at a `host:port` Ray address (the head's
    GCS port). Other forms (`auto`, `ray://...`) are left to `ray.init`."""
    if "://" in address or address in ("auto", "local"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r}: expected host:port (the head node's GCS port, "
                         "as printed by `ray start --head`), 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({e.strerror or e}): start one with "
                              "`ray start --head` or correct the address") from None


def _read_task(batch: dict, *, plan: CachePlan, chunk_size: int) -> pa.Table:
    """Ray Data read stage: plan item indices in, chunk rows (one per `chunk_size` samples) out."""
    rows = {n: [] for n in _CHUNK_SCHEMA.names}
    for idx in batch["item"]:
        item = plan.items[int(idx)]
        for start, uids, images, captions in _shard_chunks(item, chunk_size):
            rows["item"].append(int(idx))
            rows["where"].append(f"{item.dataset}/{item.shard.name}")
            rows["start"].append(start)
            rows["models"].append(list(item.model_ids))
            rows["uids"].append(uids)
            rows["images"].append(images)
            rows["captions"].append(captions)
    return pa.table(rows, schema=_CHUNK_SCHEMA)


def embed_shards_ray(plan: CachePlan, *, chunk_size: int = 64, actors: int | None = None,
                     actor_cpus: float | None = None, torch_threads: int | None = None,
                     chunks_per_call: int = 1, actor_start_timeout_s: float = 600.0,
                     on_shard: Callable[[ShardWritten], None] | None = None) -> EmbedResult:
    """Embed every pending item of `plan` with ONE Ray Data pipeline; call inside `ray_session()`.

    read (one task per shard, `iter_samples`) -> `MultiModelEmbedder` actor pool (all models,
    `ActorPoolStrategy(size=actors)`, `num_gpus=1` per actor when the cluster has GPUs) -> the
    driver groups chunks per shard, in shard order, and commits each shard via `CacheWriter`.

    Defaults: one actor per GPU, else one actor; CPU actors reserve less than the cluster's CPUs
    (an actor pool holding every CPU starves the read tasks and Ray Data hangs: STACK.md) and run
    torch on `torch_threads` = CPUs per actor, rounded down (>= 1).

    Data flows only once the whole pool is up (at most `actor_start_timeout_s`, then a RuntimeError
    naming the request): on a cluster, every actor then gets work from the start (without the wait,
    the first actor to load its models takes chunks before the others exist), and a pool the
    cluster cannot place fails instead of waiting forever. Where each chunk ran is returned in
    `EmbedResult.nodes` / `.actors` and logged per shard.
    """
    import ray

    if chunk_size < 1 or chunks_per_call < 1:
        raise ValueError(f"chunk_size and chunks_per_call must be >= 1, got {chunk_size}, {chunks_per_call}")
    result = EmbedResult("ray")
    t0 = time.perf_counter()
    if not plan.items:
        return result
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if actors is None:
        actors = max(1, gpus)
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if gpus:
        num_gpus, actor_cpus = 1, actor_cpus or 1.0
    else:
        num_gpus = 0
        if actor_cpus is None:
            actor_cpus = min(1.0, (cpus - 0.5) / actors)
        if actor_cpus * actors >= cpus:
            raise ValueError(f"{actors} actors x {actor_cpus} CPUs would take all {cpus:g} CPUs: the read tasks "
                             "would starve and Ray Data would hang; use fewer actors or fractional actor_cpus")
    if torch_threads is None and not gpus:
        torch_threads = max(1, int(cpus // actors))

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.wait_for_min_actors_s)
    ctx.execution_options.preserve_order = True  # shards complete (and commit) in plan order
    ctx.enable_progress_bars = False  # progress is logged per committed shard instead
    ctx.wait_for_min_actors_s = max(1, int(actor_start_timeout_s))  # the whole pool before any data
    try:
        ds = ray.data.from_items([{"item": i} for i in range(len(plan.items))],
                                 override_num_blocks=len(plan.items))
        ds = ds.map_batches(_read_task, batch_size=1, batch_format="numpy",
                            fn_kwargs={"plan": plan, "chunk_size": chunk_size}, num_cpus=0.5)
        ds = ds.map_batches(MultiModelEmbedder,
                            fn_constructor_args=([str(m.model_dir) for m in plan.models],),
                            fn_constructor_kwargs={"torch_threads": torch_threads,
                                                   "expect_fingerprints": plan.fingerprints()},
                            batch_size=chunks_per_call, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=actor_cpus, num_gpus=num_gpus)
        log.info("ray pipeline: %d shards, %d pairs, %d actors x (%.2g CPU, %d GPU), torch threads %s; "
                 "cluster: %d node(s), %g CPU, %d GPU", len(plan.items), plan.pairs, actors, actor_cpus, num_gpus,
                 torch_threads, sum(1 for n in ray.nodes() if n.get("Alive")), cpus, gpus)
        committer = _ShardCommitter(plan, result, on_shard)
        try:
            batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
            first = next(batches, None)
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(f"the actor pool ({actors} x {actor_cpus:g} CPU, {num_gpus} GPU) did not start "
                               f"within {actor_start_timeout_s:g} s: can the cluster ({cpus:g} CPU, {gpus} GPU) "
                               f"place it? ({e})") from None
        for batch in ([] if first is None else itertools.chain([first], batches)):
            for row in batch.to_pylist():
                item = plan.items[row["item"]]
                n = len(row["uids"])
                embs = {}
                for mid in item.model_ids:
                    d = plan.spec(mid).meta.dim
                    embs[mid] = tuple(np.frombuffer(row[f"{mid}/{k}"], dtype=np.float32).reshape(n, d)
                                      for k in ("img", "txt"))
                committer.add(row["item"], row["start"], row["uids"], embs, node=row["node"], pid=row["pid"])
        committer.check_finished()
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.wait_for_min_actors_s = saved
    if result.nodes:
        log.info("work per node (pairs): %s", {n[:12]: k for n, k in result.nodes.items()})
    result.seconds = time.perf_counter() - t0
    return result
