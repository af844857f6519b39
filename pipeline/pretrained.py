"""Pretrained models from where users keep them, offline (paper section 4.1: the references and
teachers are large pretrained CLIP/SigLIP models).

Sources (`import_model`, behind `aced model import SOURCE --name ID`):
- `hf-hub:org/name`: open_clip's Hugging Face layout read from the local cache only
  (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`:
  `models--org--name/{refs/main, snapshots/<rev>/open_clip_config.json + open_clip_model.safetensors
  or open_clip_pytorch_model.bin}`), through huggingface_hub's cache API, which never opens a
  connection. Absent -> `HubAccessError` naming the path that was expected.
- an open_clip checkpoint file (`.safetensors`, `.pt`/`.bin` state dict, `{"state_dict": ...}` with
  `module.` prefixes as open_clip training writes): `--arch`, or an `open_clip_config.json` beside it.
- an open_clip model folder (`open_clip_config.json` + weights, e.g. a copied snapshot folder).
- an OpenAI CLIP checkpoint: its TorchScript archive or a bare state dict in OpenAI's key layout,
  the architecture inferred from the tensor shapes as open_clip's `build_model_from_openai_state_dict`
  does (QuickGELU, heads = width / 64).
- a big_vision SigLIP `.npz` with `--arch` (an open_clip SigLIP architecture or JSON config), read by
  open_clip's converter; numpy never unpickles (allow_pickle=False is numpy's default and is checked).

Nothing read runs code: safetensors, `torch.load(weights_only=True)`, numpy without pickle, and for
TorchScript archives the restricted reader below (`read_torchscript_tensors`). Tokenizers are open_clip's
bundled BPE, or a Hugging Face tokenizer only when its files are in the local cache (`hf_tokenizer`).
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models import (CONFIG_FILE, HubAccessError, ModelBundle, _build, _load_weights, _read_json, _resolve,
                             load_model)

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference order
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # attributes of OpenAI's archives, not weights


# --------------------------------------------------------------------------- the local Hugging Face cache

def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment at call time (its own constant
    is fixed when it is imported): HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    revision: str
    folder: Path
    """`<cache>/models--org--name` (what a user copies between machines)."""

    def file(self, *names: str) -> Path | None:
        """The first of `names` present in this snapshot of the cache, or None; reads the cache only."""
        from huggingface_hub import try_to_load_from_cache

        for name in names:
            found = try_to_load_from_cache(self.repo_id, name, cache_dir=self.folder.parent, revision=self.revision)
            if isinstance(found, str):
                return Path(found)
        return None


def hub_repo_id(name: str) -> str:
    """`org/name` of an `hf-hub:org/name` model name (ValueError for anything else)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = name.split(":", 1)[1] if name.startswith(HUB_PREFIXES) else name
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ValueError(f"{name!r}: not a Hugging Face repo id like 'org/name' ({e})") from e
    if "/" not in repo:
        raise ValueError(f"{name!r}: not a Hugging Face repo id like 'org/name'")
    return repo


def hub_snapshot(repo_id: str, what: str = "model") -> HubSnapshot:
    """The cached snapshot of `repo_id` that `refs/main` points at (or the only snapshot when the cache
    was filled at a pinned revision). HubAccessError naming the expected folder when there is none."""
    from huggingface_hub.file_download import repo_folder_name

    cache = hf_cache_dir()
    folder = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = folder / "refs" / "main"
    snapshots = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
    if ref.is_file():
        revision = ref.read_text().strip()
    elif len(snapshots) == 1:
        revision = snapshots[0]
    else:
        found = (f"it holds snapshots {snapshots} but no refs/main to choose one" if snapshots
                 else f"{folder / 'snapshots'} does not exist")
        raise HubAccessError(
            f"{what} hf-hub:{repo_id} is not in the local Hugging Face cache ({found}); this system runs offline and "
            f"never downloads. Expected {folder}/refs/main and snapshots/<revision>/ (cache: {cache}, from HF_HUB_CACHE "
            f"or HF_HOME). Fill it where there is network (open_clip.create_model('hf-hub:{repo_id}') or "
            f"`hf download {repo_id}`) and copy {folder.name} into the cache here")
    return HubSnapshot(repo_id, revision, folder)


