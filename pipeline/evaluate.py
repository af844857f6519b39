"""Evaluation: zero-shot classification, image-text retrieval, and the StableEval subset.

Paper section 4.1 ("Evaluation Protocol") and Appendix A:
- zero-shot classification: class names through prompt templates, the mean of the normalised
  template embeddings (renormalised) is the class weight, top-1 (and top-5) accuracy;
- image-text retrieval: recall@1/5/10 both ways, an image with several captions counts as found
  image->text if any of its captions is in the top k (exact search with faiss ``IndexFlatIP``);
- StableEval: from runs that differ only in the seed, keep the evaluations whose averaged
  variability stays under that of the most stable single evaluation.

Datasets are pair-shard folders (docs/interfaces.md, read with `storage.shards`); a zero-shot set
has a ``label`` per sample and ``classnames`` in its ``_dataset.json``. The metric arithmetic is
kept apart from the model (`retrieval_from_embeddings`, `zero_shot_from_embeddings`) so it can be
checked on constructed embeddings. Metrics are fractions in [0, 1]; tables print percentages.

Comparable with the field's tables: class names and prompts can be the standard sets of open_clip and
CLIP_benchmark (`pipeline.zeroshot_data`; the default prompts are CLIP's 80 ImageNet templates, which
CLIP_benchmark also falls back to), a suite file (`load_suite`) lists the evaluations, and
`clip_benchmark_records` writes each result in CLIP_benchmark's JSON schema (its ``build`` reads them);
`compare_markdown` puts several models' results side by side.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import queue
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

# faiss's loader logs at INFO every CPU-specific build it tries and lacks, ModuleNotFoundError and all, on
# every import (so on every `aced eval`); only its warnings are news. A level set by the user is kept.
if logging.getLogger("faiss.loader").level == logging.NOTSET:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import zeroshot_data
from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.shards import decode_image
from storage.shards import ShardError, ShardRef, iter_samples, list_shards, load_dataset

log = logging.getLogger(__name__)

# Prompts for a set that names none: CLIP's 80 ImageNet templates (Radford et al. 2021), from open_clip,
# the set open_clip's zero-shot evaluation uses and CLIP_benchmark falls back to for any dataset.
DEFAULT_TEMPLATES: tuple[str, ...] = zeroshot_data.templates("openai_imagenet")

KINDS = ("zeroshot", "retrieval")
RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
# CLIP_benchmark's task names (its result JSON) <-> ours
TASKS = {"zeroshot_classification": "zeroshot", "zeroshot_retrieval": "retrieval"}

__all__ = [
    "DEFAULT_TEMPLATES", "KINDS", "RETRIEVAL_KS", "TASKS",
    "zero_shot", "zero_shot_from_embeddings", "class_weights", "zero_shot_prompts",
    "retrieval", "retrieval_from_embeddings", "select_faiss_device",
    "evaluate", "headline_metrics", "format_markdown", "write_results",
    "SuiteEntry", "load_suite", "suite_evals", "clip_benchmark_records", "write_clip_benchmark",
    "load_comparable", "compare_markdown",
    "stable_eval", "stable_eval_table", "collect_seeds",
]


# --------------------------------------------------------------------------------------------
# shared plumbing


def _device_of(bundle) -> torch.device:
    return next(bundle.model.parameters()).device


@contextlib.contextmanager
def _eval_mode(bundle):
    """Run with the model in eval mode (no dropout) and restore its mode afterwards: the trainer
    evaluates mid-run and must get a training model back."""
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        bundle.model.train(was_training)


def _decode(shard: ShardRef, key: str, data: bytes, preprocess) -> torch.Tensor:
    return preprocess(decode_image(data, where=f"{shard.tar_path}: sample {key!r}"))  # ImageError names the sample


def _samples(dataset_dir: Path):
    """(shard, sample) over every shard of a dataset, in shard then metadata order."""
    shards = list_shards(dataset_dir)
    if not shards:
        raise ValueError(f"{dataset_dir}: dataset has no shards")
    for shard in shards:
        for sample in iter_samples(shard):
            yield shard, sample


def _prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate `items` in a background thread, `depth` items ahead.

    Reading shards, decoding JPEGs and preprocessing run while the model encodes the previous batch
    (torch releases the GIL in its kernels); on a GPU the model would otherwise wait for them.
    Exceptions of the producer are re-raised here; leaving the loop early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for x in items:
                if not put((None, x)):
                    return
            put((None, end))
        except BaseException as e:  # handed to the consumer, which raises it
            put((e, None))

    thread = threading.Thread(target=work, name="eval-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            err, x = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()
        thread.join()


def _encode_images(bundle, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return bundle.encode_image(x.to(device, non_blocking=True)).float().cpu()


def _encode_tokens(bundle, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return bundle.encode_text(tokens.to(device, non_blocking=True)).float().cpu()


# --------------------------------------------------------------------------------------------
# zero-shot classification


def class_weights(bundle, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                  *, batch_size: int = 256) -> torch.Tensor:
    """Zero-shot classifier W[C, d]: for each class, the mean over templates of the normalised text
    embeddings of the template filled with the class name, renormalised (CLIP's prompt ensembling, as
    open_clip's ``build_zero_shot_classifier``). A template's placeholder is ``{}`` or CLIP_benchmark's ``{c}``."""
    if not classnames:
        raise ValueError("class_weights: no class names")
    if not templates or any("{}" not in t and "{c}" not in t for t in templates):
        raise ValueError(f"class_weights: every template needs a '{{}}' placeholder, got {list(templates)!r}")
    device = _device_of(bundle)
    texts = [t.format(c, c=c) for c in classnames for t in templates]
    embs = torch.cat([_encode_tokens(bundle, bundle.tokenizer(texts[i:i + batch_size]), device)
                      for i in range(0, len(texts), batch_size)])
    # encode_text already normalises each prompt; normalise again anyway so a bundle that returns
    # slightly denormalised (e.g. half precision) rows cannot skew the template mean.
    embs = torch.nn.functional.normalize(embs, dim=-1).reshape(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(embs.mean(dim=1), dim=-1)


def zero_shot_from_embeddings(img_emb: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                              classnames: Sequence[str] | None = None) -> dict:
    """Accuracy of argmax_c (u_i . w_c) against `labels`.

    img_emb[N, d] (normalised), labels[N] int in [0, C), weights[C, d] -> dict with top1, top5
    (top-min(5, C)), n, n_classes, mean_per_class_top1 (over classes present) and per_class
    {name: top-1} when `classnames` is given.
    """
    img_emb, weights = torch.as_tensor(img_emb).float(), torch.as_tensor(weights).float()
    labels = torch.as_tensor(labels).long()
    n, c = img_emb.shape[0], weights.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels shape {tuple(labels.shape)} != ({n},)")
    if n == 0:
        raise ValueError("zero-shot evaluation over 0 images")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{int(labels.min())}, {int(labels.max())}]")
    logits = img_emb @ weights.T
    k = min(5, c)
    topk = logits.topk(k, dim=1).indices
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    counts = torch.bincount(labels, minlength=c)
    correct = torch.bincount(labels[hit1], minlength=c)
    present = counts > 0
    # hits / n in float64 (as CLIP_benchmark and open_clip report them), not a float32 mean
    out = {
        "top1": int(hit1.sum()) / n,
        "top5": int(hit5.sum()) / n,
        "n": n,
        "n_classes": c,
        "mean_per_class_top1": (correct[present].double() / counts[present].double()).mean().item(),
    }
    if classnames is not None:
        if len(classnames) != c:
            raise ValueError(f"{len(classnames)} class names for {c} class weights")
        out["per_class"] = {classnames[i]: (correct[i] / counts[i]).item() for i in range(c) if counts[i] > 0}
    return out


def _labelled_batches(dataset_dir: Path, n_classes: int, preprocess, batch_size: int):
    """(images[B, 3, H, W], labels[B]) batches of a zero-shot set, in dataset order."""
    batch: list[torch.Tensor] = []
    labels: list[int] = []
    for shard, s in _samples(dataset_dir):
        if s.label is None or not 0 <= s.label < n_classes:
            raise ShardError(f"{shard.tar_path}: sample {s.key!r}: label {s.label!r} is not in "
                             f"[0, {n_classes}) of {dataset_dir / '_dataset.json'}")
        batch.append(_decode(shard, s.key, s.image_bytes, preprocess))
        labels.append(int(s.label))
        if len(batch) == batch_size:
            yield torch.stack(batch), torch.tensor(labels)
            batch, labels = [], []
    if batch:
        yield torch.stack(batch), torch.tensor(labels)


def zero_shot(bundle, dataset_dir: str | Path, *, templates: Sequence[str] | None = None,
              classnames: Sequence[str] | None = None, batch_size: int = 256) -> dict:
    """Zero-shot classification of a class-folder pair-shard dataset (every sample has ``label``;
    ``_dataset.json["classnames"]`` names the classes). Prompt templates: `templates` when given,
    else the set's own (``_dataset.json["templates"]``), else `DEFAULT_TEMPLATES`. `classnames`, when
    given, is the name to prompt for each label instead (e.g. a standard set's, `zero_shot_prompts`).
    Returns `zero_shot_from_embeddings`' dict plus "templates" (how many were averaged)."""
    dataset_dir = Path(dataset_dir)
    info = load_dataset(dataset_dir)
    own = info.classnames
    if not own or not all(isinstance(c, str) for c in own):
        raise ValueError(f"{dataset_dir / '_dataset.json'}: no 'classnames' list: not a zero-shot classification set")
    if classnames is not None and len(classnames) != len(own):
        raise ValueError(f"{dataset_dir}: {len(classnames)} class names given for its {len(own)} classes")
    classnames = list(classnames) if classnames is not None else own
    if templates is None:
        templates = info.templates or DEFAULT_TEMPLATES
    device = _device_of(bundle)
    embs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with _eval_mode(bundle):
        weights = class_weights(bundle, classnames, templates, batch_size=batch_size)
        for x, y in _prefetch(_labelled_batches(dataset_dir, len(classnames), bundle.preprocess, batch_size)):
            embs.append(_encode_images(bundle, x, device))
            labels.append(y)
    out = zero_shot_from_embeddings(torch.cat(embs), torch.cat(labels), weights.cpu(), classnames)
    out["templates"] = len(templates)
    return out


# --------------------------------------------------------------------------------------------
# image-text retrieval


def select_faiss_device(device: str = "auto") -> str:
    """'cpu' or 'gpu' for the faiss index. 'auto' picks the GPU when faiss was built with GPU support
    and sees a GPU and CUDA is usable from torch; 'gpu' without one is an error, never a quiet CPU run."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"faiss device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    gpu_ok = faiss.get_num_gpus() > 0 and torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")
    if device == "gpu" and not gpu_ok:
        raise RuntimeError(f"faiss GPU index requested but unavailable (faiss {faiss.__version__} sees "
                           f"{faiss.get_num_gpus()} GPUs, torch.cuda.is_available()={torch.cuda.is_available()})")
    chosen = device if device != "auto" else ("gpu" if gpu_ok else "cpu")
    log.info("retrieval: faiss %s IndexFlatIP (requested %s, faiss sees %d GPUs)", chosen.upper(), device,
             faiss.get_num_gpus())
    return chosen


def _knn(base: np.ndarray, queries: np.ndarray, k: int, device: str) -> np.ndarray:
    """Indices [n_queries, k] of the k largest inner products (exact search)."""
    d = base.shape[1]
    if device == "gpu":
        res = faiss.StandardGpuResources()  # kept alive by this frame until the search returns
        index = faiss.GpuIndexFlatIP(res, d)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(base)
    _, idx = index.search(queries, k)
    if (idx < 0).any():
        raise RuntimeError(f"faiss returned missing neighbours for k={k} over {base.shape[0]} rows")
    return idx


def _as_unit_f32(x, name: str) -> np.ndarray:
    x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: non-finite embeddings")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{name}: zero vector at row {int(np.argmax(norms == 0))}")
    # Inner product equals cosine only for unit rows; renormalise in float32 (a float16 cache or a
    # bf16 forward is a little off the unit sphere).
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


def retrieval_from_embeddings(img_emb, txt_emb, txt_image_index, *, ks: Sequence[int] = RETRIEVAL_KS,
                              faiss_device: str = "auto") -> dict:
    """Recall@k both ways from embeddings.

    img_emb[N, d]: one row per unique image; txt_emb[M, d]: one row per caption;
    txt_image_index[M]: the image row of each caption (every image needs at least one caption).
    image->text: image i is a hit at k if ANY of its captions is among its k nearest captions;
    text->image: caption t is a hit at k if its image is among its k nearest images.
    Returns {i2t_r{k}, t2i_r{k} for k in ks, mean_recall (mean of those), n_images, n_texts}.
    """
    img = _as_unit_f32(img_emb, "image embeddings")
    txt = _as_unit_f32(txt_emb, "text embeddings")
    owner = np.asarray(txt_image_index.cpu() if isinstance(txt_image_index, torch.Tensor) else txt_image_index,
                       dtype=np.int64)
    n, m = img.shape[0], txt.shape[0]
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image dim {img.shape[1]} != text dim {txt.shape[1]}")
    if owner.shape != (m,):
        raise ValueError(f"txt_image_index shape {owner.shape} != ({m},)")
    if owner.min() < 0 or owner.max() >= n:
        raise ValueError(f"txt_image_index must lie in [0, {n}), got [{owner.min()}, {owner.max()}]")
    captions_per_image = np.bincount(owner, minlength=n)
    if (captions_per_image == 0).any():
        raise ValueError(f"image row {int(np.argmax(captions_per_image == 0))} has no caption")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    dev = select_faiss_device(faiss_device)

    # text -> image: each caption's nearest images.
    k_img = min(ks[-1], n)
    nn_img = _knn(img, txt, k_img, dev)                       # [M, k_img]
    t2i_hit = np.cumsum(nn_img == owner[:, None], axis=1) > 0  # hit within the first j+1
    # image -> text: each image's nearest captions, mapped to the image that owns them.
    k_txt = min(ks[-1], m)
    nn_txt = _knn(txt, img, k_txt, dev)                       # [N, k_txt]
    i2t_hit = np.cumsum(owner[nn_txt] == np.arange(n)[:, None], axis=1) > 0

    out: dict = {}
    for k in ks:
        # k beyond the number of candidates: everything is retrieved, the hit rate of the full list.
        out[f"i2t_r{k}"] = float(i2t_hit[:, min(k, k_txt) - 1].mean())
    for k in ks:
        out[f"t2i_r{k}"] = float(t2i_hit[:, min(k, k_img) - 1].mean())
    out["mean_recall"] = float(np.mean([out[f"i2t_r{k}"] for k in ks] + [out[f"t2i_r{k}"] for k in ks]))
    out["n_images"], out["n_texts"] = n, m
    return out


def _retrieval_batches(dataset_dir: Path, preprocess, tokenizer, batch_size: int):
    """Batches ("image", images[B, 3, H, W]) of the unique images (first sample of each image_id)
    and ("text", tokens[B, L]) of every caption, then ("owner", txt_image_index[M])."""
    image_row: dict[str, int] = {}
    image_digest: dict[str, tuple[bytes, str]] = {}
    owner: list[int] = []
    img_batch: list[torch.Tensor] = []
    txt_batch: list[str] = []
    for shard, s in _samples(dataset_dir):
        digest = hashlib.blake2b(s.image_bytes, digest_size=16).digest()
        if s.image_id not in image_row:
            image_row[s.image_id] = len(image_row)
            image_digest[s.image_id] = (digest, f"{shard.tar_path}:{s.key}")
            img_batch.append(_decode(shard, s.key, s.image_bytes, preprocess))
        elif image_digest[s.image_id][0] != digest:
            # One image_id must mean one image, or "any caption of the image" is meaningless.
            raise ShardError(f"{shard.tar_path}: sample {s.key!r}: image_id {s.image_id!r} has different "
                             f"image bytes than {image_digest[s.image_id][1]}")
        owner.append(image_row[s.image_id])
        txt_batch.append(s.caption)
        if len(img_batch) == batch_size:
            yield "image", torch.stack(img_batch)
            img_batch = []
        if len(txt_batch) == batch_size:
            yield "text", tokenizer(txt_batch)
            txt_batch = []
    if img_batch:
        yield "image", torch.stack(img_batch)
    if txt_batch:
        yield "text", tokenizer(txt_batch)
    yield "owner", torch.tensor(owner)


def _embed_retrieval_set(bundle, dataset_dir: Path, batch_size: int):
    """(img[N, d], txt[M, d], txt_image_index[M]): each unique image (by image_id) once, every caption."""
    device = _device_of(bundle)
    img_chunks: list[torch.Tensor] = []
    txt_chunks: list[torch.Tensor] = []
    owner = None
    for kind, x in _prefetch(_retrieval_batches(dataset_dir, bundle.preprocess, bundle.tokenizer, batch_size)):
        if kind == "image":
            img_chunks.append(_encode_images(bundle, x, device))
        elif kind == "text":
            txt_chunks.append(_encode_tokens(bundle, x, device))
        else:
            owner = x
    return torch.cat(img_chunks), torch.cat(txt_chunks), owner


def retrieval(bundle, dataset_dir: str | Path, *, batch_size: int = 256, ks: Sequence[int] = RETRIEVAL_KS,
              faiss_device: str = "auto") -> dict:
    """Image-text retrieval over a pair-shard dataset where captions sharing an ``image_id`` belong
    to one image (e.g. Flickr8k: 5 captions per image). `faiss_device` picks the faiss index
    ('auto'|'cpu'|'gpu', see `select_faiss_device`). Returns `retrieval_from_embeddings`' dict."""
    dataset_dir = Path(dataset_dir)
    with _eval_mode(bundle):
        img, txt, owner = _embed_retrieval_set(bundle, dataset_dir, batch_size)
    return retrieval_from_embeddings(img, txt, owner, ks=ks, faiss_device=faiss_device)


# --------------------------------------------------------------------------------------------
# a suite of evaluations, results files


def zero_shot_prompts(dataset_dir: str | Path, classnames: str | None = None,
                      templates: str | None = None) -> tuple[list[str] | None, tuple[str, ...] | None, dict]:
    """(class names per label or None = the set's own, templates or None = the set's own / default,
    {"classnames": source, "templates": source}) for a zero-shot set and optional standard set names
    (`pipeline.zeroshot_data`). `classnames` maps the set's class folders onto that set's names;
    ImageNet-style folders (WordNet synset ids) get ImageNet's names without being asked (an id is no
    prompt). `templates` defaults to the class-name set's templates when it has some."""
    info = load_dataset(Path(dataset_dir))
    folders = info.extra.get("class_folders") or info.classnames
    if not folders:
        raise ValueError(f"{Path(dataset_dir) / '_dataset.json'}: no 'classnames' list: not a zero-shot "
                         f"classification set")
    names_set = classnames
    if names_set is None and zeroshot_data.is_synset_folders(folders):
        names_set = "imagenet1k"
    names = None
    if names_set is not None:
        try:
            names = zeroshot_data.classnames_for_folders(names_set, folders)
        except ValueError as e:
            raise ValueError(f"{dataset_dir}: {e}") from None
    # a named class-name set brings its prompts; one found by itself (synset folders) only where the set has none
    temps_set = templates if templates is not None else (
        names_set if names_set in zeroshot_data.set_names() and (classnames is not None or not info.templates)
        else None)
    temps = zeroshot_data.templates(temps_set) if temps_set is not None else None
    source = {"classnames": names_set or "dataset",
              "templates": temps_set or ("dataset" if info.templates else "openai_imagenet")}
    return names, temps, source


def evaluate(bundle, evals: Mapping[str, tuple], *, batch_size: int = 256,
             templates: Sequence[str] | None = None, faiss_device: str = "auto") -> dict:
    """Run named evaluations: ``evals = {name: (kind, dataset_dir)}`` or ``(kind, dataset_dir, options)``
    with kind 'zeroshot' or 'retrieval' and options ``{"classnames": set, "templates": set}`` naming
    standard sets for a zero-shot eval (`zero_shot_prompts`). `templates`, when given, applies to every
    zero-shot set whose options name no "templates" (None: `zero_shot_prompts`' choice).

    Returns {"model": bundle.name, "created": ISO time, "evals": {name: {"kind", "dataset",
    "seconds", "metrics"[, "prompts"]}}, "headline": `headline_metrics`}.
    """
    for name, spec in evals.items():
        if (not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3) or spec[0] not in KINDS
                or (len(spec) == 3 and (not isinstance(spec[2], Mapping)
                                        or set(spec[2]) - {"classnames", "templates"}))):
            raise ValueError(f"eval {name!r}: expected (kind, dataset_dir[, {{'classnames', 'templates'}}]) with kind "
                             f"in {KINDS}, got {spec!r}")
    out: dict = {"model": getattr(bundle, "name", None),
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "evals": {}}
    for name, spec in evals.items():
        kind, dataset_dir = spec[0], spec[1]
        options = dict(spec[2]) if len(spec) == 3 else {}
        t0 = time.perf_counter()
        record: dict = {"kind": kind, "dataset": str(dataset_dir)}
        if kind == "zeroshot":
            names, temps, source = zero_shot_prompts(dataset_dir, options.get("classnames"), options.get("templates"))
            if templates is not None and "templates" not in options:
                temps, source["templates"] = templates, "given"
            metrics = zero_shot(bundle, dataset_dir, templates=temps, classnames=names, batch_size=batch_size)
            record["prompts"] = source
        else:
            if options:
                raise ValueError(f"eval {name!r}: class names / templates apply to zero-shot sets only")
            metrics = retrieval(bundle, dataset_dir, batch_size=batch_size, faiss_device=faiss_device)
        seconds = time.perf_counter() - t0
        log.info("eval %s (%s, %s): %.1f s", name, kind, dataset_dir, seconds)
        out["evals"][name] = {**record, "seconds": round(seconds, 3), "metrics": metrics}
    out["headline"] = headline_metrics(out)
    return out


