"""Issue 10 item 1: cheaper step inputs with the same results.

Text at the batch's length (exact for causal, end-of-text-pooled towers), and in groups of similar length
(the same embeddings), uint8 pixels normalised on the device (exactly torchvision's ToTensor + Normalize),
the bf16 scoring copy of the student (follows its weights), selection knobs nested in TrainConfig (old flat
names still read), selection records every k steps or sampled."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models import (TrimmingTokenizer, caption_lengths, create_model, encode_text_by_length,
                             exact_short_text, trim_tokens)
from pipeline.recipes import TrainConfig, recipe
from pipeline.selection import SelectionConfig

CAPTIONS = ["a red circle", "two small blue stars above a large green square on the left side of it",
            "x", "an orange triangle next to a purple hexagon"]


def _custom_text_cfg(tmp_path, **text):
    cfg = json.loads((__import__("pathlib").Path(__file__).resolve().parents[2] / "pipeline" / "model_configs"
                      / "aced-vit-t.json").read_text())
    cfg["custom_text"] = True
    cfg["text_cfg"].update(text)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("kind", ["clip", "custom_text"])
def test_text_at_the_batch_length_equals_the_full_context(tmp_path, kind):
    bundle = create_model("aced-vit-t" if kind == "clip" else _custom_text_cfg(tmp_path), seed=3)
    assert isinstance(bundle.tokenizer, TrimmingTokenizer)
    full = bundle.tokenizer.inner(CAPTIONS)
    short = bundle.tokenizer(CAPTIONS)
    assert full.shape[1] == 32 and short.shape[1] == 24 and short.shape[1] % 8 == 0  # longest caption: 17 tokens
    assert torch.equal(short, full[:, :24]) and not full[:, 24:].any()
    with torch.no_grad():
        a = bundle.model.encode_text(full, normalize=True)
        b = bundle.model.encode_text(short, normalize=True)
        c = bundle.model.encode_text(full[:, :8], normalize=True)  # cut mid-caption: no longer the same text
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert not torch.allclose(c, a, atol=1e-3)


def test_a_tower_that_sees_the_padding_gets_the_full_context(tmp_path):
    """Non-causal attention (or last-token pooling) makes the padding part of the embedding: there the
    short tokens are padded back, so the result is still the full-context one."""
    bundle = create_model(_custom_text_cfg(tmp_path, no_causal_mask=True, pool_type="argmax"), seed=1)
    assert not exact_short_text(bundle.model.text)
    full = bundle.tokenizer.inner(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.encode_text(full[:, :24]), bundle.model.encode_text(full),
                                   rtol=0, atol=0)


LONG_CAPTIONS = [" ".join(["red", "circle", "above", "a", "blue", "star"][: 1 + i % 6] * (1 + i % 3)) for i in range(37)]


@pytest.mark.parametrize("kind", ["clip", "custom_text"])
def test_text_grouped_by_length_equals_one_forward_at_the_batch_length(tmp_path, kind):
    """encode_text_by_length sorts the captions by length, runs each chunk at its own longest caption and
    puts the rows back: the same embeddings as one forward over the batch (float rounding of another
    batch shape aside), in the input order, whatever the chunk size."""
    bundle = create_model("aced-vit-t" if kind == "clip" else _custom_text_cfg(tmp_path), seed=3)
    tokens = bundle.tokenizer(LONG_CAPTIONS)
    lengths = caption_lengths(tokens)
    assert lengths.min() < 6 and lengths.max() > 16  # chunks of very different lengths
    embedding = (bundle.model if kind == "clip" else bundle.model.text).token_embedding
    seen = []
    with torch.no_grad():
        want = bundle.model.encode_text(tokens, normalize=True)
        for rows, multiple in ((5, 1), (8, 8), (64, 1)):
            seen.clear()
            hook = embedding.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
            got = encode_text_by_length(bundle.model, tokens, rows=rows, multiple=multiple)
            hook.remove()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert [r for r, _ in seen] == [min(rows, len(tokens) - i) for i in range(0, len(tokens), rows)]
            widths = [w for _, w in seen]
            assert widths == sorted(widths) and all(w % multiple == 0 or w == tokens.shape[1] for w in widths)
            if rows < len(tokens):
                assert widths[0] < tokens.shape[1]  # the short captions ran at their own length
        assert torch.equal(bundle.encode_text(tokens), encode_text_by_length(bundle.model, tokens, rows=64))


def test_caption_lengths_count_up_to_the_end_of_text_token():
    t = torch.zeros(3, 10, dtype=torch.long)
    t[0, :4] = torch.tensor([49406, 5, 6, 49407])
    t[1, :2] = torch.tensor([49406, 49407])
    assert caption_lengths(t).tolist() == [4, 2, 0]


def test_a_tower_that_sees_the_padding_is_not_grouped_by_length(tmp_path):
    bundle = create_model(_custom_text_cfg(tmp_path, no_causal_mask=True, pool_type="argmax"), seed=1)
    full = bundle.tokenizer.inner(LONG_CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(encode_text_by_length(bundle.model, full, rows=7),
                                   bundle.model.encode_text(full, normalize=True), rtol=0, atol=1e-6)


def test_bf16_scoring_copy_follows_the_students_weights_and_stays_close_to_float32():
    """The bf16 scoring forward runs a bf16 copy of the student, refreshed at every call: after a
    change of the student's weights it scores with the new ones; its embeddings stay within bf16
    rounding of the float32 ones (the trained model itself is never cast)."""
    from pipeline.data import SuperBatch
    from pipeline.trainer import score_superbatch, scoring_model

    bundle = create_model("aced-vit-t", seed=0)
    model = bundle.model.train()
    torch.manual_seed(0)
    n = 11
    sb = SuperBatch(step=0, images=torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8),
                    tokens=bundle.tokenizer(LONG_CAPTIONS[:n]), uids=np.arange(n).astype(str).astype(object),
                    noisy=torch.zeros(n, dtype=torch.bool), reference=None, teachers=[])
    assert scoring_model(model, torch.float32) is model
    for resolution in (None, 32):
        fp32 = score_superbatch(bundle, sb, resolution=resolution, chunk=4)
        bf16 = score_superbatch(bundle, sb, resolution=resolution, chunk=4, dtype=torch.bfloat16)
        for a, b in zip(fp32, bf16):
            assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
            assert (a - b.float()).abs().max() < 2e-2 and (a - b.float()).abs().mean() < 2e-3
    before = score_superbatch(bundle, sb, resolution=None, chunk=4)
    copy = scoring_model(model, torch.bfloat16)
    assert copy is not model and scoring_model(model, torch.bfloat16) is copy  # one copy per model
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        model.visual.proj.mul_(-1.0)  # the student's weights change (an optimizer step, in place)
        model.text_projection.mul_(-1.0)
    new_fp32 = score_superbatch(bundle, sb, resolution=None, chunk=4)
    new_bf16 = score_superbatch(bundle, sb, resolution=None, chunk=4, dtype=torch.bfloat16)
    for a, b, old in zip(new_fp32, new_bf16, before):
        assert (a - old).abs().max() > 0.1  # the change matters ...
        assert (a - b.float()).abs().max() < 2e-2  # ... and the copy scored with the new weights


def test_trim_tokens_rounds_up_and_keeps_empty_batches():
    t = torch.zeros(3, 77, dtype=torch.long)
    t[0, :5] = 7
    assert trim_tokens(t).shape == (3, 8)
    t[1, :9] = 7
    assert trim_tokens(t).shape == (3, 16)
    assert trim_tokens(torch.zeros(2, 77, dtype=torch.long)).shape == (2, 8)
    assert trim_tokens(torch.ones(2, 12, dtype=torch.long)).shape == (2, 12)  # capped at the context


def test_uint8_pixels_normalised_on_the_device_equal_the_float_preprocessing():
    bundle = create_model("aced-vit-t")
    rng = np.random.default_rng(0)
    for size in ((50, 70), (64, 64), (200, 31)):
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        pixels = bundle.pixels(im)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
        assert torch.equal(bundle.normalize(pixels[None]), bundle.preprocess(im)[None])


def test_selection_knobs_are_nested_and_old_flat_names_still_read(tmp_path):
    cfg = recipe("tiny", method="h-acid", train_data=("d",), reference="r", cache_root="c", tau=3.0, n_chunks=2)
    assert cfg.selection == SelectionConfig(rule="learnability", n_chunks=2, tau=3.0)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = {**json.loads(cfg.to_json()), "tau": 3.0, "n_chunks": 2, "topk": False, "kernel_backend": "torch",
           "log_selections": False}
    del old["selection"], old["selection_log_every"]
    legacy = TrainConfig.from_dict(old)  # a config.json written before the nesting
    assert legacy.selection.backend == "torch" and legacy.selection_log_every == 0
    assert legacy.identity() == cfg.identity()  # backend and logging are execution settings
    rho = recipe("tiny", method="rho-topk", train_data=("d",), reference="r", cache_root="c")
    assert rho.selection.rule == "independent_learnability"  # the method decides the rule
    with pytest.raises(ValueError, match="n_chunks"):
        recipe("tiny", method="h-acid", train_data=("d",), reference="r", cache_root="c", n_chunks=17)


def test_cli_set_reaches_the_nested_selection(tmp_path):
    import argparse

    from flows.cmd_train import config_from_args

    data = tmp_path / "datasets" / "d"
    data.mkdir(parents=True)
    (data / "_dataset.json").write_text("{}")
    args = argparse.Namespace(root=tmp_path, recipe="tiny", config=None, method="h-acid", model=None, steps=None,
                              batch_size=None, seed=None, reference="r", init_from=None, data=["d"], teacher=None,
                              zeroshot=None, retrieval=None,
                              set=["tau=2.5", "selection.topk=true", "kernel_backend=torch", "selection_log_rows=7"])
    cfg = config_from_args(args)
    assert (cfg.selection.tau, cfg.selection.topk, cfg.selection.backend) == (2.5, True, "torch")
    assert cfg.selection_log_rows == 7
    args.set = ["selection.rule=student_loss"]
    with pytest.raises(SystemExit, match="expected FIELD=VALUE"):
        config_from_args(args)
