"""Training recipes: one frozen config per run, built by a function (SPEC.md "Methods", "Defaults").

A recipe names a method of Table 1 of the paper plus the knobs of Appendix E. Every field is documented
and validated in `__post_init__`; variants derive with `recipe(name, **overrides)` or `dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage import fs
from pipeline.selection import SelectionConfig


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


INT_MAX = 2**63 - 1
"""Largest integer field value (int64: seeds, steps and sizes reach torch, numpy and Parquet as int64)."""


def _typed(name: str, value: Any, kind: str) -> Any:
    """`value` checked against a field's annotation `kind` (the string a `from __future__ import
    annotations` dataclass records), normalised (list -> tuple, int -> float for float fields);
    ValueError naming the field otherwise. JSON and Python callers give values of any type: a bool
    is not an int, "2" is not a number, NaN/inf are not numbers a run can use."""
    if value is None:
        if "None" in kind:
            return None
        raise ValueError(f"{name} must not be null")
    base = kind.replace(" | None", "")
    if base == "tuple[str, ...]":
        if isinstance(value, str):
            raise ValueError(f"{name} must be a list of strings, got the string {value!r} (write [{value!r}])")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
        return tuple(value)
    if base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if abs(value) > INT_MAX:
            raise ValueError(f"{name} must fit in 64 bits, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    return value  # SelectionConfig: checked by __post_init__ itself


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
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """How the sub-batch is drawn (pipeline.selection.SelectionConfig: n_chunks = JEST chunks, tau =
    sampling temperature, topk, backend = conditional-score kernel); its rule is the method's. Ignored by
    IID methods. CLI: `--set n_chunks=8` or `--set selection.tau=5`."""
    score_resolution: int | None = None
    """Score the super-batch at this lower image resolution (Flexi-JEST style); None = training resolution."""
    score_dtype: str = "auto"
    """Scoring forward precision: auto (bf16 autocast on CUDA and on CPUs with native bf16, else float32),
    bfloat16 or float32. Training always runs as before (bf16 autocast on CUDA, float32 on the CPU)."""
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
    selection_log_every: int = 1
    """Write per-candidate selection records (step, uid, score, selected, self_score, noisy) to Parquet every this
    many steps (0 = never): at B = 160k candidates a record per candidate per step adds up."""
    selection_log_rows: int = 0
    """Per logged step, a seeded random sample of this many candidates (0 = all of them)."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    eval_zeroshot: tuple[str, ...] = ()
    """Class-folder datasets for zero-shot evaluation at the end."""
    eval_retrieval: tuple[str, ...] = ()
    """Pair datasets for retrieval evaluation at the end."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: every later check may then compare and hash
            object.__setattr__(self, f.name, _typed(f.name, getattr(self, f.name), str(f.type)))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if isinstance(self.selection, dict):  # from JSON
            object.__setattr__(self, "selection",
                               normalise_fields({"selection": self.selection}).get("selection", SelectionConfig()))
        if not isinstance(self.selection, SelectionConfig):
            raise ValueError(f"selection must be a SelectionConfig, got {type(self.selection).__name__}")
        if self.spec.selection is not None and self.selection.rule != self.spec.selection:
            # the rule is the method's: one source of truth, whatever the config file said
            object.__setattr__(self, "selection", dataclasses.replace(self.selection, rule=self.spec.selection))
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "shuffle_window"):
            _positive(name, getattr(self, name))
        for name in ("selection_log_every", "selection_log_rows", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.filter_ratio < 1.0:
            raise ValueError(f"filter_ratio must be in [0, 1), got {self.filter_ratio}")
        for name in ("lr", "grad_clip"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "kd_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("warmup_frac", "cooldown_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.score_resolution is not None:
            self._check_score_resolution()
        for name, options in (("contrastive", ("sigmoid", "softmax")), ("kd_loss", ("softmax", "sigmoid", "fm")),
                              ("schedule", ("cosine", "rsqrt")), ("on_bad_sample", ("raise", "skip")),
                              ("device", ("auto", "cpu", "cuda")), ("score_dtype", ("auto", "bfloat16", "float32"))):
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
        if spec.selection is not None and self.selection.n_chunks > self.batch_size:
            raise ValueError(f"selection.n_chunks {self.selection.n_chunks} > batch_size {self.batch_size}")

    def _check_score_resolution(self) -> None:
        """score_resolution against the student's config (read, not built): a positive multiple of its
        patch size, at most its image size (it scores at a *lower* resolution; a larger one only costs)."""
        if self.score_resolution < 1:
            raise ValueError(f"score_resolution must be a positive number of pixels, got {self.score_resolution}")
        from pipeline.models import check_score_resolution, model_config  # lazy: torch/open_clip only when set

        check_score_resolution(model_config(self.model), self.score_resolution, where=f"model {self.model!r}")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def superbatch_size(self) -> int:
        """B = b / (1 - f) for selection methods, b for IID ones."""
        if self.spec.selection is None:
            return self.batch_size
        return int(round(self.batch_size / (1.0 - self.filter_ratio)))

    EXECUTION_FIELDS = ("num_workers", "device", "selection_log_every", "selection_log_rows", "eval_zeroshot",
                        "eval_retrieval", "selection.backend", "checkpoint_every", "keep_checkpoints")
    """How a run executes, not what it computes: these may change when a run resumes (the kernel backend
    picks an implementation of the same scores; checkpoint spacing does not change any step)."""

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (compared on resume): everything but EXECUTION_FIELDS."""
        flat = {}
        for k, v in dataclasses.asdict(self).items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        return {k: v for k, v in flat.items() if k not in self.EXECUTION_FIELDS}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**normalise_fields(data))

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of TrainConfig fields in `path` (a run's config.json, `aced train --config`);
    ValueError naming the file when it is not UTF-8 JSON or not an object."""
    path = fs.as_path(path)  # a run's config.json may be in an object store (storage/fs.py)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a JSON config file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a JSON object of TrainConfig fields, "
                         f"got a {type(data).__name__}")
    return data


# Flat names of earlier versions (config.json files of existing runs, recipe overrides, `--set`).
_SELECTION_ALIASES = {"n_chunks": "n_chunks", "tau": "tau", "topk": "topk", "kernel_backend": "backend"}


def normalise_fields(data: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields from a dict that may use the flat selection names (`n_chunks`, `tau`, `topk`,
    `kernel_backend`), dotted ones (`selection.tau`) or the old `log_selections` flag."""
    if not isinstance(data, dict):
        raise ValueError(f"TrainConfig fields must be a JSON object / dict, got a {type(data).__name__}")
    out = dict(data)
    sel = out.pop("selection", None)
    if isinstance(sel, SelectionConfig):
        sel = dataclasses.asdict(sel)
    elif sel is None or isinstance(sel, dict):
        sel = dict(sel or {})
    else:
        raise ValueError(f"selection must be an object of SelectionConfig fields, got {type(sel).__name__} {sel!r}")
    for key in list(out):
        name = _SELECTION_ALIASES.get(key) or (key.split(".", 1)[1] if key.startswith("selection.") else None)
        if name is not None:
            sel[name] = out.pop(key)
    if sel:
        known_sel = [f.name for f in dataclasses.fields(SelectionConfig)]
        unknown_sel = sorted(set(sel) - set(known_sel))
        if unknown_sel:
            raise ValueError(f"unknown selection fields: {unknown_sel}; known: {', '.join(known_sel)}")
        sel.setdefault("rule", "learnability")  # replaced by the method's rule in __post_init__
        out["selection"] = SelectionConfig(**sel)
    if "log_selections" in out:
        out["selection_log_every"] = 1 if out.pop("log_selections") else 0
    unknown = sorted(set(out) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {unknown}")
    return out


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """Named starting points.

    - "student": the tiny CPU student (aced-vit-t, b=64) for any method (pass method=...).
    - "reference": a larger model trained IID on clean data; the paper trains its own references this way.
    - "tiny": a few-step CPU variant for integration tests (b=16, 4 chunks, checkpoints every 3 steps).
    Overrides are TrainConfig fields (selection knobs also by their flat names, e.g. n_chunks=4).
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
    return TrainConfig(**normalise_fields(base))
