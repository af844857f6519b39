"""Datasets of a workspace for the main job and the benchmarks: synthetic or imported real data.

Roles: "student" (noisy training pairs), "clean" (pairs the reference/teacher train on), "retrieval"
(held-out pairs), "zeroshot" (held-out class sets). Every function is idempotent: an existing dataset
folder is kept, so re-running a job never rewrites (and never invalidates the caches of) its data.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from storage.shards import write_shards
from storage.workspace import Workspace

log = logging.getLogger(__name__)


def prepare_synthetic(root: Path, *, train_pairs: int, clean_pairs: int, test_pairs: int, per_class: int,
                      noise_frac: float, seed: int, prefix: str = "synthetic") -> dict[str, list[str]]:
    """Disjoint index ranges of one seeded synthetic world: no held-out pair is seen in training."""
    from pipeline.synthetic import class_templates, classnames, generate_classification, generate_pairs

    ws = Workspace(root)
    parts = {
        f"{prefix}/train": (train_pairs, 0, noise_frac),
        f"{prefix}/clean": (clean_pairs, train_pairs, 0.0),
        f"{prefix}/test": (test_pairs, train_pairs + clean_pairs, 0.0),
    }
    for name, (n, start, noise) in parts.items():
        out = ws.dataset(name)
        if (out / "_dataset.json").exists():
            log.info("%s exists: kept", out)
            continue
        t0 = time.perf_counter()
        write_shards(generate_pairs(n, seed=seed, noise_frac=noise, start=start), out, name=name,
                     source="synthetic", samples_per_shard=1000)
        log.info("wrote %s: %d pairs (noise %.0f%%) in %.1f s", out, n, 100 * noise, time.perf_counter() - t0)
    # Two zero-shot sets: shapes (the harder skill) and colours (learnt within minutes).
    zeroshot = {"shape": ws.dataset(f"{prefix}/classes"), "colour": ws.dataset(f"{prefix}/colours")}
    for by, out in zeroshot.items():
        if not (out / "_dataset.json").exists():
            write_shards(generate_classification(per_class, seed=seed + 1, by=by), out, name=f"{prefix}/{out.name}",
                         source="synthetic", samples_per_shard=1000,
                         extra={"classnames": list(classnames(by)), "templates": list(class_templates(by))})
    return {"student": [str(ws.dataset(f"{prefix}/train"))], "clean": [str(ws.dataset(f"{prefix}/clean"))],
            "retrieval": [str(ws.dataset(f"{prefix}/test"))], "zeroshot": [str(d) for d in zeroshot.values()]}


def prepare_real(root: Path, data: Path) -> dict[str, list[str]]:
    """A real folder of images + captions with split lists (e.g. ../shared/data/flickr8k), imported once:
    train split for everyone, test split for retrieval; CIFAR-10 beside it becomes the zero-shot set."""
    from storage.importers import import_captions, import_class_folders

    data = Path(data).resolve()
    name = data.name
    ws = Workspace(root)
    target = ws.dataset(name)
    if not (target / "train" / "_dataset.json").exists():
        import_captions(data, root, name)
    if not (target / "test" / "_dataset.json").exists():
        raise FileNotFoundError(f"{data}: the job needs split lists (splits/train.txt, splits/test.txt)")
    out = {"student": [str(target / "train")], "clean": [str(target / "train")],
           "retrieval": [str(target / "test")], "zeroshot": []}
    cifar = data.parent / "cifar10" / "test"
    if cifar.is_dir():
        if not (ws.dataset("cifar10") / "_dataset.json").exists():
            import_class_folders(cifar, root, "cifar10")
        out["zeroshot"] = [str(ws.dataset("cifar10"))]
    return out


def eval_specs(sets: dict[str, list[str]]) -> dict[str, list]:
    """{eval name: [kind, dataset dir(, standard sets)]} for the held-out roles. A zero-shot dataset named
    like one of the field's standard sets (e.g. cifar10) is evaluated with that set's class names and
    templates (CLIP_benchmark's), as published numbers are."""
    from pipeline.zeroshot_data import set_names

    evals: dict[str, list] = {f"{Path(d).name}-retrieval": ["retrieval", d] for d in sets["retrieval"]}
    for d in sets["zeroshot"]:
        name = Path(d).name
        std = [{"classnames": name, "templates": name}] if name in set_names() else []
        evals[f"{name}-zeroshot"] = ["zeroshot", d, *std]
    return evals
