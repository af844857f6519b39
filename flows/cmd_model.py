"""`aced model info|create|import`: model sizes and inference cost (the paper's Table 2 axis), fresh
models, and pretrained weights from disk (pipeline.pretrained: the local Hugging Face cache, open_clip,
OpenAI and big_vision checkpoints) registered as workspace models."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _forward_seconds(bundle, batch: int, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of one image + text forward over `batch` pairs (after a warm-up)."""
    import torch

    x = torch.randn(batch, 3, bundle.image_size, bundle.image_size)
    t = bundle.tokenizer(["a small red circle above two blue stars"] * batch)
    best = float("inf")
    with torch.inference_mode():
        bundle.encode_image(x), bundle.encode_text(t)
        for _ in range(repeats):
            t0 = time.perf_counter()
            bundle.encode_image(x), bundle.encode_text(t)
            best = min(best, time.perf_counter() - t0)
    return best


def _info_model(root: Path, name: str):
    """A workspace model id (`<root>/models/ID`) first, else whatever create_model takes (a ladder/open_clip
    name, JSON config, model folder, hf-hub name from the local cache)."""
    from pipeline.models import create_model, load_model
    from storage.workspace import Workspace

    if not name.startswith(("hf-hub:", "hf_hub:")) and not Path(name).exists():
        try:
            folder = Workspace(root).model(name)
        except ValueError:  # not a valid workspace name (e.g. a path): not a workspace model
            folder = None
        if folder is not None and folder.is_dir():
            return load_model(folder)
    return create_model(name)


def _info(args: argparse.Namespace) -> int:
    from pipeline.models import count_flops, fingerprint

    rows = {}
    for name in args.models:
        bundle = _info_model(args.root, name)
        row = {**count_flops(bundle), "embed_dim": bundle.embed_dim, "image_size": bundle.image_size,
               "context_length": bundle.context_length, "logit_scale": bundle.logit_scale,
               "logit_bias": bundle.logit_bias, "fingerprint": fingerprint(bundle)}
        if args.time_batch:
            row[f"forward_s_batch{args.time_batch}"] = _forward_seconds(bundle, args.time_batch)
        rows[name] = row
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    timed = f"forward_s_batch{args.time_batch}" if args.time_batch else None
    print(f"{'model':<28} {'params':>11} {'img params':>11} {'txt params':>11} {'GFLOPs/img':>11} "
          f"{'GFLOPs/txt':>11} {'GFLOPs/pair':>12} {'dim':>5}" + (f" {'fwd s/' + str(args.time_batch):>10}" if timed else ""))
    for name, r in rows.items():
        print(f"{name:<28} {r['params']:>11,} {r['params_image']:>11,} {r['params_text']:>11,} "
              f"{r['gflops_image']:>11.4f} {r['gflops_text']:>11.4f} {r['gflops_pair']:>12.4f} {r['embed_dim']:>5}"
              + (f" {r[timed]:>10.3f}" if timed else ""))
    print("GFLOPs = 2 x multiply-accumulates of one forward pass (one image at its size, one text at context length)")
    return 0


def _create(args: argparse.Namespace) -> int:
    from pipeline.models import create_model, fingerprint, save_model
    from storage.workspace import Workspace

    bundle = create_model(args.name, pretrained=args.pretrained, seed=args.seed)
    out = args.out if args.out is not None else Workspace(args.root).model(bundle.name)
    save_model(bundle, out, overwrite=args.overwrite)
    print(f"wrote {out} ({bundle.name}, fingerprint {fingerprint(bundle)[:16]})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from pipeline.models import count_params, fingerprint, load_model, save_model
    from pipeline.pretrained import describe, import_model, source_json
    from storage.workspace import Workspace

    out = Workspace(args.root).model(args.name)  # the name is checked before anything is read
    imported = import_model(args.source, arch=args.arch, name=args.name)
    bundle = imported.bundle
    print(f"read {describe(imported)}")
    save_model(bundle, out, overwrite=args.overwrite, source=source_json(imported.source))
    load_model(out)  # read back as every stage will: weights + config + preprocessing checked against the fingerprint
    fp = fingerprint(bundle)
    params = count_params(bundle)["params"]
    print(f"wrote {out} ({params:,} parameters, {bundle.image_size} px, embed_dim {bundle.embed_dim}, "
          f"fingerprint {fp[:16]}); use it as --models/--teacher/--reference {args.name}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="model info (params, GFLOPs) and creation")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    i = msub.add_parser("info", help="parameters and inference GFLOPs per image-text pair")
    i.add_argument("models", nargs="+", metavar="MODEL",
                   help="workspace model id, ladder/open_clip name, JSON config, model folder or hf-hub:org/name "
                        "(local cache)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--time-batch", type=int, default=0, metavar="N",
                   help="also time one forward of N images + N texts on this machine")
    i.set_defaults(func=_info)
    c = msub.add_parser("create", help="write a freshly initialised (or locally pretrained) model folder")
    c.add_argument("name", help="ladder/open_clip name or JSON config")
    c.add_argument("--out", type=Path, default=None, help="model folder (default: <root>/models/<name>)")
    c.add_argument("--seed", type=int, default=0, help="initialisation seed")
    c.add_argument("--pretrained", help="local weights file or folder (never a hub tag)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder (only ever one this project wrote)")
    c.set_defaults(func=_create)
    m = msub.add_parser(
        "import", help="register pretrained weights from disk as a workspace model (offline)",
        description="SOURCE: hf-hub:org/name (read from the local Hugging Face cache, HF_HUB_CACHE or HF_HOME), an "
                    "open_clip checkpoint file (--arch, or its open_clip_config.json beside it), an open_clip model "
                    "folder, an OpenAI CLIP checkpoint (TorchScript archive or state dict; architecture inferred) or a "
                    "big_vision SigLIP .npz (--arch). Writes <root>/models/NAME (safetensors + config + fingerprint). "
                    "Nothing is downloaded and nothing read can run code.")
    m.add_argument("source", metavar="SOURCE")
    m.add_argument("--name", required=True, help="model id: the folder <root>/models/NAME")
    m.add_argument("--arch", default=None,
                   help="open_clip architecture or JSON config of a checkpoint file that names none (open_clip, big_vision)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder (only ever one this project wrote)")
    m.set_defaults(func=_import)
