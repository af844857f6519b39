"""The field's zero-shot class names and prompt templates, and the mapping of a class-folder set onto them.

Paper section 4.1 evaluates zero-shot classification the way CLIP and the open_clip / CLIP_benchmark
tables do; numbers are comparable only with the same class names and prompts, so none are written here:
- ``imagenet1k``: open_clip's ``zero_shot_metadata`` (IMAGENET_CLASSNAMES, and CLIP's 80
  OPENAI_IMAGENET_TEMPLATES); ``openai_imagenet`` / ``simple_imagenet`` name its two template sets;
- every other set: CLIP_benchmark 1.6.2's ``en_classnames.json`` and
  ``en_zeroshot_classification_templates.json``, vendored unchanged in ``pipeline/clip_benchmark_data``
  (MIT; clip-benchmark itself is only a test dependency). Sets CLIP_benchmark takes the class names of
  from the data itself (``cifar10``, ``cifar100``: torchvision's label names, which are the class folder
  names of an exported CIFAR) have templates only: their names are the dataset's folder names, verbatim;
- ImageNet-style folders (WordNet synset ids, ``n01440764``) map to IMAGENET_CLASSNAMES through the
  standard class index, the sorted order of the 1000 ILSVRC-2012 synsets (timm's ``ImageNetInfo``).

Templates are returned with one ``{}`` placeholder (CLIP_benchmark's ``{c}`` rewritten), the form
`pipeline.evaluate.class_weights` formats.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Sequence

DATA_DIR = Path(__file__).with_name("clip_benchmark_data")
CLASSNAMES_FILE = DATA_DIR / "en_classnames.json"
TEMPLATES_FILE = DATA_DIR / "en_zeroshot_classification_templates.json"

# Sets whose class names CLIP_benchmark reads from the dataset (torchvision's CIFAR meta files), with
# the number of classes a folder set must have to be one of them.
NAMES_FROM_FOLDERS = {"cifar10": 10, "cifar100": 100}
_SYNSET = re.compile(r"^n\d{8}$")

__all__ = ["set_names", "templates", "classnames", "is_synset_folders", "imagenet_synsets",
           "classnames_for_folders", "render_template"]


@functools.cache
def _clip_benchmark() -> tuple[dict, dict]:
    try:
        names = json.loads(CLASSNAMES_FILE.read_text(encoding="utf-8"))
        temps = json.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # a broken install, not user input
        raise RuntimeError(f"{DATA_DIR}: CLIP_benchmark class names/templates unreadable: {e}") from e
    return names, temps


@functools.cache
def _open_clip() -> dict:
    from open_clip import zero_shot_metadata as m

    return {"classnames": tuple(m.IMAGENET_CLASSNAMES),
            "openai_imagenet": tuple(_template_string(t) for t in m.OPENAI_IMAGENET_TEMPLATES),
            "simple_imagenet": tuple(_template_string(t) for t in m.SIMPLE_IMAGENET_TEMPLATES)}


def _template_string(template) -> str:
    """open_clip's templates are functions (``lambda c: f"a photo of a {c}."``): the "{}" form, checked
    to render every name as the function does."""
    s = template("{}")
    if s.count("{}") != 1 or any(s.format(x) != template(x) for x in ("x", "a b", "{c}")):
        raise RuntimeError(f"open_clip template {template!r} has no one-placeholder string form")
    return s


def render_template(template: str) -> str:
    """CLIP_benchmark's ``{c}`` placeholder as ``{}`` (its templates hold no other braces)."""
    s = template.replace("{c}", "{}")
    if s.count("{}") != 1 or s.replace("{}", "").count("{") or s.replace("{}", "").count("}"):
        raise ValueError(f"template {template!r}: needs exactly one '{{}}' or '{{c}}' placeholder and no other braces")
    return s


def set_names() -> list[str]:
    """Every name `templates` accepts (sets with templates, and the two named ImageNet template sets)."""
    return sorted(set(_clip_benchmark()[1]) | {"imagenet1k", "openai_imagenet", "simple_imagenet"})


