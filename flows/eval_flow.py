"""Prefect flow: evaluate a saved model (paper section 4.1: zero-shot classification, retrieval).

load -> `pipeline.evaluate.evaluate` -> results.json + results.md (+ CLIP_benchmark result files in
clip_benchmark/) in an out dir, and the same Markdown table as a Prefect artifact (visible in the UI under the flow run). The metrics and the
table format live in `pipeline.evaluate`.
"""
from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.evaluate import evaluate, format_markdown, write_clip_benchmark, write_results


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model_dir: str, evals: dict, batch_size: int, device: str, faiss_device: str) -> dict:
    from pipeline.models import load_model, resolve_device

    bundle = load_model(Path(model_dir))
    bundle.model.to(resolve_device(device))
    return evaluate(bundle, {name: tuple(spec) for name, spec in evals.items()}, batch_size=batch_size,
                    faiss_device=faiss_device)


@task(name="write-results", cache_policy=NO_CACHE)
def write_task(results: dict, out_dir: str, model_id: str) -> list[str]:
    bench = write_clip_benchmark(results, Path(out_dir) / "clip_benchmark", model=results["model"], pretrained=model_id)
    return [str(p) for p in write_results(results, out_dir)] + [str(p) for p in bench]


@task(name="results-artifact", cache_policy=NO_CACHE)
def artifact_task(results: dict, model_id: str) -> None:
    # artifact keys: lowercase letters, digits and dashes only
    key = "eval-" + (re.sub(r"[^a-z0-9-]+", "-", model_id.lower()).strip("-") or "model")
    create_markdown_artifact(markdown=format_markdown(results), key=key,
                             description=f"evaluation of {model_id}")


@flow(name="eval")
def eval_flow(model_dir: str, evals: dict, out_dir: str | None = None, *, batch_size: int = 256,
              device: str = "auto", faiss_device: str = "auto") -> dict:
    """Evaluate `model_dir` on `evals` = {name: [kind, dataset_dir]} with kind "zeroshot" or "retrieval"
    (or [kind, dataset_dir, {"classnames": set, "templates": set}], standard sets for a zero-shot set).

    Writes results.json, results.md and clip_benchmark/*.json (CLIP_benchmark's result schema) to
    `out_dir` (default `<model_dir>/eval`) and publishes the
    table as the artifact `eval-<model id>`. Returns the results dict of `pipeline.evaluate.evaluate`.
    """
    if not evals:
        raise ValueError("eval_flow: no evaluations given")
    model_dir = str(Path(model_dir))
    out = out_dir or str(Path(model_dir) / "eval")
    results = evaluate_task(model_dir, evals, batch_size, device, faiss_device)
    paths = write_task(results, out, Path(model_dir).name)
    artifact_task(results, Path(model_dir).name)
    get_run_logger().info("results: %s; headline: %s", ", ".join(paths), results["headline"])
    return results
