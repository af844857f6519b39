"""pipeline.models: ladder, offline guards, save/load, fingerprint, FLOP counting; the `aced model` CLI."""
from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

from pipeline import models as M


@pytest.fixture(scope="module")
def tiny():
    return M.create_model("aced-vit-t", seed=0)


def _batch(bundle, n=3):
    torch.manual_seed(0)
    return torch.randn(n, 3, bundle.image_size, bundle.image_size), bundle.tokenizer(
        ["a red circle", "two blue stars", "a small green cross above a white ring"][:n])


def test_bundle_contract(tiny):
    x, t = _batch(tiny)
    with torch.no_grad():
        u, v = tiny.encode_image(x), tiny.encode_text(t)
    assert u.shape == v.shape == (3, tiny.embed_dim)
    assert torch.allclose(u.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    # tokens are cut to the batch's longest caption, rounded up to 8 (exact for this causal tower)
    assert t.dtype == torch.long and t.shape == (3, 16) and tiny.context_length == 32
    cfg = tiny.config["model_cfg"]
    # logit_scale is exp(t) of the configured init; the bias is the configured one.
    assert tiny.logit_scale == pytest.approx(torch.tensor(cfg["init_logit_scale"]).exp().item(), rel=1e-6)
    assert tiny.logit_bias == pytest.approx(cfg["init_logit_bias"])
    # Preprocess: PIL -> normalised tensor at the model's size, no augmentation (deterministic).
    img = Image.new("RGB", (80, 64), (255, 0, 0))
    p1, p2 = tiny.preprocess(img), tiny.preprocess(img)
    assert p1.shape == (3, 64, 64) and torch.equal(p1, p2)


def test_seed_determines_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = M.create_model("aced-vit-t", seed=1)
    after = torch.rand(3)
    assert torch.equal(expected, after)  # creating a model does not consume the caller's RNG
    b = M.create_model("aced-vit-t", seed=1)
    c = M.create_model("aced-vit-t", seed=2)
    assert M.fingerprint(a) == M.fingerprint(b) != M.fingerprint(c)


def _meta_flops(name):
    # On the meta device nothing is allocated or initialised: shapes only, which is all that
    # parameter and FLOP counting need (checked against a real model below).
    with torch.device("meta"):
        return M.count_flops(M.create_model(name))


def test_ladder_strictly_increases(tiny):
    rows = [_meta_flops(n) for n in M.LADDER]
    assert rows[0] == M.count_flops(tiny)
    for small, big in zip(rows, rows[1:]):
        for key in ("params", "params_image", "params_text", "gflops_image", "gflops_text", "gflops_pair"):
            assert big[key] > small[key], (key, small, big)
    t = rows[0]
    assert 2e6 <= t["params"] <= 8e6  # the student is CPU-sized
    assert t["gflops_pair"] == pytest.approx(t["gflops_image"] + t["gflops_text"])


@pytest.mark.parametrize("name", ["aced-vit-s128", "aced-vit-s128-tt"])
def test_high_resolution_references(name, tiny):
    """The 128 px ladder variants (benchmarks/ladder.py): 128 px preprocessing, 64 patches of 16 px (the
    student's token count), unit embeddings, and larger than the student in every tower's FLOPs."""
    bundle = M.create_model(name, seed=0)
    assert bundle.image_size == 128 and bundle.config["model_cfg"]["vision_cfg"]["patch_size"] == 16
    assert bundle.preprocess(Image.new("RGB", (200, 150), (0, 0, 255))).shape == (3, 128, 128)
    x, t = _batch(bundle)
    with torch.no_grad():
        u, v = bundle.encode_image(x), bundle.encode_text(t)
    assert u.shape == v.shape == (3, 256)
    assert torch.allclose(u.norm(dim=-1), torch.ones(3), atol=1e-5)
    f, small = M.count_flops(bundle), M.count_flops(tiny)
    assert f["gflops_image"] > 5 * small["gflops_image"] and f["params"] > small["params"]


def test_flops_count_the_whole_forward(tiny):
    """aced-vit-t by hand: FLOPs = 2 x MACs of patch embedding, attention (projections and both
    matmuls), MLPs and output projections. Catches an uncounted fused attention op."""
    vc, tc, d = tiny.config["model_cfg"]["vision_cfg"], tiny.config["model_cfg"]["text_cfg"], tiny.embed_dim

    def tower(n, w, layers, mlp_ratio=4.0):
        per_layer = n * w * 3 * w + 2 * n * n * w + n * w * w + 2 * n * w * int(w * mlp_ratio)
        return layers * per_layer

    p = vc["patch_size"]
    n_img = (vc["image_size"] // p) ** 2
    img_macs = n_img * 3 * p * p * vc["width"] + tower(n_img + 1, vc["width"], vc["layers"]) + vc["width"] * d
    txt_macs = tower(tc["context_length"], tc["width"], tc["layers"]) + tc["width"] * d
    f = M.count_flops(tiny)
    assert f["gflops_image"] * 1e9 == pytest.approx(2 * img_macs, rel=1e-6)
    assert f["gflops_text"] * 1e9 == pytest.approx(2 * txt_macs, rel=1e-6)
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


def test_save_load_round_trip(tiny, tmp_path):
    x, t = _batch(tiny)
    out = M.save_model(tiny, tmp_path / "models" / "t")
    assert sorted(p.name for p in out.iterdir()) == sorted([M.CONFIG_FILE, M.WEIGHTS_FILE, M.ACED_FILE])
    meta = json.loads((out / M.ACED_FILE).read_text())
    assert meta["name"] == "aced-vit-t" and meta["fingerprint"] == M.fingerprint(tiny)
    assert meta["params"] == M.count_params(tiny)["params"] and meta["created"].endswith("Z")
    oc = json.loads((out / M.CONFIG_FILE).read_text())
    assert set(oc) == {"model_cfg", "preprocess_cfg"}
    loaded = M.load_model(out)
    assert M.fingerprint(loaded) == M.fingerprint(tiny) and loaded.name == "aced-vit-t"
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), tiny.encode_image(x))
        assert torch.equal(loaded.encode_text(t), tiny.encode_text(t))
    assert (loaded.logit_scale, loaded.logit_bias) == (tiny.logit_scale, tiny.logit_bias)
    # The folder also loads through the name argument and as pretrained= for the same architecture.
    assert M.fingerprint(M.create_model(str(out))) == M.fingerprint(tiny)
    assert M.fingerprint(M.create_model("aced-vit-t", pretrained=str(out))) == M.fingerprint(tiny)
    with pytest.raises(ValueError, match="not a 'aced-vit-s'"):
        M.create_model("aced-vit-s", pretrained=str(out))
    # open_clip itself reads the folder (its local-dir layout).
    import open_clip
    oc_model = open_clip.create_model(f"local-dir:{out}")
    with torch.no_grad():
        assert torch.allclose(oc_model.encode_image(x, normalize=True), tiny.encode_image(x), atol=1e-6)
    # Overwrite in place, only when asked: the new model replaces the old, nothing else is left beside it.
    other = M.create_model("aced-vit-t", seed=5)
    with pytest.raises(FileExistsError, match="--overwrite"):
        M.save_model(other, out)
    M.save_model(other, out, overwrite=True)
    assert M.fingerprint(M.load_model(out)) == M.fingerprint(other)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["t"]