def headline_metrics(results: Mapping) -> dict[str, float]:
    """One number per evaluation, as the paper counts them: zero-shot top-1 under the eval's name;
    retrieval as two evaluations, ``<name>:i2t`` and ``<name>:t2i`` (recall@1 each)."""
    out: dict[str, float] = {}
    for name, ev in results["evals"].items():
        m = ev["metrics"]
        if ev["kind"] == "zeroshot":
            out[name] = float(m["top1"])
        elif ev["kind"] == "retrieval":
            out[f"{name}:i2t"] = float(m["i2t_r1"])
            out[f"{name}:t2i"] = float(m["t2i_r1"])
        else:
            raise ValueError(f"eval {name!r}: unknown kind {ev['kind']!r}")
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def format_markdown(results: Mapping) -> str:
    """Markdown tables of a results dict (zero-shot and retrieval), values in percent."""
    lines = [f"# Evaluation of `{results.get('model')}`", "", f"created {results.get('created')}", ""]
    zs = [(n, e) for n, e in results["evals"].items() if e["kind"] == "zeroshot"]
    rt = [(n, e) for n, e in results["evals"].items() if e["kind"] == "retrieval"]
    if zs:
        lines += ["## Zero-shot classification (%)", "",
                  "| eval | n | classes | top-1 | top-5 | mean per-class top-1 |", "|---|---:|---:|---:|---:|---:|"]
        for n, e in zs:
            m = e["metrics"]
            lines.append(f"| {n} | {m['n']} | {m['n_classes']} | {_pct(m['top1'])} | {_pct(m['top5'])} "
                         f"| {_pct(m['mean_per_class_top1'])} |")
        lines.append("")
    if rt:
        ks = sorted(int(k[5:]) for k in rt[0][1]["metrics"] if k.startswith("i2t_r"))
        head = " | ".join([f"I2T R@{k}" for k in ks] + [f"T2I R@{k}" for k in ks])
        lines += ["## Image-text retrieval (%)", "", f"| eval | images | texts | {head} | mean |",
                  "|---|---:|---:|" + "---:|" * (2 * len(ks) + 1)]
        for n, e in rt:
            m = e["metrics"]
            vals = " | ".join([_pct(m[f"i2t_r{k}"]) for k in ks] + [_pct(m[f"t2i_r{k}"]) for k in ks])
            lines.append(f"| {n} | {m['n_images']} | {m['n_texts']} | {vals} | {_pct(m['mean_recall'])} |")
        lines.append("")
    return "\n".join(lines)


