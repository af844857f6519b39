"""Pretrained models from where users keep them (pipeline/pretrained.py, `aced model import|info`).

Each source layout is built here with open_clip itself (random weights of a tiny architecture) and
laid out as that source does: a Hugging Face cache (models--org--name/{refs/main, blobs, snapshots}),
open_clip checkpoints (training {"state_dict"} with module. prefixes, a bare state dict, a config beside
it), OpenAI's layout (state dict and TorchScript archive) and a big_vision SigLIP .npz (the inverse of
open_clip's converter). The imported model's image and text embeddings must equal the source model's.
Every test runs with the network cut off: any non-loopback connect or name lookup raises.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.models as M  # noqa: F401 - sets HF_HUB_OFFLINE before open_clip is imported
import open_clip  # noqa: E402
from pipeline import pretrained as P  # noqa: E402

TEXTS = ["a photo of a cat", "two red dogs on the grass", "x"]

# OpenAI-compatible tiny CLIP: QuickGELU, heads = width / 64 (what OpenAI inference assumes).
CLIP_CFG = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
# SigLIP-style: timm ViT image tower (timm's test_vit: width 64, 6 blocks, 160 px), bidirectional text
# tower pooled at the last token with a biased linear head, learnable logit bias.
SIGLIP_CFG = {"embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
              "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                             "timm_pool": "token", "timm_proj": "none"},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                           "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}}
SIGLIP_PRE = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection or name lookup beyond this machine fails the test at once."""
    def local(host) -> bool:
        return str(host) in ("localhost", "127.0.0.1", "::1", "") or str(host).startswith("127.")

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            raise AssertionError(f"name lookup attempted: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, a: connect(self, a) or 0)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


def source_clip(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**{k: v for k, v in CLIP_CFG.items()}).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    return model


def source_siglip(seed: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in SIGLIP_CFG.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.5)
    return model


def assert_same_embeddings(bundle, source: torch.nn.Module, image_size: int) -> None:
    """The imported bundle embeds images and texts (through its own tokenizer) as the source model does."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, image_size, image_size, generator=g)
    tokens = open_clip.tokenize(TEXTS, context_length=16)
    with torch.no_grad():
        want_i, want_t = source.encode_image(images, normalize=True), source.encode_text(tokens, normalize=True)
        got_i, got_t = bundle.encode_image(images), bundle.encode_text(bundle.tokenizer(TEXTS))
    assert got_i.shape == want_i.shape and got_t.shape == want_t.shape
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-5)
    assert abs(bundle.logit_scale - float(source.logit_scale.exp())) < 1e-4


def config_file(folder: Path, model_cfg: dict, preprocess_cfg: dict | None = None, name: str = "open_clip_config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"model_cfg": model_cfg, **({"preprocess_cfg": preprocess_cfg} if preprocess_cfg else {})}))
    return path


# ---------------------------------------------------------------------------- Hugging Face cache

def fill_hf_cache(cache: Path, repo: str, files: dict[str, bytes], revision: str = "a" * 40) -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshots/<rev>/<file> symlinks, refs/main."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / revision
    (folder / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


def weights_bytes(model: torch.nn.Module, kind: str) -> bytes:
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if kind == "safetensors":
        from safetensors.torch import save

        return save(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_hf_hub_model_from_the_local_cache(hf_cache, weights):
    source = source_siglip()
    cfg = json.dumps({"model_cfg": SIGLIP_CFG, "preprocess_cfg": SIGLIP_PRE}).encode()
    fill_hf_cache(hf_cache, "acme/tiny-siglip",
                  {"open_clip_config.json": cfg, weights: weights_bytes(source, weights.rsplit(".")[-1])})
    bundle = M.create_model("hf-hub:acme/tiny-siglip")
    assert_same_embeddings(bundle, source, 160)
    assert bundle.config["preprocess_cfg"]["mean"] == [0.5] * 3 and bundle.config["preprocess_cfg"]["resize_mode"] == "squash"
    assert abs(bundle.logit_bias - -7.5) < 1e-6
    assert M.model_config("hf-hub:acme/tiny-siglip") == SIGLIP_CFG


def test_open_clip_reads_the_same_cache_layout(hf_cache):
    """The layout built above is the one open_clip itself loads hf-hub: names from, offline."""
    source = source_clip()
    fill_hf_cache(hf_cache, "acme/tiny-clip", {"open_clip_config.json": json.dumps({"model_cfg": CLIP_CFG}).encode(),
                                              "open_clip_model.safetensors": weights_bytes(source, "safetensors")})
    theirs = open_clip.create_model("hf-hub:acme/tiny-clip", cache_dir=str(hf_cache)).eval()
    ours = P.import_model("hf-hub:acme/tiny-clip").bundle
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.model.state_dict()[key], value), key
    assert_same_embeddings(ours, source, 32)


def test_hub_model_missing_from_the_cache_names_the_expected_path(hf_cache):
    with pytest.raises(M.HubAccessError) as err:
        M.create_model("hf-hub:acme/absent")
    msg = str(err.value)
    assert str(hf_cache / "models--acme--absent") in msg and "runs offline" in msg
    fill_hf_cache(hf_cache, "acme/no-weights", {"open_clip_config.json": json.dumps({"model_cfg": CLIP_CFG}).encode()})
    with pytest.raises(M.HubAccessError, match="none of open_clip_model.safetensors"):
        M.create_model("hf-hub:acme/no-weights")


def test_hf_tokenizer_is_local_or_refused(hf_cache):
    """A config naming a Hugging Face tokenizer builds only when its files are in the cache (and
    transformers can read them); otherwise a clear refusal before any weights are allocated."""
    cfg = {**CLIP_CFG, "text_cfg": {**CLIP_CFG["text_cfg"], "hf_tokenizer_name": "acme/tok"}}
    with pytest.raises(M.HubAccessError, match=r"tokenizer of hf-hub:acme/tok is not in the local Hugging Face cache"):
        M._build("x", cfg, None, seed=0)
    fill_hf_cache(hf_cache, "acme/tok", {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(M.HubAccessError, match="needs the `transformers` package"):
            M._build("x", cfg, None, seed=0)


# ---------------------------------------------------------------------------- open_clip checkpoints

def test_open_clip_training_checkpoint_with_arch(tmp_path):
    source = source_clip()
    arch = config_file(tmp_path / "cfg", CLIP_CFG, name="tiny.json")
    ckpt = tmp_path / "epoch_3.pt"  # what open_clip's training loop writes
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    got = P.import_model(str(ckpt), arch=str(arch), name="mine")
    assert got.bundle.name == "mine" and got.source["kind"] == "open_clip"
    assert_same_embeddings(got.bundle, source, 32)
    with pytest.raises(ValueError, match="training checkpoint names no architecture; pass --arch"):
        P.import_model(str(ckpt))


def test_bare_state_dict_with_its_config_beside_it(tmp_path):
    source = source_siglip()
    folder = tmp_path / "exported"
    config_file(folder, SIGLIP_CFG, SIGLIP_PRE)
    torch.save(source.state_dict(), folder / "weights.bin")
    got = P.import_model(str(folder / "weights.bin"))
    assert_same_embeddings(got.bundle, source, 160)
    assert got.bundle.config["preprocess_cfg"]["std"] == [0.5] * 3
    # the folder itself is open_clip's local-dir layout once the weights carry open_clip's name
    (folder / "weights.bin").rename(folder / "open_clip_pytorch_model.bin")
    assert_same_embeddings(P.import_model(str(folder)).bundle, source, 160)


# ---------------------------------------------------------------------------- OpenAI

def test_openai_state_dict_arch_inferred(tmp_path):
    source = source_clip()
    path = tmp_path / "ViT-tiny.pt"
    torch.save(source.state_dict(), path)
    got = P.import_model(str(path))
    assert got.source["kind"] == "openai" and got.source["layout"] == "torch"
    assert got.bundle.config["model_cfg"] == CLIP_CFG  # read off the shapes
    assert_same_embeddings(got.bundle, source, 32)
    assert "QuickGELU" in P.describe(got)


def test_openai_torchscript_archive_read_without_running_it(tmp_path):
    source = source_clip()
    images, tokens = torch.zeros(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.long)
    traced = torch.jit.trace_module(source, {"forward": (images, tokens), "encode_image": (images,),
                                             "encode_text": (tokens,)})
    path = tmp_path / "ViT-tiny-jit.pt"
    traced.save(str(path))
    with pytest.raises(RuntimeError, match="weights_only"):  # why the archive needs its own reader
        torch.load(path, weights_only=True)
    got = P.import_model(str(path))
    assert got.source["layout"] == "torchscript"
    assert_same_embeddings(got.bundle, source, 32)
    # the same archive as weights of a named architecture
    arch = config_file(tmp_path / "cfg", CLIP_CFG, name="tiny.json")
    assert_same_embeddings(M.create_model(str(arch), pretrained=str(path)), source, 32)


def test_a_planted_torchscript_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"weight": Payload()}, protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(ValueError, match=r"unreadable TorchScript archive: refusing (io|builtins)\.open"):
        P.import_model(str(path))
    assert not marker.exists()


# ---------------------------------------------------------------------------- big_vision

def _qkv_kernels(weight: torch.Tensor, bias: torch.Tensor, heads: int) -> dict[str, np.ndarray]:
    """Inverse of the converter's query/key/value reading: kernel [D, H, hd], bias [H, hd]."""
    d = weight.shape[1]
    out = {}
    for i, n in enumerate(("query", "key", "value")):
        w = weight[i * d:(i + 1) * d]
        out[f"{n}/kernel"] = w.T.reshape(d, heads, d // heads).numpy()
        out[f"{n}/bias"] = bias[i * d:(i + 1) * d].reshape(heads, d // heads).numpy()
    return out


def _block(prefix: str, ln1, attn_w, attn_b, out_w, out_b, ln2, fc1, fc2, heads: int) -> dict[str, np.ndarray]:
    d = attn_w.shape[1]
    w = {f"{prefix}LayerNorm_0/scale": ln1.weight, f"{prefix}LayerNorm_0/bias": ln1.bias,
         f"{prefix}LayerNorm_1/scale": ln2.weight, f"{prefix}LayerNorm_1/bias": ln2.bias,
         f"{prefix}MultiHeadDotProductAttention_0/out/kernel": out_w.reshape(d, heads, d // heads).permute(1, 2, 0),
         f"{prefix}MultiHeadDotProductAttention_0/out/bias": out_b,
         f"{prefix}MlpBlock_0/Dense_0/kernel": fc1.weight.T, f"{prefix}MlpBlock_0/Dense_0/bias": fc1.bias,
         f"{prefix}MlpBlock_0/Dense_1/kernel": fc2.weight.T, f"{prefix}MlpBlock_0/Dense_1/bias": fc2.bias}
    out = {k: v.detach().numpy() for k, v in w.items()}
    out.update({f"{prefix}MultiHeadDotProductAttention_0/{k}": v
                for k, v in _qkv_kernels(attn_w.detach(), attn_b.detach(), heads).items()})
    return out


def big_vision_arrays(model) -> dict[str, np.ndarray]:
    """A SigLIP model as big_vision saves it (params/img, params/txt, params/t, params/b): the exact
    inverse of open_clip.convert.load_big_vision_weights for a timm ViT + open_clip text tower."""
    trunk, text = model.visual.trunk, model.text
    w: dict[str, np.ndarray] = {}
    img = "params/img/"
    w[img + "embedding/kernel"] = trunk.patch_embed.proj.weight.detach().permute(2, 3, 1, 0).numpy()
    w[img + "embedding/bias"] = trunk.patch_embed.proj.bias.detach().numpy()
    w[img + "cls"] = trunk.cls_token.detach().numpy()
    w[img + "pos_embedding"] = trunk.pos_embed.detach().numpy()
    for i, b in enumerate(trunk.blocks):
        w.update(_block(f"{img}Transformer/encoderblock_{i}/", b.norm1, b.attn.qkv.weight, b.attn.qkv.bias,
                        b.attn.proj.weight.detach(), b.attn.proj.bias, b.norm2, b.mlp.fc1, b.mlp.fc2, b.attn.num_heads))
    w[img + "Transformer/encoder_norm/scale"] = trunk.norm.weight.detach().numpy()
    w[img + "Transformer/encoder_norm/bias"] = trunk.norm.bias.detach().numpy()
    txt = "params/txt/"
    w[txt + "Embed_0/embedding"] = text.token_embedding.weight.detach().numpy()
    w[txt + "pos_embedding"] = text.positional_embedding.detach()[None].numpy()
    for i, b in enumerate(text.transformer.resblocks):
        w.update(_block(f"{txt}Encoder_0/encoderblock_{i}/", b.ln_1, b.attn.in_proj_weight, b.attn.in_proj_bias,
                        b.attn.out_proj.weight.detach(), b.attn.out_proj.bias, b.ln_2, b.mlp.c_fc, b.mlp.c_proj,
                        b.attn.num_heads))
    w[txt + "Encoder_0/encoder_norm/scale"] = text.ln_final.weight.detach().numpy()
    w[txt + "Encoder_0/encoder_norm/bias"] = text.ln_final.bias.detach().numpy()
    w[txt + "head/kernel"] = text.text_projection.weight.detach().T.numpy()
    w[txt + "head/bias"] = text.text_projection.bias.detach().numpy()
    w["params/t"] = model.logit_scale.detach().reshape(1).numpy()
    w["params/b"] = model.logit_bias.detach().reshape(1).numpy()
    return w


def test_big_vision_npz(tmp_path):
    source = source_siglip()
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_arrays(source))
    arch = config_file(tmp_path / "cfg", SIGLIP_CFG, SIGLIP_PRE, name="tiny-siglip.json")
    got = P.import_model(str(path), arch=str(arch), name="sig")
    assert got.source["kind"] == "big_vision"
    assert_same_embeddings(got.bundle, source, 160)
    assert abs(got.bundle.logit_bias - -7.5) < 1e-6
    with pytest.raises(ValueError, match="pass --arch"):
        P.import_model(str(path))


def test_big_vision_npz_refusals(tmp_path):
    arrays = big_vision_arrays(source_siglip())
    arch = str(config_file(tmp_path / "cfg", SIGLIP_CFG, name="tiny-siglip.json"))
    lacking = tmp_path / "lacking.npz"
    np.savez(lacking, **{k: v for k, v in arrays.items() if k != "params/txt/head/bias"})
    with pytest.raises(ValueError, match="weights do not fit"):
        P.import_model(str(lacking), arch=arch)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **arrays, extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="never loaded"):
        P.import_model(str(pickled), arch=arch)


# ---------------------------------------------------------------------------- aced model import / info

def _aced(capsys, *argv) -> tuple[int, str, str]:
    from flows.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_aced_model_import_and_info(tmp_path, capsys, hf_cache):
    root = tmp_path / "ws"
    source = source_siglip()
    fill_hf_cache(hf_cache, "acme/tiny-siglip", {
        "open_clip_config.json": json.dumps({"model_cfg": SIGLIP_CFG, "preprocess_cfg": SIGLIP_PRE}).encode(),
        "open_clip_model.safetensors": weights_bytes(source, "safetensors")})
    rc, out, err = _aced(capsys, "--root", root, "model", "import", "hf-hub:acme/tiny-siglip", "--name", "teacher-sig")
    assert rc == 0, err
    assert "from the local cache" in out and "teacher-sig" in out
    folder = root / "models" / "teacher-sig"
    meta = json.loads((folder / "aced_model.json").read_text())
    assert meta["source"]["kind"] == "hf-hub" and meta["source"]["revision"] == "a" * 40
    assert meta["tokenizer"] == {"kind": "open_clip-bpe"} and meta["image_size"] == 160
    assert_same_embeddings(M.load_model(folder), source, 160)  # what `aced cache --models teacher-sig` loads

    rc, out, err = _aced(capsys, "--root", root, "model", "info", "teacher-sig", "--json")
    assert rc == 0, err
    row = json.loads(out)["teacher-sig"]
    assert row["params"] == sum(p.numel() for p in source.parameters()) and row["gflops_image"] > 0
    assert row["fingerprint"] == meta["fingerprint"]

    # a second import under the same name is refused without --overwrite
    rc, _, err = _aced(capsys, "--root", root, "model", "import", str(tmp_path / "nothing.pt"), "--name", "teacher-sig")
    assert rc == 1 and "no such file" in err
    torch.save(source_clip().state_dict(), tmp_path / "clip.pt")
    rc, _, err = _aced(capsys, "--root", root, "model", "import", tmp_path / "clip.pt", "--name", "teacher-sig")
    assert rc == 1 and "--overwrite" in err
    rc, out, err = _aced(capsys, "--root", root, "model", "import", tmp_path / "clip.pt", "--name", "teacher-sig",
                         "--overwrite")
    assert rc == 0 and "OpenAI CLIP torch checkpoint" in out, err
    rc, _, err = _aced(capsys, "--root", root, "model", "import", "hf-hub:acme/absent", "--name", "x")
    assert rc == 1 and "models--acme--absent" in err and len(err.strip().splitlines()) == 1
