"""Prefect flow for stage 2: train (resuming), evaluate, publish a table, training curves and the HTML report.

train -> evaluate -> publish (Markdown artifact + curves) -> html report (a link artifact to the run's
report.html: what the curation selected, pipeline/html_report.py). The trainer owns resumption (its
run folder's latest checkpoint), so re-running a crashed or cancelled flow run with the same run folder
continues from the last checkpoint instead of starting over; Prefect's result caching is off for the
same reason as in the cache flow: the run folder, not Prefect, says what is done.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.evaluate import evaluate, write_results
from pipeline.html_report import write_html_report
from pipeline.models import load_model
from pipeline.recipes import TrainConfig
from pipeline.report import markdown_table, plot_runs, read_metrics, summary_metrics
from pipeline.trainer import train
from storage.atomic import atomic_write_bytes

_CURVE_KEYS = ("contrastive", "kd", "total", "noisy_frac_selected", "noisy_frac_superbatch", "pairs_per_s")


@task(name="train", cache_policy=NO_CACHE)
def train_task(config: dict, run_dir: str) -> str:
    cfg = TrainConfig.from_dict(config)
    logger = get_run_logger()
    latest = Path(run_dir) / "checkpoints" / "latest"
    if latest.exists():
        logger.info("resuming %s from %s", run_dir, latest.read_text().strip())
    result = train(cfg, Path(run_dir), progress=False)
    logger.info("trained %s to step %d", run_dir, result.step)
    return str(result.model_dir)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model_dir: str, evals: dict[str, list], out_dir: str) -> dict:
    results = evaluate(load_model(model_dir), {name: tuple(spec) for name, spec in evals.items()})
    write_results(results, Path(out_dir))
    return results


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(run_dir: str, results: dict) -> str:
    """Markdown table of final metrics + PNG of the curves, as Prefect artifacts and files in the run folder."""
    run = Path(run_dir)
    table = read_metrics(run).to_pydict()
    # None (unknown noise) stays in: the table says n/a rather than leaving the column out.
    last = {k: table[k][-1] for k in _CURVE_KEYS if k in table}
    flat = summary_metrics(results) if results else {}
    md = ["## " + run.name, "", "Final training step", "", markdown_table({run.name: last}), ""]
    if flat:
        md += ["Evaluation", "", markdown_table({run.name: flat}), ""]
    png = plot_runs({run.name: run}, run / "curves.png",
                    evals={run.name: flat} if flat else None)
    md += [f"Curves: `{png}`"]
    text = "\n".join(md)
    atomic_write_bytes(run / "report.md", text.encode())
    create_markdown_artifact(markdown=text, key=_artifact_key(run.name), description=f"training run {run.name}")
    return text


@task(name="html-report", cache_policy=NO_CACHE)
def html_report_task(run_dir: str) -> str:
    """<run>/report.html (rewritten on every flow run: the flow owns it) and a link artifact to it."""
    run = Path(run_dir)
    out = write_html_report([run], run / "report.html", overwrite=True)
    uri = out.resolve().as_uri()
    create_link_artifact(link=uri, link_text=f"{run.name}: report.html", key=_artifact_key(run.name, "report"),
                         description=f"what the curation of {run.name} did (self-contained HTML)")
    get_run_logger().info("report: %s", uri)
    return uri


def _artifact_key(name: str, kind: str = "train") -> str:
    # Prefect artifact keys: lowercase letters, numbers and dashes only; `kind` first, so the keys of
    # two kinds never collide whatever the run names.
    return f"{kind}-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@flow(name="train", log_prints=True)
def train_flow(config: dict, run_dir: str, evals: dict[str, list[str]] | None = None) -> dict:
    """Train `config` (TrainConfig fields) in `run_dir`, evaluate `evals` ({name: [kind, dataset_dir]},
    kind zeroshot|retrieval), publish the report. Re-running resumes."""
    model_dir = train_task(config, run_dir)
    results = evaluate_task(model_dir, evals, str(Path(run_dir) / "eval")) if evals else {}
    publish_task(run_dir, results)
    html_report_task(run_dir)
    return {"model_dir": model_dir, "eval": json.loads(json.dumps(results))}
