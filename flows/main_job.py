"""The main job: the whole pipeline as one Prefect flow (README's first command).

data -> train reference and teacher on clean pairs -> cache flow (both models, one pass) ->
train students (iid, h-acid, aced-acidistill) on noisy pairs -> evaluate on held-out sets ->
comparison table + curves plot. Every stage is idempotent: re-running the job skips finished data,
models and caches and resumes unfinished training runs.

`reference=` / `teacher=` (`aced run --reference ID --teacher ID`): a workspace model id or model folder,
e.g. pretrained weights brought in with `aced model import`. That role is then not trained: the model
is cached under its own id and evaluated once on the job's held-out sets (results in
`<root>/eval/<role>/`, reused while the model's fingerprint and the sets are the same); the students
still train with the paper's method against it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.cache_flow import cache_flow
from flows.train_flow import evaluate_task, train_flow
from pipeline.recipes import recipe
from pipeline.report import markdown_table, plot_runs
from pipeline.workspace import eval_specs, prepare_real, prepare_synthetic
from storage.atomic import atomic_write_bytes
from storage.workspace import Workspace


@dataclass(frozen=True)
class JobSize:
    """How big the built-in run is. `default` fits the 15-minute budget on a 2-core CPU."""

    train_pairs: int
    """Noisy synthetic pairs the students train on."""
    clean_pairs: int
    """Clean synthetic pairs the reference and teacher train on (disjoint from the rest)."""
    test_pairs: int
    """Held-out pairs for retrieval evaluation."""
    per_class: int
    """Images per class of the held-out zero-shot set."""
    noise_frac: float
    """Fraction of mismatched captions in the student's training pairs (web noise)."""
    reference_steps: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    """Student batch b (the selected sub-batch for ACID methods)."""
    reference_batch_size: int = 64
    """Batch of the reference/teacher training runs."""
    reference_model: str = "aced-vit-s"
    teacher_model: str = "aced-vit-s"
    student_model: str = "aced-vit-t"
    methods: tuple[str, ...] = ("iid", "h-acid", "aced-acidistill")
    num_workers: int = 1
    """Decoding worker processes per training run (TrainConfig.num_workers); 0 decodes in the trainer,
    which beats starting a spawned worker (seconds) when a run is only a few steps long."""


SIZES = {
    # Budget (2-core CPU, measured ~0.9 s per aced-vit-t step at b=64): reference + teacher ~5 min, cache ~1 min,
    # three students ~4-5 min,
    # Prefect/Ray/evaluation overheads ~2 min.
    # Reference and teacher are the student's architecture trained longer on clean pairs: in measured runs
    # here (lr 1e-3, b=64) aced-vit-s stayed on the loss plateau (~4.9) for 200 steps, which this budget
    # cannot outlast; larger references are a `--size`/recipe choice on bigger machines.
    "default": JobSize(train_pairs=4000, clean_pairs=6000, test_pairs=500, per_class=30, noise_frac=0.5,
                       reference_steps=200, teacher_steps=150, student_steps=150, batch_size=32,
                       reference_model="aced-vit-t", teacher_model="aced-vit-t"),
    "tiny": JobSize(train_pairs=240, clean_pairs=160, test_pairs=48, per_class=3, noise_frac=0.5,
                    reference_steps=4, teacher_steps=4, student_steps=4, batch_size=16,
                    reference_batch_size=16, reference_model="aced-vit-t", teacher_model="aced-vit-t",
                    num_workers=0),
}


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(root: str, size: JobSize, seed: int, data: str | None) -> dict[str, list[str]]:
    """Dataset folders for each role: {"student", "clean", "retrieval", "zeroshot"} -> [folders]."""
    if data is not None:
        sets = prepare_real(Path(root), Path(data))
    else:
        sets = prepare_synthetic(Path(root), train_pairs=size.train_pairs, clean_pairs=size.clean_pairs,
                                 test_pairs=size.test_pairs, per_class=size.per_class, noise_frac=size.noise_frac,
                                 seed=seed)
    get_run_logger().info("datasets: %s", json.dumps(sets))
    return sets


@task(name="export-model", cache_policy=NO_CACHE)
def export_task(run_dir: str, out_dir: str) -> str:
    from pipeline.trainer import export_model

    export_model(Path(run_dir), Path(out_dir))
    return out_dir


def given_models(root: str, reference: str | None, teacher: str | None) -> dict[str, str]:
    """{role: model folder} of the roles given as workspace model ids or folders, checked (a readable
    model config) before anything else runs."""
    from pipeline.models import local_model_dir, model_config

    ws = Workspace(root)
    out = {}
    for role, arg in (("reference", reference), ("teacher", teacher)):
        if arg:
            folder = local_model_dir(ws.resolve_model(arg)).resolve()  # an s3:// one: its verified local copy
            model_config(str(folder))
            out[role] = str(folder)
    return out


@task(name="evaluate-given-model", cache_policy=NO_CACHE)
def evaluate_given(model_dir: str, evals: dict[str, list[str]], out_dir: str) -> dict:
    """Results of a given (imported) model on the job's held-out sets, evaluated once: a rerun reuses them
    while the model's fingerprint and the evaluation sets are unchanged."""
    from storage.atomic import atomic_write_json

    fp = json.loads((Path(model_dir) / "aced_model.json").read_text()).get("fingerprint")
    stamp = {"model": model_dir, "fingerprint": fp, "evals": evals}
    out = Path(out_dir)
    if (out / "inputs.json").is_file() and (out / "results.json").is_file():
        if json.loads((out / "inputs.json").read_text()) == stamp:
            return json.loads((out / "results.json").read_text())
    results = evaluate_task.fn(model_dir, evals, out_dir)
    atomic_write_json(out / "inputs.json", stamp)
    return results