def test_load_detects_tampering(tiny, tmp_path):
    out = M.save_model(tiny, tmp_path / "m")
    cfg = json.loads((out / M.CONFIG_FILE).read_text())
    cfg["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (out / M.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fingerprint"):
        M.load_model(out)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        M.load_model(tmp_path / "nothing")


def test_fingerprint_tracks_weights_and_preprocessing(tiny):
    bundle = M.create_model("aced-vit-t", seed=0)
    fp = M.fingerprint(bundle)
    assert fp == M.fingerprint(tiny) and len(fp) == 64
    with torch.no_grad():
        bundle.model.visual.conv1.weight[0, 0, 0, 0] += 1e-3
    fp2 = M.fingerprint(bundle)
    assert fp2 != fp
    with torch.no_grad():
        bundle.model.logit_bias.add_(1.0)  # a 0-dim parameter counts too
    fp3 = M.fingerprint(bundle)
    assert fp3 != fp2
    bundle.config["preprocess_cfg"] = {**bundle.config["preprocess_cfg"], "interpolation": "bilinear"}
    assert M.fingerprint(bundle) != fp3


@pytest.mark.parametrize("call", [
    lambda: M.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k"),
    lambda: M.create_model("aced-vit-t", pretrained="openai"),
    lambda: M.create_model("hf-hub:timm/ViT-B-16-SigLIP"),
    lambda: M.create_model("ViT-B-16-SigLIP"),        # its tokenizer lives on the HF hub
    lambda: M.create_model("roberta-ViT-B-32"),       # an HF text tower
])
def test_hub_names_fail_fast(call):
    t0 = time.perf_counter()
    with pytest.raises(M.HubAccessError, match="hub"):
        call()
    assert time.perf_counter() - t0 < 5.0


