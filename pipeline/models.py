"""Model factory over open_clip (paper section 4.1 and Table 2: students, references, teachers).

- Any open_clip architecture by name, a custom JSON config by path, a saved model folder, or the
  built-in ladder of small 64x64 configs (`aced-vit-t` < `aced-vit-s` < `aced-vit-b` < `aced-vit-l`,
  `pipeline/model_configs/*.json`) that train on a CPU, so the reference and teacher can be larger
  than the student as in the paper.
- Offline only: pretrained weights from a local file or folder, or an `hf-hub:org/name` model read
  from the local Hugging Face cache (`pipeline.pretrained`, which also imports OpenAI and big_vision
  checkpoints); open_clip's bundled BPE tokenizer, or a Hugging Face tokenizer found in that cache.
  A pretrained tag, anything missing from the cache, or a tower that would fetch base weights fails
  at once with `HubAccessError` (checked before open_clip is asked for anything).
- Weights as safetensors + JSON config in open_clip's `local-dir` layout (`open_clip_config.json`,
  `open_clip_model.safetensors`) plus `aced_model.json` (name, fingerprint, params, created).
- `fingerprint` hashes weights + model config + preprocessing: the cache stage records it so a cache
  from another model (or other preprocessing) is never used silently, and `load_model` checks a folder
  against the one in its aced_model.json (a folder without one is refused: nothing could be checked).
- Configs are checked before anything is built (`check_model_cfg`, `_preprocess_cfg`): known keys,
  integer sizes, valid preprocessing, and an estimated size within MAX_PARAMS and the machine's memory.
- `count_flops` counts the operations of a real forward pass (torch's FlopCounterMode).

Logit initialisation of the ladder (SPEC.md "Models and embeddings"): `init_logit_scale` and
`init_logit_bias` are fields of each config (any JSON config may set its own). The ladder keeps
SigLIP's t = log 10, c = -10, chosen by measurement, not by habit. With Adam at lr 1e-3, t and c
move by at most ~lr per step, so over a short run they stay at their init and the init decides
the loss landscape. Measured on clean synthetic pairs (aced-vit-t, batch 64, sigmoid loss, AdamW
lr 1e-3 (0.9, 0.95), 10% warm-up + cosine, 200 steps; image->text R@1 / R@5 over 256 held-out
pairs, chance 0.004 / 0.020):

    a = exp(t)   c     R@1    R@5
    10         -10    0.172  0.582   (SigLIP; chosen)
    20         -10    0.148  0.574
    10          -5    0.129  0.492
    14.3        -5    0.102  0.391   (CLIP's scale)
    10         -15    0.008  0.055   (collapses: negatives get no gradient, all pairs align)

So at batch 64 SigLIP's init does not slow learning; a less negative bias does. The cliff is on the
other side: once a + c <= -5, even identical embeddings give a negative pair a logit of -5 or less,
negatives get almost no gradient, and the positives' pull aligns everything (collapse).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from safetensors import SafetensorError

from storage import fs
from storage.atomic import replace_dir, temp_sibling

# Belt and braces (the checks below are the real guard: hub files are resolved from the local cache
# by path): should anything still reach for the HF hub, it fails instead of waiting on a network this
# system does not have. Forced, not defaulted: a user's HF_HUB_OFFLINE=0 must not open a connection.
os.environ["HF_HUB_OFFLINE"] = "1"

import open_clip  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

CONFIG_DIR = Path(__file__).with_name("model_configs")
LADDER = ("aced-vit-t", "aced-vit-s", "aced-vit-b", "aced-vit-l")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
ACED_FILE = "aced_model.json"
# Normalisation: open_clip's default (OpenAI CLIP statistics). Any fixed choice works for models
# trained from scratch, and it is what OpenAI-style local checkpoints expect. It is part of the
# fingerprint. A JSON config (or a model folder) may carry its own "preprocess_cfg".
_MEAN = tuple(open_clip.OPENAI_DATASET_MEAN)
_STD = tuple(open_clip.OPENAI_DATASET_STD)
_HUB_PREFIXES = ("hf-hub:", "hf_hub:")

open_clip.add_model_config(CONFIG_DIR)


class HubAccessError(ValueError, RuntimeError):
    """Raised for anything that would download weights or tokenizers: this system runs offline. A
    ValueError too: a hub name is bad input, reported by `aced` as one line."""


@dataclass
class ModelBundle:
    """A two-tower model with its preprocessing and tokenizer (see docs/interfaces.md).

    model: the open_clip model (CLIP / CustomTextCLIP / CoCa), in eval mode after creation.
    preprocess: PIL image -> Tensor[3, H, W] (resize + centre crop to image_size, normalise; no augmentation).
    tokenizer: list[str] -> LongTensor[N, context_length] (open_clip's bundled BPE).
    name: the ladder/open_clip name or config stem it was made from.
    config: {"model_cfg": ..., "preprocess_cfg": ..., "name": ...}.
    """

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    config: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.config["model_cfg"]["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.config["model_cfg"]["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def context_length(self) -> int:
        return int(self.config["model_cfg"]["text_cfg"].get("context_length", 77))

    @property
    def pixels(self) -> Callable:
        """PIL image -> uint8 Tensor[3, H, W]: `preprocess` without its float conversion and normalisation,
        so a batch travels (and is cut into sub-batches) at a quarter of the bytes; `normalize` finishes
        it on the device: normalize(pixels(im)[None]) == preprocess(im)[None] exactly. A small picklable
        transform (DataLoader workers receive it, not the model)."""
        from torchvision.transforms import Compose, PILToTensor

        steps = list(self.preprocess.transforms)
        if type(steps[-1]).__name__ != "Normalize" or "ToTensor" not in type(steps[-2]).__name__:
            raise ValueError(f"{self.name}: preprocessing does not end in ToTensor + Normalize: {self.preprocess}")
        return Compose(steps[:-2] + [PILToTensor()])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 Tensor[N, 3, H, W] (from `pixels`, on any device) -> the model's float32 input, as
        torchvision's ToTensor + Normalize compute it (divide by 255, subtract mean, divide by std)."""
        pre = self.config["preprocess_cfg"]
        mean = torch.tensor(pre["mean"], dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(pre["std"], dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Tensor[N, 3, H, W] (preprocessed) -> L2-normalised Tensor[N, embed_dim]."""
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor[N, context_length] -> L2-normalised Tensor[N, embed_dim]; on the CPU in groups of
        similar caption length (`encode_text_by_length`: the same embeddings, ~40% less text-tower time)."""
        if tokens.device.type == "cpu":
            return encode_text_by_length(self.model, tokens, rows=TEXT_ROWS)
        return self.model.encode_text(tokens, normalize=True)

    @property
    def logit_scale(self) -> float:
        """a = exp(t) (the multiplier of the cosine similarity)."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float:
        """c (0.0 for a model without a bias, e.g. CLIP)."""
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else float(bias.detach())


def resolve_device(requested: str = "auto") -> torch.device:
    """The one device rule of the project: "auto" is CUDA when torch sees a GPU, else the CPU; "cuda"
    without a GPU is an error (never a silent fall back to the CPU); "cuda:N" / "cpu" as given."""
    kind = str(requested).split(":")[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but torch sees no CUDA device")
    return torch.device(requested)


# --------------------------------------------------------------------------- offline guards

def _local_pretrained(pretrained: str, arch: str) -> Path:
    path = Path(pretrained.removeprefix("local-dir:"))
    if not path.exists():
        from pipeline.pretrained import pretrained_tag_hint

        raise HubAccessError(f"pretrained={pretrained!r} is not a local file or folder. Pretrained tags download "
                             "from a hub, which this system never does: weights must be a local file "
                             "(.pt/.bin/.safetensors/.npz) or a model folder written by save_model"
                             + pretrained_tag_hint(arch, pretrained))
    return path


def _refuse_hub_cfg(model_cfg: dict, where: str) -> None:
    """Configs whose construction alone would fetch something (HF text tower, timm weights). A Hugging
    Face tokenizer is looked up in the local cache by `_tokenizer`."""
    text, vision = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    if text.get("hf_model_name"):
        raise HubAccessError(f"{where}: the text tower is the Hugging Face model {text['hf_model_name']!r}, whose "
                             "config and weights come from a hub; unavailable offline")
    if vision.get("timm_model_pretrained"):
        raise HubAccessError(f"{where}: timm_model_pretrained=true downloads the image tower's weights; "
                             "set it false and pass local weights instead")


# --------------------------------------------------------------------------- construction

def _resolve(name: str) -> tuple[str, dict, dict | None]:
    """(name, model config, preprocess config or None) for a ladder/open_clip name or a JSON path."""
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a model config must be a JSON object")
        # Either a bare model config (open_clip's model_configs/*.json) or the local-dir layout.
        cfg = raw.get("model_cfg", raw)
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in cfg:
                raise ValueError(f"{path}: model config lacks {key!r}")
        return path.stem, copy.deepcopy(cfg), raw.get("preprocess_cfg")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}: not a ladder name ({', '.join(LADDER)}), an open_clip "
                         "architecture (open_clip.list_models()), a JSON config file or a model folder")
    return name, copy.deepcopy(cfg), None


_INTERPOLATIONS = ("bicubic", "bilinear", "random")  # open_clip.image_transform's (it asserts)
_RESIZE_MODES = ("shortest", "longest", "squash")


def _preprocess_cfg(model_cfg: dict, given: dict | None, where: str = "preprocess_cfg") -> dict:
    """The model's preprocessing: open_clip's defaults updated by `given` (a config's or folder's
    `preprocess_cfg`), checked value by value (ValueError naming `where` and the key)."""
    size = model_cfg["vision_cfg"]["image_size"]
    cfg = {"size": size, "mode": "RGB", "mean": list(_MEAN), "std": list(_STD), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    if given is not None and not isinstance(given, dict):
        raise ValueError(f"{where}: preprocess_cfg must be a JSON object, got {type(given).__name__}")
    if given:
        unknown = set(given) - set(cfg) - {"fill_color"}
        if unknown:
            raise ValueError(f"{where}: unknown preprocess_cfg keys {sorted(unknown)}")
        cfg.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items()})

    def numbers(v) -> bool:
        return (isinstance(v, list) and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))

    def same_size(a, b) -> bool:
        pair = lambda v: list(v) if isinstance(v, (list, tuple)) else [v, v]  # noqa: E731
        return pair(a) == pair(b)

    if not same_size(cfg["size"], size):
        raise ValueError(f"{where}: preprocess_cfg.size {cfg['size']!r} differs from the model's image_size {size!r}")
    if cfg["mode"] != "RGB":
        raise ValueError(f"{where}: preprocess_cfg.mode must be 'RGB' (images are decoded as RGB), got {cfg['mode']!r}")
    if not numbers(cfg["mean"]):
        raise ValueError(f"{where}: preprocess_cfg.mean must be 3 finite numbers, got {cfg['mean']!r}")
    if not numbers(cfg["std"]) or not all(x > 0 for x in cfg["std"]):
        raise ValueError(f"{where}: preprocess_cfg.std must be 3 finite numbers > 0, got {cfg['std']!r}")
    if cfg["interpolation"] not in _INTERPOLATIONS:
        raise ValueError(f"{where}: preprocess_cfg.interpolation must be one of {_INTERPOLATIONS}, "
                         f"got {cfg['interpolation']!r}")
    if cfg["resize_mode"] not in _RESIZE_MODES:
        raise ValueError(f"{where}: preprocess_cfg.resize_mode must be one of {_RESIZE_MODES}, "
                         f"got {cfg['resize_mode']!r}")
    fill = cfg.get("fill_color", 0)
    if not (_is_int(fill) and 0 <= fill <= 255):
        raise ValueError(f"{where}: preprocess_cfg.fill_color must be an integer in [0, 255], got {fill!r}")
    return cfg


# --------------------------------------------------------------------------- text at the batch's length

TEXT_MULTIPLE = 8  # trimmed context lengths are rounded up to this (fewer distinct shapes; tensor-core friendly)


def trim_tokens(tokens: torch.Tensor, multiple: int = TEXT_MULTIPLE) -> torch.Tensor:
    """The columns of `tokens` [N, context] up to the batch's longest caption (its end-of-text token
    included), rounded up to a multiple of `multiple`; a view, no copy. Call it where tokens are made
    (the CPU tokenizer output): on a device tensor it would cost a host sync."""
    if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.device.type == "meta":  # meta: shapes only
        return tokens
    used = torch.nonzero(tokens.ne(0).any(dim=0))  # open_clip pads with token 0
    length = int(used[-1]) + 1 if len(used) else 1
    length = min(tokens.shape[1], -(-length // multiple) * multiple)
    return tokens[:, :length]


class TrimmingTokenizer:
    """open_clip's tokenizer whose output is cut to the batch's longest caption (`trim_tokens`), for
    models whose text tower gives the same embedding at any context length (`exact_short_text`)."""

    def __init__(self, inner):
        self.inner = inner
        self.context_length = inner.context_length

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        return trim_tokens(self.inner(texts, context_length) if context_length else self.inner(texts))


def exact_short_text(text_tower) -> bool:
    """True when the text tower's embedding of a caption does not depend on the padding after it: a
    causal attention mask (position t sees only positions <= t) and pooling at the end-of-text token
    (argmax/eos), no appended class token. Then running only the first L positions is exact."""
    pool = getattr(text_tower, "text_pool_type", getattr(text_tower, "pool_type", None))
    return (getattr(text_tower, "attn_mask", None) is not None and pool in ("argmax", "eos")
            and getattr(text_tower, "cls_emb", None) is None)


def _short_text_forward(tower, text: torch.Tensor, *, pool_type: str, eos_id) -> torch.Tensor:
    """The text transformer of CLIP / TextTransformer over the first L = text.shape[1] positions:
    positional embedding and causal mask sliced to L (exact, see `exact_short_text`)."""
    length = text.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, text, pool_type, eos_token_id=eos_id)
    if tower.text_projection is not None:
        x = tower.text_projection(x) if isinstance(tower.text_projection, torch.nn.Linear) else x @ tower.text_projection
    return x


def _pad_context(text: torch.Tensor, context: int) -> torch.Tensor:
    return torch.nn.functional.pad(text, (0, context - text.shape[1])) if text.shape[1] < context else text


class ShortTextCLIP(open_clip.CLIP):
    """open_clip's CLIP whose encode_text accepts tokens cut to the batch's length (TrimmingTokenizer):
    exact for causal, end-of-text-pooled towers; any other tower gets the tokens padded back."""

    def encode_text(self, text, normalize: bool = False):
        context = self.positional_embedding.shape[0]
        if text.shape[1] == context or not exact_short_text(self):
            x = super().encode_text(_pad_context(text, context), normalize=False)
        else:
            x = _short_text_forward(self, text, pool_type=self.text_pool_type, eos_id=getattr(self, "text_eos_id", None))
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


class ShortTextCustomTextCLIP(open_clip.CustomTextCLIP):
    """CustomTextCLIP counterpart of ShortTextCLIP (the text tower is `self.text`)."""

    def encode_text(self, text, normalize: bool = False):
        tower = self.text
        context = tower.positional_embedding.shape[0]
        if text.shape[1] == context or not exact_short_text(tower) or not hasattr(tower, "token_embedding"):
            x = tower(_pad_context(text, context))
        else:
            x = _short_text_forward(tower, text, pool_type=tower.pool_type, eos_id=getattr(tower, "eos_id", None))
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


TEXT_ROWS = 64  # rows per length group on the CPU (the scoring chunk of the trainer's b = 64 runs)


def caption_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Positions each row of `tokens` [N, L] uses: up to its last non-padding token (open_clip pads
    with 0), the end-of-text token included; 0 for an all-padding row."""
    used = tokens.ne(0)
    return torch.where(used.any(dim=1), tokens.shape[1] - used.flip(1).int().argmax(dim=1), 0)


def _short_text_exact(model) -> bool:
    """Whether `model.encode_text` runs cut tokens exactly (ShortTextCLIP / ShortTextCustomTextCLIP over
    a causal, end-of-text-pooled tower); elsewhere the caption lengths must not be used."""
    if isinstance(model, ShortTextCLIP):
        return exact_short_text(model)
    return (isinstance(model, ShortTextCustomTextCLIP) and exact_short_text(model.text)
            and hasattr(model.text, "token_embedding"))


def encode_text_by_length(model, tokens: torch.Tensor, *, rows: int, multiple: int = 1,
                          normalize: bool = True) -> torch.Tensor:
    """`model.encode_text(tokens)` with the captions grouped by length: sorted by `caption_lengths`, cut
    into chunks of `rows`, each chunk run at its own longest caption (rounded up to `multiple`), the
    embeddings put back in the input order.

    Exact for the towers `exact_short_text` accepts (a caption's embedding depends only on its own
    positions up to its end-of-text token): the values of one forward at the batch's length, up to the
    float rounding of another batch shape (~1e-7, tests/unit/test_step_inputs.py). Captions average 12
    of the 24 positions a batch of synthetic captions runs at, so this about halves the text tower's
    work (benchmarks/results/step_cost.md). `multiple` = 1 on the CPU; 8 on a GPU (tensor-core shapes,
    fewer distinct shapes). One host sync (the lengths). Other towers: plain `encode_text` in chunks.
    """
    n = tokens.shape[0]
    if n == 0 or tokens.ndim != 2 or not _short_text_exact(model):
        parts = [model.encode_text(tokens[i:i + rows], normalize=normalize) for i in range(0, max(n, 1), rows)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    lengths = caption_lengths(tokens)
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()  # the host sync
    out = None
    for start in range(0, n, rows):
        idx = order[start:start + rows]
        longest = max(1, sorted_lengths[min(start + rows, n) - 1])
        length = min(tokens.shape[1], -(-longest // multiple) * multiple)
        emb = model.encode_text(tokens[idx, :length], normalize=normalize)
        if out is None:
            out = emb.new_empty((n, emb.shape[1]))
        out[idx] = emb
    return out


def _model_class(model_cfg: dict):
    """The class open_clip.create_model would pick for this config (CLIP towers as their short-text
    subclasses: same parameters and state dict, plus encode_text at the batch's length)."""
    if model_cfg.get("custom_text", False):
        return open_clip.CoCa if "multimodal_cfg" in model_cfg else ShortTextCustomTextCLIP
    return ShortTextCLIP


_INT_KEYS = {"vision_cfg": ("layers", "width", "patch_size", "image_size", "head_width"),
             "text_cfg": ("layers", "width", "heads", "context_length", "vocab_size")}
_POSITIVE_NUMBER_KEYS = ("mlp_ratio",)
MAX_PARAMS = 10**10
"""Largest model a config may describe (estimated before anything is allocated): 4x the paper's largest
teacher, 40 GB of float32 weights. A hand-edited size (embed_dim 1e12) is refused by name, not by the allocator."""


def _model_keys() -> dict[str, set[str]]:
    """Keys open_clip accepts: the model classes' keyword arguments (plus custom_text, which picks the
    class) and the tower config dataclasses' fields. Anything else is a TypeError deep inside open_clip."""
    import dataclasses
    import inspect

    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    top = {"custom_text"}
    for cls in (open_clip.CLIP, open_clip.CustomTextCLIP, open_clip.CoCa):
        top |= set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {"": top, "vision_cfg": {f.name for f in dataclasses.fields(CLIPVisionCfg)},
            "text_cfg": {f.name for f in dataclasses.fields(CLIPTextCfg)},
            "multimodal_cfg": {f.name for f in dataclasses.fields(MultimodalCfg)}}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_ints(value, max_len: int = 0) -> bool:
    """A positive int, or (for layers of a ResNet tower / a (h, w) image size) a list of up to max_len."""
    if isinstance(value, (list, tuple)):
        return 0 < len(value) <= max_len and all(_is_int(v) and v > 0 for v in value)
    return _is_int(value) and value > 0


def estimate_params(model_cfg: dict) -> int:
    """Rough parameter count of a (checked) config, from its sizes alone: transformer blocks
    (4 + 2 x mlp_ratio) w^2 each, ResNet bottlenecks ~17 planes^2, embeddings, projections. Within a few %
    for ViT/text towers; only used to refuse absurd sizes before allocating."""
    def get(cfg, key, default):
        value = cfg.get(key)
        return default if value is None else value

    def blocks(w, layers, mlp):
        return layers * (4 + 2 * mlp) * w * w

    d = model_cfg["embed_dim"]
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    total = d * d  # logit scale/bias and slack
    if not v.get("timm_model_name"):
        w, layers = get(v, "width", 768), get(v, "layers", 12)
        if isinstance(layers, (list, tuple)):  # ModifiedResNet: stage i has planes w * 2^i, attention pool at 32 w
            total += sum(n * 17 * (w * 2**i) ** 2 for i, n in enumerate(layers)) + 4 * (32 * w) ** 2 + 32 * w * d
        else:
            p, size = get(v, "patch_size", 16), get(v, "image_size", 224)
            hw = size if isinstance(size, (list, tuple)) else (size, size)
            grid = max(1, hw[0] // p) * max(1, hw[-1] // p)
            total += blocks(w, layers, get(v, "mlp_ratio", 4.0)) + 3 * p * p * w + (grid + 1) * w + w * d
    if not t.get("hf_model_name"):
        w = get(t, "width", 512)
        total += (blocks(w, get(t, "layers", 12), get(t, "mlp_ratio", 4.0))
                  + (get(t, "vocab_size", 49408) + get(t, "context_length", 77)) * w + w * d)
    m = model_cfg.get("multimodal_cfg")
    if isinstance(m, dict):
        w = get(m, "width", 512)
        total += 2 * blocks(w, get(m, "layers", 12), get(m, "mlp_ratio", 4.0)) + get(m, "vocab_size", 49408) * w
    return int(total)


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_cfg(model_cfg: dict, where: str) -> None:
    """The model config of a name, JSON file or model folder, checked before open_clip builds anything:
    only keys open_clip knows, sizes that are positive integers (a float layer count, a zero width or a
    width its heads do not divide fails later inside torch, or never), and a size that fits (a
    parameter estimate within MAX_PARAMS and the machine's memory). ValueError naming `where` and the key."""
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{where}: model config must be a JSON object, got {type(model_cfg).__name__}")
    known = _model_keys()
    unknown = sorted(set(model_cfg) - known[""])
    if unknown:
        raise ValueError(f"{where}: unknown model config keys {unknown}; known: {', '.join(sorted(known['']))}")
    if not (_is_int(model_cfg.get("embed_dim")) and model_cfg["embed_dim"] > 0):
        raise ValueError(f"{where}: embed_dim must be a positive integer, got {model_cfg.get('embed_dim')!r}")
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        cfg = model_cfg.get(tower)
        if cfg is None and tower == "multimodal_cfg":
            continue
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: {tower} must be a JSON object, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - known[tower])
        if unknown:
            raise ValueError(f"{where}: unknown {tower} keys {unknown}")
        for key in _INT_KEYS.get(tower, ("layers", "width", "heads", "context_length", "vocab_size")):
            value = cfg.get(key)
            # lists: a ResNet image tower's layers per stage, an (h, w) image size
            max_len = {("vision_cfg", "layers"): 4, ("vision_cfg", "image_size"): 2}.get((tower, key), 0)
            if value is not None and not _positive_ints(value, max_len):
                kind = f"a positive integer or a list of at most {max_len}" if max_len else "a positive integer"
                raise ValueError(f"{where}: {tower}.{key} must be {kind}, got {value!r}")
        for key in _POSITIVE_NUMBER_KEYS:
            value = cfg.get(key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and math.isfinite(value) and value > 0):
                raise ValueError(f"{where}: {tower}.{key} must be a positive number, got {value!r}")
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if not vision.get("timm_model_name") and not isinstance(vision.get("layers"), (list, tuple)):  # a ViT
        width, head = vision.get("width") or 768, vision.get("head_width") or 64
        if width % head:
            raise ValueError(f"{where}: vision_cfg.width {width} is not a multiple of head_width {head}")
    if not text.get("hf_model_name"):
        width, heads = text.get("width") or 512, text.get("heads") or 8
        if width % heads:
            raise ValueError(f"{where}: text_cfg.width {width} is not a multiple of heads {heads}")
    params = estimate_params(model_cfg)
    if params > MAX_PARAMS:
        raise ValueError(f"{where}: the config describes about {params:.3g} parameters (more than {MAX_PARAMS:.0e}); "
                         "check embed_dim, widths, layers and vocab_size")
    memory = _memory_bytes()
    if memory and 4 * params > memory:
        raise ValueError(f"{where}: the config describes about {params:.3g} parameters ({4 * params / 2**30:.1f} GiB "
                         f"in float32), more than this machine's {memory / 2**30:.1f} GiB of memory")


def _folder_config(folder: Path) -> tuple[dict, Path]:
    """A model folder's open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}) and its path."""
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no {CONFIG_FILE})")
    cfg = _read_json(cfg_file)
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise ValueError(f"{cfg_file}: lacks 'model_cfg'")
    return cfg, cfg_file


def model_config(name: str) -> dict:
    """The model config (`model_cfg`) of a ladder/open_clip name, JSON config path or model folder,
    read and checked without building the model (an `hf-hub:` name from the local cache)."""
    folder = Path(name.removeprefix("local-dir:"))
    if name.startswith(_HUB_PREFIXES):
        from pipeline.pretrained import hub_config

        _, config, cfg = hub_config(name)
        model_cfg, where = cfg["model_cfg"], str(config)
    elif name.startswith("local-dir:") or folder.is_dir():
        cfg, cfg_file = _folder_config(folder)
        model_cfg, where = cfg["model_cfg"], str(cfg_file)
    else:
        _, model_cfg, _ = _resolve(name)
        where = name
    check_model_cfg(model_cfg, where)
    return model_cfg


def check_score_resolution(model_cfg: dict, resolution: int, where: str) -> None:
    """Low-resolution scoring (pipeline.flexi) needs a ViT image tower; the resolution must be a positive
    multiple of its patch size and at most its image size (scoring at a *lower* resolution)."""
    vision = model_cfg["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(f"{where}: score_resolution needs a ViT image tower (open_clip VisionTransformer)")
    size = vision.get("image_size", 224)
    size = min(size) if isinstance(size, (list, tuple)) else size
    patch = vision.get("patch_size", 16)
    if not patch <= resolution <= size or resolution % patch:
        raise ValueError(f"score_resolution must be a multiple of the patch size {patch} between {patch} and the "
                         f"image size {size} of {where}, got {resolution}")


def _build(name: str, model_cfg: dict, preprocess_cfg: dict | None, seed: int, where: str | None = None) -> ModelBundle:
    where = where or name
    check_model_cfg(model_cfg, where)
    _refuse_hub_cfg(model_cfg, where)
    pre = _preprocess_cfg(model_cfg, preprocess_cfg, where)  # checked before anything is allocated
    tokenizer = _tokenizer(model_cfg, where)  # a tokenizer missing from the local cache also fails before
    kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    # Initial weights depend only on `seed`; fork_rng keeps the caller's RNG stream untouched
    # (the trainer's exact resume depends on it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(model_cfg)(**kwargs)
    model.eval()
    preprocess = open_clip.image_transform(pre["size"], is_train=False, mean=pre["mean"], std=pre["std"],
                                           interpolation=pre["interpolation"], resize_mode=pre["resize_mode"],
                                           fill_color=pre.get("fill_color", 0))
    if isinstance(model, (ShortTextCLIP, ShortTextCustomTextCLIP)):
        tokenizer = TrimmingTokenizer(tokenizer)
    config = {"model_cfg": model_cfg, "preprocess_cfg": pre, "name": name}
    return ModelBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, name=name, config=config)


def _tokenizer(model_cfg: dict, where: str):
    """open_clip's bundled BPE tokenizer, or the config's Hugging Face tokenizer read from the local cache
    (pipeline.pretrained.hf_tokenizer: HubAccessError when it is not there)."""
    text = model_cfg["text_cfg"]
    context = int(text.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH))
    if text.get("hf_tokenizer_name"):
        from pipeline.pretrained import hf_tokenizer

        return hf_tokenizer(text["hf_tokenizer_name"], context, dict(text.get("tokenizer_kwargs") or {}), where)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def tokenizer_info(model_cfg: dict) -> dict:
    """Which tokenizer a model config uses (recorded in aced_model.json)."""
    name = model_cfg["text_cfg"].get("hf_tokenizer_name")
    return {"kind": "hf", "name": name, "source": "local Hugging Face cache"} if name else {"kind": "open_clip-bpe"}


def _load_weights(bundle: ModelBundle, path: Path) -> None:
    """Local open_clip checkpoint (state dict .pt/.bin, {"state_dict": ...}, safetensors, big_vision
    .npz) through open_clip's own loader (prefix stripping, 3rd-party conversion, position-embedding
    resize), strictly: a checkpoint of another architecture is an error, not a partial load. A
    TorchScript archive (OpenAI's checkpoints) is read by pipeline.pretrained's tensor-only reader."""
    from pipeline import pretrained

    if pretrained.is_torchscript(path):
        pretrained.load_tensors(bundle, pretrained.read_torchscript_tensors(path), path, extra_ok=True)
        return
    big_vision = path.suffix in (".npz", ".npy")
    if big_vision:
        _check_npz(path)
        # open_clip's converter copies tensor by tensor and ignores what the model has but the file lacks:
        # NaN everywhere first, so any parameter it leaves untouched is found below (not silently random).
        with torch.no_grad():
            for p in bundle.model.parameters():
                p.fill_(float("nan"))
    try:
        # weights_only=True: torch's restricted unpickler refuses anything but tensors and plain values,
        # so a planted pickle cannot run code; .npz goes through numpy without pickle support.
        open_clip.load_checkpoint(bundle.model, str(path), strict=True, weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, EOFError) as e:
        raise ValueError(f"{path}: not a loadable weights file ({' '.join(str(e).split())[:300]}); it is truncated, or holds "
                         "something other than plain tensors (which is never unpickled)") from e
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:  # open_clip asserts on shape changes
        raise ValueError(f"{path}: weights do not fit model {bundle.name!r}: {_load_error_summary(e)}") from e
    if big_vision:
        untouched = [n for n, p in bundle.model.named_parameters() if torch.isnan(p).any()]
        if untouched:
            raise ValueError(f"{path}: the big_vision checkpoint does not cover {len(untouched)} parameter(s) of "
                             f"{bundle.name!r} ({', '.join(untouched[:3])}{', ...' if len(untouched) > 3 else ''}): "
                             "another architecture, or a non-finite value in the file")
    bundle.model.eval()


def _check_npz(path: Path) -> None:
    """A numpy archive of plain arrays: opened without pickle support (an object array is refused by numpy)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                z[key]
    except (ValueError, OSError, EOFError) as e:  # object arrays, truncated or not an archive
        raise ValueError(f"{path}: not a numpy archive of plain arrays ({' '.join(str(e).split())[:200]}); "
                         "arrays needing pickle are never loaded") from e


def _load_error_summary(err: BaseException) -> str:
    """One line for torch's multi-line load_state_dict error (hundreds of key names for another
    architecture): how many keys are missing / unexpected / of another shape, and the first few."""
    text = str(err)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} key(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    shapes = re.findall(r"size mismatch for ([^:]+):", text)
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape ({', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''})")
    return "; ".join(parts) if parts else " ".join(text.split())[:300]


def create_model(name: str, *, pretrained: str | None = None, seed: int = 0) -> ModelBundle:
    """A model by ladder/open_clip name, JSON config path or model folder.

    name may also be `hf-hub:org/name`, read from the local Hugging Face cache (pipeline.pretrained).
    pretrained: None (fresh weights from `seed`), a local weights file (open_clip checkpoint: .pt,
      .bin, .safetensors, big_vision .npz, an OpenAI TorchScript archive) or a model folder written by
      `save_model`. A tag such as "laion2b_s34b_b79k" raises HubAccessError at once (naming the
      hf-hub repo that holds it, to be read from the cache instead).
    """
    if name.startswith(_HUB_PREFIXES):
        if pretrained is not None:
            raise ValueError(f"{name}: an hf-hub model carries its own weights; do not also pass pretrained=")
        from pipeline.pretrained import hub_model

        return hub_model(name)[0]
    local = _local_pretrained(pretrained, name) if pretrained is not None else None
    if name.startswith("local-dir:") or Path(name).is_dir():
        if local is not None:
            raise ValueError(f"{name}: a model folder already holds weights; do not also pass pretrained=")
        return load_model(name.removeprefix("local-dir:"))
    arch, cfg, pre = _resolve(name)
    if local is not None and local.is_dir():
        bundle = load_model(local)
        if bundle.config["model_cfg"] != json.loads(json.dumps(cfg)):
            raise ValueError(f"{local}: the saved model is not a {name!r} (its model_cfg differs)")
        return bundle
    bundle = _build(arch, cfg, pre, seed)
    if local is not None:
        _load_weights(bundle, local)
    return bundle


# --------------------------------------------------------------------------- identity, save, load

def fingerprint(bundle: ModelBundle) -> str:
    """sha256 over model config + preprocessing config (canonical JSON) and every state_dict tensor
    (name, dtype, shape, raw bytes) in sorted-name order. Equal fingerprints = same embeddings."""
    h = hashlib.sha256()
    h.update(json.dumps({k: bundle.config[k] for k in ("model_cfg", "preprocess_cfg")}, sort_keys=True).encode())
    for key, tensor in sorted(bundle.model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: 0-dim tensors cannot be viewed as bytes
        h.update(f"{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, ACED_FILE)


def _check_model_target(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a model folder this project wrote, and that only with `overwrite`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [n for n in entries if n not in MODEL_FILES]
    if foreign:
        raise FileExistsError(f"{out} holds files this project did not write ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}): refusing to replace it; choose another folder")
    if not overwrite:
        raise FileExistsError(f"{out} already holds a model; pass --overwrite to replace it")


def save_model(bundle: ModelBundle, out_dir: str | os.PathLike, *, overwrite: bool = False,
               source: dict | None = None) -> Path:
    """Write open_clip's local-dir layout + aced_model.json into `out_dir`, atomically: everything
    goes to a temp folder beside it (files fsynced), which then replaces `out_dir` by rename.
    Readers see the old folder or the new one, never a mix. An existing folder is replaced only with
    `overwrite` and only if it holds nothing but a model's own files (nothing else is ever deleted); a
    folder that already holds this very model (same fingerprint) is left as it is. `source` (where
    imported weights came from, pipeline.pretrained) is recorded in aced_model.json."""
    from safetensors.torch import save_file

    out = fs.as_path(out_dir)  # local, or an object-store URL (storage/fs.py: uploaded, aced_model.json last)
    if not overwrite and (out / ACED_FILE).is_file() and set(p.name for p in out.iterdir()) <= set(MODEL_FILES):
        try:
            same = _read_json(out / ACED_FILE).get("fingerprint") == fingerprint(bundle)
        except ValueError:
            same = False
        if same:  # the very same model is already there (e.g. a re-run of an export): nothing to replace
            return out
    _check_model_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, mkdir=True)
    try:
        # clone: safetensors refuses tensors that share storage (e.g. tied weights).
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in bundle.model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps({"model_cfg": bundle.config["model_cfg"],
                                                   "preprocess_cfg": bundle.config["preprocess_cfg"]}, indent=2))
        meta = {"name": bundle.name, "fingerprint": fingerprint(bundle), **count_params(bundle),
                "embed_dim": bundle.embed_dim, "image_size": bundle.image_size,
                "logit_scale": bundle.logit_scale, "logit_bias": bundle.logit_bias,
                "tokenizer": tokenizer_info(bundle.config["model_cfg"]),
                **({"source": source} if source else {}),
                "open_clip": open_clip.__version__, "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / ACED_FILE).write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def local_model_dir(model_dir: str | os.PathLike) -> Path:
    """The local folder to load a model from: `model_dir` itself, or for a folder in an object store
    (`s3://.../models/ID`) its local copy (storage.fs.local_copy: downloaded once per content, its
    fingerprint verified by `load_model` before the copy is published), named like the original, so
    the folder name stays the model id the cache files it under."""
    if not fs.is_url(model_dir):
        return Path(model_dir)
    return fs.local_copy(model_dir, check=load_model)


def load_model(model_dir: str | os.PathLike, *, verify: bool = True) -> ModelBundle:
    """Load a folder written by `save_model`. With `verify` (the default) its aced_model.json must record
    a fingerprint and the loaded weights + config + preprocessing must match it: a folder without one
    (aced_model.json missing, or edited to drop the fingerprint) cannot be checked, so it is refused rather
    than trusted, because any preprocessing edit would then pass. `verify=False` loads any open_clip
    local-dir folder with safetensors or .bin weights as it is (foreign weights are adopted with
    `create_model(ARCH, pretrained=WEIGHTS_FILE)` + `save_model`, which records a fingerprint).
    A folder in an object store is loaded from its local copy (`local_model_dir`; the first load is
    the check of the fresh download, so it is not loaded twice)."""
    if fs.is_url(model_dir):
        loaded: list[ModelBundle] = []
        folder = fs.local_copy(model_dir, check=lambda d: loaded.append(load_model(d, verify=verify)))
        return loaded[0] if loaded else load_model(folder, verify=verify)
    folder = Path(model_dir)
    cfg, cfg_file = _folder_config(folder)
    aced = _read_aced_file(folder, verify)
    weights = next((folder / f for f in (WEIGHTS_FILE, "open_clip_pytorch_model.bin") if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no weights ({WEIGHTS_FILE})")
    bundle = _build(aced.get("name", folder.name), cfg["model_cfg"], cfg.get("preprocess_cfg"), seed=0,
                    where=str(cfg_file))
    _load_weights(bundle, weights)
    if verify and fingerprint(bundle) != aced["fingerprint"]:
        raise ValueError(f"{folder}: weights/config do not match the fingerprint in {ACED_FILE} "
                         "(a corrupted or hand-edited model folder)")
    return bundle


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def _read_aced_file(folder: Path, verify: bool) -> dict:
    """aced_model.json of a model folder: a JSON object with a string name and (when verifying) a sha256
    fingerprint. ValueError naming the file and what is wrong otherwise."""
    path = folder / ACED_FILE
    if not path.is_file():
        if verify:
            raise ValueError(f"{folder}: no {ACED_FILE}, so no recorded fingerprint to check the weights and "
                             "preprocessing against; refusing an unverifiable model folder (adopt foreign weights "
                             "with `aced model create ARCH --pretrained WEIGHTS_FILE`)")
        return {}
    aced = _read_json(path)
    if not isinstance(aced, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(aced).__name__}")
    if "name" in aced and not (isinstance(aced["name"], str) and aced["name"]):
        raise ValueError(f"{path}: name must be a non-empty string, got {aced['name']!r}")
    if verify:
        if "fingerprint" not in aced:
            raise ValueError(f"{path}: no fingerprint recorded, so the weights and preprocessing cannot be checked "
                             "(a hand-edited model folder?); refusing it. Re-export or re-save the model")
        if not (isinstance(aced["fingerprint"], str) and _FINGERPRINT.fullmatch(aced["fingerprint"])):
            raise ValueError(f"{path}: fingerprint must be 64 hex digits (sha256), got {aced['fingerprint']!r}")
    return aced


# --------------------------------------------------------------------------- size and cost

def count_params(bundle: ModelBundle) -> dict[str, int]:
    """Parameter counts: total, image tower (`model.visual`), the rest (text tower, logit scale/bias)."""
    m = bundle.model
    total = sum(p.numel() for p in m.parameters())
    image = sum(p.numel() for p in m.visual.parameters())
    return {"params": total, "params_image": image, "params_text": total - image}


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that
# scaled_dot_product_attention dispatches to here; without this the attention matmuls go uncounted.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


def count_flops(bundle: ModelBundle) -> dict[str, float]:
    """Inference cost per image-text pair, counted on a real forward pass of one image at the
    model's size and one text at its context length (all tokens run through the text tower).

    Convention: FLOPs = 2 x multiply-accumulates (torch's FlopCounterMode), counting matmuls,
    convolutions and attention; elementwise work (norms, activations, softmax) is not counted.
    Returns params, params_image, params_text, gflops_image, gflops_text, gflops_pair.
    """
    model = bundle.model
    was_training = model.training
    model.eval()
    image = torch.zeros(1, 3, bundle.image_size, bundle.image_size)
    # one text at the full context length (the paper's per-pair cost; the trainer's cut texts cost less)
    tokens = _pad_context(bundle.tokenizer(["a photo of a thing"]), bundle.context_length)
    # nn.MultiheadAttention's inference fast path is one fused op that FlopCounterMode cannot see
    # into (it would drop every attention projection); the regular path computes the same thing.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as fc_img:
                model.encode_image(image)
            with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as fc_txt:
                model.encode_text(tokens)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    gi, gt = fc_img.get_total_flops() / 1e9, fc_txt.get_total_flops() / 1e9
    return {**count_params(bundle), "gflops_image": gi, "gflops_text": gt, "gflops_pair": gi + gt}
