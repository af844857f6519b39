"""scripts/gpu_check.sh / benchmarks/gpu_check.py on a CPU: what can run here does.

The GPU sizes are checked as data (the issue's B, d, dtypes, the ViT-B/16 student at 224 px), the script
refuses clearly without CUDA, and --cpu-smoke runs the same section code at tiny sizes: the Triton kernel
under the interpreter against the PyTorch reference, the ACID/IID step functions, and (slow) torchrun with
two gloo ranks plus the trainer's W = 2 vs one-process equality check.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SHELL = REPO / "scripts" / "gpu_check.sh"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_check


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --cpu-smoke
    return env


def _smoke(tmp_path: Path, *sections: str, via_shell: bool = False) -> dict:
    cmd = (["bash", str(SHELL)] if via_shell else [sys.executable, str(SCRIPT)]) + ["--cpu-smoke", "--sections",
                                                                                  *sections, "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "| section | check | result | pass |" in out.stdout  # the table is printed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cpu_smoke"] is True
    return report


def test_gpu_sizes_are_the_issues():
    g = _load()
    s = g.Sizes(smoke=False)
    assert max(s.kernel_B) == 163_840 and sorted(s.kernel_d) == [256, 768]
    assert s.kernel_dtypes == ["float32", "bfloat16"] and s.kernel_k == 2048
    assert s.select == dict(B=163_840, b=32_768, n_chunks=16, d=768)
    assert set(s.step_models) == {"aced-vit-t", g.VIT_B16}
    assert s.ddp["device"] == "cuda" and s.ddp["world"] is None  # every visible GPU
    # the smoke sizes stay inside the interpreter's safe range (B <= 256, no bf16)
    t = g.Sizes(smoke=True)
    assert max(t.kernel_B) <= 256 and "bfloat16" not in t.kernel_dtypes and t.select["B"] <= 256


def test_vit_b16_student_is_vit_b16_at_224():
    import open_clip

    import pipeline.models  # noqa: F401  (registers pipeline/model_configs)

    g = _load()
    ours, theirs = open_clip.get_model_config(g.VIT_B16), open_clip.get_model_config("ViT-B-16")
    assert ours["vision_cfg"] == {**theirs["vision_cfg"], "head_width": 64, "mlp_ratio": 4.0}
    assert ours["vision_cfg"]["image_size"] == 224 and ours["vision_cfg"]["patch_size"] == 16
    assert (ours["text_cfg"]["layers"], ours["text_cfg"]["width"]) == (12, 512)
    assert ours["init_logit_bias"] == -10.0  # the sigmoid loss and selection need a bias; ViT-B-16 has none
    assert "init_logit_bias" not in theirs


def test_without_cuda_it_refuses_clearly():
    out = subprocess.run([sys.executable, str(SCRIPT), "--sections", "kernel"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "CUDA is not available" in out.stderr and "--cpu-smoke" in out.stderr
    if shutil.which("nvidia-smi") is None:
        sh = subprocess.run(["bash", str(SHELL)], cwd=REPO, env={**_env(), "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=60)
        assert sh.returncode == 2 and "nvidia-smi not found" in sh.stderr


def test_missing_packages_are_named(monkeypatch):
    g = _load()
    monkeypatch.setitem(g.NEEDS, "kernel", ("torch", "surely_not_a_module_xyz"))
    assert g.missing_modules("kernel") == ["surely_not_a_module_xyz"]


def test_cpu_smoke_kernel_parity_and_step(tmp_path):
    report = _smoke(tmp_path, "kernel", "step")
    rows = report["rows"]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    parity = [r for r in rows if r["check"].startswith("cond scores")]
    assert len(parity) == 4 and all(r["rel_err"] <= r["tol"] for r in parity)  # d 256/768 x fp32/fp16
    assert any("backend=triton" in r["check"] for r in rows) and any("backend=torch" in r["check"] for r in rows)
    env = rows[0]
    assert env["triton_interpreter"] is True  # the kernel ran interpreted, not the torch path twice
    step = [r for r in rows if r["section"] == "step" and "ratio" in r]
    assert len(step) == 1 and step[0]["ratio"] > 1.0  # an ACID step scores B candidates more than an IID step
    assert set(step[0]["seconds"]) == {"acid score", "acid select", "acid train", "acid step", "iid step"}


@pytest.mark.slow
def test_cpu_smoke_everything_through_the_shell_script(tmp_path):
    """~2 min on 2 shared cores: torchrun with 2 gloo ranks twice (probe, trainer) and a one-process run."""
    report = _smoke(tmp_path, "kernel", "step", "ddp", via_shell=True)
    rows = report["rows"]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    ddp = [r for r in rows if r["section"] == "ddp"]
    assert "gloo: all_reduce + all_gather correct" in ddp[0]["result"]
    eq = ddp[1]
    assert eq["loss_rel_err"] <= 1e-4 and eq["weight_rel_diff"] <= 1e-3
    losses = list(eq["losses"].values())
    assert len(losses) == 2 and len(losses[0]) == 3
