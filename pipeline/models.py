"""Model factory over open_clip (paper section 4.1 / Table 2: students, references, teachers).

- Any open_clip architecture by name, a custom JSON config by path, or the built-in ladder of small
  64x64 configs (`aced-vit-t` < `aced-vit-s` < `aced-vit-b` < `aced-vit-l`) that train on a CPU, so the
  reference and teacher can be larger than the student as in the paper.
- Offline only: open_clip's bundled BPE tokenizer; pretrained weights only from a local file or
  folder. A hub tag or `hf-hub:` name fails at once with a clear message (no network wait).
- Weights as safetensors + JSON config in open_clip's `local-dir` layout, plus `aced_model.json`.
- `fingerprint` hashes weights + model config + preprocessing: the cache stage records it so a cache
  from another model (or other preprocessing) is never used silently.
- `count_flops` counts the operations of a real forward pass (torch's FlopCounterMode).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a hub

import open_clip  # noqa: E402

CONFIG_DIR = Path(__file__).with_name("model_configs")
LADDER = ("aced-vit-t", "aced-vit-s", "aced-vit-b", "aced-vit-l")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
ACED_FILE = "aced_model.json"
# Normalisation of the synthetic/CIFAR/Flickr images: open_clip's CLIP statistics (any fixed choice works
# when models are trained from scratch; it is part of the fingerprint).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)

open_clip.add_model_config(CONFIG_DIR)


class HubAccessError(RuntimeError):
    """Raised for anything that would download weights or tokenizers: this system runs offline."""


@dataclass
class ModelBundle:
    """A two-tower model with its preprocessing and tokenizer (see docs/interfaces.md)."""

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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float:
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else float(bias.detach())


def _refuse_hub(name: str, pretrained: str | None) -> None:
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise HubAccessError(f"model {name!r} lives on a hub; this system runs offline: "
                             "pass a local config file or folder instead")
    if pretrained is not None and not Path(pretrained.removeprefix("local-dir:")).exists():
        raise HubAccessError(f"pretrained={pretrained!r} is not a local file or folder; pretrained tags download "
                             "from a hub, which this system never does: pass the path of a local weights file "
                             "(.pt/.bin/.safetensors) or a model folder")


def _model_cfg(name: str) -> tuple[str, dict]:
    """(open_clip name, model config) for a ladder/open_clip name or a JSON config path."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)
        return path.stem, cfg
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}: not a ladder name ({', '.join(LADDER)}), an open_clip "
                         "architecture or a JSON config file")
    return name, copy.deepcopy(cfg)


def _preprocess_cfg(model_cfg: dict) -> dict:
    size = model_cfg["vision_cfg"]["image_size"]
    return {"size": size, "mode": "RGB", "mean": list(_MEAN), "std": list(_STD), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def _tokenizer_for(model_cfg: dict):
    text = model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text:
        raise HubAccessError(f"text tower uses the hub tokenizer {text['hf_tokenizer_name']!r}, unavailable offline; "
                             "use a config with open_clip's bundled BPE tokenizer")
    return open_clip.tokenizer.SimpleTokenizer(context_length=int(text.get("context_length", 77)))


def _build(name: str, model_cfg: dict, seed: int) -> ModelBundle:
    # Seed before construction so initial weights depend only on `seed`.
    torch.manual_seed(seed)
    if "hf_tokenizer_name" in model_cfg.get("text_cfg", {}):
        _tokenizer_for(model_cfg)  # raises with the offline message
    kwargs = {k: v for k, v in model_cfg.items()}
    model = open_clip.model.CLIP(**kwargs) if not kwargs.get("custom_text") else open_clip.model.CustomTextCLIP(
        **{k: v for k, v in kwargs.items() if k != "custom_text"})
    pre_cfg = _preprocess_cfg(model_cfg)
    preprocess = open_clip.image_transform(pre_cfg["size"], is_train=False, mean=pre_cfg["mean"], std=pre_cfg["std"],
                                           interpolation=pre_cfg["interpolation"], resize_mode=pre_cfg["resize_mode"])
    config = {"model_cfg": model_cfg, "preprocess_cfg": pre_cfg, "name": name}
    model.eval()
    return ModelBundle(model=model, preprocess=preprocess, tokenizer=_tokenizer_for(model_cfg), name=name, config=config)


def create_model(name: str, *, pretrained: str | None = None, seed: int = 0) -> ModelBundle:
    """A fresh model (or one with local pretrained weights) by ladder/open_clip name or JSON path."""
    _refuse_hub(name, pretrained)
    if pretrained is not None and Path(pretrained.removeprefix("local-dir:")).is_dir():
        return load_model(pretrained.removeprefix("local-dir:"))
    arch, cfg = _model_cfg(name)
    bundle = _build(arch, cfg, seed)
    if pretrained is not None:
        state = _read_weights(Path(pretrained))
        missing, unexpected = bundle.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{pretrained}: weights do not fit {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return bundle


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def fingerprint(bundle: ModelBundle) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes in sorted order) + model and preprocess config."""
    h = hashlib.sha256()
    h.update(json.dumps({k: bundle.config[k] for k in ("model_cfg", "preprocess_cfg")}, sort_keys=True).encode())
    for key, tensor in sorted(bundle.model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: 0-dim tensors cannot be viewed as bytes
        h.update(f"{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(bundle: ModelBundle, out_dir: str | os.PathLike) -> Path:
    """Write open_clip's local-dir layout + aced_model.json into `out_dir`, atomically (temp folder + rename)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in bundle.model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps({"model_cfg": bundle.config["model_cfg"],
                                                   "preprocess_cfg": bundle.config["preprocess_cfg"]}, indent=2))
        stats = count_params(bundle)
        (tmp / ACED_FILE).write_text(json.dumps({"name": bundle.name, "fingerprint": fingerprint(bundle),
                                                 **stats}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(model_dir: str | os.PathLike) -> ModelBundle:
    """Load a folder written by `save_model` (or any open_clip local-dir folder)."""
    folder = Path(model_dir)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{folder}: not a model folder (no {CONFIG_FILE})")
    cfg = json.loads(cfg_file.read_text())
    aced = json.loads((folder / ACED_FILE).read_text()) if (folder / ACED_FILE).exists() else {}
    bundle = _build(aced.get("name", folder.name), cfg["model_cfg"], seed=0)
    bundle.model.load_state_dict(_read_weights(folder / WEIGHTS_FILE))
    return bundle


def count_params(bundle: ModelBundle) -> dict[str, int]:
    m = bundle.model
    total = sum(p.numel() for p in m.parameters())
    image = sum(p.numel() for p in m.visual.parameters())
    return {"params": total, "params_image": image, "params_text": total - image}


def count_flops(bundle: ModelBundle) -> dict[str, float]:
    """Inference cost per image-text pair, counted on a real forward pass of one image and one text.

    Convention: FLOPs = 2 x multiply-accumulates (torch's FlopCounterMode; matmuls/convolutions/attention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = bundle.model.eval()
    image = torch.zeros(1, 3, bundle.image_size, bundle.image_size)
    tokens = bundle.tokenizer(["a photo of a thing"])
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc_img:
            model.encode_image(image)
        with FlopCounterMode(display=False) as fc_txt:
            model.encode_text(tokens)
    gi, gt = fc_img.get_total_flops() / 1e9, fc_txt.get_total_flops() / 1e9
    return {**count_params(bundle), "gflops_image": gi, "gflops_text": gt, "gflops_pair": gi + gt}
