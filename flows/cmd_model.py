"""`aced model info|create`: model sizes and inference cost (the paper's Table 2 axis), fresh models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _bundle(name: str):
    from pipeline.models import create_model, load_model

    path = Path(name)
    return load_model(path) if path.is_dir() else create_model(name)


def _info(args: argparse.Namespace) -> int:
    from pipeline.models import count_flops, fingerprint

    rows = {}
    for name in args.models:
        bundle = _bundle(name)
        rows[name] = {**count_flops(bundle), "embed_dim": bundle.embed_dim, "image_size": bundle.image_size,
                      "context_length": bundle.context_length, "fingerprint": fingerprint(bundle)[:16]}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<28} {'params':>11} {'img params':>11} {'txt params':>11} {'GFLOPs/img':>11} "
          f"{'GFLOPs/txt':>11} {'GFLOPs/pair':>12} {'dim':>5}")
    for name, r in rows.items():
        print(f"{name:<28} {r['params']:>11,} {r['params_image']:>11,} {r['params_text']:>11,} "
              f"{r['gflops_image']:>11.4f} {r['gflops_text']:>11.4f} {r['gflops_pair']:>12.4f} {r['embed_dim']:>5}")
    print("GFLOPs = 2 x multiply-accumulates of one forward pass (one image at its size, one text at context length)")
    return 0


def _create(args: argparse.Namespace) -> int:
    from pipeline.models import create_model, fingerprint, save_model

    bundle = create_model(args.name, pretrained=args.pretrained, seed=args.seed)
    out = save_model(bundle, args.out)
    print(f"wrote {out} (fingerprint {fingerprint(bundle)[:16]})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="model info (params, GFLOPs) and creation")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    i = msub.add_parser("info", help="parameters and inference GFLOPs per image-text pair")
    i.add_argument("models", nargs="+", help="ladder/open_clip name, JSON config or model folder")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)
    c = msub.add_parser("create", help="write a freshly initialised (or locally pretrained) model folder")
    c.add_argument("name")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--pretrained", help="local weights file or folder (never a hub tag)")
    c.set_defaults(func=_create)
