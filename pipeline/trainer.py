"""The training loop for every method of SPEC.md's table (paper sections 3.1-3.3, Appendix E).

`train` opens the run (`open_run`: lock, config, student, caches, logs, resume) and then, for each step,
reads as its named parts:
  SuperBatch        B raw pairs (uint8 pixels, tokens) + cached reference/teacher rows (pipeline.data)
  score_superbatch  student forward over all B candidates, no grad (selection methods only)
  select_subbatch   joint (JEST) selection of b pairs with the conditional-score kernel
  train_step        contrastive loss on B_CE (+ lambda * KD on B_KD), clipped Adam update
  log_step          per-step metrics and (every k steps, optionally sampled) per-candidate selection records
  checkpoint        atomic (pipeline.checkpoint), after flushing the logs
Metrics and selections are flushed to Parquet parts at every checkpoint and, between checkpoints, after the
first step and then at most every LOG_FLUSH_S seconds, so a running run shows in `aced sql` and the report
before its first checkpoint. A resume drops what was flushed after its checkpoint (`truncate_after`), so a
resumed run never holds a duplicated or a missing step.

Resume order (written once, here): the run's own latest checkpoint, then `init_from` weights, then scratch.
Everything random is derived from (seed, step), so a killed and restarted run reproduces the
uninterrupted run's per-step losses exactly on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import losses
from pipeline.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from pipeline.data import CacheSpec, PairIndex, SuperBatch, SuperBatches, cached_model_meta, loader
from pipeline.distributed import SINGLE, Dist
from pipeline.distributed import setup as setup_distributed
from pipeline.flexi import at_resolution
from pipeline.models import (TEXT_MULTIPLE, ModelBundle, create_model, encode_text_by_length, load_model,
                             resolve_device, save_model)
from pipeline.recipes import TrainConfig
from pipeline.selection import SelectionResult, select
from storage.atomic import atomic_write_json
from storage.runlog import SELECTIONS_SCHEMA, ParquetLog
from storage.shards import load_dataset
from storage import fs
from storage.workspace import FolderLock, held_by

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP/open_clip clamp: keeps a = exp(t) <= 100
LOG_EVERY = 25  # steps between progress log lines when no progress bar is shown
LOG_FLUSH_S = 30.0  # at most this long between metrics/selections parts of a running run (after its first step)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]
    model_dir: Path


@dataclass
class Run:
    """What every step of a run shares; built once by `open_run` (benchmarks build one by hand)."""

    cfg: TrainConfig
    device: torch.device
    bundle: ModelBundle
    """The student: model, tokenizer, pixel transform and normalisation."""
    opt: torch.optim.Optimizer
    sched: Any
    proj: torch.nn.Module | None = None
    """Feature-matching projection head (kd_loss="fm"), a submodule of the student."""
    reference: CacheSpec | None = None
    teachers: list[CacheSpec] = field(default_factory=list)
    group: Dist = SINGLE
    run_dir: Path | None = None
    start: int = 0
    """First step to run (the resumed checkpoint's step)."""
    metrics_log: ParquetLog | None = None
    selections_log: ParquetLog | None = None
    flushed_at: float = -math.inf
    """time.monotonic() of the last flush of the logs (the first step of a process flushes at once)."""
    net: torch.nn.Module | None = None
    """The student for the training forward: DDP at W > 1 (Dist.wrap), the model itself at W = 1."""

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model


# ---------------------------------------------------------------------------------------------
# set-up


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine or rsqrt (+ cool-down)."""
    warm = max(1, int(round(cfg.warmup_frac * cfg.steps)))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, cfg.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    cool = int(round(cfg.cooldown_frac * cfg.steps))
    value = math.sqrt(warm / (step + 1))
    if cool and step >= cfg.steps - cool:
        value *= (cfg.steps - step) / cool
    return value


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with decay on weight matrices only (not on gains, biases, embeddings' scale/bias).

    Weight decay follows big_vision's decoupled form (the paper trains with big_vision, Appendix E):
    each step multiplies a decayed weight by 1 - wd * m(t), where m(t) is the schedule multiplier and
    wd = cfg.weight_decay, *not* scaled by the peak lr. torch's AdamW multiplies its weight_decay by the
    current lr (peak * m(t)), so it is given wd / peak: the paper's 1e-4 at lr 1e-3 is torch's 0.1
    (open_clip's usual value). Passing 1e-4 to torch directly would decay 1000x less than the paper.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name or "ln_" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay / cfg.lr}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
        # fused: one kernel over all parameters instead of a per-parameter loop; measured to cut the tiny
        # student's optimizer step from 13% to 1% of a train step on the CPU (benchmarks/results/train.md).
        fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    return opt, sched


def cache_specs(cfg: TrainConfig) -> tuple[CacheSpec | None, list[CacheSpec]]:
    """Reference and teacher caches, with the model metadata every shard must match."""
    if not cfg.cache_root:
        return None, []
    root = fs.as_path(cfg.cache_root)  # local, or an object-store URL (storage/fs.py)

    def spec(model_id: str) -> CacheSpec:
        return CacheSpec(model_id=model_id, cache_root=root, meta=cached_model_meta(root, model_id, cfg.train_data))

    ref = spec(cfg.reference) if cfg.spec.needs_reference else None
    teachers = [spec(t) for t in cfg.teacher] if cfg.spec.kd else []
    return ref, teachers


# ---------------------------------------------------------------------------------------------
# the named steps


def embed(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings (grad follows the caller's mode)."""
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain float32 on the CPU for training (SPEC: no low precision where it is
    slow or inexact); the scoring forward may use bf16 on CPUs too (`score_dtype`)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Precision of the scoring forward: cfg.score_dtype, where "auto" is bf16 on CUDA and on CPUs with
    native bf16 arithmetic (AVX512-BF16 / AMX), float32 elsewhere (emulated bf16 is slower than fp32).
    benchmarks/step_cost.py measures its embedding error and how often it changes the selection."""
    if cfg.score_dtype != "auto":
        return getattr(torch, cfg.score_dtype)
    if device.type == "cuda":
        return torch.bfloat16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the scoring forward, then back to the mode it had. The ladder has no dropout or
    batch norm, so the embeddings are the same; eval + inference mode lets torch take the fused
    attention fast path (benchmarks/results/step_cost.md measured ~8% less scoring time)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


_SCORING_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def scoring_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The module the scoring forward runs: `model` itself for float32; for bf16, a copy of it with bf16
    weights, made once per model (and dtype/device) and refreshed from the model's current weights at
    every call (one cast-copy of the parameters: ~2 ms for aced-vit-t on the CPU).

    Why a bf16 copy and not autocast: autocast casts around every op and turns off torch's fused
    attention path, so on this CPU it saved only ~20% of the image tower's time; running the weights in
    bf16 saves ~50%, with the same embedding error against float32 (both ~3e-3 on L2-normalised rows;
    benchmarks/results/step_cost.md measures it and how often it changes the selected sub-batch)."""
    if dtype == torch.float32:
        return model
    source = [*model.parameters(), *model.buffers()]
    key = (dtype, source[0].device, len(source))
    entry = _SCORING_COPIES.get(model)
    if entry is None or entry[0] != key:
        shadow = copy.deepcopy(model)
        shadow.zero_grad(set_to_none=True)  # the student's gradients are not the copy's to hold
        shadow = shadow.to(dtype).eval().requires_grad_(False)
        entry = (key, shadow, [*shadow.parameters(), *shadow.buffers()])
        _SCORING_COPIES[model] = entry
    with torch.no_grad():
        torch._foreach_copy_(entry[2], source)  # cast-copies in one call (the optimizers' own primitive)
    return entry[1]


def score_superbatch(bundle: ModelBundle, sb: SuperBatch, *, resolution: int | None, chunk: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Student embeddings of every candidate (L2-normalised, in `dtype`: float32, or bf16 from the
    `scoring_model` copy), under inference mode, optionally at a lower image resolution. `sb` lives on
    the scoring device already.

    Images in chunks of `chunk` rows: measured 1.3-1.4x faster than one B=320 forward on the CPU
    (cache-sized activations; benchmarks/results/step_cost.md); on a GPU pass chunk=B. Captions in
    chunks of `chunk` rows of similar length, each at its own longest caption
    (`encode_text_by_length`: the same embeddings, about half the text tower's work)."""
    model = scoring_model(bundle.model, dtype)
    images = bundle.normalize(sb.images)
    lowres = resolution is not None and resolution != images.shape[-1]
    if lowres:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                                 antialias=True, align_corners=False)
    images = images.to(dtype)
    with torch.inference_mode(), _eval_mode(model):
        with at_resolution(model, resolution) if lowres else contextlib.nullcontext():
            img = torch.cat([model.encode_image(images[i:i + chunk], normalize=True)
                             for i in range(0, images.shape[0], chunk)])
        txt = encode_text_by_length(model, sb.tokens, rows=chunk,
                                    multiple=TEXT_MULTIPLE if sb.tokens.is_cuda else 1)
    # in the dtype they were produced in: the kernel reads bf16 and accumulates in fp32
    return img, txt


def select_subbatch(run: Run, stu: tuple[torch.Tensor, torch.Tensor], sb: SuperBatch) -> SelectionResult:
    """Joint batch selection (JEST / ACID) of this rank's b / W candidates; noise drawn from
    (seed, step, rank) for exact resume; with W > 1 the conditional scores see every rank's picks."""
    cfg, group = run.cfg, run.group
    gen = torch.Generator(device=stu[0].device)
    # Not hash(): Python salts str hashes per process, which would break exact resume.
    gen.manual_seed((cfg.seed * 1_000_003 + sb.step + group.rank * 0x9E3779B97F4A7C15) % (2**63 - 1))
    kwargs: dict[str, Any] = dict(stu_img=stu[0], stu_txt=stu[1], stu_scale=run.model.logit_scale.detach().exp(),
                                  stu_bias=run.model.logit_bias.detach())
    if sb.reference is not None:
        meta = run.reference.meta
        kwargs.update(ref_img=sb.reference[0], ref_txt=sb.reference[1], ref_scale=meta.logit_scale,
                      ref_bias=meta.logit_bias)
    return select(cfg.selection, cfg.batch_size // group.world, generator=gen,
                  gather=group.gather_rows if group.active else None, **kwargs)


def noisy_fraction(noisy: float, known: float, n: float) -> float | None:
    """noisy / n, or None (null in the metrics: "n/a") unless the noise flag of every one of the n pairs is
    known: a dataset that records none (a plain import) has an unknown noisy fraction, not 0."""
    return noisy / n if known == n and n else None


def _noise_known(sb: SuperBatch) -> torch.Tensor:
    return sb.noise_known if sb.noise_known is not None else torch.ones_like(sb.noisy)


def selection_metrics(run: Run, sb: SuperBatch, result: SelectionResult) -> dict[str, float | None]:
    """Means over the whole (global) super-batch of the scores and the noisy flags, of all candidates and
    of the selected ones: sums and counts added over the ranks in one collective. A noisy fraction is
    None where a pair it covers has no known flag (`noisy_fraction`)."""
    selected = torch.zeros(len(sb), dtype=torch.bool, device=result.scores.device)
    selected[result.indices] = True
    scores, noisy = result.scores.float(), sb.noisy.to(selected.device)
    known = _noise_known(sb).to(selected.device)
    sums = torch.stack([scores.sum(), torch.tensor(float(len(sb)), device=selected.device),
                        scores[selected].sum(), selected.sum().float(), noisy.sum().float(),
                        noisy[selected].sum().float(), known.sum().float(), known[selected].sum().float()]).double()
    s = run.group.sum_floats(sums.tolist(), run.device)  # one host sync per step, here
    return {"score_mean_all": s[0] / s[1], "score_mean_selected": s[2] / s[3],
            "noisy_frac_superbatch": noisy_fraction(s[4], s[6], s[1]),
            "noisy_frac_selected": noisy_fraction(s[5], s[7], s[3])}


def log_selections(run: Run, sb: SuperBatch, result: SelectionResult) -> None:
    """Per-candidate records (step, uid, score, selected, self_score, noisy) as Arrow columns, every
    cfg.selection_log_every steps, of all candidates or a seeded sample of cfg.selection_log_rows."""
    cfg = run.cfg
    if not cfg.selection_log_every or sb.step % cfg.selection_log_every:
        return
    n = len(sb)
    rows = np.arange(n)
    if cfg.selection_log_rows and cfg.selection_log_rows < n:
        rng = np.random.default_rng([cfg.seed, sb.step, run.group.rank, 0x10C])
        rows = np.sort(rng.choice(n, cfg.selection_log_rows, replace=False))
    selected = np.zeros(n, dtype=bool)
    selected[result.indices.cpu().numpy()] = True
    part = {"uid": sb.uids[rows], "score": result.scores.float().cpu().numpy()[rows],
            "self_score": result.self_scores.float().cpu().numpy()[rows], "selected": selected[rows],
            "noisy": sb.noisy.cpu().numpy()[rows],
            "known": _noise_known(sb).cpu().numpy()[rows]}
    every = run.group.gather_objects(part)
    if run.group.is_main:
        cols = {k: np.concatenate([p[k] for p in every]) for k in part}
        table = pa.table({"step": pa.array(np.full(len(cols["uid"]), sb.step, dtype=np.int64)),
                          "uid": pa.array(cols["uid"].tolist(), pa.string()),
                          "score": pa.array(cols["score"], pa.float32()),
                          "selected": pa.array(cols["selected"]),
                          "self_score": pa.array(cols["self_score"], pa.float32()),
                          "noisy": pa.array(cols["noisy"], mask=~cols["known"])},  # null: unknown
                         schema=SELECTIONS_SCHEMA)
        run.selections_log.append_table(table)


def contrastive_loss(cfg: TrainConfig, model: torch.nn.Module, rows: losses.Rows) -> torch.Tensor:
    scale = model.logit_scale.exp()
    if cfg.contrastive == "sigmoid":
        return losses.sigmoid_contrastive_rows(rows, scale, model.logit_bias)
    return losses.softmax_contrastive_rows(rows, scale)


def kd_loss(cfg: TrainConfig, model: torch.nn.Module, rows: losses.Rows,
            teachers: list[tuple[losses.Rows, Any]], proj: torch.nn.Module | None) -> torch.Tensor:
    """Distillation term on the KD batch, averaged over teachers (eq. 18, losses.ensemble_kd)."""
    scale = model.logit_scale.exp()

    def one_teacher(tea: losses.Rows, meta: Any) -> torch.Tensor:
        if cfg.kd_loss == "softmax":
            return losses.softmax_kd_rows(rows, scale, tea, meta.logit_scale)
        if cfg.kd_loss == "sigmoid":
            return losses.sigmoid_kd_rows(rows, scale, model.logit_bias, tea, meta.logit_scale, meta.logit_bias)
        return losses.feature_matching_kd_rows(rows, tea, proj)

    return losses.ensemble_kd(one_teacher, (), teachers)


def train_step(run: Run, ce: SuperBatch, kd: SuperBatch | None) -> dict[str, float]:
    """One update: L = L_contrastive[B_CE] + lambda * L_dist[B_KD] (SPEC "Full objective"). `ce` and `kd`
    live on the training device (uint8 pixels: normalised here).

    Data-parallel (W > 1): each rank embeds its m = b/W rows and computes its rows of every loss against the
    gathered columns, a column block at a time ([m, m] logits, never b x b: pipeline.losses.Rows); the batch
    loss is the sum of the ranks' shares, so DDP (Dist.wrap) sums the gradients while backward runs, which
    makes the update the single-process update on the gathered batch (pipeline/distributed.py derives it)."""
    cfg, model, group, device = run.cfg, run.model, run.group, run.device
    model.train()
    run.opt.zero_grad(set_to_none=True)
    net = run.net if run.net is not None else model
    with autocast(device):
        img, txt = net(run.bundle.normalize(ce.images), ce.tokens)[:2]
        rows = group.rows(img.float(), txt.float())
        terms = {}
        if kd is not None:
            if kd is ce:
                k_rows = rows
            else:
                k_img, k_txt = net(run.bundle.normalize(kd.images), kd.tokens)[:2]
                k_rows = group.rows(k_img.float(), k_txt.float())
            teachers = [(group.rows(ti, tt, grad=False), spec.meta) for (ti, tt), spec in zip(kd.teachers, run.teachers)]
            terms["kd"] = (cfg.kd_lambda, kd_loss(cfg, model, k_rows, teachers, run.proj))
        total, metrics = losses.unified_objective(contrastive_loss(cfg, model, rows), terms)
    total.backward()  # at W > 1 DDP sums the ranks' gradients bucket by bucket during backward
    metrics = group.sum_metrics(metrics)  # the ranks' loss shares -> the batch's losses
    # model.parameters() includes the feature-matching projection (a registered submodule), once
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    bias = getattr(model, "logit_bias", None)
    values = torch.stack([*metrics.values(), grad_norm, model.logit_scale.detach().exp(),
                          bias.detach().reshape(()) if bias is not None else torch.zeros((), device=device)])
    out = dict(zip([*metrics, "grad_norm", "logit_scale", "logit_bias"], values.tolist()))  # one host sync
    out["lr"] = lr
    return out


# ---------------------------------------------------------------------------------------------
# the run


def _init_student(cfg: TrainConfig, *, resuming: bool) -> ModelBundle:
    """The student before training: fresh weights from the seed, then `init_from` weights, unless the run
    resumes from its own checkpoint (which replaces them all, so the init folder may be gone by then)."""
    bundle = create_model(cfg.model, seed=cfg.seed)
    if cfg.init_from and not resuming:
        init = load_model(cfg.init_from)
        bundle.model.load_state_dict(init.model.state_dict())
        log.info("student initialised from %s", cfg.init_from)
    return bundle


def check_or_write_config(cfg: TrainConfig, run_dir: Path, group: Dist = SINGLE) -> None:
    """Write run_dir/config.json (rank 0) or refuse a run folder that holds another run.

    Only the fields that define the run are compared (TrainConfig.identity): execution settings such as
    the device, data workers or evaluation sets may change between a run and its resume; the file is
    then rewritten with the new settings (torchrun ranks read it). Call this only with a config that has
    passed every check, so a failed start never leaves a config that blocks the retry."""
    saved_cfg = run_dir / "config.json"
    if group.is_main:
        if saved_cfg.exists():
            previous = _saved_config(saved_cfg)
            if previous.identity() != cfg.identity():
                changed = sorted(k for k, v in cfg.identity().items() if previous.identity().get(k) != v)
                raise ValueError(f"{run_dir} already holds another run ({saved_cfg}; differs in {', '.join(changed)}); "
                                 "use a new run name, or the same settings to resume")
        if not saved_cfg.exists() or _saved_config(saved_cfg) != cfg:
            saved_cfg.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(saved_cfg, json.loads(cfg.to_json()))
    group.barrier()  # every rank sees the file rank 0 wrote


def _saved_config(path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_json(path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a valid run config ({e}); move the folder aside or fix the file") from e


def validate_run(cfg: TrainConfig) -> None:
    """The checks of a run's start that write nothing (model builds, caches exist, data opens), for a
    launcher that must write config.json before its ranks start (`aced train --nproc`)."""
    cache_specs(cfg)
    create_model(cfg.model, seed=cfg.seed)
    for d in cfg.train_data:
        load_dataset(d)


def open_run(cfg: TrainConfig, run_dir: Path, device: torch.device, group: Dist) -> tuple[Run, PairIndex]:
    """Everything before the first step. Whatever can refuse the run (caches, model, data) is checked
    before config.json is written; then the student is restored from the run's checkpoint (resume order
    in the module docstring) and logs written after that checkpoint are dropped."""
    ckpt_dir = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_dir)
    reference, teachers = cache_specs(cfg)
    torch.manual_seed(cfg.seed)
    bundle = _init_student(cfg, resuming=latest is not None)
    index = PairIndex(cfg.train_data)
    check_or_write_config(cfg, run_dir, group)

    model = bundle.model.to(device)
    proj = None
    if cfg.spec.kd and cfg.kd_loss == "fm":
        d_student = model.text_projection.shape[1] if hasattr(model, "text_projection") else bundle.embed_dim
        proj = losses.FeatureProjection(d_student, teachers[0].meta.dim).to(device)
        model.add_module("kd_projection", proj)  # saved and optimised with the student
    opt, sched = build_optimizer(cfg, model)
    run = Run(cfg=cfg, device=device, bundle=bundle, opt=opt, sched=sched, proj=proj, reference=reference,
              teachers=teachers, group=group, run_dir=run_dir, metrics_log=ParquetLog(run_dir / "metrics"),
              selections_log=ParquetLog(run_dir / "selections", schema=SELECTIONS_SCHEMA))
    if latest is not None:
        run.start = int(load_checkpoint(latest, model=model, optimizer=opt, scheduler=sched)["step"])
        log.info("resuming %s from %s (step %d)", run_dir, latest.name, run.start)
    run.net = group.wrap(model)  # broadcasts rank 0's weights
    if group.is_main:
        # Rows logged after the checkpoint we resume from belong to steps that will run again.
        run.metrics_log.truncate_after(run.start - 1)
        run.selections_log.truncate_after(run.start - 1)
    return run, index


def train(cfg: TrainConfig, run_dir: Path, *, progress: bool | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir` to cfg.steps; export the final model to run_dir/model.

    Under torchrun (WORLD_SIZE > 1) this is one rank of a data-parallel run (pipeline.distributed):
    every rank calls it with the same config and run folder; rank 0 owns and writes the folder."""
    run_dir = fs.as_path(run_dir)
    device = resolve_device(cfg.device)
    group = setup_distributed(device)
    device = group.device(device)
    if group.active:
        group.shard_size(cfg.batch_size, "batch_size")
        group.shard_size(cfg.superbatch_size, "super-batch")
    with contextlib.ExitStack() as owner:
        if group.is_main:  # one owner per run folder; torchrun's rank 0 inherits the launcher's lock
            owner.enter_context(own_run(run_dir))
        run, index = open_run(cfg, run_dir, device, group)
        if run.start < cfg.steps:
            last = _steps(run, index, progress)
        else:
            last = {}
            log.info("%s: finished run (step %d), nothing to do", run_dir, run.start)
        model_dir = run_dir / "model"
        if group.is_main and (last or not (model_dir / "open_clip_config.json").exists()):
            export_model(run_dir, model_dir, overwrite=True)
        group.barrier()
        return TrainResult(run_dir=run_dir, step=max(run.start, cfg.steps if last else run.start), metrics=last,
                           model_dir=model_dir)


def _steps(run: Run, index: PairIndex, progress: bool | None) -> dict[str, float]:
    """The loop: for each step, score -> select -> train_step -> log -> checkpoint. Returns the last metrics."""
    cfg, group, device = run.cfg, run.group, run.device
    data = SuperBatches(index, size=cfg.superbatch_size, seed=cfg.seed, window=cfg.shuffle_window,
                        preprocess=run.bundle.pixels, tokenizer=run.bundle.tokenizer, reference=run.reference,
                        teachers=run.teachers, on_bad_sample=cfg.on_bad_sample, shard=(group.rank, group.world))
    scoring = score_dtype(cfg, device)
    bar = _progress_bar(run, progress)
    metrics: dict[str, Any] = {}
    t_wait = time.perf_counter()
    for sb in loader(data, start_step=run.start, stop_step=cfg.steps, num_workers=cfg.num_workers,
                     pin_memory=device.type == "cuda"):
        t0 = time.perf_counter()
        sb = sb.to(device)
        metrics = {"step": sb.step, "data_wait_s": t0 - t_wait}
        if cfg.spec.selection is not None:
            stu = score_superbatch(run.bundle, sb, resolution=cfg.score_resolution, dtype=scoring,
                                   chunk=len(sb) if device.type == "cuda" else cfg.batch_size)
            t1 = time.perf_counter()
            result = select_subbatch(run, stu, sb)
            t2 = time.perf_counter()
            ce = sb.subset(result.indices)
            kd = (ce if cfg.spec.kd_batch == "same" else sb.subset(torch.arange(len(ce)))) if cfg.spec.kd else None
            metrics.update(score_s=t1 - t0, select_s=t2 - t1, **selection_metrics(run, sb, result))
            log_selections(run, sb, result)
        else:
            t2 = t0
            ce, kd = sb, (sb if cfg.spec.kd else None)
            noisy = group.sum_floats([float(sb.noisy.sum()), float(_noise_known(sb).sum()), len(sb)], device)
            frac = noisy_fraction(*noisy)
            metrics.update(noisy_frac_selected=frac, noisy_frac_superbatch=frac)
        metrics.update(train_step(run, ce, kd))
        t3 = time.perf_counter()
        metrics.update(train_s=t3 - t2, step_s=t3 - t0 + metrics["data_wait_s"],
                       pairs_per_s=len(ce) * group.world / max(1e-9, t3 - t0 + metrics["data_wait_s"]))
        _log_step(run, metrics, bar)
        done = sb.step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if group.is_main:
                _checkpoint(run, done)
            group.barrier()  # no rank runs ahead of a checkpoint it might have to resume from
        t_wait = time.perf_counter()
    if bar is not None:
        bar.close()
    if data.skipped:
        log.warning("%d bad samples skipped in the main process (workers log their own)", data.skipped)
    return metrics


def _progress_bar(run: Run, progress: bool | None):
    show = (sys.stderr.isatty() if progress is None else progress) and run.group.is_main
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=run.cfg.steps, initial=run.start, desc=run.cfg.method, unit="step", dynamic_ncols=True)


def _log_step(run: Run, metrics: dict[str, Any], bar) -> None:
    done = metrics["step"] + 1
    if run.group.is_main:
        run.metrics_log.append([metrics])
        if time.monotonic() - run.flushed_at >= LOG_FLUSH_S:
            _flush_logs(run, done)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['total']:.3f}")
    elif run.group.is_main and (done % LOG_EVERY == 0 or done == run.cfg.steps):  # no terminal: a log line
        log.info("%s step %d/%d loss %.4f (%.2f s/step)", run.run_dir.name, done, run.cfg.steps, metrics["total"],
                 metrics["step_s"])


def _flush_logs(run: Run, done: int) -> None:
    """Write the buffered metrics and selections as parts tagged with the steps done (each atomically;
    tags grow with the steps, and a resume removes the parts past its checkpoint, so no part is
    written twice with other rows)."""
    run.metrics_log.flush(f"{done:08d}")
    run.selections_log.flush(f"{done:08d}")
    run.flushed_at = time.monotonic()


def _checkpoint(run: Run, done: int) -> None:
    # Logs first: a crash after them but before the checkpoint leaves rows past the old checkpoint,
    # which truncate_after() removes on resume; the reverse order could lose rows.
    _flush_logs(run, done)
    save_checkpoint(run.run_dir / "checkpoints", done, model=run.model, optimizer=run.opt, scheduler=run.sched,
                    state={"config": json.loads(run.cfg.to_json())}, keep=run.cfg.keep_checkpoints)


def export_model(run_dir: Path, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write the run's latest weights as a model folder that the cache stage and `aced eval` load.
    Reads only the config and the checkpoint's weights (never optimizer or RNG state)."""
    cfg = _saved_config(fs.as_path(run_dir) / "config.json")
    ckpt = latest_checkpoint(fs.as_path(run_dir) / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export")
    bundle = create_model(cfg.model, seed=cfg.seed)
    if cfg.spec.kd and cfg.kd_loss == "fm":
        # The projection head is a training-only part; the exported model is the plain two-tower model.
        load_weights(ckpt, model=bundle.model, drop_prefix="kd_projection.")
    else:
        load_weights(ckpt, model=bundle.model)
    return save_model(bundle, out_dir, overwrite=overwrite)


RUN_LOCK_ENV = "ACED_RUN_LOCK_PID"  # set by a launcher that holds the run's lock for its torchrun ranks


@contextlib.contextmanager
def own_run(run_dir: Path):
    """Exclusive ownership of a run folder for this process (storage.workspace.FolderLock), released on
    every exit path, SIGKILL included. A torchrun rank 0 started by `aced train --nproc` runs under its
    launcher's lock: it checks that the launcher named in RUN_LOCK_ENV is the recorded holder."""
    launcher = os.environ.get(RUN_LOCK_ENV)
    if launcher and held_by(run_dir) == int(launcher):
        yield
        return
    with FolderLock(run_dir, "run"):
        yield


# ---------------------------------------------------------------------------------------------
# entry point for torchrun (data-parallel runs; `aced train RUN --nproc N` builds this command)


def launch_command(run_dir: Path, nproc: int) -> list[str]:
    """torchrun command line that trains the run whose config.json is already in `run_dir`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pipeline.trainer", str(run_dir)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pipeline.distributed import teardown

    p = argparse.ArgumentParser(prog="python -m pipeline.trainer",
                                description="Train (or resume) the run in RUN_DIR from its config.json; under "
                                            "torchrun every rank runs this with the same folder.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--config", type=Path, help="TrainConfig JSON (default: RUN_DIR/config.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg_file = args.config or args.run_dir / "config.json"
    if not cfg_file.exists():
        p.error(f"{cfg_file}: no config (write one with `aced train RUN ...` or pass --config)")
    try:
        result = train(TrainConfig.from_json(cfg_file), args.run_dir, progress=False)
    finally:
        teardown()
    if os.environ.get("RANK", "0") == "0":
        log.info("run %s: %d steps, model at %s", result.run_dir, result.step, result.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
