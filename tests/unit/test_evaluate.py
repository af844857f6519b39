"""Tests for pipeline/evaluate.py and flows/cmd_eval.py.

Metric arithmetic is checked on constructed embeddings with answers worked out by hand; the dataset
plumbing (shards, image_id grouping, labels, templates) with a colour-reading stand-in model whose
answers are known; and one end-to-end run with a real tiny open_clip model.
"""
from __future__ import annotations

import io
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import evaluate as E
from storage.shards import Sample, ShardError, make_uid, write_shards


# ---------------------------------------------------------------- retrieval metric, constructed


def _n(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _worked_example():
    """4 images e0..e3 (d=4), 5 captions. Inner products worked out by hand:
    c0 (image 0) = e0                       -> nearest image I0 (1.0)
    c1 (image 0) = (e3 + .2 e2 + .1 e0)/|.| -> I3 .976, I2 .195, I0 .098, I1 0   (own image 3rd)
    c2 (image 1) = (e0 + .5 e1)/|.|         -> I0 .894, I1 .447                  (own image 2nd)
    c3 (image 2) = e2                       -> I2 1.0
    c4 (image 3) = (e1 + .3 e3)/|.|         -> I1 .958, I3 .287                  (own image 2nd)
    image -> text: I0 top c0 (own); I1: c4 (.958, image 3) then c2 (own);
                   I2 top c3 (own); I3: c1 (.976, image 0) then c4 (own).
    Image 0 is found at rank 1 through c0 although its other caption c1 is far: "any caption".
    """
    e = np.eye(4)
    img = e.copy()
    txt = np.stack([e[0], _n(e[3] + .2 * e[2] + .1 * e[0]), _n(e[0] + .5 * e[1]), e[2], _n(e[1] + .3 * e[3])])
    owner = np.array([0, 0, 1, 2, 3])
    return img, txt, owner


def test_retrieval_worked_example():
    img, txt, owner = _worked_example()
    r = E.retrieval_from_embeddings(img, txt, owner, ks=(1, 2, 3, 10), faiss_device="cpu")
    assert r["i2t_r1"] == pytest.approx(2 / 4)      # I0, I2
    assert r["i2t_r2"] == pytest.approx(1.0)        # I1, I3 find their own caption second
    assert r["t2i_r1"] == pytest.approx(2 / 5)      # c0, c3
    assert r["t2i_r2"] == pytest.approx(4 / 5)      # + c2, c4
    assert r["t2i_r3"] == pytest.approx(1.0)        # + c1
    assert r["i2t_r10"] == 1.0 and r["t2i_r10"] == 1.0  # k beyond the candidates: all found
    assert (r["n_images"], r["n_texts"]) == (4, 5)
    vals = [r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 2, 3, 10)]
    assert r["mean_recall"] == pytest.approx(sum(vals) / len(vals))
    # default ks are 1/5/10
    assert set(E.retrieval_from_embeddings(img, txt, owner, faiss_device="cpu")) == {
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall", "n_images", "n_texts"}


def test_retrieval_any_caption_rule_differs_from_per_caption():
    # Image 0 has three captions; only one is close to it. Image 1's single caption is closer to
    # image 0 than two of image 0's own captions, but not closer than the good one.
    img = np.eye(3)[:2]
    txt = np.stack([_n([0.1, 0.0, 1.0]), _n([1.0, 0.0, 0.05]), _n([0.1, 0.1, 1.0]), _n([0.6, 0.8, 0.0])])
    owner = np.array([0, 0, 0, 1])
    r = E.retrieval_from_embeddings(img, txt, owner, ks=(1,), faiss_device="cpu")
    assert r["i2t_r1"] == 1.0  # image 0 via caption 1, image 1 via its caption (0.8 > everything else)


def _brute_force(img, txt, owner, k):
    sims = img @ txt.T
    i2t = np.mean([np.any(owner[np.argsort(-sims[i])[:k]] == i) for i in range(len(img))])
    t2i = np.mean([owner[t] in np.argsort(-sims[:, t])[:k] for t in range(len(txt))])
    return i2t, t2i


def test_retrieval_matches_brute_force_on_random_embeddings():
    rng = np.random.default_rng(0)
    n, m, d = 23, 61, 8
    owner = np.concatenate([np.arange(n), rng.integers(0, n, m - n)])
    img = rng.standard_normal((n, d))
    txt = img[owner] + 1.2 * rng.standard_normal((m, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    r = E.retrieval_from_embeddings(torch.tensor(img), torch.tensor(txt), torch.tensor(owner), faiss_device="cpu")
    for k in (1, 5, 10):
        i2t, t2i = _brute_force(img, txt, owner, k)
        assert r[f"i2t_r{k}"] == pytest.approx(i2t) and r[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < r["t2i_r1"] < r["t2i_r10"] < 1  # a non-degenerate case


def test_retrieval_input_errors():
    img, txt, owner = _worked_example()
    with pytest.raises(ValueError, match="image row 3 has no caption"):
        E.retrieval_from_embeddings(img, txt, np.array([0, 0, 1, 2, 2]), faiss_device="cpu")
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        E.retrieval_from_embeddings(img, txt, np.array([0, 0, 1, 2, 4]), faiss_device="cpu")
    with pytest.raises(ValueError, match="image dim 4 != text dim 3"):
        E.retrieval_from_embeddings(img, txt[:, :3], owner, faiss_device="cpu")
    bad = txt.copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        E.retrieval_from_embeddings(img, bad, owner, faiss_device="cpu")


def test_faiss_device_selection_is_explicit(caplog):
    import faiss
    with caplog.at_level(logging.INFO, logger="pipeline.evaluate"):
        chosen = E.select_faiss_device("auto")
    assert re.search(r"faiss (CPU|GPU) IndexFlatIP", caplog.text)
    if faiss.get_num_gpus() == 0 or not torch.cuda.is_available():
        assert chosen == "cpu"
        with pytest.raises(RuntimeError, match="GPU index requested but unavailable"):
            E.select_faiss_device("gpu")
    with pytest.raises(ValueError):
        E.select_faiss_device("tpu")


# ---------------------------------------------------------------- zero-shot metric, constructed


def test_zero_shot_from_embeddings_worked_example():
    w = torch.eye(6)  # 6 classes, class c = e_c
    # image rows: scores against the 6 classes are the rows themselves
    img = torch.tensor([
        [.9, .1, 0, 0, 0, 0],      # label 0: top-1 right
        [.5, .6, .4, .3, .2, .1],  # label 0: ranked 2nd -> top-5 only
        [.1, .2, .3, .4, .5, .6],  # label 0: ranked 6th -> neither
        [0, 1., 0, 0, 0, 0],       # label 1: right
    ])
    r = E.zero_shot_from_embeddings(img, torch.tensor([0, 0, 0, 1]), w, [f"c{i}" for i in range(6)])
    assert r["top1"] == pytest.approx(2 / 4) and r["top5"] == pytest.approx(3 / 4)
    assert r["n"] == 4 and r["n_classes"] == 6
    assert r["per_class"] == pytest.approx({"c0": 1 / 3, "c1": 1.0})
    assert r["mean_per_class_top1"] == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        E.zero_shot_from_embeddings(img, torch.tensor([0, 0, 0, 6]), w)


# ---------------------------------------------------------------- StableEval, constructed


def _seeds(mean: float, std: float) -> list[float]:
    # three seeds m - s, m, m + s have sample std (ddof=1) exactly s
    return [mean - std, mean, mean + std]


def test_stable_eval_keeps_prefix_under_most_stable_std():
    per_seed = {"a": _seeds(50, 1.0), "b": _seeds(60, 1.0), "c": _seeds(40, 2.0), "d": _seeds(30, 3.0),
                "e": _seeds(20, 10.0)}
    # avg std: N=1: 1; N=2: sqrt(2)/2 = .707; N=3: sqrt(6)/3 = .816; N=4: sqrt(15)/4 = .968;
    # N=5: sqrt(115)/5 = 2.14 > 1 -> stop
    rows = E.stable_eval_table(per_seed)
    assert [r["name"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert [round(r["avg_std"], 3) for r in rows] == [1.0, 0.707, 0.816, 0.968, 2.145]
    assert E.stable_eval(per_seed) == ["a", "b", "c", "d"]
    # order of the input does not matter; the result is sorted by stability
    assert E.stable_eval(dict(reversed(list(per_seed.items())))) == ["a", "b", "c", "d"]


def test_stable_eval_stops_at_first_crossing():
    # stds 1, then 200 evals of std 10: the average's std is 5.02 at N=2 (> 1), and only falls back
    # under 1 after ~100 evals (sqrt(1 + 100 (N-1)) / N). The paper prunes at the critical point.
    per_seed = {"stable": _seeds(0, 1.0), **{f"noisy{i:03d}": _seeds(0, 10.0) for i in range(200)}}
    assert math.sqrt(1 + 100 * 199) / 200 < 1
    assert E.stable_eval(per_seed) == ["stable"]


def test_stable_eval_errors():
    with pytest.raises(ValueError, match="needs >= 2 seeds"):
        E.stable_eval({"a": [1.0]})
    with pytest.raises(ValueError, match="no evaluations"):
        E.stable_eval({})


def _result(headline: dict[str, float]) -> dict:
    return {"model": "m", "created": "now", "evals": {}, "headline": headline}


def test_collect_seeds():
    got = E.collect_seeds([_result({"x": 0.1, "y:i2t": 0.5}), _result({"x": 0.2, "y:i2t": 0.7})])
    assert got == {"x": [0.1, 0.2], "y:i2t": [0.5, 0.7]}
    with pytest.raises(ValueError, match="b.json: evaluations"):
        E.collect_seeds([_result({"x": 0.1}), _result({"z": 0.1})], ["a.json", "b.json"])


# ---------------------------------------------------------------- plumbing with a stand-in model

COLOURS = {"red": (230, 25, 25), "green": (25, 230, 25), "blue": (25, 25, 230), "yellow": (230, 230, 25),
           "pink": (255, 150, 150)}


class ColourBundle:
    """Stand-in for ModelBundle whose embeddings are known: an image embeds as its centred mean colour,
    a text as the centred colour of the colour word it contains."""

    name = "colour-stand-in"

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)  # parameters give a device; train/eval mode is observable
        self.texts: list[str] = []

    def preprocess(self, im: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(im.resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        start = len(self.texts)
        self.texts.extend(texts)
        return torch.arange(start, start + len(texts))[:, None]

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.model.training and torch.is_inference_mode_enabled()
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)) - 0.5, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        vecs = []
        for t in tokens[:, 0].tolist():
            word = sorted({w for w in re.findall(r"[a-z]+", self.texts[t]) if w in COLOURS})
            assert len(word) == 1, self.texts[t]
            vecs.append(torch.tensor(COLOURS[word[0]], dtype=torch.float32) / 255.0 - 0.5)
        return torch.nn.functional.normalize(torch.stack(vecs), dim=-1)


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _sample(i: int, colour: str, caption: str, image_id: str, label=None) -> Sample:
    return Sample(key=f"s{i:04d}", uid=make_uid("test", image_id, caption, i), image_bytes=_jpeg(COLOURS[colour]),
                  caption=caption, image_id=image_id, width=16, height=16, source="test", label=label)


@pytest.fixture
def retrieval_set(tmp_path):
    # 4 images, 6 captions; the blue image's second caption says "pink", whose nearest image is not
    # blue (centred pink . yellow = .2 > pink . red = .13 > pink . blue = -.2): it is found only at rank 4.
    rows = [("red", "a red square", "r"), ("red", "red, bright red", "r"), ("green", "green", "g"),
            ("blue", "a blue thing", "b"), ("blue", "pink", "b"), ("yellow", "yellow", "y")]
    samples = [_sample(i, c, cap, iid) for i, (c, cap, iid) in enumerate(rows)]
    write_shards(samples, tmp_path / "ret", name="test/ret", source="test", samples_per_shard=4)
    return tmp_path / "ret"


def test_retrieval_over_shards_groups_by_image_id(retrieval_set):
    bundle = ColourBundle()
    bundle.model.train()
    r = E.retrieval(bundle, retrieval_set, batch_size=3, faiss_device="cpu")
    assert bundle.model.training  # mode restored
    assert (r["n_images"], r["n_texts"]) == (4, 6)
    assert r["i2t_r1"] == 1.0
    assert r["t2i_r1"] == pytest.approx(5 / 6) and r["t2i_r5"] == 1.0


def test_retrieval_rejects_one_image_id_with_two_images(tmp_path):
    samples = [_sample(0, "red", "red", "x"), _sample(1, "green", "green", "x")]
    write_shards(samples, tmp_path / "bad", name="bad", source="test")
    with pytest.raises(ShardError, match="image_id 'x' has different image bytes"):
        E.retrieval(ColourBundle(), tmp_path / "bad", faiss_device="cpu")


@pytest.fixture
def zeroshot_set(tmp_path):
    classes = ["red", "green", "blue", "yellow"]
    spec = [("red", 0), ("red", 0), ("green", 1), ("green", 1), ("blue", 2), ("blue", 2), ("yellow", 3),
            ("green", 0)]  # the last one is labelled red but is green: a top-1 miss
    samples = [_sample(i, c, classes[y], f"z{i}", label=y) for i, (c, y) in enumerate(spec)]
    write_shards(samples, tmp_path / "zs", name="test/zs", source="test", samples_per_shard=3,
                 extra={"classnames": classes})
    return tmp_path / "zs"


def test_zero_shot_over_shards(zeroshot_set):
    r = E.zero_shot(ColourBundle(), zeroshot_set, batch_size=3)
    assert r["n"] == 8 and r["n_classes"] == 4
    assert r["top1"] == pytest.approx(7 / 8) and r["top5"] == 1.0  # 4 classes: top-5 is top-4
    assert r["per_class"] == pytest.approx({"red": 2 / 3, "green": 1.0, "blue": 1.0, "yellow": 1.0})


def test_zero_shot_asks_in_the_sets_own_templates_unless_told(tmp_path):
    classes = ["red", "green"]
    samples = [_sample(0, "red", "red", "a", label=0), _sample(1, "green", "green", "b", label=1)]
    write_shards(samples, tmp_path / "zs", name="zs", source="test",
                 extra={"classnames": classes, "templates": ["the {} one.", "a {} shape."]})
    bundle = ColourBundle()
    r = E.zero_shot(bundle, tmp_path / "zs")
    assert r["top1"] == 1.0 and r["templates"] == 2
    assert bundle.texts == ["the red one.", "a red shape.", "the green one.", "a green shape."]
    bundle = ColourBundle()
    r = E.zero_shot(bundle, tmp_path / "zs", templates=["itap of a {}."])  # explicit templates win
    assert r["templates"] == 1 and bundle.texts == ["itap of a red.", "itap of a green."]


def test_zero_shot_defaults_to_clip_templates(zeroshot_set):
    bundle = ColourBundle()
    r = E.zero_shot(bundle, zeroshot_set)
    assert r["templates"] == len(E.DEFAULT_TEMPLATES)
    assert bundle.texts[:2] == [t.format("red") for t in E.DEFAULT_TEMPLATES[:2]]


def test_zero_shot_rejects_a_label_outside_the_classes(tmp_path):
    samples = [_sample(0, "red", "red", "a", label=0), _sample(1, "blue", "blue", "b", label=7)]
    write_shards(samples, tmp_path / "zs", name="zs", source="test", extra={"classnames": ["red", "blue"]})
    with pytest.raises(ShardError, match=r"00000000.tar: sample 's0001': label 7 is not in \[0, 2\)"):
        E.zero_shot(ColourBundle(), tmp_path / "zs")


def test_prefetch_order_errors_and_early_exit():
    assert list(E._prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ShardError("x.tar: sample 'k': broken")
    with pytest.raises(ShardError, match="broken"):
        list(E._prefetch(failing()))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1
    for x in E._prefetch(endless(), depth=2):
        if x == 3:
            break  # the producer thread must stop (join returns) instead of running on
    assert len(produced) <= 3 + 2 + 2


def test_zero_shot_needs_classnames(retrieval_set):
    with pytest.raises(ValueError, match="no 'classnames'"):
        E.zero_shot(ColourBundle(), retrieval_set)


def test_class_weights_average_templates_then_renormalise():
    class TemplateBundle(ColourBundle):
        # "photo" prompts lean towards +e3, "art" prompts towards -e3: the template mean cancels them
        def encode_text(self, tokens):
            out = []
            for t in tokens[:, 0].tolist():
                text = self.texts[t]
                v = torch.zeros(4)
                v[["red", "green", "blue"].index(re.findall(r"(red|green|blue)", text)[0])] = 1.0
                v[3] = 0.5 if "photo" in text else -0.5
                out.append(v / v.norm())
            return torch.stack(out)

    w = E.class_weights(TemplateBundle(), ["red", "green", "blue"], ["a photo of a {}.", "art of the {}."])
    assert torch.allclose(w, torch.eye(4)[:3], atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        E.class_weights(TemplateBundle(), ["red"], ["no placeholder"])


def test_evaluate_and_write_results(retrieval_set, zeroshot_set, tmp_path):
    res = E.evaluate(ColourBundle(), {"zs": ("zeroshot", zeroshot_set), "ret": ("retrieval", retrieval_set)},
                     batch_size=4, faiss_device="cpu")
    assert res["headline"] == pytest.approx({"zs": 7 / 8, "ret:i2t": 1.0, "ret:t2i": 5 / 6})
    json_path, md_path = E.write_results(res, tmp_path / "out")
    assert json.loads(json_path.read_text())["evals"]["ret"]["metrics"]["t2i_r1"] == pytest.approx(5 / 6)
    md = md_path.read_text()
    assert "| zs | 8 | 4 | 87.50 | 100.00 |" in md and "| ret | 4 | 6 | 100.00 |" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md"]
    with pytest.raises(ValueError, match="kind in"):
        E.evaluate(ColourBundle(), {"x": ("linear-probe", zeroshot_set)})



def _cli(argv: list[str], root) -> int:
    """Run `aced <argv>` with only this area's commands (flows/cli.py wires every area the same way)."""
    import argparse

    from flows import cmd_eval
    parser = argparse.ArgumentParser(prog="aced")
    cmd_eval.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.root = root
    return args.func(args)


def test_cli_stable_eval(tmp_path, capsys):
    paths = []
    for i, (a, b, c) in enumerate([(0.50, 0.30, 0.9), (0.51, 0.32, 0.5), (0.52, 0.31, 0.7)]):
        p = tmp_path / f"seed{i}.json"
        p.write_text(json.dumps(_result({"zs": a, "ret:i2t": b, "ret:t2i": c})))
        paths.append(str(p))
    assert _cli(["stable-eval", *paths], tmp_path) == 0
    out = capsys.readouterr().out
    # stds 0.01, 0.01, 0.2: avg std at N=3 is sqrt(2e-4 + .04)/3 = .067 > .01 -> dropped
    assert "kept 2 of 3: ret:i2t, zs" in out
    assert _cli(["stable-eval", "--json", *paths], tmp_path) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == ["ret:i2t", "zs"]
    with pytest.raises(SystemExit, match="needs results of >= 2 seeds"):
        _cli(["stable-eval", paths[0]], tmp_path)


# ---------------------------------------------------------------- end to end with a real tiny model


@pytest.fixture
def tiny_sets(tmp_path):
    from dataclasses import replace

    from pipeline.synthetic import CLASSNAMES, generate_classification, generate_pairs

    pairs = list(generate_pairs(6, seed=3, noise_frac=0.0))
    # two more captions for image 0 and one more for image 1: 6 images, 9 captions
    extra = [replace(pairs[0], key="x0", caption=pairs[2].caption, uid=make_uid("t", "x", "0", 0)),
             replace(pairs[0], key="x1", caption=pairs[3].caption, uid=make_uid("t", "x", "1", 1)),
             replace(pairs[1], key="x2", caption=pairs[4].caption, uid=make_uid("t", "x", "2", 2))]
    write_shards(pairs + extra, tmp_path / "ret", name="tiny/ret", source="t", samples_per_shard=4)
    write_shards(generate_classification(2, seed=3), tmp_path / "cls", name="tiny/cls", source="t",
                 samples_per_shard=5, extra={"classnames": list(CLASSNAMES)})
    return tmp_path / "ret", tmp_path / "cls", pairs + extra


def test_end_to_end_tiny_model(tiny_sets, tmp_path, capsys):
    from pipeline.models import create_model, save_model

    ret_dir, cls_dir, samples = tiny_sets
    bundle = create_model("aced-vit-t", seed=0)
    res = E.evaluate(bundle, {"ret": ("retrieval", ret_dir), "cls": ("zeroshot", cls_dir)}, batch_size=4,
                     faiss_device="cpu")
    r, z = res["evals"]["ret"]["metrics"], res["evals"]["cls"]["metrics"]
    assert (r["n_images"], r["n_texts"]) == (6, 9)
    assert z["n"] == z["n_classes"] * 2 and 0.0 <= z["top1"] <= z["top5"] <= 1.0

    # the same numbers from embeddings computed by hand, one image per image_id
    with torch.inference_mode():
        bundle.model.eval()
        first = {}
        for s in samples:
            first.setdefault(s.image_id, s)
        ids = list(first)
        img = bundle.encode_image(torch.stack([bundle.preprocess(Image.open(io.BytesIO(first[i].image_bytes)).convert("RGB"))
                                               for i in ids]))
        txt = bundle.encode_text(bundle.tokenizer([s.caption for s in samples]))
    # shards keep the written order, so caption t of the dataset is samples[t]
    want = E.retrieval_from_embeddings(img, txt, [ids.index(s.image_id) for s in samples], faiss_device="cpu")
    assert r == pytest.approx(want)

    # `aced eval` on the saved model reproduces them and writes the files
    model_dir = tmp_path / "models" / "tiny"
    save_model(bundle, model_dir)
    out = tmp_path / "eval-out"
    assert _cli(["eval", str(model_dir), "--retrieval", str(ret_dir), "--zeroshot", str(cls_dir), "--out", str(out),
                 "--batch-size", "4", "--device", "cpu", "--faiss", "cpu"], tmp_path) == 0
    printed = capsys.readouterr().out
    assert "Image-text retrieval" in printed and "Zero-shot classification" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["evals"]["tiny/ret"]["metrics"] == pytest.approx(r)
    assert saved["evals"]["tiny/cls"]["metrics"]["top1"] == pytest.approx(z["top1"])