def hub_config(name: str) -> tuple[HubSnapshot, Path, dict]:
    """(snapshot, config path, config) of an `hf-hub:org/name` model in the local cache."""
    repo = hub_repo_id(name)
    snap = hub_snapshot(repo)
    config = snap.file(CONFIG_FILE)
    if config is None:
        raise HubAccessError(f"hf-hub:{repo}: the cached snapshot {snap.folder / 'snapshots' / snap.revision} has no "
                             f"{CONFIG_FILE}, so it is not an open_clip model (or was cached partly); this system runs "
                             "offline and never downloads")
    cfg = _read_json(config)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ValueError(f"{config}: lacks 'model_cfg' (not an open_clip config)")
    return snap, config, cfg


def hub_model(name: str) -> tuple[ModelBundle, dict]:
    """An `hf-hub:org/name` model from the local cache: its open_clip_config.json (model + preprocessing)
    and weights. Returns (bundle, source record for aced_model.json)."""
    snap, config, cfg = hub_config(name)
    weights = snap.file(*HUB_WEIGHTS)
    if weights is None:
        raise HubAccessError(f"hf-hub:{snap.repo_id}: the cached snapshot {config.parent} has none of "
                             f"{', '.join(HUB_WEIGHTS)}; this system runs offline and never downloads: copy the weights "
                             "file into the cache")
    bundle = _build(f"hf-hub:{snap.repo_id}", cfg["model_cfg"], cfg.get("preprocess_cfg"), seed=0, where=str(config))
    _load_weights(bundle, weights)
    return bundle, {"kind": "hf-hub", "repo": snap.repo_id, "revision": snap.revision, "weights": weights.name}


def pretrained_tag_hint(arch: str, tag: str) -> str:
    """For a refused pretrained tag: the hf-hub name whose local cache holds the same weights, if any."""
    try:
        from open_clip.pretrained import get_pretrained_cfg

        repo = get_pretrained_cfg(arch, tag).get("hf_hub", "").rstrip("/")
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return f" (open_clip's tag {tag!r} of {arch} is the hub repo hf-hub:{repo}: pass that name, read from the local cache)" if repo.count("/") == 1 else ""


def hf_tokenizer(name: str, context_length: int, kwargs: dict, where: str):
    """open_clip's HFTokenizer over the tokenizer files of `name` in the local cache (a path to the
    cached snapshot is passed, so transformers reads files and never the network). HubAccessError when
    the files are not cached or transformers is not installed."""
    import importlib.util

    repo = hub_repo_id(name)
    snap = hub_snapshot(repo, what=f"{where}: the tokenizer of")
    if snap.file("tokenizer_config.json", "tokenizer.json", "spiece.model") is None:
        raise HubAccessError(f"{where}: the tokenizer hf-hub:{repo} is not in the local Hugging Face cache "
                             f"({snap.folder}/snapshots/{snap.revision} has no tokenizer files); this system runs "
                             "offline: use a model with open_clip's bundled BPE tokenizer or copy the tokenizer here")
    if importlib.util.find_spec("transformers") is None:
        raise HubAccessError(f"{where}: the text tower uses the Hugging Face tokenizer {repo!r} (cached in "
                             f"{snap.folder}), which needs the `transformers` package: not in this project's pinned "
                             "set; install it to use this model")
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(snap.folder / "snapshots" / snap.revision), context_length=context_length, **kwargs)


# --------------------------------------------------------------------------- TorchScript archives, read safely

# OpenAI's official checkpoints are TorchScript archives. torch.jit.load would execute their code and
# torch.load(weights_only=True) refuses them ("Cannot use weights_only=True with TorchScript archives").
# Their weights are an ordinary pickle (data.pkl) of module objects whose attributes are tensors stored
# as raw bytes beside it, so this reader unpickles data.pkl with a closed list of globals: stand-ins for
# the `__torch__.*` module classes that only keep their attribute dicts, tensor/storage rebuilding from
# raw bytes, OrderedDict, and TorchScript's identity list builders. Anything else is refused by name.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptObject:
    """Stand-in for a TorchScript module class: keeps the attribute dict pickle hands it, runs nothing."""

    def __setstate__(self, state):
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _identity(value):
    return value


class _TensorOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__.") or module == "__torch__":
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                      "build_tensorlist"):
            return _identity  # TorchScript's list builders: identity functions in torch too
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _tag: value
        raise pickle.UnpicklingError(f"refusing {module}.{name} in the TorchScript archive: only modules "
                                     "and tensors are read (nothing in a checkpoint is allowed to run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent record {pid!r:.80}")
        _, kind, key, _location, numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        size = int(numel) * torch.empty(0, dtype=kind.dtype).element_size()
        if len(raw) < size:
            raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, {size} expected (truncated?)")
        return torch.frombuffer(bytearray(raw[:size]), dtype=kind.dtype) if size else torch.empty(0, dtype=kind.dtype)