def write_results(results: Mapping, out_dir: str | Path, *, stem: str = "results") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into `out_dir`, each atomically. Returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_json(json_path, results)
    atomic_write_bytes(md_path, format_markdown(results).encode())
    return json_path, md_path


# --------------------------------------------------------------------------------------------
# suites and CLIP_benchmark's result schema


@dataclass(frozen=True)
class SuiteEntry:
    """One evaluation of a suite file (see `load_suite`)."""

    dataset: str
    """A workspace dataset name or a dataset folder (resolved by the caller, e.g. `Workspace.resolve_dataset`)."""
    task: str
    """CLIP_benchmark's task name: "zeroshot_classification" or "zeroshot_retrieval"."""
    classnames: str | None = None
    """Standard class-name set (`pipeline.zeroshot_data`, e.g. "cifar10", "imagenet1k"); zero-shot only."""
    templates: str | None = None
    """Standard template set; default: the class-name set's, else the dataset's own, else CLIP's 80."""
    name: str | None = None
    """The dataset's name in the results (default: the dataset's own name)."""

    def __post_init__(self):
        for f in ("dataset", "task"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f).strip():
                raise ValueError(f"'{f}' must be a non-empty string, got {getattr(self, f)!r}")
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {sorted(TASKS)}")
        for f in ("classnames", "templates", "name"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"'{f}' must be a non-empty string, got {v!r}")
        if TASKS[self.task] == "retrieval" and (self.classnames or self.templates):
            raise ValueError("'classnames' / 'templates' apply to zeroshot_classification only")
        if self.classnames is not None:
            zeroshot_data.classnames(self.classnames)  # raises naming the known sets
        if self.templates is not None:
            zeroshot_data.templates(self.templates)


