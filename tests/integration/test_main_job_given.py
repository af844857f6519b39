"""The main job with a given reference and teacher (`aced run --reference ID --teacher ID`): weights on
disk -> `aced model import` -> the job caches them, trains only the student (the paper's method against
them) and reports them beside it; no reference/teacher training run exists.

In-process under Prefect's test harness at a micro size (one step, one student method), as
test_main_job.py's fast check; the imported models are tiny open_clip CLIPs with random weights, one as
an OpenAI-layout state dict (architecture inferred), one as an open_clip training checkpoint (--arch).
"""
from __future__ import annotations

import json
import time

import pytest
import torch

CLIP_CFG = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def _aced(*argv) -> int:
    from flows.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def given_job(tmp_path_factory, prefect_harness) -> dict:
    import open_clip

    from flows import main_job as mj

    tmp = tmp_path_factory.mktemp("given")
    root = tmp / "ws"
    torch.manual_seed(7)
    teacher = open_clip.CLIP(**CLIP_CFG).eval()
    torch.save(teacher.state_dict(), tmp / "openai-tiny.pt")  # OpenAI's key layout
    torch.manual_seed(8)
    reference = open_clip.CLIP(**CLIP_CFG).eval()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
               tmp / "epoch_1.pt")  # open_clip's training checkpoint
    (tmp / "tiny-clip.json").write_text(json.dumps(CLIP_CFG))
    assert _aced("--root", root, "model", "import", tmp / "openai-tiny.pt", "--name", "clip-teacher") == 0
    assert _aced("--root", root, "model", "import", tmp / "epoch_1.pt", "--arch", tmp / "tiny-clip.json",
                 "--name", "clip-ref") == 0

    mj.SIZES["micro-given"] = mj.JobSize(
        train_pairs=80, clean_pairs=32, test_pairs=16, per_class=1, noise_frac=0.5, reference_steps=1,
        teacher_steps=1, student_steps=1, batch_size=16, reference_batch_size=16, methods=("aced-acidistill",),
        num_workers=0)
    try:
        t0 = time.monotonic()
        rows = mj.main_job(str(root), size="micro-given", engine="plain", reference="clip-ref", teacher="clip-teacher")
        yield {"root": root, "rows": rows, "seconds": time.monotonic() - t0}
    finally:
        del mj.SIZES["micro-given"]


def test_given_reference_and_teacher_are_used_not_trained(given_job):
    from storage.cache import verify_cache

    root, rows = given_job["root"], given_job["rows"]
    assert list(rows) == ["reference", "teacher", "student-aced-acidistill"]
    assert not (root / "runs" / "reference").exists() and not (root / "runs" / "teacher").exists()
    for name in rows:
        assert 0.0 <= rows[name]["test-retrieval:mean_recall"] <= 1.0
        assert 0.0 <= rows[name]["colours-zeroshot:top1"] <= 1.0
    assert rows["teacher"]["noisy_frac_trained"] is None  # not trained here
    rep = verify_cache(root)
    assert rep.ok and rep.shards == 2, rep.format()
    assert (root / "cache" / "clip-ref").is_dir() and (root / "cache" / "clip-teacher").is_dir()
    cfg = json.loads((root / "runs" / "student-aced-acidistill" / "config.json").read_text())
    assert cfg["reference"] == "clip-ref" and cfg["teacher"] == ["clip-teacher"]
    report = (root / "report.md").read_text()
    assert "teacher: given model `clip-teacher`" in report and "reference: given model `clip-ref`" in report
    print(f"main job with given reference + teacher (micro, in-process): {given_job['seconds']:.1f} s")


def test_given_model_evaluation_is_reused(given_job):
    from flows.main_job import evaluate_given

    out = given_job["root"] / "evals" / "teacher"
    stamp = json.loads((out / "inputs.json").read_text())
    before = (out / "results.json").stat().st_mtime_ns
    again = evaluate_given.fn(stamp["model"], stamp["evals"], str(out))
    assert (out / "results.json").stat().st_mtime_ns == before  # not evaluated again
    assert again == json.loads((out / "results.json").read_text())


def test_an_unknown_given_model_fails_before_anything_runs(tmp_path):
    from flows.main_job import given_models

    with pytest.raises(FileNotFoundError, match="no-such-model"):
        given_models(str(tmp_path / "ws"), "no-such-model", None)
    assert not (tmp_path / "ws").exists()
