"""Built-in procedural image-caption data: a small, fully known world for tests and demos.

The paper trains on web-scale pairs (WebLI, DataComp; section 4.1) whose captions are often wrong
for their image, and its reference model is trained on a cleaner set so that *learnability*
(section 3.2) can tell the two apart. This module makes a miniature of that setting that needs no
download: 64x64 scenes of 1-3 coloured shapes on varied backgrounds, each with a grammatical
caption, where a chosen fraction `noise_frac` of pairs carries the caption of another random scene
(recorded per pair as ``noisy=True``, so curation quality can be measured exactly).

What makes it learnable yet not trivial: captions bind attributes to objects ("a small red circle
above a blue star"), count identical objects ("three green crosses and a white ring") and name
positions (a 3x3 grid, or a relation between two objects). A tiny CLIP learns colour and shape
words within minutes on a CPU; binding, counting and relations need more capacity.

Determinism: pair ``index`` under ``seed`` is a pure function of ``(seed, index)`` (independent
random streams seeded from ``(seed, index, stream)``: scene + caption, caption swap, texture), so
any slice ``[start, start + n)`` can be generated on its own, in any order, on any worker, byte for
byte (given the same Pillow/libjpeg, which encode the JPEG).

Also here: ``generate_classification`` (single objects labelled by shape, ``CLASSNAMES``, or by colour)
and ``class_templates`` for zero-shot classification sets of the same world (paper section 4.1).
"""
from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from storage.shards import Sample, make_uid

SOURCE = "synthetic"
JPEG_QUALITY = 90
# Geometry is sampled on a 64-pixel canvas and scaled to `image_size` when drawing, so a scene
# does not depend on the resolution it is rendered at.
BASE = 64.0
# Shapes are drawn at twice the output size and box-filtered down: cheap anti-aliasing.
SUPERSAMPLE = 2

# Clearly distinct, saturated colours (names are caption words). Backgrounds below are muted so
# every object colour stands out against every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "dark gray": (70, 70, 74),
    "light gray": (188, 188, 184),
    "beige": (205, 192, 160),
    "brown": (112, 84, 62),
}
TEXTURES = ("plain", "gradient", "noise", "stripes")

# The ten shapes; they are also the classes of the zero-shot set.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart", "crescent", "arrow")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
CLASSNAMES: tuple[str, ...] = SHAPES

# Radii (on the 64-pixel canvas) of the two size words. The gap between them keeps "small" and
# "large" unambiguous.
SIZES = {"small": (5.0, 7.0), "large": (10.5, 13.0)}
SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
NUMBER_WORDS = {2: "two", 3: "three"}

# Scene kinds and how often each is drawn.
KINDS = ("single", "relation", "count", "count_other")
KIND_PROBS = (0.35, 0.35, 0.15, 0.15)

# 3x3 grid cells -> location phrases (paraphrases are picked at random).
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")
_LOCATION_PHRASES = {
    ("top", "left"): ("in the top left corner", "at the top left"),
    ("top", "centre"): ("at the top", "near the top"),
    ("top", "right"): ("in the top right corner", "at the top right"),
    ("middle", "left"): ("on the left", "at the left"),
    ("middle", "centre"): ("in the centre", "in the middle"),
    ("middle", "right"): ("on the right", "at the right"),
    ("bottom", "left"): ("in the bottom left corner", "at the bottom left"),
    ("bottom", "centre"): ("at the bottom", "near the bottom"),
    ("bottom", "right"): ("in the bottom right corner", "at the bottom right"),
}
# relation of A to B -> (phrase variants, inverse relation)
_RELATIONS = {
    "above": (("above",), "below"),
    "below": (("below", "beneath"), "above"),
    "left of": (("to the left of", "left of"), "right of"),
    "right of": (("to the right of", "right of"), "left of"),
}
# Shapes that keep their identity under any rotation get any angle; the others only a tilt, so a
# square never turns into a diamond.
_MAX_TILT = {"circle": 0.0, "ring": 0.0, "square": 12.0, "diamond": 12.0, "cross": 12.0,
             "triangle": 15.0, "star": 15.0, "heart": 15.0, "crescent": 180.0, "arrow": 180.0}