def _torchscript_prefix(path: Path) -> str | None:
    """The record folder of a TorchScript archive (`<prefix>/data.pkl` + `<prefix>/code/`), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            prefix = parts[0]
            if any(n.startswith(f"{prefix}/code/") or n == f"{prefix}/constants.pkl" for n in names):
                return prefix
    return None


def is_torchscript(path: str | os.PathLike) -> bool:
    return _torchscript_prefix(Path(path)) is not None


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's modules by dotted name (parameters, buffers and
    plain tensor attributes alike: the archive does not say which is which), read without running code."""
    path = Path(path)
    prefix = _torchscript_prefix(path)
    if prefix is None:
        raise ValueError(f"{path}: not a TorchScript archive")
    try:
        with zipfile.ZipFile(path) as z:
            root = _TensorOnlyUnpickler(z.read(f"{prefix}/data.pkl"), z, prefix).load()
    except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable TorchScript archive: {' '.join(str(e).split())[:300]}") from e
    out: dict[str, torch.Tensor] = {}

    def walk(obj, prefix: str) -> None:
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            return
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[prefix + key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{key}.")

    walk(root, "")
    if not out:
        raise ValueError(f"{path}: the TorchScript archive holds no tensors")
    return out


# --------------------------------------------------------------------------- checkpoint files

def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, layout) of a weights file: safetensors, a torch state dict (`{"state_dict": ...}` and
    `module.` prefixes removed) or a TorchScript archive. layout: "safetensors", "torch", "training"
    (a {"state_dict": ...} training checkpoint) or "torchscript"."""
    if is_torchscript(path):
        return read_torchscript_tensors(path), "torchscript"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # restricted unpickler: tensors and plain values
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a loadable weights file ({' '.join(str(e).split())[:300]}); it is truncated, or "
                         "holds something other than plain tensors (which is never unpickled)") from e
    layout = "torch"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, layout = obj["state_dict"], "training"
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise ValueError(f"{path}: not a state dict of named tensors")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, layout


def openai_model_cfg(sd: dict[str, torch.Tensor], where: str) -> dict:
    """open_clip model config of an OpenAI-layout CLIP state dict, read off the tensor shapes exactly as
    open_clip's build_model_from_openai_state_dict does (ViT or ModifiedResNet image tower, QuickGELU,
    text heads = width / 64)."""
    need = ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in need if k not in sd]
    if missing or not ("visual.proj" in sd or "visual.layer1.0.conv1.weight" in sd):
        raise ValueError(f"{where}: not an OpenAI CLIP checkpoint (no {', '.join(missing) or 'visual.proj'}); for open_clip "
                         "weights of another layout pass --arch ARCH (or keep their open_clip_config.json beside them)")
    if "visual.proj" in sd:
        conv = sd["visual.conv1.weight"]
        layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"image_size": int(conv.shape[-1]) * grid, "layers": layers, "width": int(conv.shape[0]),
                  "patch_size": int(conv.shape[-1])}
    else:
        counts = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        out_width = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"image_size": out_width * 32, "layers": counts, "width": int(sd["visual.layer1.0.conv1.weight"].shape[0])}
    width = int(sd["ln_final.weight"].shape[0])
    text = {"context_length": int(sd["positional_embedding"].shape[0]), "vocab_size": int(sd["token_embedding.weight"].shape[0]),
            "width": width, "heads": max(1, width // 64),
            "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})}
    return {"embed_dim": int(sd["text_projection"].shape[1]), "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}


def _load_openai(name: str, sd: dict[str, torch.Tensor], layout: str, path: Path) -> ModelBundle:
    bundle = _build(name, openai_model_cfg(sd, str(path)), None, seed=0, where=str(path))
    load_tensors(bundle, sd, path, extra_ok=layout == "torchscript")
    return bundle


def load_tensors(bundle: ModelBundle, sd: dict[str, torch.Tensor], path: Path, *, extra_ok: bool) -> None:
    """Load named tensors into the bundle's model: every weight it has must be there with its shape;
    tensors it lacks are an error unless `extra_ok` (a TorchScript archive also holds masks and other
    tensor attributes of its modules). OpenAI's three integer attributes are never weights."""
    from pipeline.models import _load_error_summary

    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    if extra_ok:
        expected = bundle.model.state_dict()
        sd = {k: v for k, v in sd.items() if k in expected}
    try:
        bundle.model.load_state_dict(sd, strict=True)  # copies (and casts fp16 -> fp32) into the model's tensors
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit model {bundle.name!r}: {_load_error_summary(e)}") from e
    bundle.model.eval()