def test_hub_error_says_weights_must_be_local():
    with pytest.raises(M.HubAccessError, match="weights must be a local file"):
        M.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_unknown_names_and_missing_configs(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.create_model(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="lacks 'vision_cfg'"):
        M.create_model(str(bad))


def test_json_config_path(tmp_path):
    cfg = {"embed_dim": 32, "init_logit_scale": 1.0, "init_logit_bias": -3.0,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps(cfg))
    b = M.create_model(str(path), seed=3)
    assert b.name == "my-tiny" and b.image_size == 32 and b.context_length == 16 and b.embed_dim == 32
    assert b.logit_scale == pytest.approx(torch.e) and b.logit_bias == pytest.approx(-3.0)
    with torch.no_grad():
        assert b.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    # The local-dir layout ({"model_cfg", "preprocess_cfg"}) is accepted as a config file too.
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    w = M.create_model(str(wrapped), seed=3)
    assert w.config["preprocess_cfg"]["mean"] == [0.5] * 3
    assert M.fingerprint(w) != M.fingerprint(b)  # same weights, other preprocessing


def test_local_open_clip_checkpoint_loads(tmp_path, tiny):
    src = M.create_model("aced-vit-t", seed=7)
    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.model.state_dict().items()}}, ckpt)
    got = M.create_model("aced-vit-t", pretrained=str(ckpt))
    x, t = _batch(src)
    with torch.no_grad():
        assert torch.equal(got.encode_image(x), src.encode_image(x))
        assert torch.equal(got.encode_text(t), src.encode_text(t))
    assert M.fingerprint(got) == M.fingerprint(src)
    # A plain state dict and a safetensors file work too.
    plain = tmp_path / "plain.pt"
    torch.save(src.model.state_dict(), plain)
    assert M.fingerprint(M.create_model("aced-vit-t", pretrained=str(plain))) == M.fingerprint(src)
    from safetensors.torch import save_file
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(st))
    assert M.fingerprint(M.create_model("aced-vit-t", pretrained=str(st))) == M.fingerprint(src)
    # Weights of another architecture are refused, naming the file.
    with pytest.raises(ValueError, match="weights.pt: weights do not fit"):
        M.create_model("aced-vit-s", pretrained=str(ckpt))


def test_cli_info_and_create(tmp_path, capsys):
    from flows.cli import main

    assert main(["--root", str(tmp_path), "model", "create", "aced-vit-t", "--out", str(tmp_path / "m"),
                 "--seed", "4"]) == 0
    assert M.fingerprint(M.load_model(tmp_path / "m")) == M.fingerprint(M.create_model("aced-vit-t", seed=4))
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "model", "info", "aced-vit-t", str(tmp_path / "m"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["aced-vit-t"]["params"] == rows[str(tmp_path / "m")]["params"]
    assert rows["aced-vit-t"]["gflops_pair"] > 0
    assert main(["--root", str(tmp_path), "model", "info", "aced-vit-t"]) == 0
    table = capsys.readouterr().out
    assert "aced-vit-t" in table and "GFLOPs" in table
    # Default output folder: <root>/models/<name>.
    assert main(["--root", str(tmp_path), "model", "create", "aced-vit-t"]) == 0
    assert (tmp_path / "models" / "aced-vit-t" / M.WEIGHTS_FILE).is_file()
