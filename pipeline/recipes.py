"""Training recipes: one frozen config per run, built by a function (SPEC.md "Methods", "Defaults").

A recipe names a method of Table 1 of the paper plus the knobs of Appendix E. Every field is documented
and validated in `__post_init__`; variants derive with `recipe(name, **overrides)` or `dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """How a method of SPEC.md's table builds its batches.

    selection: scoring rule of the CE batch (None = IID), one of pipeline.selection's rules.
    kd: whether a distillation term is added (weight TrainConfig.kd_lambda).
    kd_batch: "same" (KD on the CE batch) or "iid" (KD on a second, uniformly drawn batch).
    """

    selection: str | None
    kd: bool
    kd_batch: str = "same"

    @property
    def needs_reference(self) -> bool:
        return self.selection in ("learnability", "easy_reference", "independent_learnability")


METHODS: dict[str, MethodSpec] = {
    "iid": MethodSpec(selection=None, kd=False),
    "softmax-kd": MethodSpec(selection=None, kd=True),
    "i-acid": MethodSpec(selection="easy_reference", kd=False),
    "h-acid": MethodSpec(selection="learnability", kd=False),
    "aced-acidistill": MethodSpec(selection="learnability", kd=True, kd_batch="same"),
    "aced-iidistill": MethodSpec(selection="learnability", kd=True, kd_batch="iid"),
    # Appendix G baselines.
    "rho-topk": MethodSpec(selection="independent_learnability", kd=False),
    "student-loss": MethodSpec(selection="student_loss", kd=False),
}


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Paths are strings so the config round-trips through JSON unchanged."""

    method: str = "iid"
    """Method of SPEC.md's table: iid, softmax-kd, i-acid, h-acid, aced-acidistill, aced-iidistill, rho-topk, student-loss."""
    model: str = "aced-vit-t"
    """Student architecture: a ladder name, an open_clip name or a JSON config path (pipeline.models.create_model)."""
    init_from: str | None = None
    """Optional model dir whose weights initialise the student (resume order: own checkpoint, then this, then scratch)."""
    train_data: tuple[str, ...] = ()
    """Pair-shard dataset folders read for training."""
    cache_root: str | None = None
    """Folder holding `<model_id>/<dataset>/` embedding caches (stage 1 output); needed by selection and KD."""
    reference: str | None = None
    """Model id of the reference in cache_root (selection scores)."""
    teacher: tuple[str, ...] = ()
    """Model id(s) of the teacher(s) in cache_root; several = ensemble KD (eq. 18)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 64
    """b: pairs per training batch (the selected sub-batch for ACID methods)."""
    filter_ratio: float = 0.8
    """f: fraction of the super-batch filtered out; super-batch B = round(b / (1 - f)). Ignored by IID methods."""
    n_chunks: int = 16
    """JEST chunks per selection (each b/n examples)."""
    tau: float = 10.0
    """Sampling temperature of joint selection (0 = uniform, large = greedy)."""
    topk: bool = False
    """Deterministic top-k per chunk instead of Gumbel sampling."""
    score_resolution: int | None = None
    """Score the super-batch at this lower image resolution (Flexi-JEST style); None = training resolution."""
    kernel_backend: str = "auto"
    """Conditional-score kernel: auto (Triton on CUDA, torch on CPU), triton or torch."""
    contrastive: str = "sigmoid"
    """Contrastive loss: sigmoid (SigLIP) or softmax (CLIP)."""
    kd_loss: str = "softmax"
    """Distillation loss: softmax (eq. 13, the ACED default), sigmoid (eq. 15) or fm (eq. 16)."""
    kd_lambda: float = 2.0
    """lambda of L = L_contrastive + lambda * L_dist (paper sweeps 0.5, 1, 2)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 1e-4
    """Decoupled weight decay per step at the peak of the schedule, big_vision style (Appendix E): decayed
    weights shrink by weight_decay * lr multiplier each step, independent of the peak lr (build_optimizer)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    schedule: str = "cosine"
    """Learning-rate schedule: cosine (warm-up then cosine to 0) or rsqrt (warm-up, 1/sqrt decay, linear cool-down)."""
    warmup_frac: float = 0.1
    """Fraction of steps of linear warm-up."""
    cooldown_frac: float = 0.1
    """Fraction of steps of linear cool-down (rsqrt only)."""
    seed: int = 0
    """Seeds model init, data order and selection noise (all derived, so resume is exact)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (plus one at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    num_workers: int = 1
    """Decoding worker processes (0 = decode in the training process)."""
    shuffle_window: int = 8
    """Shards whose samples are shuffled together (memory grows with it)."""
    on_bad_sample: str = "raise"
    """raise: stop at the first bad sample, naming it; skip: count, log and skip it."""
    log_selections: bool = True
    """Write per-candidate selection records (step, uid, score, selected, noisy) to Parquet."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    eval_zeroshot: tuple[str, ...] = ()
    """Class-folder datasets for zero-shot evaluation at the end."""
    eval_retrieval: tuple[str, ...] = ()
    """Pair datasets for retrieval evaluation at the end."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "n_chunks", "checkpoint_every", "keep_checkpoints", "shuffle_window"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.filter_ratio < 1.0:
            raise ValueError(f"filter_ratio must be in [0, 1), got {self.filter_ratio}")
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        _positive("lr", self.lr)
        for name, options in (("contrastive", ("sigmoid", "softmax")), ("kd_loss", ("softmax", "sigmoid", "fm")),
                              ("schedule", ("cosine", "rsqrt")), ("on_bad_sample", ("raise", "skip")),
                              ("device", ("auto", "cpu", "cuda")), ("kernel_backend", ("auto", "triton", "torch"))):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_frac + (self.cooldown_frac if self.schedule == "rsqrt" else 0) <= 1:
            raise ValueError("warmup_frac (+ cooldown_frac) must lie in [0, 1]")
        if not self.train_data:
            raise ValueError("train_data is empty: name at least one pair-shard dataset folder")
        spec = self.spec
        if spec.needs_reference and not self.reference:
            raise ValueError(f"method {self.method!r} selects with a reference model: set reference (a cached model id)")
        if spec.kd and not self.teacher:
            raise ValueError(f"method {self.method!r} distills: set teacher (cached model id(s))")
        if (spec.needs_reference or spec.kd) and not self.cache_root:
            raise ValueError(f"method {self.method!r} reads cached embeddings: set cache_root")
        if spec.selection is not None and self.superbatch_size <= self.batch_size:
            raise ValueError(f"filter_ratio {self.filter_ratio} leaves nothing to select: super-batch "
                             f"{self.superbatch_size} <= batch {self.batch_size}")
        if spec.selection is not None and self.n_chunks > self.batch_size:
            raise ValueError(f"n_chunks {self.n_chunks} > batch_size {self.batch_size}")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def superbatch_size(self) -> int:
        """B = b / (1 - f) for selection methods, b for IID ones."""
        if self.spec.selection is None:
            return self.batch_size
        return int(round(self.batch_size / (1.0 - self.filter_ratio)))

    EXECUTION_FIELDS = ("num_workers", "device", "log_selections", "eval_zeroshot", "eval_retrieval",
                        "kernel_backend", "checkpoint_every", "keep_checkpoints")
    """How a run executes, not what it computes: these may change when a run resumes (kernel_backend
    picks an implementation of the same scores; checkpoint spacing does not change any step)."""

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (compared on resume): everything but EXECUTION_FIELDS."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EXECUTION_FIELDS}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """Named starting points.

    - "student": the tiny CPU student (aced-vit-t, b=64) for any method (pass method=...).
    - "reference": a larger model trained IID on clean data; the paper trains its own references this way.
    - "tiny": a few-step CPU variant for integration tests (b=16, 4 chunks, checkpoints every 3 steps).
    Overrides are TrainConfig fields.
    """
    base: dict[str, Any]
    if name == "student":
        base = dict(model="aced-vit-t", batch_size=64, steps=400, checkpoint_every=100)
    elif name == "reference":
        base = dict(method="iid", model="aced-vit-s", batch_size=64, steps=600, checkpoint_every=100)
    elif name == "tiny":
        base = dict(model="aced-vit-t", batch_size=16, n_chunks=4, steps=10, checkpoint_every=3,
                    keep_checkpoints=2, num_workers=0)
    else:
        raise ValueError(f"unknown recipe {name!r}; known: student, reference, tiny")
    base.update(overrides)
    return TrainConfig(**base)