# --------------------------------------------------------------------------- aced model import

@dataclass(frozen=True)
class Imported:
    bundle: ModelBundle
    source: dict
    """What was read and how (kept in aced_model.json as "source")."""


def import_model(source: str, *, arch: str | None = None, name: str | None = None) -> Imported:
    """Read a pretrained model from any source of the module docstring; nothing is written."""
    from pipeline.models import create_model

    label = name or source
    if source.startswith(HUB_PREFIXES):
        if arch is not None:
            raise ValueError(f"{source}: an hf-hub model carries its own open_clip_config.json; do not pass --arch")
        bundle, info = hub_model(source)
        return Imported(_named(bundle, label), info)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder (and not an hf-hub:org/name model)")
    if path.is_dir():
        if arch is not None:
            raise ValueError(f"{path}: a model folder carries its own {CONFIG_FILE}; do not pass --arch")
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: not an open_clip model folder (no {CONFIG_FILE})")
        # verify=False: a foreign open_clip folder has no aced_model.json; the import records the fingerprint
        return Imported(_named(load_model(path, verify=False), label), {"kind": "open_clip-folder", "path": str(path.resolve())})
    info = {"path": str(path.resolve()), "file": path.name}
    beside = path.parent / CONFIG_FILE
    if path.suffix in (".npz", ".npy"):
        if arch is None and not beside.is_file():
            raise ValueError(f"{path}: a big_vision checkpoint names no architecture; pass --arch (an open_clip SigLIP "
                             "architecture such as ViT-B-16-SigLIP, or a JSON config)")
        bundle = create_model(arch, pretrained=str(path)) if arch else _with_config_beside(path, beside)
        return Imported(_named(bundle, label), {**info, "kind": "big_vision", "arch": arch or str(beside)})
    if arch is not None:
        return Imported(_named(create_model(arch, pretrained=str(path)), label), {**info, "kind": "open_clip", "arch": arch})
    if beside.is_file():
        return Imported(_named(_with_config_beside(path, beside), label), {**info, "kind": "open_clip", "arch": str(beside)})
    sd, layout = read_state_dict(path)
    if layout == "training":
        raise ValueError(f"{path}: an open_clip training checkpoint names no architecture; pass --arch ARCH "
                         f"(the --model it was trained with) or put its {CONFIG_FILE} beside it")
    bundle = _load_openai(label, sd, layout, path)
    return Imported(bundle, {**info, "kind": "openai", "layout": layout, "inferred": bundle.config["model_cfg"]})


def _with_config_beside(path: Path, config: Path) -> ModelBundle:
    name, model_cfg, pre = _resolve(str(config))
    bundle = _build(name, model_cfg, pre, seed=0, where=str(config))
    _load_weights(bundle, path)
    return bundle


def _named(bundle: ModelBundle, name: str) -> ModelBundle:
    bundle.name = name
    bundle.config["name"] = name
    return bundle


def describe(imported: Imported) -> str:
    """One line on what was read, for `aced model import`."""
    s = imported.source
    kind = s["kind"]
    if kind == "hf-hub":
        return f"hf-hub:{s['repo']} from the local cache (revision {s['revision'][:12]}, {s['weights']})"
    if kind == "openai":
        cfg = s["inferred"]
        v = cfg["vision_cfg"]
        tower = (f"ViT width {v['width']} x {v['layers']} layers, patch {v['patch_size']}" if "patch_size" in v
                 else f"ModifiedResNet width {v['width']} layers {v['layers']}")
        return (f"OpenAI CLIP {s['layout']} checkpoint {s['file']}: inferred {tower}, {v['image_size']} px, text width "
                f"{cfg['text_cfg']['width']} x {cfg['text_cfg']['layers']}, embed_dim {cfg['embed_dim']}, QuickGELU")
    if kind == "open_clip-folder":
        return f"open_clip model folder {s['path']}"
    return f"{kind} checkpoint {s['file']} as {s['arch']}"


def source_json(source: dict) -> dict:
    """The source record as plain JSON (for aced_model.json)."""
    return json.loads(json.dumps(source))
