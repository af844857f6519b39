"""The field's evaluation: standard class names / templates (pipeline/zeroshot_data.py), Karpathy-split
retrieval sets (storage.importers.import_karpathy), suites and CLIP_benchmark's result schema
(pipeline/evaluate.py, `aced eval --suite`, `aced eval compare`).

The numbers are checked against the field's own code on the same model: open_clip's
``build_zero_shot_classifier`` + open_clip_train's ``accuracy``, and CLIP_benchmark 1.6.2's zero-shot
classification and retrieval metrics (clip-benchmark is a test dependency). Real data, read in place:
a subset of ../shared/data/cifar10/test and a Karpathy JSON built from ../shared/data/flickr8k.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline import evaluate as E
from pipeline import zeroshot_data as Z
from storage.importers import import_class_folders, import_karpathy
from storage.shards import ShardError, load_dataset
from tests.conftest import data_cli

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
CIFAR = DATA / "cifar10" / "test"
FLICKR = DATA / "flickr8k"
PER_CLASS = 12  # CIFAR-10 test images per class in the subset (120 images)
N_TEST, N_TRAIN = 12, 3  # Flickr8k images of the Karpathy JSON per split

needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"needs {CIFAR}")
needs_flickr = pytest.mark.skipif(not (FLICKR / "captions.csv").is_file(), reason=f"needs {FLICKR}")


def _clip_benchmark_file(name: str) -> Path:
    spec = importlib.util.find_spec("clip_benchmark")
    assert spec is not None, "clip-benchmark (a test dependency) is not installed"
    return Path(spec.submodule_search_locations[0]) / "datasets" / name


# ---------------------------------------------------------------- standard sets


@pytest.mark.parametrize("name", ["en_classnames.json", "en_zeroshot_classification_templates.json"])
def test_vendored_clip_benchmark_files_equal_the_installed_package(name):
    assert (Z.DATA_DIR / name).read_bytes() == _clip_benchmark_file(name).read_bytes()
    assert "MIT License" in (Z.DATA_DIR / "LICENSE").read_text()


def test_standard_sets_are_open_clips_and_clip_benchmarks():
    from open_clip import zero_shot_metadata as m

    cb_templates = json.loads(_clip_benchmark_file("en_zeroshot_classification_templates.json").read_text())
    cb_names = json.loads(_clip_benchmark_file("en_classnames.json").read_text())
    assert Z.classnames("imagenet1k") == tuple(m.IMAGENET_CLASSNAMES) == tuple(cb_names["imagenet1k"])
    openai = Z.templates("imagenet1k")
    assert len(openai) == 80 and [t.format("x") for t in openai] == [f("x") for f in m.OPENAI_IMAGENET_TEMPLATES]
    assert [t.format("x") for t in openai] == [t.format(c="x") for t in cb_templates["imagenet1k"]]
    assert [t.format("x") for t in Z.templates("simple_imagenet")] == [f("x") for f in m.SIMPLE_IMAGENET_TEMPLATES]
    for name in ("cifar10", "cifar100", "flowers", "pets"):
        assert [t.format("a b") for t in Z.templates(name)] == [t.format(c="a b") for t in cb_templates[name]]
    assert len(Z.templates("cifar10")) == 18 and Z.classnames("cifar10") is None  # names: torchvision's, the folders
    assert Z.classnames("pets") == tuple(cb_names["pets"])
    assert E.DEFAULT_TEMPLATES == openai  # the prompts of a set that names none: CLIP's 80, not hand-written
    with pytest.raises(ValueError, match="unknown template set 'cifar11'.*cifar10"):
        Z.templates("cifar11")
    with pytest.raises(ValueError, match="unknown class-name set 'nope'"):
        Z.classnames("nope")


def test_folders_map_onto_a_standard_set():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as IN

    assert Z.imagenet_synsets()[:2] == ("n01440764", "n01443537")
    synsets = ["n01440764", "n01443537", "n15075141"]  # sorted folder order; the last is class 999
    assert Z.classnames_for_folders("imagenet1k", synsets) == [IN[0], IN[1], IN[999]]
    assert Z.classnames_for_folders("imagenet1k", ["0", "2", "10"]) == [IN[0], IN[2], IN[10]]
    assert Z.classnames_for_folders("pets", ["Abyssinian", "american_bulldog"]) == ["Abyssinian", "American Bulldog"]
    assert Z.classnames_for_folders("cifar10", [f"c{i}" for i in range(10)]) == [f"c{i}" for i in range(10)]
    with pytest.raises(ValueError, match=r"1 class folder\(s\) match no class name of 'pets' \(e.g. \['martian'\]\)"):
        Z.classnames_for_folders("pets", ["Abyssinian", "martian"])
    with pytest.raises(ValueError, match="not ImageNet-1k synsets.*n99999999"):
        Z.classnames_for_folders("imagenet1k", ["n01440764", "n99999999"])
    with pytest.raises(ValueError, match="synset ids: use the class-name set 'imagenet1k'"):
        Z.classnames_for_folders("pets", synsets)
    with pytest.raises(ValueError, match="'cifar10' has 10 classes, the dataset 3"):
        Z.classnames_for_folders("cifar10", ["a", "b", "c"])
    with pytest.raises(ValueError, match="match several"):  # IMAGENET_CLASSNAMES names two classes "missile"
        Z.classnames_for_folders("imagenet1k", ["missile"])


def test_imagenet_style_folders_are_prompted_by_name(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as IN

    src = tmp_path / "val"
    for i, syn in enumerate(["n01443537", "n01440764"]):
        (src / syn).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(src / syn / "a.JPEG")
    info = import_class_folders(src, tmp_path / "ws", "inval")
    assert info.extra["class_folders"] == ["n01440764", "n01443537"]
    names, temps, source = E.zero_shot_prompts(info.path)  # no set named: synset ids are mapped all the same
    assert names == [IN[0], IN[1]] and temps == Z.templates("imagenet1k")
    assert source == {"classnames": "imagenet1k", "templates": "imagenet1k"}
    names, temps, source = E.zero_shot_prompts(info.path, templates="simple_imagenet")
    assert temps == Z.templates("simple_imagenet") and source["templates"] == "simple_imagenet"


# ---------------------------------------------------------------- CIFAR-10 against open_clip / CLIP_benchmark


@pytest.fixture(scope="module")
def model():
    from pipeline.models import create_model

    return create_model("aced-vit-t", seed=0)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The first PER_CLASS images of each CIFAR-10 test class (copied: the importer refuses links that
    lead out of the folder), imported with `import_class_folders`."""
    if not CIFAR.is_dir():
        pytest.skip(f"needs {CIFAR}")
    tmp = tmp_path_factory.mktemp("cifar")
    for cls in sorted(p.name for p in CIFAR.iterdir() if p.is_dir()):
        (tmp / "src" / cls).mkdir(parents=True)
        for f in sorted((CIFAR / cls).iterdir())[:PER_CLASS]:
            shutil.copyfile(f, tmp / "src" / cls / f.name)
    info = import_class_folders(tmp / "src", tmp / "ws", "cifar10")
    return tmp / "src", info