# Independent random streams per sample (the third seed word).
_STREAM_SCENE, _STREAM_NOISE, _STREAM_RENDER, _STREAM_CLASS = 0, 1, 2, 10


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. Coordinates and radius are on the 64-pixel canvas."""

    shape: str
    colour: str
    size: str          # "small" | "large"
    cx: float
    cy: float
    r: float
    angle: float       # degrees, counter-clockwise
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A scene and its true caption.

    kind: "single" | "relation" | "count" | "count_other" | "class".
    location: (row, col) grid cell of the object for "single"/"class", else None.
    relation: for "relation", how objects[0] relates to objects[1] ("above", "below", "left of",
      "right of"); else None.
    """

    kind: str
    objects: tuple[SceneObject, ...]
    background: str
    background_rgb: tuple[int, int, int]
    texture: str
    location: tuple[str, str] | None
    relation: str | None
    caption: str


@dataclass(frozen=True)
class SyntheticPair:
    """A generated pair with what it shows: `scene.caption` is the true caption, and
    `sample.caption` differs from it exactly when `sample.noisy`. `caption_scene` is the scene the
    caption describes (`scene` itself for a clean pair, another scene's for a noisy one)."""

    sample: Sample
    scene: Scene
    caption_scene: Scene


# --------------------------------------------------------------------------- scene sampling

def _rng(seed: int, index: int, stream: int) -> random.Random:
    """The sample's own stream. Python's Mersenne Twister (seeding ~15 us, scalar draws ~0.1 us)
    is several times cheaper per sample than a numpy Generator for the few dozen scalar draws a
    scene needs; the packed integer is a one-to-one map of (seed, index, stream)."""
    if not (0 <= seed < 2**62 and 0 <= index < 2**62):
        raise ValueError(f"seed and index must be in [0, 2**62), got seed={seed}, index={index}")
    return random.Random((int(seed) << 72) | (int(index) << 8) | stream)


