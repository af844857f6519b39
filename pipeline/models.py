"""Model factory over open_clip (paper section 4.1 and Table 2: students, references, teachers).

- Any open_clip architecture by name, a custom JSON config by path, a saved model folder, or the
  built-in ladder of small 64x64 configs (`aced-vit-t` < `aced-vit-s` < `aced-vit-b` < `aced-vit-l`,
  `pipeline/model_configs/*.json`) that train on a CPU, so the reference and teacher can be larger
  than the student as in the paper.
- Offline only: open_clip's bundled BPE tokenizer; pretrained weights only from a local file or
  folder. A hub tag, an `hf-hub:` name, a hub tokenizer or a tower that would fetch base weights
  fails at once with `HubAccessError` (checked before open_clip is asked for anything).
- Weights as safetensors + JSON config in open_clip's `local-dir` layout (`open_clip_config.json`,
  `open_clip_model.safetensors`) plus `aced_model.json` (name, fingerprint, params, created).
- `fingerprint` hashes weights + model config + preprocessing: the cache stage records it so a cache
  from another model (or other preprocessing) is never used silently.
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
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from safetensors import SafetensorError

from storage.atomic import replace_dir, temp_sibling

# Belt and braces (the checks below are the real guard): should anything still reach for the HF
# hub, it fails instead of waiting on a network this system does not have.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


class HubAccessError(RuntimeError):
    """Raised for anything that would download weights or tokenizers: this system runs offline."""


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
        """LongTensor[N, context_length] -> L2-normalised Tensor[N, embed_dim]."""
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

def _refuse_hub_name(name: str) -> None:
    if name.startswith(_HUB_PREFIXES):
        raise HubAccessError(f"model {name!r} lives on a hub; this system runs offline: pass a ladder name "
                             f"({', '.join(LADDER)}), an open_clip architecture with pretrained=<local weights file>, "
                             "a local JSON config or a model folder")


def _local_pretrained(pretrained: str) -> Path:
    path = Path(pretrained.removeprefix("local-dir:"))
    if not path.exists():
        raise HubAccessError(f"pretrained={pretrained!r} is not a local file or folder. Pretrained tags download "
                             "from a hub, which this system never does: weights must be a local file "
                             "(.pt/.bin/.safetensors/.npz) or a model folder written by save_model")
    return path


def _refuse_hub_cfg(model_cfg: dict, where: str) -> None:
    """Configs whose construction alone would fetch something (tokenizer, HF text tower, timm weights)."""
    text, vision = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    if text.get("hf_tokenizer_name"):
        raise HubAccessError(f"{where}: the text tower uses the hub tokenizer {text['hf_tokenizer_name']!r}, "
                             "unavailable offline; use a config with open_clip's bundled BPE tokenizer")
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


def _preprocess_cfg(model_cfg: dict, given: dict | None) -> dict:
    size = model_cfg["vision_cfg"]["image_size"]
    cfg = {"size": size, "mode": "RGB", "mean": list(_MEAN), "std": list(_STD), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    if given:
        unknown = set(given) - set(cfg) - {"fill_color"}
        if unknown:
            raise ValueError(f"unknown preprocess_cfg keys {sorted(unknown)}")
        cfg.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items()})
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


def _model_class(model_cfg: dict):
    """The class open_clip.create_model would pick for this config (CLIP towers as their short-text
    subclasses: same parameters and state dict, plus encode_text at the batch's length)."""
    if model_cfg.get("custom_text", False):
        return open_clip.CoCa if "multimodal_cfg" in model_cfg else ShortTextCustomTextCLIP
    return ShortTextCLIP


_POSITIVE_KEYS = {"vision_cfg": ("layers", "width", "patch_size", "image_size", "head_width", "mlp_ratio"),
                  "text_cfg": ("layers", "width", "heads", "context_length", "vocab_size", "mlp_ratio")}


def check_model_cfg(model_cfg: dict, where: str) -> None:
    """Sizes that must be positive numbers (a zero width or negative layer count would build an empty or
    broken tower that fails only later, or never): checked when a model is created or loaded."""
    def positive(value) -> bool:
        items = value if isinstance(value, (list, tuple)) else [value]
        return bool(items) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in items)

    if not isinstance(model_cfg, dict):
        raise ValueError(f"{where}: model config must be a JSON object")
    if not positive(model_cfg.get("embed_dim")):
        raise ValueError(f"{where}: embed_dim must be a positive integer, got {model_cfg.get('embed_dim')!r}")
    for tower, keys in _POSITIVE_KEYS.items():
        cfg = model_cfg.get(tower)
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: {tower} must be a JSON object")
        for key in keys:
            if key in cfg and cfg[key] is not None and not positive(cfg[key]):
                raise ValueError(f"{where}: {tower}.{key} must be positive, got {cfg[key]!r}")


