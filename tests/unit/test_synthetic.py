"""pipeline.synthetic: determinism, noise flags, captions vs scenes, image format, throughput."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from pipeline import synthetic as S
from storage.shards import make_uid


def _decode(b: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(b))
    im.load()
    return im


def test_same_seed_same_bytes_and_slices_agree():
    a = list(S.generate_pairs(40, seed=3, noise_frac=0.3))
    b = list(S.generate_pairs(40, seed=3, noise_frac=0.3))
    assert [s.image_bytes for s in a] == [s.image_bytes for s in b]
    assert [(s.uid, s.caption, s.noisy) for s in a] == [(s.uid, s.caption, s.noisy) for s in b]
    # Any slice is reproducible on its own, in any order.
    tail = list(S.generate_pairs(15, seed=3, noise_frac=0.3, start=25))
    assert [(s.uid, s.image_bytes) for s in tail] == [(s.uid, s.image_bytes) for s in a[25:]]
    single = S.make_pair(31, seed=3, noise_frac=0.3).sample
    assert (single.uid, single.image_bytes, single.caption) == (a[31].uid, a[31].image_bytes, a[31].caption)


def test_other_seed_differs_and_uids_unique():
    a = list(S.generate_pairs(200, seed=1, noise_frac=0.2))
    b = list(S.generate_pairs(200, seed=2, noise_frac=0.2))
    assert len({s.uid for s in a} | {s.uid for s in b}) == 400
    assert len({s.key for s in a}) == 200
    assert sum(x.image_bytes == y.image_bytes for x, y in zip(a, b)) == 0


def test_sample_fields_and_uid_contract():
    for i, s in enumerate(S.generate_pairs(20, seed=5, noise_frac=0.5, start=100)):
        assert s.source == "synthetic" and s.label is None and isinstance(s.noisy, bool)
        assert s.uid == make_uid("synthetic", s.image_id, s.caption, 100 + i)
        assert s.problem() is None, s.problem()
        im = _decode(s.image_bytes)
        assert im.format == "JPEG" and im.size == (64, 64) == (s.width, s.height) and im.mode == "RGB"


def test_image_size_parameter():
    s = next(S.generate_pairs(1, seed=0, noise_frac=0.0, image_size=96))
    assert _decode(s.image_bytes).size == (96, 96) and (s.width, s.height) == (96, 96)
    with pytest.raises(ValueError):
        next(S.generate_pairs(1, seed=0, noise_frac=0.0, image_size=8))


def test_noise_fraction_and_flags():
    n = 2000
    pairs = [S.make_pair(i, seed=11, noise_frac=0.25) for i in range(n)]
    noisy = [p for p in pairs if p.sample.noisy]
    assert abs(len(noisy) / n - 0.25) < 0.035  # binomial sd is ~0.01
    for p in pairs:
        # noisy <=> the caption is not the scene's own; a swapped caption describes other objects.
        assert (p.sample.caption != p.scene.caption) == p.sample.noisy
    for p in pairs:
        assert p.sample.caption == p.caption_scene.caption
        assert (p.caption_scene is p.scene) == (not p.sample.noisy)
    for p in noisy:
        # The swapped caption names a different set of (shape, colour) objects than the image shows.
        assert S._signature(p.caption_scene) != S._signature(p.scene)
    assert not any(S.make_pair(i, seed=11, noise_frac=0.0).sample.noisy for i in range(200))
    assert all(S.make_pair(i, seed=11, noise_frac=1.0).sample.noisy for i in range(50))
    with pytest.raises(ValueError):
        S.make_pair(0, seed=0, noise_frac=1.5)


def test_captions_describe_the_drawn_objects():
    kinds = set()
    for i in range(600):
        sc = S.make_pair(i, seed=4, noise_frac=0.0).scene
        kinds.add(sc.kind)
        cap = sc.caption.lower()
        assert cap[-1] == "." and sc.caption[0].isupper()
        assert " a a" not in cap and " a o" not in cap  # "an orange", never "a orange"
        assert 1 <= len(sc.objects) <= 3
        for o in sc.objects:
            assert o.colour in cap, (sc.caption, o)
            assert o.shape in cap or S.PLURALS[o.shape] in cap, (sc.caption, o)
            lo, hi = S.SIZES[o.size]
            assert lo <= o.r <= hi and o.r <= o.cx <= 64 - o.r and o.r <= o.cy <= 64 - o.r
        words = set(cap.replace(",", "").replace(".", "").split())
        for size, synonyms in S.SIZE_WORDS.items():
            if words & set(synonyms):  # a size word, when given, is the right one
                assert any(o.size == size for o in sc.objects), sc.caption
        if sc.kind == "single":
            if "background" not in cap:
                assert any(p in cap for p in S._LOCATION_PHRASES[sc.location]), sc.caption
        elif sc.kind == "relation":
            a, b = sc.objects
            assert S._relation_of(a, b) == sc.relation
            assert any(w in cap for w in ("above", "below", "beneath", "left of", "right of"))
            if sc.relation in ("above", "below"):
                assert (a.cy < b.cy) == (sc.relation == "above")
        else:
            n_same = sum(o == sc.objects[0] or (o.shape, o.colour) == (sc.objects[0].shape, sc.objects[0].colour)
                         for o in sc.objects)
            assert S.NUMBER_WORDS[n_same] in cap, sc.caption
        # Objects never overlap (so counts are countable).
        for j, o in enumerate(sc.objects):
            for p in sc.objects[j + 1:]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) > o.r + p.r
    assert kinds == set(S.KINDS)


def test_relation_words_match_geometry():
    """'A above B' in the caption must agree with the drawn positions, in both phrasings."""
    checked = 0
    for i in range(400):
        sc = S.scene_at(i, seed=9)
        if sc.kind != "relation":
            continue
        a, b = sc.objects
        cap = sc.caption.lower()
        first = a if cap.find(f"{a.colour} {a.shape}") < cap.find(f"{b.colour} {b.shape}") else b
        second = b if first is a else a
        if " above " in cap:
            assert first.cy < second.cy
        elif " below " in cap or " beneath " in cap:
            assert first.cy > second.cy
        elif "left of" in cap:
            assert first.cx < second.cx
        else:
            assert "right of" in cap and first.cx > second.cx
        checked += 1
    assert checked > 50


def test_filled_shapes_have_their_colour_at_the_centre():
    checked = 0
    for i in range(300):
        p = S.make_pair(i, seed=2, noise_frac=0.0)
        px = np.asarray(_decode(p.sample.image_bytes)).astype(int)
        for o in p.scene.objects:
            if o.shape in ("circle", "square", "diamond", "heart") and o.size == "large":
                got = px[int(round(o.cy - 0.5)), int(round(o.cx - 0.5))]
                assert np.abs(got - np.array(o.rgb)).max() < 40, (p.scene, got)
                checked += 1
    assert checked > 20


def test_classification_set():
    samples = list(S.generate_classification(3, seed=0))
    assert len(samples) == 3 * len(S.CLASSNAMES) == 30
    assert len(S.CLASSNAMES) == 10 and len(set(S.CLASSNAMES)) == 10
    for s in samples:
        assert s.caption == S.CLASSNAMES[s.label]
        assert _decode(s.image_bytes).size == (64, 64) and s.problem() is None
    assert sorted(s.label for s in samples) == sorted(list(range(10)) * 3)
    again = list(S.generate_classification(3, seed=0))
    assert [s.image_bytes for s in again] == [s.image_bytes for s in samples]
    other = list(S.generate_classification(3, seed=1))
    assert {s.uid for s in other}.isdisjoint({s.uid for s in samples})
    # Distinct from pair uids of the same seed.
    pairs = {s.uid for s in S.generate_pairs(30, seed=0, noise_frac=0.0)}
    assert pairs.isdisjoint({s.uid for s in samples})


@pytest.mark.parametrize("by", S.CLASS_AXES)
def test_class_templates_speak_the_caption_language(by):
    import re
    templates = S.class_templates(by)
    assert len(set(templates)) == len(templates) >= 8 and all(t.count("{}") == 1 for t in templates)
    vocab = {w for p in S.generate_pairs(2000, seed=0, noise_frac=0.0) for w in re.findall(r"[a-z]+", p.caption.lower())}
    for t in templates:
        for c in S.classnames(by):
            words = set(re.findall(r"[a-z]+", t.format(c)))
            assert words <= vocab, (t, words - vocab)  # no word the model never saw in training
    assert {"shape": "an orange {}.", "colour": "three {} crosses."}[by] in templates


def test_colour_class_set():
    samples = list(S.generate_classification(2, seed=0, by="colour"))
    assert len(samples) == 2 * len(S.COLOURS) == 16
    assert [s.caption for s in samples[:8]] == list(S.COLOURS) == list(S.classnames("colour"))
    shapes = {S.classification_scene(i, seed=0, by="colour")[1].objects[0].shape for i in range(200)}
    assert len(shapes) == 10  # the other attribute varies
    for i in range(40):
        label, scene = S.classification_scene(i, seed=0, by="colour")
        assert scene.objects[0].colour == S.classnames("colour")[label]
    assert {s.uid for s in samples}.isdisjoint({s.uid for s in S.generate_classification(2, seed=0)})
    with pytest.raises(ValueError, match="by must be one of"):
        list(S.generate_classification(1, seed=0, by="size"))


def test_throughput():
    # Target: >= 1,000 pairs/s on one core including JPEG encoding (measured ~2,600/s on an idle
    # machine). Measured in this process's CPU time so that other jobs on the shared cores do not
    # make the test flaky; the bound is softer than the target for slower CPUs.
    list(S.generate_pairs(50, seed=0, noise_frac=0.2))  # warm-up (noise bank, imports)
    n = 1000
    t0 = time.process_time()
    for _ in S.generate_pairs(n, seed=0, noise_frac=0.2, start=1000):
        pass
    rate = n / (time.process_time() - t0)
    assert rate > 600, f"{rate:.0f} pairs per CPU second"