def templates(name: str) -> tuple[str, ...]:
    """The prompt templates of set `name` ("{}" form): ``imagenet1k`` / ``openai_imagenet`` = CLIP's
    80 (open_clip), ``simple_imagenet`` = open_clip's 7, others CLIP_benchmark's."""
    if name in ("imagenet1k", "openai_imagenet"):
        return _open_clip()["openai_imagenet"]
    if name == "simple_imagenet":
        return _open_clip()["simple_imagenet"]
    temps = _clip_benchmark()[1]
    if name not in temps or not isinstance(temps[name], list):
        raise ValueError(f"unknown template set {name!r}; known: {', '.join(set_names())}")
    return tuple(render_template(t) for t in temps[name])


def classnames(name: str) -> tuple[str, ...] | None:
    """The class names of set `name` in its label order, or None for a set whose names come from the
    dataset's folders (`NAMES_FROM_FOLDERS`)."""
    if name == "imagenet1k":
        return _open_clip()["classnames"]
    if name in NAMES_FROM_FOLDERS:
        return None
    names = _clip_benchmark()[0]
    if name not in names:
        known = sorted(set(names) | set(NAMES_FROM_FOLDERS))
        raise ValueError(f"unknown class-name set {name!r}; known: {', '.join(known)}")
    return tuple(names[name])


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 synset ids in class-index order (sorted; index i is IMAGENET_CLASSNAMES[i])."""
    from timm.data import ImageNetInfo

    synsets = tuple(ImageNetInfo().label_names())
    if len(synsets) != 1000 or list(synsets) != sorted(synsets):
        raise RuntimeError(f"timm's ImageNet synset list is not the 1000 sorted ids ({len(synsets)} entries)")
    return synsets


def is_synset_folders(folders: Sequence[str]) -> bool:
    return bool(folders) and all(_SYNSET.match(f) for f in folders)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def classnames_for_folders(set_name: str, folders: Sequence[str]) -> list[str]:
    """The standard name of each class folder of a set (folders in label order, i.e. sorted), so that
    label i is prompted as the standard name of folder i. A folder maps by:
    - a WordNet synset id (every folder one) onto ImageNet's name at its standard index (imagenet1k);
    - a decimal number: the set's class at that index;
    - its name ('_' as a space, case ignored) equal to one of the set's names.
    For ``cifar10`` / ``cifar100`` the names are the folder names themselves (as CLIP_benchmark reads
    them from torchvision), the count checked. Anything unmatched is a ValueError naming the folders."""
    folders = list(folders)
    if not folders:
        raise ValueError("no class folders to map")
    if set_name in NAMES_FROM_FOLDERS:
        if len(folders) != NAMES_FROM_FOLDERS[set_name]:
            raise ValueError(f"class-name set {set_name!r} has {NAMES_FROM_FOLDERS[set_name]} classes, the dataset "
                             f"{len(folders)} class folders")
        return folders
    names = classnames(set_name)
    if is_synset_folders(folders):
        if set_name != "imagenet1k":
            raise ValueError(f"class folders are WordNet synset ids: use the class-name set 'imagenet1k', not "
                             f"{set_name!r}")
        index = {s: i for i, s in enumerate(imagenet_synsets())}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ValueError(f"{len(unknown)} class folder(s) are not ImageNet-1k synsets (e.g. {unknown[:5]})")
        return [names[index[f]] for f in folders]
    if all(f.isdecimal() for f in folders):
        bad = [f for f in folders if int(f) >= len(names)]
        if bad:
            raise ValueError(f"class folder(s) {bad[:5]} are beyond the {len(names)} classes of {set_name!r}")
        return [names[int(f)] for f in folders]
    by_norm: dict[str, list[str]] = {}
    for n in names:
        by_norm.setdefault(_norm(n), []).append(n)
    out, unmatched, ambiguous = [], [], []
    for f in folders:
        hits = by_norm.get(_norm(f), [])
        if len(hits) == 1:
            out.append(hits[0])
        elif hits:
            ambiguous.append(f)
        else:
            unmatched.append(f)
    if unmatched or ambiguous:
        parts = [f"{len(unmatched)} class folder(s) match no class name of {set_name!r} (e.g. {unmatched[:5]})"] * bool(unmatched)
        parts += [f"{len(ambiguous)} match several (e.g. {ambiguous[:5]}; name such folders by class index)"] * bool(ambiguous)
        raise ValueError("; ".join(parts))
    return out