def _build(name: str, model_cfg: dict, preprocess_cfg: dict | None, seed: int) -> ModelBundle:
    check_model_cfg(model_cfg, name)
    _refuse_hub_cfg(model_cfg, name)
    kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    # Initial weights depend only on `seed`; fork_rng keeps the caller's RNG stream untouched
    # (the trainer's exact resume depends on it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(model_cfg)(**kwargs)
    model.eval()
    pre = _preprocess_cfg(model_cfg, preprocess_cfg)
    preprocess = open_clip.image_transform(pre["size"], is_train=False, mean=pre["mean"], std=pre["std"],
                                           interpolation=pre["interpolation"], resize_mode=pre["resize_mode"],
                                           fill_color=pre.get("fill_color", 0))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(
        context_length=int(model_cfg["text_cfg"].get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)))
    if isinstance(model, (ShortTextCLIP, ShortTextCustomTextCLIP)):
        tokenizer = TrimmingTokenizer(tokenizer)
    config = {"model_cfg": model_cfg, "preprocess_cfg": pre, "name": name}
    return ModelBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, name=name, config=config)


def _load_weights(bundle: ModelBundle, path: Path) -> None:
    """Local open_clip checkpoint (state dict .pt/.bin, {"state_dict": ...}, safetensors, big_vision
    .npz) through open_clip's own loader (prefix stripping, 3rd-party conversion, position-embedding
    resize), strictly: a checkpoint of another architecture is an error, not a partial load."""
    try:
        # weights_only=True: torch's restricted unpickler refuses anything but tensors and plain values,
        # so a planted pickle cannot run code; .npz goes through numpy without pickle support.
        open_clip.load_checkpoint(bundle.model, str(path), strict=True, weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, EOFError) as e:
        raise ValueError(f"{path}: not a loadable weights file ({str(e)[:300]}); it is truncated, or holds "
                         "something other than plain tensors (which is never unpickled)") from e
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:  # open_clip asserts on shape changes
        raise ValueError(f"{path}: weights do not fit model {bundle.name!r}: {str(e)[:600]}") from e
    bundle.model.eval()


def create_model(name: str, *, pretrained: str | None = None, seed: int = 0) -> ModelBundle:
    """A model by ladder/open_clip name, JSON config path or model folder.

    pretrained: None (fresh weights from `seed`), a local weights file (open_clip checkpoint: .pt,
      .bin, .safetensors, .npz) or a model folder written by `save_model`. Anything else (a tag
      such as "laion2b_s34b_b79k", an hf-hub name) raises HubAccessError at once.
    """
    _refuse_hub_name(name)
    local = _local_pretrained(pretrained) if pretrained is not None else None
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


def save_model(bundle: ModelBundle, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write open_clip's local-dir layout + aced_model.json into `out_dir`, atomically: everything
    goes to a temp folder beside it (files fsynced), which then replaces `out_dir` by rename.
    Readers see the old folder or the new one, never a mix. An existing folder is replaced only with
    `overwrite` and only if it holds nothing but a model's own files (nothing else is ever deleted); a
    folder that already holds this very model (same fingerprint) is left as it is."""
    from safetensors.torch import save_file

    out = Path(out_dir)
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


def load_model(model_dir: str | os.PathLike, *, verify: bool = True) -> ModelBundle:
    """Load a folder written by `save_model` (or any open_clip local-dir folder with safetensors or
    .bin weights). With `verify`, the fingerprint must equal the one recorded in aced_model.json."""
    folder = Path(model_dir)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no {CONFIG_FILE})")
    cfg = _read_json(cfg_file)
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise ValueError(f"{cfg_file}: lacks 'model_cfg'")
    aced = _read_json(folder / ACED_FILE) if (folder / ACED_FILE).is_file() else {}
    weights = next((folder / f for f in (WEIGHTS_FILE, "open_clip_pytorch_model.bin") if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no weights ({WEIGHTS_FILE})")
    bundle = _build(aced.get("name", folder.name), cfg["model_cfg"], cfg.get("preprocess_cfg"), seed=0)
    _load_weights(bundle, weights)
    if verify and "fingerprint" in aced and fingerprint(bundle) != aced["fingerprint"]:
        raise ValueError(f"{folder}: weights/config do not match the fingerprint in {ACED_FILE} "
                         "(a corrupted or hand-edited model folder)")
    return bundle


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