@flow(name="main-job", log_prints=True)
def main_job(root: str, size: str = "default", seed: int = 0, data: str | None = None,
             engine: str = "ray", reference: str | None = None, teacher: str | None = None) -> dict:
    """Run the whole pipeline in workspace `root`; returns {run name: headline metrics}. `reference` /
    `teacher`: model ids or folders used as they are instead of training that role."""
    job = SIZES[size]
    ws = Workspace(root)
    given = given_models(root, reference, teacher)
    sets = prepare_data(root, job, seed, data)
    evals = eval_specs(sets)
    cache_root = str(ws.cache)

    # Stage 0: the paper trains its own reference/teacher on cleaner data; so does the main job, unless
    # the user gives pretrained ones.
    models, given_results = {}, {}
    # Two models trained on the clean pairs with different seeds; the paper's reference and teacher also
    # differ only in their training (WebLI-curated++ vs WebLI), not in architecture.
    for role, model, steps, offset in (("reference", job.reference_model, job.reference_steps, 100),
                                       ("teacher", job.teacher_model, job.teacher_steps, 200)):
        if role in given:
            models[role] = given[role]
            given_results[role] = evaluate_given(given[role], evals, str(ws.evals(role)))
            continue
        cfg = recipe("reference", model=model, steps=steps, batch_size=job.reference_batch_size, seed=seed + offset,
                     train_data=tuple(sets["clean"]), checkpoint_every=max(1, steps // 4),
                     num_workers=job.num_workers)
        run_dir = ws.run(role)
        train_flow(dataclasses.asdict(cfg), str(run_dir), evals)
        models[role] = export_task(str(run_dir), str(ws.model(role)))

    # Stage 1: both models embed the students' data in one pass.
    # (one model given for both roles is cached once)
    cache_flow(root, datasets=[str(Path(d)) for d in sets["student"]],
               models=list(dict.fromkeys([models["reference"], models["teacher"]])), engine=engine)
    cache_ids = {role: Path(folder).name for role, folder in models.items()}  # the cache files models by folder name

    # Stage 2: students.
    runs = {}
    for method in job.methods:
        cfg = recipe("student", method=method, model=job.student_model, steps=job.student_steps,
                     batch_size=job.batch_size, seed=seed, train_data=tuple(sets["student"]),
                     cache_root=cache_root, reference=cache_ids["reference"], teacher=(cache_ids["teacher"],),
                     checkpoint_every=max(1, job.student_steps // 4),
                     n_chunks=min(16, job.batch_size // 4), num_workers=job.num_workers)
        run_dir = ws.run(f"student-{method}")
        train_flow(dataclasses.asdict(cfg), str(run_dir), evals)
        runs[method] = run_dir
    trained = {role: ws.run(role) for role in ("reference", "teacher") if role not in given}
    return summarize(ws.root, runs, trained, {role: (given[role], given_results[role]) for role in given})


def summarize(root: Path, students: dict[str, Path], others: dict[str, Path],
              given: dict[str, tuple[str, dict]] | None = None) -> dict:
    """Comparison table (<root>/report.md and the Prefect artifact `main-job`) and the curves plot.
    `given`: {role: (model folder, evaluation results)} of roles used as given instead of trained.
    `aced run` prints the report when the flow returns (a print here would only reach the log)."""
    from pipeline.report import read_metrics, summary_metrics

    rows, evals = {}, {}
    given = given or {}
    for role in ("reference", "teacher"):  # table order: reference, teacher, students
        if role in given:
            rows[role] = {**summary_metrics(given[role][1]), "noisy_frac_trained": None}  # not trained here
    for name, run_dir in {**others, **{f"student-{m}": d for m, d in students.items()}}.items():
        res_file = run_dir / "eval" / "results.json"
        results = json.loads(res_file.read_text()) if res_file.exists() else {}
        head = summary_metrics(results) if results else {}
        metrics = read_metrics(run_dir).to_pydict()
        tail = max(1, len(metrics["step"]) // 5)  # last 20% of steps
        sel = [v for v in metrics.get("noisy_frac_selected", [])[-tail:] if v is not None]
        row = dict(head)
        # None (shown as n/a) when the training data records no noise flags: unknown, not 0.
        row["noisy_frac_trained"] = sum(sel) / len(sel) if sel else None
        rows[name] = row
        if name.startswith("student-"):
            evals[name] = head
    roles = [r for r in ("reference", "teacher") if r in rows]
    rows = {k: rows[k] for k in roles + [k for k in rows if k not in roles]}
    # Evaluations first (in the order the runs report them), the trained batches' noise last.
    columns = [*dict.fromkeys(k for r in rows.values() for k in r if k != "noisy_frac_trained"), "noisy_frac_trained"]
    table = markdown_table(rows, columns=columns)
    png = plot_runs(students and {f"student-{m}": d for m, d in students.items()}, root / "curves.png", evals=evals)
    notes = "".join(f"{role}: given model `{Path(folder).name}` ({folder}), not trained here\n\n"
                    for role, (folder, _) in given.items())
    text = f"# Main job\n\n{table}\n\n{notes}Curves: {png}\n"
    atomic_write_bytes(root / "report.md", text.encode())
    create_markdown_artifact(markdown=text, key="main-job", description=f"main job comparison ({root})")
    get_run_logger().info("report: %s, curves: %s", root / "report.md", png)
    return rows