def load_suite(path: str | Path) -> list[SuiteEntry]:
    """A suite file: a JSON list of objects {"dataset", "task"[, "classnames", "templates", "name"]}
    (`SuiteEntry`). Errors name the file and the entry."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a suite ({e})") from None
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"{path}: a suite is a non-empty JSON list of {{\"dataset\", \"task\", ...}} objects")
    entries = []
    fields = set(SuiteEntry.__dataclass_fields__)
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        unknown = set(item) - fields
        if unknown:
            raise ValueError(f"{path}: entry {i}: unknown key(s) {sorted(unknown)} (known: {sorted(fields)})")
        try:
            entries.append(SuiteEntry(**item))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: entry {i} ({item.get('dataset')!r}): {e}") from None
    return entries


def suite_evals(entries: Sequence[SuiteEntry], resolve) -> dict[str, tuple]:
    """`evaluate`'s ``evals`` for suite entries; `resolve(dataset) -> folder`. An eval is named by the
    entry's "name", else the dataset's own name; two evals of one name are an error."""
    evals: dict[str, tuple] = {}
    for e in entries:
        folder = Path(resolve(e.dataset))
        name = e.name or load_dataset(folder).name
        if name in evals:
            raise ValueError(f"suite: two evaluations named {name!r} (give one a \"name\")")
        options = {k: v for k, v in (("classnames", e.classnames), ("templates", e.templates)) if v is not None}
        evals[name] = (TASKS[e.task], folder, options) if options else (TASKS[e.task], folder)
    return evals


def clip_benchmark_records(results: Mapping, *, model: str, pretrained: str) -> list[dict]:
    """One CLIP_benchmark result object per evaluation, its ``cli.py`` schema: {"dataset", "model",
    "pretrained", "task", "metrics", "language": "en"}; metrics {"acc1", "acc5", "mean_per_class_recall"}
    for zero-shot classification, {"image_retrieval_recall@k", "text_retrieval_recall@k"} for retrieval.
    CLIP_benchmark's "image retrieval" is text -> image (our t2i), "text retrieval" image -> text (i2t);
    both count a query as found if any of its matches is in the top k, as we do."""
    out = []
    for name, ev in results["evals"].items():
        m = ev["metrics"]
        if ev["kind"] == "zeroshot":
            task = "zeroshot_classification"
            metrics = {"acc1": m["top1"], "acc5": m["top5"], "mean_per_class_recall": m["mean_per_class_top1"]}
        elif ev["kind"] == "retrieval":
            task = "zeroshot_retrieval"
            ks = sorted(int(k[5:]) for k in m if k.startswith("t2i_r"))
            metrics = {}
            for k in ks:  # CLIP_benchmark's key order: image then text retrieval, per k
                metrics[f"image_retrieval_recall@{k}"] = m[f"t2i_r{k}"]
                metrics[f"text_retrieval_recall@{k}"] = m[f"i2t_r{k}"]
        else:
            raise ValueError(f"eval {name!r}: unknown kind {ev['kind']!r}")
        out.append({"dataset": name, "model": model, "pretrained": pretrained, "task": task,
                    "metrics": {k: float(v) for k, v in metrics.items()}, "language": "en"})
    return out


def _file_part(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", s).strip("-.") or "x"


def write_clip_benchmark(results: Mapping, out_dir: str | Path, *, model: str, pretrained: str) -> list[Path]:
    """Write `clip_benchmark_records` as ``<out_dir>/<dataset>_<pretrained>_<model>_en_<task>.json`` (CLIP_benchmark's
    default output name, '/' and other odd characters as '-'), each atomically. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in clip_benchmark_records(results, model=model, pretrained=pretrained):
        stem = "_".join(_file_part(x) for x in (r["dataset"], r["pretrained"], r["model"], r["language"], r["task"]))
        atomic_write_json(out_dir / f"{stem}.json", r)
        paths.append(out_dir / f"{stem}.json")
    return paths