def _choice(rng: random.Random, options):
    return options[rng.randrange(len(options))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: SceneObject, rng: random.Random, *, with_size: bool) -> str:
    words = ([_choice(rng, SIZE_WORDS[obj.size])] if with_size else []) + [obj.colour, obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _new_object(rng: random.Random, cx: float, cy: float, *, shape: str, colour: str,
                size: str) -> SceneObject:
    lo, hi = SIZES[size]
    r = float(rng.uniform(lo, hi))
    tilt = _MAX_TILT[shape]
    angle = float(rng.uniform(-tilt, tilt)) if tilt else 0.0
    # A little colour jitter so a colour word covers a small region, not one exact RGB value.
    base = COLOURS[colour]
    rgb = tuple(min(255, max(0, int(v) + rng.randint(-14, 14))) for v in base)
    return SceneObject(shape, colour, size, float(cx), float(cy), r, angle, rgb)


def _clamp(v: float, lo: float, hi: float) -> float:
    return float(min(hi, max(lo, v)))


def _cell_of(cx: float, cy: float) -> tuple[str, str]:
    col = min(int(cx / (BASE / 3)), 2)
    row = min(int(cy / (BASE / 3)), 2)
    return _ROWS[row], _COLS[col]


def _place_single(rng, shape, colour, size) -> SceneObject:
    """Put one object in a random grid cell, jittered, fully inside the canvas."""
    row, col = rng.randrange(3), rng.randrange(3)
    obj = _new_object(rng, 0, 0, shape=shape, colour=colour, size=size)
    cell = BASE / 3
    margin = obj.r + 1.5
    cx = _clamp((col + 0.5) * cell + rng.uniform(-3, 3), margin, BASE - margin)
    cy = _clamp((row + 0.5) * cell + rng.uniform(-3, 3), margin, BASE - margin)
    # Clamping a large object away from an edge must not move it into another cell's phrase.
    cx = _clamp(cx, col * cell, (col + 1) * cell - 1e-3)
    cy = _clamp(cy, row * cell, (row + 1) * cell - 1e-3)
    return SceneObject(obj.shape, obj.colour, obj.size, cx, cy, obj.r, obj.angle, obj.rgb)


def _place_many(rng, specs: list[tuple[str, str, str]]) -> list[SceneObject]:
    """Place objects uniformly at random without overlap (rejection sampling)."""
    objs = [_new_object(rng, 0, 0, shape=s, colour=c, size=z) for s, c, z in specs]
    for _ in range(1000):
        placed = []
        for o in objs:
            m = o.r + 1.5
            cx, cy = rng.uniform(m, BASE - m), rng.uniform(m, BASE - m)
            if all(math.hypot(cx - p.cx, cy - p.cy) > o.r + p.r + 3.0 for p in placed):
                placed.append(SceneObject(o.shape, o.colour, o.size, float(cx), float(cy), o.r, o.angle, o.rgb))
            else:
                break
        if len(placed) == len(objs):
            return placed
    raise RuntimeError(f"could not place {specs} without overlap after 1000 tries")  # pragma: no cover


def _relation_of(a: SceneObject, b: SceneObject) -> str | None:
    """How a relates to b, or None when the layout is ambiguous. One axis must dominate and the
    objects must be separated along it, so "above" is never a judgement call."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    gap = a.r + b.r + 2.0
    if abs(dy) >= gap and abs(dx) <= 0.6 * abs(dy):
        return "above" if dy < 0 else "below"
    if abs(dx) >= gap and abs(dy) <= 0.6 * abs(dx):
        return "left of" if dx < 0 else "right of"
    return None


def _distinct_specs(rng, k: int) -> list[tuple[str, str]]:
    """k (shape, colour) pairs that differ from each other in at least one attribute."""
    out: list[tuple[str, str]] = []
    while len(out) < k:
        sc = (_choice(rng, SHAPES), _choice(rng, tuple(COLOURS)))
        if sc not in out:
            out.append(sc)
    return out


def _sample_background(rng) -> tuple[str, tuple[int, int, int], str]:
    name = _choice(rng, tuple(BACKGROUNDS))
    rgb = tuple(min(255, max(0, v + rng.randint(-10, 10))) for v in BACKGROUNDS[name])
    return name, rgb, _choice(rng, TEXTURES)


def _caption_single(rng, obj: SceneObject, loc: tuple[str, str], bg: str) -> str:
    where = _choice(rng, _LOCATION_PHRASES[loc])
    full = _noun_phrase(obj, rng, with_size=True)
    t = rng.randrange(6)
    if t == 0:
        return _sentence(f"{full} {where}")
    if t == 1:
        return _sentence(f"there is {full} {where}")
    if t == 2:
        return _sentence(f"a picture of {full} {where} on a {bg} background")
    if t == 3:
        return _sentence(f"{where}, {full}")
    if t == 4:
        return _sentence(f"{full} on a {bg} background")
    return _sentence(f"{_noun_phrase(obj, rng, with_size=False)} {where}")


def _caption_relation(rng, a: SceneObject, b: SceneObject, rel: str, bg: str) -> str:
    with_size = bool(rng.random() < 0.5)
    # Half the time describe b relative to a instead: same scene, inverse relation word.
    if rng.random() < 0.5:
        a, b, rel = b, a, _RELATIONS[rel][1]
    pa, pb = _noun_phrase(a, rng, with_size=with_size), _noun_phrase(b, rng, with_size=with_size)
    word = _choice(rng, _RELATIONS[rel][0])
    t = rng.randrange(4)
    if t == 0:
        return _sentence(f"{pa} {word} {pb}")
    if t == 1:
        return _sentence(f"{pa} is {word} {pb}")
    if t == 2:
        return _sentence(f"there is {pa} {word} {pb}")
    return _sentence(f"{pa} {word} {pb} on a {bg} background")


def _group_phrase(rng, group: list[SceneObject]) -> str:
    o = group[0]
    size = [_choice(rng, SIZE_WORDS[o.size])] if rng.random() < 0.5 else []
    return " ".join([NUMBER_WORDS[len(group)], *size, o.colour, PLURALS[o.shape]])


def _caption_count(rng, group: list[SceneObject], other: SceneObject | None, bg: str) -> str:
    g = _group_phrase(rng, group)
    if other is None:
        t = rng.randrange(4)
        if t == 0:
            return _sentence(g)
        if t == 1:
            return _sentence(f"there are {g}")
        if t == 2:
            return _sentence(f"{g} on a {bg} background")
        return _sentence(f"a picture of {g}")
    po = _noun_phrase(other, rng, with_size=bool(rng.random() < 0.5))
    t = rng.randrange(3)
    if t == 0:
        return _sentence(f"{g} and {po}")
    if t == 1:
        return _sentence(f"{po} and {g}")
    return _sentence(f"there are {g} next to {po}")


def scene_at(index: int, *, seed: int) -> Scene:
    """The scene (objects, background, true caption) of pair `index` under `seed`."""
    rng = _rng(seed, index, _STREAM_SCENE)
    kind = rng.choices(KINDS, weights=KIND_PROBS)[0]
    bg, bg_rgb, texture = _sample_background(rng)
    if kind == "single":
        shape, colour = _distinct_specs(rng, 1)[0]
        obj = _place_single(rng, shape, colour, _choice(rng, tuple(SIZES)))
        loc = _cell_of(obj.cx, obj.cy)
        return Scene(kind, (obj,), bg, bg_rgb, texture, loc, None, _caption_single(rng, obj, loc, bg))
    if kind == "relation":
        (s1, c1), (s2, c2) = _distinct_specs(rng, 2)
        specs = [(s1, c1, _choice(rng, tuple(SIZES))), (s2, c2, _choice(rng, tuple(SIZES)))]
        while True:  # re-place until the relation is unambiguous (about 1 in 3 layouts qualifies)
            a, b = _place_many(rng, specs)
            rel = _relation_of(a, b)
            if rel is not None:
                break
        return Scene(kind, (a, b), bg, bg_rgb, texture, None, rel, _caption_relation(rng, a, b, rel, bg))
    n = rng.randrange(2, 4) if kind == "count" else 2
    k = 2 if kind == "count_other" else 1
    specs2 = _distinct_specs(rng, k)
    # Three large objects rarely fit on a 64-pixel canvas without touching: at most two are large.
    size = "small" if n == 3 else _choice(rng, tuple(SIZES))
    specs = [(specs2[0][0], specs2[0][1], size)] * n
    if kind == "count_other":
        specs.append((specs2[1][0], specs2[1][1], "small" if size == "large" else _choice(rng, tuple(SIZES))))
    objs = _place_many(rng, specs)
    group, other = objs[:n], (objs[n] if kind == "count_other" else None)
    return Scene(kind, tuple(objs), bg, bg_rgb, texture, None, None, _caption_count(rng, group, other, bg))


def _signature(scene: Scene) -> tuple:
    return tuple(sorted((o.shape, o.colour) for o in scene.objects))


# --------------------------------------------------------------------------- rendering

def _polygon(obj: SceneObject, pts: tuple[tuple[float, float], ...], s: float) -> list[tuple[float, float]]:
    """Rotate unit-radius points by obj.angle (counter-clockwise on screen), scale by r*s and move
    to the centre. Plain Python: for <= 32 points it is faster than building numpy arrays."""
    a = math.radians(obj.angle)
    c, sn, k, cx, cy = math.cos(a), math.sin(a), obj.r * s, obj.cx * s, obj.cy * s
    return [(cx + k * (x * c + y * sn), cy + k * (y * c - x * sn)) for x, y in pts]


def _regular(n: int, start_deg: float, radii=(1.0,)) -> list[tuple[float, float]]:
    out = []
    for i in range(n):
        t = math.radians(start_deg + 360.0 * i / n)
        r = radii[i % len(radii)]
        out.append((r * math.cos(t), r * math.sin(t)))
    return out


def _heart(n: int = 32) -> list[tuple[float, float]]:
    ts = [2 * math.pi * i / n for i in range(n)]
    return [(16 * math.sin(t) ** 3 / 15.0,
             -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 15.0) for t in ts]


# Unit outlines (radius ~1, y pointing down as on screen).
_UNIT = {
    "square": tuple(_regular(4, 45.0, (1.1,))),
    "diamond": ((0, -1.1), (0.7, 0), (0, 1.1), (-0.7, 0)),
    "triangle": tuple((x, y + 0.15) for x, y in _regular(3, -90.0, (1.15,))),
    "star": tuple(_regular(10, -90.0, (1.15, 0.48))),
    "cross": ((-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33),
              (0.33, 1), (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)),
    "heart": tuple(_heart()),
    "arrow": ((-1, -0.25), (0.15, -0.25), (0.15, -0.7), (1.05, 0), (0.15, 0.7), (0.15, 0.25), (-1, 0.25)),
}


def _draw_object(canvas: Image.Image, draw: ImageDraw.ImageDraw, obj: SceneObject, s: float) -> None:
    cx, cy, r = obj.cx * s, obj.cy * s, obj.r * s
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.rgb)
    elif obj.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=obj.rgb, width=max(2, round(0.38 * r)))
    elif obj.shape == "crescent":
        # A disc minus an offset disc, through a small mask (the background may be textured).
        box = (int(cx - r) - 1, int(cy - r) - 1, int(cx + r) + 2, int(cy + r) + 2)
        mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
        md = ImageDraw.Draw(mask)
        ox, oy = cx - box[0], cy - box[1]
        md.ellipse([ox - r, oy - r, ox + r, oy + r], fill=255)
        a = math.radians(obj.angle)
        dx, dy, r2 = 0.5 * r * math.cos(a), -0.5 * r * math.sin(a), 0.85 * r
        md.ellipse([ox + dx - r2, oy + dy - r2, ox + dx + r2, oy + dy + r2], fill=0)
        canvas.paste(obj.rgb, box, mask)
    else:
        draw.polygon(_polygon(obj, _UNIT[obj.shape], s), fill=obj.rgb)


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed field of unit Gaussian noise; "noise" textures are random crops of it. Cropping is
    ~50x cheaper than drawing fresh noise per image, and still deterministic."""
    n = max(256, 2 * size)
    return np.random.default_rng(0x5EED).standard_normal((n, n, 1)).astype(np.float32)


def _background_image(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    if scene.texture == "plain":
        return Image.new("RGB", (size, size), scene.background_rgb)
    img = np.empty((size, size, 3), np.float32)
    img[:] = scene.background_rgb
    if scene.texture == "gradient":
        ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * rng.uniform(12, 28)
        img += ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    elif scene.texture == "noise":
        bank = _noise_bank(size)
        oy, ox = rng.randrange(bank.shape[0] - size + 1), rng.randrange(bank.shape[1] - size + 1)
        img += bank[oy:oy + size, ox:ox + size] * rng.uniform(5, 10)
    elif scene.texture == "stripes":
        period = rng.uniform(6, 14) * size / BASE
        wave = np.sin(2 * np.pi * np.arange(size, dtype=np.float32) / period) * rng.uniform(6, 12)
        img += wave[:, None, None] if rng.random() < 0.5 else wave[None, :, None]
    else:
        raise ValueError(f"unknown texture {scene.texture!r}")
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
"""Image sizes `render` draws. Scenes are laid out on a 64-pixel canvas, so larger images add pixels, not
detail; 1024 px (a 2048^2 supersampled canvas, ~12 MB) bounds the memory one image takes."""


def _check_args(*, seed: int, image_size: int, noise_frac: float | None = None) -> None:
    """The generators' arguments, checked when a generator is called (not at its first item)."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(image_size) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    if not is_int(seed) or not 0 <= seed < 2**62:
        raise ValueError(f"seed must be an integer in [0, 2**62), got {seed!r}")
    if noise_frac is not None and (isinstance(noise_frac, bool) or not isinstance(noise_frac, (int, float))
                                   or not 0.0 <= noise_frac <= 1.0):
        raise ValueError(f"noise_frac must be in [0, 1], got {noise_frac!r}")


def render(scene: Scene, *, image_size: int = 64, rng: random.Random) -> Image.Image:
    """Draw a scene as an RGB image of `image_size` x `image_size`. `rng` drives the texture."""
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    big = image_size * SUPERSAMPLE
    # Texture at the output resolution, objects at SUPERSAMPLE x, then a box filter down: the
    # texture survives unchanged (each pixel became a constant 2x2 block) and edges get smoothed.
    canvas = _background_image(scene, image_size, rng).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    s = big / BASE
    for obj in scene.objects:
        _draw_object(canvas, draw, obj, s)
    return canvas.reduce(SUPERSAMPLE)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: at 64x64 the default 4:2:0 subsampling visibly bleeds the colours of small shapes.
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


# --------------------------------------------------------------------------- public generators

def make_pair(index: int, *, seed: int, noise_frac: float, image_size: int = 64) -> SyntheticPair:
    """Pair `index` under `seed`, with its scene. With probability `noise_frac` (drawn from the
    pair's own stream) the caption is replaced by the true caption of another random scene whose
    objects differ, and the sample is marked ``noisy=True``."""
    _check_args(seed=seed, image_size=image_size, noise_frac=noise_frac)
    scene = scene_at(index, seed=seed)
    caption_scene, noisy = scene, False
    nrng = _rng(seed, index, _STREAM_NOISE)
    if nrng.random() < noise_frac:
        while True:
            other = scene_at(nrng.randrange(2**62), seed=seed)
            # A swapped caption must name a different set of objects, or it would still be true.
            if _signature(other) != _signature(scene):
                break
        caption_scene, noisy = other, True
    caption = caption_scene.caption
    img = render(scene, image_size=image_size, rng=_rng(seed, index, _STREAM_RENDER))
    image_id = f"syn{seed}-{index:08d}"
    sample = Sample(key=image_id, uid=make_uid(SOURCE, image_id, caption, index), image_bytes=_jpeg(img),
                    caption=caption, image_id=image_id, width=image_size, height=image_size,
                    source=SOURCE, noisy=noisy)
    return SyntheticPair(sample, scene, caption_scene)


def generate_pairs(n: int, *, seed: int, noise_frac: float, image_size: int = 64,
                   start: int = 0) -> Iterator[Sample]:
    """Pairs ``start .. start + n - 1`` under `seed` (see `make_pair`); any slice is reproducible
    on its own. Bad arguments raise ValueError here, at the call."""
    if isinstance(n, bool) or not isinstance(n, int) or isinstance(start, bool) or not isinstance(start, int) \
            or n < 0 or start < 0:
        raise ValueError(f"n and start must be integers >= 0, got n={n!r}, start={start!r}")
    _check_args(seed=seed, image_size=image_size, noise_frac=noise_frac)
    return (make_pair(index, seed=seed, noise_frac=noise_frac, image_size=image_size).sample
            for index in range(start, start + n))


CLASS_AXES = ("shape", "colour")


def classnames(by: str = "shape") -> tuple[str, ...]:
    """Class names of the zero-shot set labelled by `by`: the ten shapes or the eight colours."""
    if by == "shape":
        return CLASSNAMES
    if by == "colour":
        return tuple(COLOURS)
    raise ValueError(f"by must be one of {CLASS_AXES}, got {by!r}")


def classification_scene(index: int, *, seed: int, by: str = "shape") -> tuple[int, Scene]:
    """(label, scene) of classification image `index`: one object whose shape (by="shape") or colour
    (by="colour") is class ``index % n_classes``; every other attribute (the other of the two, size,
    cell, background) is random."""
    names = classnames(by)
    rng = _rng(seed, index, _STREAM_CLASS)
    label = index % len(names)
    bg, bg_rgb, texture = _sample_background(rng)
    if by == "shape":
        shape, colour = names[label], _choice(rng, tuple(COLOURS))
    else:
        shape, colour = _choice(rng, SHAPES), names[label]
    obj = _place_single(rng, shape, colour, _choice(rng, tuple(SIZES)))
    scene = Scene("class", (obj,), bg, bg_rgb, texture, _cell_of(obj.cx, obj.cy), None, names[label])
    return label, scene


def class_templates(by: str = "shape") -> tuple[str, ...]:
    """Zero-shot prompts of the class set, in the grammar of the training captions. A CLIP only knows
    the words its captions used, so generic photo prompts ("a photo of a {}.") are out of this world's
    distribution; and a class weight that averages over the other attribute leaves the class attribute
    as the part its prompts share (CLIP's per-dataset prompt ensembling, Radford et al. 2021, 3.1.4).

    by="shape": one prompt per colour and size word ("a small red {}.", "an orange {}.", ...).
    by="colour": one per shape, in the counting grammar ("two {} circles.", "three {} crosses."), which
    needs no article before the colour word."""
    if by == "shape":
        out = [f"{_article(c)} {c} {{}}." for c in COLOURS]
        out += [f"{_article(w)} {w} {c} {{}}." for w in ("small", "large") for c in COLOURS]
        return tuple(out)
    classnames(by)  # validates
    return tuple(f"{NUMBER_WORDS[n]} {{}} {PLURALS[s]}." for n in (2, 3) for s in SHAPES)


def generate_classification(n_per_class: int, *, seed: int, image_size: int = 64,
                            by: str = "shape") -> Iterator[Sample]:
    """A zero-shot set of the same world: `n_per_class` images per class of ``classnames(by)``
    (interleaved by class), each with ``label`` set and ``caption`` = its class name.

    Why two axes: the small models of the demo learn colour words within minutes, while shape
    recognition (a small object inside one 8x8 patch, and rarely needed to tell the captions of a
    batch apart once colours are known) comes much later; measured on the demo's reference
    (aced-vit-t, 200 steps): colour top-1 94.5%, shape top-1 at chance (8.5%, 10 classes)."""
    names = classnames(by)
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 0:
        raise ValueError(f"n_per_class must be an integer >= 0, got {n_per_class!r}")
    _check_args(seed=seed, image_size=image_size)
    return _classification_samples(n_per_class * len(names), seed=seed, image_size=image_size, by=by)


def _classification_samples(n: int, *, seed: int, image_size: int, by: str) -> Iterator[Sample]:
    prefix = "cls" if by == "shape" else "col"
    for index in range(n):
        label, scene = classification_scene(index, seed=seed, by=by)
        img = render(scene, image_size=image_size, rng=_rng(seed, index, _STREAM_RENDER + _STREAM_CLASS))
        image_id = f"{prefix}{seed}-{index:08d}"
        yield Sample(key=image_id, uid=make_uid(SOURCE, image_id, scene.caption, index), image_bytes=_jpeg(img),
                     caption=scene.caption, image_id=image_id, width=image_size, height=image_size,
                     source=SOURCE, noisy=False, label=label)