def _accuracy(output, target, topk=(1,)):
    """open_clip_train's (and CLIP_benchmark's) `accuracy`, top-k hit counts, line for line, but for
    `.item()` where theirs calls float() on a one-element array, which numpy 2.4 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() for k in topk]


@needs_cifar
def test_cifar10_zero_shot_equals_open_clip_and_clip_benchmark(model, cifar, monkeypatch):
    import open_clip
    from clip_benchmark.metrics import zeroshot_classification as cb_zs
    from torchvision.datasets import ImageFolder

    src, info = cifar
    res = E.evaluate(model, {"cifar10": ("zeroshot", info.path, {"classnames": "cifar10"})}, batch_size=64)
    ours = res["evals"]["cifar10"]
    assert ours["prompts"] == {"classnames": "cifar10", "templates": "cifar10"}
    assert ours["metrics"]["templates"] == 18 and ours["metrics"]["n"] == 10 * PER_CLASS

    # The field's code on the same model, its own data loading (torchvision ImageFolder: sorted class folders).
    folder = ImageFolder(str(src), transform=model.preprocess)
    assert folder.classes == info.extra["class_folders"]
    loader = torch.utils.data.DataLoader(folder, batch_size=32)
    raw_templates = json.loads(_clip_benchmark_file("en_zeroshot_classification_templates.json").read_text())["cifar10"]
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)  # untrimmed
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model.model, tokenizer, folder.classes, [lambda c, t=t: t.format(c=c) for t in raw_templates])
        feats, labels = [], []
        for x, y in loader:
            feats.append(model.model.encode_image(x, normalize=True))
            labels.append(y)
        logits = 100.0 * torch.cat(feats) @ weights
    labels = torch.cat(labels)
    top1, top5 = (c / len(labels) for c in _accuracy(logits, labels, topk=(1, 5)))
    # a top-1 margin far above float rounding: the comparison below cannot hinge on a near tie
    assert (logits.topk(2).values[:, 0] - logits.topk(2).values[:, 1]).min() > 1e-4
    assert ours["metrics"]["top1"] == pytest.approx(top1, abs=1e-9)
    assert ours["metrics"]["top5"] == pytest.approx(top5, abs=1e-9)
    assert 0.0 < top5 < 1.0  # a random model: not a degenerate all-or-nothing comparison

    monkeypatch.setattr(cb_zs, "accuracy", lambda *a, **k: [c / len(a[1]) for c in _accuracy(*a, **k)])
    cb = cb_zs.evaluate(model.model, loader, tokenizer, folder.classes, raw_templates, "cpu", amp=False)
    record = E.clip_benchmark_records(res, model="aced-vit-t", pretrained="seed0")[0]
    assert record["task"] == "zeroshot_classification" and record["language"] == "en"
    assert record["metrics"].keys() == cb.keys() == {"acc1", "acc5", "mean_per_class_recall"}
    for k in cb:
        assert record["metrics"][k] == pytest.approx(cb[k], abs=1e-9), k


@needs_cifar
def test_a_set_that_does_not_fit_is_refused_naming_it(model, cifar):
    _, info = cifar
    with pytest.raises(ValueError, match=r"cifar10.*'cifar100' has 100 classes, the dataset 10"):
        E.evaluate(model, {"c": ("zeroshot", info.path, {"classnames": "cifar100"})})
    with pytest.raises(ValueError, match="classes only|zero-shot sets only"):
        E.evaluate(model, {"c": ("retrieval", info.path, {"classnames": "cifar10"})})


# ---------------------------------------------------------------- Karpathy retrieval sets


def _karpathy_json(path: Path, *, n_test: int = N_TEST, n_train: int = N_TRAIN) -> dict:
    """dataset_flickr8k.json's layout for the first images of Flickr8k's test and train lists, with
    their captions from captions.csv."""
    caps: dict[str, list[str]] = {}
    with open(FLICKR / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], []).append(row["caption"])
    images, sentid = [], 0
    for split, n in (("train", n_train), ("test", n_test)):
        names = [ln.strip() for ln in (FLICKR / "splits" / f"{split}.txt").read_text().splitlines() if ln.strip()]
        for name in [x for x in names if x in caps][:n]:
            sents = [{"tokens": c.lower().split(), "raw": c, "imgid": len(images), "sentid": sentid + j}
                     for j, c in enumerate(caps[name])]
            images.append({"sentids": [s["sentid"] for s in sents], "imgid": len(images), "sentences": sents,
                           "split": split, "filename": name})
            sentid += len(sents)
    doc = {"images": images, "dataset": "flickr8k"}
    path.write_text(json.dumps(doc))
    return doc


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    if not (FLICKR / "captions.csv").is_file():
        pytest.skip(f"needs {FLICKR}")
    tmp = tmp_path_factory.mktemp("karpathy")
    doc = _karpathy_json(tmp / "dataset_flickr8k.json")
    return tmp / "dataset_flickr8k.json", doc


@needs_flickr
def test_karpathy_split_imports_as_a_retrieval_set(karpathy, tmp_path):
    path, doc = karpathy
    root = tmp_path / "ws"
    assert data_cli(root, "import", "karpathy", str(path), "--images", str(FLICKR / "images"),
                    "--name", "f8k/test") == 0  # --split test by default
    info = load_dataset(root / "datasets" / "f8k" / "test")
    test = [im for im in doc["images"] if im["split"] == "test"]
    assert info.rows == sum(len(im["sentences"]) for im in test)
    assert info.extra["karpathy_dataset"] == "flickr8k" and info.source.startswith("karpathy:")
    from storage.shards import iter_samples, list_shards

    got = [(s.image_id, s.caption, s.split) for sh in list_shards(info.path) for s in iter_samples(sh)]
    want = [(im["filename"].rsplit(".", 1)[0], s["raw"].strip(), "test") for im in test for s in im["sentences"]]
    assert got == want  # file order, every sentence, the image id import_captions gives Flickr images

    train = import_karpathy(path, FLICKR / "images", root, "f8k/train", split="train")
    assert train.rows == sum(len(im["sentences"]) for im in doc["images"] if im["split"] == "train")
    with pytest.raises(ShardError, match=r"no image has split 'val' \(splits: test \(12\), train \(3\)\)"):
        import_karpathy(path, FLICKR / "images", root, "f8k/val", split="val")


def test_karpathy_bad_input_is_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    doc = {"images": [{"filepath": "", "filename": "a.jpg", "split": "test", "cocoid": 7,
                       "sentences": [{"raw": "a cat."}, {"raw": "  "}]},
                      {"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "a dog."}]}],
           "dataset": "coco"}
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(ShardError, match=r"k.json: images\[0\].sentences\[1\] \(a.jpg\): empty or missing 'raw'"):
        import_karpathy(tmp_path / "k.json", images, tmp_path / "ws", "k")
    info = import_karpathy(tmp_path / "k.json", images, tmp_path / "ws", "k", on_error="skip")
    assert info.rows == 1 and info.extra["skipped_at_import"] == 2  # the empty caption, the missing image's one
    from storage.shards import iter_samples, list_shards

    assert [s.image_id for sh in list_shards(info.path) for s in iter_samples(sh)] == ["7"]  # COCO: the cocoid
    doc["images"][0]["sentences"].pop()
    doc["images"][1] = {"filename": "../a.jpg", "split": "test", "sentences": [{"raw": "x"}]}
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(ShardError, match=r"images\[1\]: image path '../a.jpg' leaves the image folder"):
        import_karpathy(tmp_path / "k.json", images, tmp_path / "ws", "k2")
    (tmp_path / "k.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ShardError, match="not a Karpathy-split file"):
        import_karpathy(tmp_path / "k.json", images, tmp_path / "ws", "k3")


@needs_flickr
def test_karpathy_retrieval_equals_clip_benchmark(model, karpathy, tmp_path):
    from clip_benchmark.metrics import zeroshot_retrieval as cb_ret

    path, doc = karpathy
    info = import_karpathy(path, FLICKR / "images", tmp_path / "ws", "f8k")
    res = E.evaluate(model, {"flickr8k": ("retrieval", info.path)}, batch_size=8)
    record = E.clip_benchmark_records(res, model="aced-vit-t", pretrained="seed0")[0]
    assert record["task"] == "zeroshot_retrieval"

    # CLIP_benchmark's loop: batches of (images, [captions of each image]), images read from the files.
    test = [im for im in doc["images"] if im["split"] == "test"]
    batches = []
    for i in range(0, len(test), 5):
        chunk = test[i:i + 5]
        x = torch.stack([model.preprocess(Image.open(FLICKR / "images" / im["filename"]).convert("RGB"))
                         for im in chunk])
        batches.append((x, [[s["raw"].strip() for s in im["sentences"]] for im in chunk]))
    tokenizer = __import__("open_clip").tokenizer.SimpleTokenizer(context_length=model.context_length)
    cb = cb_ret.evaluate(model.model, batches, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert record["metrics"].keys() == cb.keys()
    for k in cb:  # CLIP_benchmark averages hits in float32; one hit in 60 queries is 0.017
        assert record["metrics"][k] == pytest.approx(cb[k], abs=1e-6), k
    m = res["evals"]["flickr8k"]["metrics"]
    assert m["n_images"] == len(test) and m["n_texts"] == sum(len(im["sentences"]) for im in test)
    assert 0 < m["t2i_r5"] < 1 and record["metrics"]["image_retrieval_recall@5"] == m["t2i_r5"]


# ---------------------------------------------------------------- suites, CLIP_benchmark files, compare


def test_suite_file_errors_name_the_entry(tmp_path):
    f = tmp_path / "suite.json"
    for doc, msg in [([], "non-empty JSON list"),
                     ([{"dataset": "x", "task": "linear_probe"}], r"entry 0 \('x'\): task 'linear_probe'"),
                     ([{"dataset": "x", "task": "zeroshot_classification", "clasnames": "cifar10"}],
                      r"entry 0: unknown key\(s\) \['clasnames'\]"),
                     ([{"dataset": "x", "task": "zeroshot_classification"},
                       {"dataset": "y", "task": "zeroshot_classification", "classnames": "cifar11"}],
                      r"entry 1 \('y'\): unknown class-name set 'cifar11'"),
                     ([{"dataset": "x", "task": "zeroshot_retrieval", "templates": "cifar10"}],
                      "apply to zeroshot_classification only")]:
        f.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=msg):
            E.load_suite(f)
    f.write_text("[{")
    with pytest.raises(ValueError, match="suite.json: cannot read a suite"):
        E.load_suite(f)


def _eval_cli(capsys, root, *argv) -> tuple[int, str, str]:
    from flows.cli import main

    capsys.readouterr()
    message = ""
    try:
        rc = main(["--root", str(root), "eval", *map(str, argv)])
    except SystemExit as e:  # SystemExit("text"): the interpreter prints the text and exits 1
        rc, message = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    out, err = capsys.readouterr()
    return rc, out, err + message


@pytest.fixture(scope="module")
def suite_ws(tmp_path_factory, cifar, karpathy):
    """A workspace with two saved models (seeds 0 and 1), the CIFAR-10 subset and the Karpathy test set."""
    from pipeline.models import create_model, save_model

    root = tmp_path_factory.mktemp("suite") / "ws"
    src, _ = cifar
    import_class_folders(src, root, "cifar10")
    import_karpathy(karpathy[0], FLICKR / "images", root, "flickr8k-karpathy/test")
    for seed in (0, 1):
        save_model(create_model("aced-vit-t", seed=seed), root / "models" / f"tiny{seed}")
    suite = root.parent / "suite.json"
    suite.write_text(json.dumps([
        {"dataset": "cifar10", "task": "zeroshot_classification", "classnames": "cifar10"},
        {"dataset": "flickr8k-karpathy/test", "task": "zeroshot_retrieval", "name": "flickr8k"}]))
    return root, suite


@needs_cifar
@needs_flickr
def test_suite_results_load_with_clip_benchmarks_build_and_compare(suite_ws, capsys, tmp_path):
    from clip_benchmark.cli import main_build

    root, suite = suite_ws
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"out{seed}"
        rc, stdout, err = _eval_cli(capsys, root, f"tiny{seed}", "--suite", suite, "--out", out, "--batch-size", 32)
        assert rc == 0, err
        assert stdout.startswith("# Evaluation of `aced-vit-t`")  # results first
        outs.append(out)
    results = json.loads((outs[0] / "results.json").read_text())
    assert set(results["evals"]) == {"cifar10", "flickr8k"} and results["pretrained"] == "tiny0"
    files = sorted((outs[0] / "clip_benchmark").glob("*.json"))
    assert [f.name for f in files] == ["cifar10_tiny0_aced-vit-t_en_zeroshot_classification.json",
                                       "flickr8k_tiny0_aced-vit-t_en_zeroshot_retrieval.json"]
    rec = json.loads(files[0].read_text())
    assert set(rec) == {"dataset", "model", "pretrained", "task", "metrics", "language"}

    # CLIP_benchmark's own `build` (clip_benchmark build FILES --output CSV) over both models' result folders
    csv_path = tmp_path / "benchmark.csv"
    main_build(argparse.Namespace(files=[str(o / "clip_benchmark") for o in outs], output=str(csv_path)))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["model_fullname"], r["dataset"]) for r in rows) == [
        ("aced-vit-t tiny0", "cifar10"), ("aced-vit-t tiny0", "flickr8k"),
        ("aced-vit-t tiny1", "cifar10"), ("aced-vit-t tiny1", "flickr8k")]
    row = next(r for r in rows if r["model_fullname"] == "aced-vit-t tiny0" and r["dataset"] == "cifar10")
    m = results["evals"]["cifar10"]["metrics"]
    assert float(row["acc1"]) == m["top1"] and float(row["mean_per_class_recall"]) == m["mean_per_class_top1"]
    row = next(r for r in rows if r["model_fullname"] == "aced-vit-t tiny0" and r["dataset"] == "flickr8k")
    m = results["evals"]["flickr8k"]["metrics"]
    assert float(row["text_retrieval_recall@10"]) == m["i2t_r10"] and float(row["image_retrieval_recall@1"]) == m["t2i_r1"]

    # side by side: a results folder and a folder of CLIP_benchmark files
    rc, stdout, err = _eval_cli(capsys, root, "compare", outs[0], outs[1] / "clip_benchmark")
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "| dataset | metric | aced-vit-t tiny0 | aced-vit-t tiny1 |"
    acc0 = results["evals"]["cifar10"]["metrics"]["top1"]
    acc1 = json.loads((outs[1] / "results.json").read_text())["evals"]["cifar10"]["metrics"]["top1"]
    assert f"| cifar10 | acc1 | {100 * acc0:.2f} | {100 * acc1:.2f} |" in lines
    assert any(ln.startswith("| flickr8k | text_retrieval_recall@5 |") for ln in lines) and len(lines) == 2 + 3 + 6
    rc, _, err = _eval_cli(capsys, root, "compare", outs[0], outs[0] / "clip_benchmark")
    assert rc == 1 and "is also in" in err  # one model's result twice: refused, naming both files


@needs_cifar
@needs_flickr
def test_eval_prints_results_first_and_no_faiss_loader_lines(suite_ws):
    root, _ = suite_ws
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(root), "eval", "tiny0",
                          "--retrieval", "flickr8k-karpathy/test", "--zeroshot", "cifar10", "--classnames", "cifar10"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# Evaluation of `aced-vit-t`")
    # faiss's loader logs (at INFO, "faiss.loader: Loading faiss with AVX512 support" ... ModuleNotFoundError) are silenced
    assert "faiss.loader" not in out.stderr and "swigfaiss" not in out.stderr and "Loading faiss" not in out.stderr
    assert "| cifar10 | 120 | 10 |" in out.stdout