def _records_of(doc, where: str) -> list[dict]:
    if isinstance(doc, dict) and "evals" in doc:  # a results.json of `aced eval`
        model = doc.get("model") or "?"
        pretrained = doc.get("pretrained") or Path(str(doc.get("model_dir") or "?")).name
        return clip_benchmark_records(doc, model=model, pretrained=pretrained)
    if isinstance(doc, dict) and {"dataset", "model", "pretrained", "task", "metrics"} <= set(doc):
        return [doc]
    raise ValueError(f"{where}: neither an `aced eval` results.json nor a CLIP_benchmark result")


def load_comparable(paths: Sequence[str | Path]) -> list[dict]:
    """CLIP_benchmark records from result files and folders: a results.json of `aced eval`, a CLIP_benchmark
    result JSON, or a folder (its results.json if it has one, else every *.json in it)."""
    records: list[tuple[dict, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = [p / "results.json"] if (p / "results.json").is_file() else sorted(p.glob("*.json"))
            if not files:
                raise ValueError(f"{p}: no results.json or *.json result files")
        elif p.is_file():
            files = [p]
        else:
            raise ValueError(f"{p}: no such file or folder")
        for f in files:
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{f}: cannot read ({e})") from None
            records += [(r, str(f)) for r in _records_of(doc, str(f))]
    seen: dict[tuple, str] = {}
    for r, f in records:
        key = (r["model"], r["pretrained"], r["dataset"], r["task"], r.get("language", "en"))
        if key in seen:
            raise ValueError(f"{f}: {r['model']} {r['pretrained']} on {r['dataset']} ({r['task']}) is also in {seen[key]}")
        seen[key] = f
    return [r for r, _ in records]


def compare_markdown(records: Sequence[Mapping]) -> str:
    """One table: a row per (dataset, metric), a column per model ("model pretrained", CLIP_benchmark's
    model_fullname), values in percent; a model without that result shows "-"."""
    if not records:
        raise ValueError("nothing to compare")
    models = list(dict.fromkeys(f"{r['model']} {r['pretrained']}" for r in records))
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for r in records:
        for metric, v in r["metrics"].items():
            rows.setdefault((r["dataset"], metric), {})[f"{r['model']} {r['pretrained']}"] = v
    lines = ["| dataset | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for (dataset, metric), vals in rows.items():
        cells = [_pct(vals[m]) if isinstance(vals.get(m), (int, float)) else "-" for m in models]
        lines.append(f"| {dataset} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# StableEval (Appendix A)


def stable_eval_table(per_seed: Mapping[str, Sequence[float]]) -> list[dict]:
    """The StableEval procedure step by step (Appendix A).

    per_seed: {eval_name: [metric of seed 1, seed 2, ...]} (at least 2 seeds each).
    1. std_i = sample standard deviation (ddof=1) of eval i across seeds;
    2. sort evals by std_i ascending (ties by name, for a deterministic order);
    3. for each prefix of N evals, std of their average = sqrt(sum_{i<=N} var_i) / N
       (seeds' metrics treated as independent across evals, as in the paper);
    4. keep evals while that stays <= the std of the most stable single eval; the first prefix that
       exceeds it is the paper's "critical point" and ends the set (later prefixes are not kept even
       if very many evals would bring the average back down).
    Returns one row per eval in sorted order: {name, std, avg_std, kept}.
    """
    if not per_seed:
        raise ValueError("stable_eval: no evaluations")
    stds = {}
    for name, values in per_seed.items():
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1 or v.size < 2:
            raise ValueError(f"stable_eval: eval {name!r} needs >= 2 seeds, got {v.size}")
        if not np.isfinite(v).all():
            raise ValueError(f"stable_eval: eval {name!r} has non-finite values {values!r}")
        stds[name] = float(v.std(ddof=1))
    order = sorted(stds, key=lambda k: (stds[k], k))
    threshold = stds[order[0]]
    rows, total_var, kept = [], 0.0, True
    for n, name in enumerate(order, start=1):
        total_var += stds[name] ** 2
        avg_std = math.sqrt(total_var) / n
        # a relative epsilon so that equal stds (avg = s*sqrt(N)/N <= s) are not lost to rounding
        kept = kept and avg_std <= threshold * (1 + 1e-12)
        rows.append({"name": name, "std": stds[name], "avg_std": avg_std, "kept": kept})
    return rows


def stable_eval(per_seed: Mapping[str, Sequence[float]]) -> list[str]:
    """Names of the StableEval subset (most stable first); see `stable_eval_table`."""
    return [r["name"] for r in stable_eval_table(per_seed) if r["kept"]]


def collect_seeds(results_per_seed: Sequence[Mapping], sources: Sequence[str] | None = None) -> dict[str, list[float]]:
    """{eval_name: [headline metric per seed]} from several results dicts (one per seed). Every
    result must hold the same evaluations; `sources` (e.g. file names) make the error say which."""
    if len(results_per_seed) < 2:
        raise ValueError(f"stable eval needs results of >= 2 seeds, got {len(results_per_seed)}")
    sources = list(sources) if sources is not None else [f"result #{i}" for i in range(len(results_per_seed))]
    heads = [r["headline"] if "headline" in r else headline_metrics(r) for r in results_per_seed]
    names = set(heads[0])
    for src, h in zip(sources, heads):
        if set(h) != names:
            raise ValueError(f"{src}: evaluations {sorted(h)} differ from {sources[0]}: {sorted(names)}")
    return {name: [float(h[name]) for h in heads] for name in sorted(names)}
