"""The methods study on real photos and human captions (issue 13): `benchmarks/methods.py --data DIR`.

Design (CPU-sized analogue of the paper's Figs. 4-6 and 9):
- data: the real caption set at DIR (e.g. ../shared/data/flickr8k, with splits/{train,dev,test}.txt) is
  imported once; its train split is corrupted with `aced data corrupt` semantics (a fraction of captions
  swapped for captions of other train images, flagged `noisy`), the clean train split stays for the
  references. CIFAR-10 beside DIR (../cifar10/test) is the zero-shot set, with the standard templates.
- references: the student's architecture trained IID on the clean train captions (the main budget `1x`;
  for the strength curve also 1/4, 1/2 and 2x the budget, and one trained on the corrupted captions).
  The 1x reference is also the teacher of the distillation methods.
- methods, step-matched: iid, softmax-kd, h-acid, aced-acidistill, each for the same steps and seeds.
- methods, compute-matched: iid and softmax-kd given h-acid's wall-clock, i.e. more steps (the ratio
  of the measured median step times of the step-matched runs, recorded in the results).
- curve: h-acid with each reference, student quality vs reference quality.
- dev: diagnostics of the selection on the dev split only (never test): sampling temperature, top-k,
  chunks, filter ratio, stronger reference; and, from the per-candidate selection logs, how well the
  learnability scores separate clean from swapped candidates over training (AUC per logged step).
Test metrics: Flickr8k test retrieval (mean of R@1/5/10 both ways) and CIFAR-10 zero-shot top-1. Dev
runs are evaluated on the dev split only.

Every stage is resumable (finished runs are skipped, unfinished ones resume from their checkpoints), so
the study can run in the background across sessions; results go to benchmarks/results/<name>.{json,md}
after every run:
    python benchmarks/methods.py --data ../shared/data/flickr8k --root /tmp/aced-real --stages all
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import statistics
import time
from pathlib import Path

from _common import machine, machine_name, write_report

METHODS = ("iid", "softmax-kd", "h-acid", "aced-acidistill")
COMPUTE_MATCHED = ("iid", "softmax-kd")
STAGES = ("methods", "compute", "curve", "dev", "tuned")
# The arguments that define what a recorded row measured (--keep-recorded keeps a row only if they match).
DESIGN = ("steps", "batch_size", "filter_ratio", "lr", "student_model", "reference_model", "reference_steps",
          "reference_lr", "swap_frac", "corrupt_seed")
# Reference strength curve: budget multipliers of the 1x reference, plus one on the corrupted captions.
CURVE = (("ref-0.25x", 0.25, "clean"), ("ref-0.5x", 0.5, "clean"), ("ref-1x", 1.0, "clean"),
         ("ref-2x", 2.0, "clean"), ("ref-noisy", 1.0, "noisy"))
# Dev-split diagnostics of h-acid: {name: TrainConfig overrides}; tau=10, 16 chunks, f=0.8 is the default.
# Ordered by what they tell about the selected batches' noise: i-acid scores with the reference alone (no
# student term, so no catch-up); 1chunk samples the whole batch from the own scores s(x, x) (no
# conditional rounds, whose normalised scores cbar = c / (2|selected| + 1) are ~1/(2|selected| + 1) the
# scale of s(x, x), so tau = 10 samples them nearly uniformly here); tau100 and top-k sharpen every round;
# ref2x is a stronger reference (alone, and with the sharp sampler that uses its scores); then the filter
# ratio and a softer sampler.
DEV_VARIANTS = {
    "h-acid": {},
    "iid": {"method": "iid"},
    "i-acid": {"method": "i-acid"},
    "h-acid-1chunk": {"selection.n_chunks": 1},
    "h-acid-tau100": {"selection.tau": 100.0},
    "h-acid-topk": {"selection.topk": True},
    "h-acid-ref2x": {"reference": "ref-2x"},
    "h-acid-topk-ref2x": {"selection.topk": True, "reference": "ref-2x"},
    "h-acid-f0.5": {"filter_ratio": 0.5},
    "h-acid-f0.9": {"filter_ratio": 0.9},
    "h-acid-tau1": {"selection.tau": 1.0},
}


# The dev variants that change only the sampler (not the method or the reference): what stage 'tuned' may use.
SAMPLER_VARIANTS = [v for v, o in DEV_VARIANTS.items() if v.startswith("h-acid-") and not {"method", "reference"} & set(o)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real-data study (--data)")
    g.add_argument("--data", type=Path, default=None,
                   help="real caption set with splits/ (e.g. ../shared/data/flickr8k): run the real-data study")
    g.add_argument("--stages", nargs="+", default=["methods", "compute"], choices=[*STAGES, "all"],
                   help="which parts of the study to run (in this order; each resumable)")
    g.add_argument("--swap-frac", type=float, default=0.4, help="fraction of train captions swapped")
    g.add_argument("--corrupt-seed", type=int, default=0)
    g.add_argument("--lr", type=float, default=1e-3, help="student peak learning rate")
    g.add_argument("--reference-lr", type=float, default=5e-4)
    g.add_argument("--dev-seeds", type=int, nargs="+", default=[0])
    g.add_argument("--dev-variants", nargs="+", default=list(DEV_VARIANTS), choices=list(DEV_VARIANTS))
    g.add_argument("--tuned", default="auto", choices=["auto", *SAMPLER_VARIANTS],
                   help="stage 'tuned': the dev variant whose sampler settings h-acid and aced-acidistill use on the "
                        "test split (auto: the h-acid variant with the best dev retrieval, same reference)")
    g.add_argument("--keep-recorded", action="store_true",
                   help="a row already in the results file, measured under the same design, whose run folder is not "
                        "here (e.g. another machine's /tmp) is kept instead of trained again; off by default, so "
                        "a rerun from a fresh clone measures everything itself")
    g.add_argument("--references-only", action="store_true",
                   help="stop after training the references the chosen stages need")
    g.add_argument("--selection-log-rows", type=int, default=0,
                   help="per logged step, a sample of this many candidates (0 = all)")


@contextlib.contextmanager
def run_lock(root: Path, name: str, wait: bool):
    """Hold the lock of one run (or of the import, the corruption, the cache) of the study's workspace; yields
    False if another invocation holds it and wait is False. Two invocations never write the same folder at
    once: a reference, the data and the cache are waited for (everything after needs them), a student run is
    left to the invocation training it."""
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with open(root / ".locks" / f"{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def _corrupt(root: Path, src: str, name: str, frac: float, seed: int) -> str:
    from storage.corrupt import corrupt_dataset
    from storage.workspace import Workspace

    ws = Workspace(root)
    if not (ws.dataset(name) / "_dataset.json").exists():
        corrupt_dataset(root, src, name=name, swap_frac=frac, seed=seed)
    return str(ws.dataset(name))


def prepare(args: argparse.Namespace, root: Path) -> dict:
    """Import the real data (idempotent); the corrupted train split comes later (`add_noisy`)."""
    from pipeline.workspace import eval_specs, prepare_real
    from storage.workspace import Workspace

    with run_lock(root, "import", wait=True):
        sets = prepare_real(root, args.data)
    name = Path(args.data).resolve().name
    ws = Workspace(root)
    if not (ws.dataset(f"{name}/dev") / "_dataset.json").exists():
        raise FileNotFoundError(f"{args.data}: the study needs a dev split (splits/dev.txt) to tune on")
    test_evals = {f"{name}-test-retrieval": ["retrieval", sets["retrieval"][0]],
                  **eval_specs({"retrieval": [], "zeroshot": sets["zeroshot"]})}
    return {"clean": sets["clean"], "name": name, "test_evals": test_evals,
            "dev_evals": {f"{name}-dev-retrieval": ["retrieval", str(ws.dataset(f"{name}/dev"))]}}


def add_noisy(args, root: Path, data: dict) -> None:
    """The students' training set: the train split with a fraction of captions swapped (idempotent)."""
    data["noisy_name"] = f"{data['name']}-swap{round(100 * args.swap_frac)}/train"
    with run_lock(root, "corrupt", wait=True):
        data["noisy"] = [_corrupt(root, f"{data['name']}/train", data["noisy_name"], args.swap_frac, args.corrupt_seed)]


def reference(args, root: Path, data: dict, rid: str, budget: float, source: str, evals: dict) -> dict:
    """Train (or resume, or reuse) one reference and export it as a workspace model."""
    from methods import train_and_eval
    from pipeline.recipes import recipe
    from pipeline.trainer import export_model

    steps = max(1, round(args.reference_steps * budget))
    cfg = recipe("reference", model=args.reference_model, steps=steps, batch_size=args.batch_size,
                 lr=args.reference_lr, seed=100, train_data=tuple(data[source]),
                 checkpoint_every=max(1, steps // 4), selection_log_every=0)
    res = train_and_eval(cfg, root / "runs" / rid, evals)
    if not (root / "models" / rid).exists():
        export_model(root / "runs" / rid, root / "models" / rid)
    return res


def cache(root: Path, data: dict, model_ids: list[str]) -> None:
    """Reference embeddings of the corrupted train split (idempotent: cached shards are skipped)."""
    from pipeline.ray_embed import embed_shards_plain, plan_cache

    embed_shards_plain(plan_cache(root, [data["noisy_name"]], sorted(model_ids)), chunk_size=256)


def student(args, root: Path, data: dict, run: str, evals: dict, *, method: str, seed: int, steps: int,
            ref: str = "ref-1x", eval_dir: str = "eval", **overrides) -> dict:
    from methods import noisy_fractions, train_and_eval
    from pipeline.recipes import recipe
    from pipeline.report import summary_metrics

    # JEST's 16 chunks and the study's filter ratio unless a variant says otherwise
    overrides = {"selection.n_chunks": min(16, args.batch_size // 2), "filter_ratio": args.filter_ratio, **overrides}
    cfg = recipe("student", method=method, model=args.student_model, steps=steps, batch_size=args.batch_size,
                 seed=seed, lr=args.lr, train_data=tuple(data["noisy"]),
                 cache_root=str(root / "cache"), reference=ref, teacher=("ref-1x",),
                 checkpoint_every=max(1, steps // 3),
                 selection_log_rows=args.selection_log_rows, **overrides)
    run_dir = root / "runs" / run
    res = train_and_eval(cfg, run_dir, evals, eval_dir)
    out = {**summary_metrics(res), **noisy_fractions(run_dir), "train_seconds": res.get("train_seconds"),
           "steps": steps, "step_s_median": median_step_s(run_dir), "tau": cfg.selection.tau,
           "n_chunks": cfg.selection.n_chunks, "topk": cfg.selection.topk, "separation": _windows(separation(run_dir))}
    print(run, json.dumps(out), flush=True)
    return out


def median_step_s(run_dir: Path) -> float:
    from pipeline.report import read_metrics

    return statistics.median(read_metrics(run_dir).column("step_s").to_pylist())


def separation(run_dir: Path) -> list[dict]:
    """Per logged step: how well the candidates' own scores s(x, x) rank clean above swapped candidates
    (ROC AUC), their mean score each, and the swapped fraction among the selected: the 'catch-up'
    diagnostic. Also where in the sampler the swapped picks come from: the swapped fraction of the first
    round's picks (sampled by s(x, x): their logged score equals it) and of the later rounds' (sampled by
    the conditional cbar(x)), and the spread (std) of the last round's scores over the candidates left."""
    import duckdb

    parts = sorted((run_dir / "selections").glob("part-*.parquet"))
    if not parts:
        return []
    con = duckdb.connect()
    rows = con.execute(f"""
        WITH s AS (SELECT step, self_score, score, selected, noisy,
                          rank() OVER (PARTITION BY step ORDER BY self_score) AS r
                   FROM read_parquet({[str(p) for p in parts]}))
        SELECT step, count(*) FILTER (WHERE NOT noisy) AS n_clean, count(*) FILTER (WHERE noisy) AS n_noisy,
               sum(r) FILTER (WHERE NOT noisy) AS rank_sum_clean,
               avg(self_score) FILTER (WHERE NOT noisy), avg(self_score) FILTER (WHERE noisy),
               stddev_pop(self_score),
               avg(noisy::INT) FILTER (WHERE selected),
               avg(noisy::INT) FILTER (WHERE selected AND score = self_score),
               avg(noisy::INT) FILTER (WHERE selected AND score <> self_score),
               stddev_pop(score) FILTER (WHERE NOT selected)
        FROM s GROUP BY step ORDER BY step""").fetchall()
    out = []
    for step, nc, nn, rs, sc, sn, sd, nf, nf1, nfl, sdl in rows:
        # Mann-Whitney U of the clean ranks: AUC = P(score_clean > score_noisy)
        auc = (rs - nc * (nc + 1) / 2) / (nc * nn) if nc and nn else None
        out.append({"step": step, "auc_clean_vs_noisy": auc, "score_clean": sc, "score_noisy": sn,
                    "score_std": sd, "noisy_frac_selected": nf, "noisy_first_round": nf1,
                    "noisy_later_rounds": nfl, "last_round_std": sdl})
    return out


def reference_auc(root: Path, dataset: str, model_id: str) -> float | None:
    """How well a cached reference alone tells clean from swapped pairs of `dataset`: ROC AUC of its
    image-text cosine (its per-pair sigmoid loss is monotone in it), read through the SQL views."""
    from storage.sql import open_views

    con = open_views(root)
    try:
        row = con.execute("""
            WITH s AS (SELECT p.noisy, list_dot_product(c.image_emb, c.text_emb) AS cos
                       FROM cache c JOIN pairs p ON c.uid = p.uid AND c.dataset = p.dataset
                       WHERE c.model_id = ? AND c.dataset = ?),
                 r AS (SELECT noisy, rank() OVER (ORDER BY cos) AS r FROM s)
            SELECT count(*) FILTER (WHERE NOT noisy), count(*) FILTER (WHERE noisy),
                   sum(r) FILTER (WHERE NOT noisy) FROM r""", [model_id, dataset]).fetchone()
    finally:
        con.close()
    nc, nn, rs = row
    return (rs - nc * (nc + 1) / 2) / (nc * nn) if nc and nn else None


SEPARATION_KEYS = ("auc_clean_vs_noisy", "score_clean", "score_noisy", "score_std", "noisy_frac_selected",
                   "noisy_first_round", "noisy_later_rounds", "last_round_std")


def _mean(vals: list) -> float | None:
    """Mean of the values that are there (None: a statistic a run does not have, e.g. later rounds of 1 chunk)."""
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _windows(curve: list[dict], n: int = 4) -> list[dict]:
    """The separation curve averaged over n equal windows of training."""
    if not curve:
        return []
    size = max(1, len(curve) // n)
    out = []
    for i in range(0, len(curve), size):
        w = [r for r in curve[i:i + size] if r["auc_clean_vs_noisy"] is not None]
        if w:
            out.append({"steps": f"{curve[i]['step']}-{curve[min(i + size, len(curve)) - 1]['step']}",
                        **{k: _mean([r.get(k) for r in w]) for k in SEPARATION_KEYS}})
    return out


def run_study(args: argparse.Namespace) -> None:
    root = args.root.resolve()
    stages = list(STAGES) if "all" in args.stages else [s for s in STAGES if s in args.stages]
    t_start = time.perf_counter()
    data = prepare(args, root)
    results_file = args.results / f"{args.name}.json"
    state = {"rows": {}, "compute": {}, "curve": {}, "dev": {}, "tuned": {}, "references": {}}
    recorded_args: dict = {}
    if results_file.exists():  # keep what earlier sessions measured (their runs are skipped anyway)
        old = json.loads(results_file.read_text())
        state.update({k: old.get(k, v) for k, v in state.items()})
        recorded_args = old.get("args", {})
    same_design = all(recorded_args.get(k) == getattr(args, k) for k in DESIGN)

    mine: set[tuple] = set()  # the entries this invocation measured; the file's win for all others

    def save() -> None:
        # Several invocations may run at once (e.g. the curve beside the compute stage, or the same stage
        # twice to use two cores; run_lock keeps them off each other's runs): merge with what the file holds
        # now, under a lock, so none drops another's rows.
        results_file.parent.mkdir(parents=True, exist_ok=True)
        with open(results_file.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = json.loads(results_file.read_text()) if results_file.exists() else {}
            for rid, v in now.get("references", {}).items():
                if ("references", rid) not in mine:
                    state["references"][rid] = v
            for k in ("rows", "compute", "curve", "dev", "tuned"):
                for name, per_seed in now.get(k, {}).items():
                    for seed, v in per_seed.items():
                        if (k, name, seed) not in mine:
                            state[k].setdefault(name, {})[seed] = v
            for key in ("compute_ratio", "tuned_variant"):
                if key in now and (key,) not in mine:
                    state[key] = now[key]
            report(args, state, time.perf_counter() - t_start)

    needed = [("ref-1x", 1.0, "clean")]
    if "curve" in stages:
        needed = list(CURVE)
    elif "dev" in stages and any(DEV_VARIANTS[v].get("reference") == "ref-2x" for v in args.dev_variants):
        needed.append(("ref-2x", 2.0, "clean"))
    evals_ref = {**data["test_evals"], **data["dev_evals"]}
    for rid, budget, source in sorted(needed, key=lambda r: (r[2] == "noisy", r[0] != "ref-1x")):  # 1x first; clean ones need no corruption
        if source == "noisy" and "noisy" not in data:
            add_noisy(args, root, data)
        with run_lock(root, rid, wait=True):
            res = reference(args, root, data, rid, budget, source, evals_ref)
        from pipeline.report import summary_metrics
        state["references"][rid] = {**summary_metrics(res), "budget": budget, "captions": source,
                                    "train_seconds": res.get("train_seconds")}
        mine.add(("references", rid))
        save()
    if args.references_only:
        return
    if "noisy" not in data:
        add_noisy(args, root, data)
    with run_lock(root, "cache", wait=True):
        cache(root, data, [r for r, _, _ in needed])
    for rid, _, _ in needed:
        state["references"][rid]["auc_clean_vs_swapped"] = reference_auc(root, data["noisy_name"], rid)
        save()

    def seed_row(table: str, name: str, run: str, **kw) -> None:
        """Train + evaluate (or resume, or only read) one run and record it as `table[name][kw["seed"]]`."""
        seed = kw["seed"]
        recorded = state[table].get(name, {}).get(str(seed))
        if (args.keep_recorded and same_design and recorded is not None
                and not (root / "runs" / run / kw.get("eval_dir", "eval") / "results.json").exists()):
            print(f"{run}: kept the row recorded in {results_file} (--keep-recorded; no run folder here)", flush=True)
            return
        with run_lock(root, run, wait=False) as mine_to_train:
            if not mine_to_train:
                print(f"{run}: another invocation is training it; skipped here (a rerun of this stage reads "
                      "the finished run)", flush=True)
                return
            state[table].setdefault(name, {})[str(seed)] = student(args, root, data, run, **kw)
        mine.add((table, name, str(seed)))
        save()

    if "methods" in stages or "compute" in stages:
        for seed in args.seeds:
            for method in args.methods:
                seed_row("rows", method, f"{method}-seed{seed}", evals=data["test_evals"], method=method,
                         seed=seed, steps=args.steps)
    if "compute" in stages:
        ratio = compute_ratio(state["rows"])
        state["compute_ratio"] = ratio
        mine.add(("compute_ratio",))
        steps = round(args.steps * ratio)
        for seed in args.seeds:
            for method in COMPUTE_MATCHED:
                seed_row("compute", f"{method}-{steps}steps", f"{method}-cm{steps}-seed{seed}",
                         evals=data["test_evals"], method=method, seed=seed, steps=steps)
    if "curve" in stages:
        for seed in args.seeds:  # seeds outside: an interrupted curve still has every reference at seed 0
            for rid, _, _ in CURVE:
                # ref-1x: the step-matched h-acid run itself, one row (curve_rows reads it from there)
                table, name, run = ("rows", "h-acid", "h-acid") if rid == "ref-1x" else ("curve", rid, f"h-acid-{rid}")
                seed_row(table, name, f"{run}-seed{seed}", evals=data["test_evals"], method="h-acid",
                         seed=seed, steps=args.steps, ref=rid)
    if "dev" in stages:
        for seed in args.dev_seeds:
            for variant in args.dev_variants:
                over = dict(DEV_VARIANTS[variant])
                method = over.pop("method", "h-acid")
                ref = over.pop("reference", "ref-1x")
                # a plain method (no overrides) is the run named like the step-matched one, shared with it and
                # scored on dev as well (e.g. h-acid-seed0: trained once, eval/ = test, eval-dev/ = dev)
                same = not over and ref == "ref-1x" and method == variant
                run = f"{method}-seed{seed}" if same else f"dev-{variant}-seed{seed}"
                seed_row("dev", variant, run, evals=data["dev_evals"], method=method, seed=seed,
                         steps=args.steps, ref=ref, eval_dir="eval-dev" if same else "eval", **over)
    if "tuned" in stages:
        # The knob the paper's appendix points to (Fig. 10: the sampling temperature), chosen on dev only,
        # then measured on test for every seed: h-acid and aced-acidistill with the chosen sampler.
        variant = args.tuned if args.tuned != "auto" else best_dev_variant(state["dev"], data["name"])
        state["tuned_variant"] = variant
        mine.add(("tuned_variant",))
        over = dict(DEV_VARIANTS[variant])
        knob = variant.removeprefix("h-acid-")
        for seed in args.seeds:
            for method in ("h-acid", "aced-acidistill"):
                seed_row("tuned", f"{method}-{knob}", f"{method}-{knob}-seed{seed}", evals=data["test_evals"],
                         method=method, seed=seed, steps=args.steps, **over)
    save()


def curve_rows(state: dict) -> dict:
    """The reference strength curve, {reference: {seed: row}} in CURVE order; its ref-1x point is the
    step-matched h-acid row (the same run, stored once)."""
    rows = {**state["curve"], "ref-1x": state["rows"].get("h-acid", {})}
    return {rid: rows[rid] for rid, _, _ in CURVE if rows.get(rid)}


def best_dev_variant(dev: dict, name: str) -> str:
    """The sampler setting with the best mean dev retrieval among the h-acid variants that keep the 1x
    reference (a stronger reference is not a sampler setting). Refuses when none beats the default h-acid:
    then there is nothing to tune."""
    key = f"{name}-dev-retrieval:mean_recall"
    cands = {v: statistics.fmean(r[key] for r in dev[v].values()) for v in dev if v in ("h-acid", *SAMPLER_VARIANTS)}
    if "h-acid" not in cands or len(cands) < 2:
        raise RuntimeError("stage 'tuned' needs the dev stage's h-acid and at least one of its variants first")
    best = max(cands, key=cands.get)
    if best == "h-acid":
        raise RuntimeError(f"no dev variant beats the default h-acid on dev ({cands}): nothing to tune")
    return best


def compute_ratio(rows: dict) -> float:
    """Wall-clock of an h-acid step over an iid step: medians of the step-matched runs, per seed."""
    h = [v["step_s_median"] for v in rows.get("h-acid", {}).values()]
    i = [v["step_s_median"] for v in rows.get("iid", {}).values()]
    if not h or not i:
        raise RuntimeError("compute matching needs the step-matched iid and h-acid runs first (stage 'methods')")
    return statistics.median(h) / statistics.median(i)


def _mean_std(vals: list[float], scale: float = 100.0) -> str:
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    if len(vals) == 1:  # one seed has no spread to report (a "± 0.00" would claim one)
        return f"{scale * mean:.2f}"
    return f"{scale * mean:.2f} ± {scale * statistics.stdev(vals):.2f}"


# Table cells are percentages (x 100) except these (x scale).
SCALES = {"train_seconds": 1 / 60}


def _table(table: dict, keys: list[str], labels: dict[str, str]) -> list[str]:
    lines = ["| run | seeds | " + " | ".join(labels.get(k, k) for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, seeds in table.items():
        cells = [_mean_std([s[k] for s in seeds.values() if s.get(k) is not None], SCALES.get(k, 100.0)) for k in keys]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def report(args: argparse.Namespace, state: dict, seconds: float) -> None:
    name = Path(args.data).resolve().name
    ret, zs = f"{name}-test-retrieval:mean_recall", "cifar10-zeroshot:top1"
    labels = {ret: f"{name} test retrieval, mean R@1/5/10 (%)", zs: "CIFAR-10 zero-shot top-1 (%)",
              "noisy_frac_superbatch": "swapped in super-batch (%)", "noisy_frac_trained": "swapped in trained batch (%)",
              f"{name}-dev-retrieval:mean_recall": f"{name} dev retrieval, mean R@1/5/10 (%)"}
    labels["train_seconds"] = "training wall-clock (min)"
    keys = [ret, zs, "noisy_frac_superbatch", "noisy_frac_trained", "train_seconds"]
    md = [f"# The methods on real captions ({name}, {args.swap_frac:.0%} of train captions swapped; {machine_name()})", "",
          f"Student {args.student_model}, b = {args.batch_size}, {args.steps} steps, f = {args.filter_ratio}, lr {args.lr}; "
          f"reference/teacher {args.reference_model}, {args.reference_steps} steps (1x) at lr {args.reference_lr} on the "
          f"clean train captions. Mean ± std over seeds; test = {name} test split and CIFAR-10 test (standard "
          f"templates); dev runs evaluated on the dev split only. The rows accumulate over resumable invocations of the "
          f"study; the command above is the latest (its wall-clock: {seconds / 60:.1f} min), each row's training "
          f"wall-clock is in its table.",
          "", "## References", ""]
    labels["auc_clean_vs_swapped"] = "AUC clean vs swapped train pairs (%)"
    md += _table({k: {"-": v} for k, v in state["references"].items()},
                 [ret, zs, f"{name}-dev-retrieval:mean_recall", "auc_clean_vs_swapped"], labels)
    md += ["", "## Step-matched", ""] + _table(state["rows"], keys, labels)
    if state["compute"]:
        md += ["", f"## Compute-matched (iid and softmax-kd given h-acid's wall-clock: {state.get('compute_ratio', 0):.2f}x "
               "its steps, from the median step times above)", ""]
        md += _table({**{k: v for k, v in state["rows"].items() if k in ("h-acid", "aced-acidistill")},
                      **state["compute"]}, keys, labels)
    if state["curve"]:
        curve = curve_rows(state)
        md += ["", "## Reference strength curve (h-acid with each reference)", "",
               "| reference | budget | captions | reference test retrieval (%) | reference AUC clean vs swapped (%) | "
               "student seeds | student test retrieval (%) | student CIFAR-10 (%) | swapped in trained batch (%) |",
               "|---|---|---|---|---|---|---|---|---|"]
        for rid, seeds in curve.items():
            r = state["references"].get(rid, {})
            auc = r.get("auc_clean_vs_swapped")
            md.append(f"| {rid} | {r.get('budget', '')} | {r.get('captions', '')} | "
                      f"{_mean_std([r[ret]] if ret in r else [])} | {_mean_std([auc] if auc is not None else [])} | "
                      f"{len(seeds)} | "
                      f"{_mean_std([s[ret] for s in seeds.values() if ret in s])} | "
                      f"{_mean_std([s[zs] for s in seeds.values() if zs in s])} | "
                      f"{_mean_std([s['noisy_frac_trained'] for s in seeds.values() if s.get('noisy_frac_trained') is not None])} |")
    if state["dev"]:
        dkey = f"{name}-dev-retrieval:mean_recall"
        md += ["", "## Dev-split diagnostics (h-acid variants; never the test split)", ""]
        md += _table(state["dev"], [dkey, "noisy_frac_trained"], labels)
    if state.get("tuned"):
        variant = state.get("tuned_variant", "")
        md += ["", f"## Step-matched, the sampler tuned on dev ({variant}: {DEV_VARIANTS.get(variant)}, chosen by dev "
               "retrieval; the paper's defaults above)", ""]
        md += _table({**{k: v for k, v in state["rows"].items() if k in ("iid", "softmax-kd")}, **state["tuned"]},
                     keys, labels)
    tables = {"step-matched": state["rows"], "tuned": state.get("tuned", {}), "curve": state["curve"], "dev": state["dev"]}
    if any(s.get("separation") for t in tables.values() for seeds in t.values() for s in seeds.values()):
        md += ["", "## Does the selection still tell swapped captions apart?", "",
               "Each candidate's own score s(x, x) (h-acid: learnability, its student loss minus its reference loss; "
               "i-acid: minus its reference loss), per quarter of training, mean over seeds: AUC = P(own score of a "
               "clean candidate > that of a swapped one); the swapped fraction of the trained batch, of the first "
               "round's picks (sampled by s(x, x)) and of the later rounds' picks (sampled by the conditional score "
               "cbar(x) = c(x) / (2|selected| + 1)); tau x the std of the last round's scores over the candidates "
               "left (much below 1: that round is sampled nearly uniformly).", "",
               "| table | run | window (steps) | AUC | own score clean | own score swapped | own score std | "
               "swapped in trained batch (%) | in first-round picks (%) | in later-round picks (%) | tau x last-round std |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]

        def cell(v, fmt: str, scale: float = 1.0) -> str:
            return "n/a" if v is None else format(scale * v, fmt)

        for tname, table in tables.items():
            for run, seeds in table.items():
                rows = [s for s in seeds.values() if s.get("separation")]
                for i, w in enumerate(rows[0]["separation"] if rows else []):
                    avg = {k: _mean([r["separation"][i].get(k) for r in rows if len(r["separation"]) > i])
                           for k in SEPARATION_KEYS}
                    tau_std = _mean([r.get("tau", 10.0) * r["separation"][i]["last_round_std"] for r in rows
                                     if len(r["separation"]) > i and r["separation"][i].get("last_round_std") is not None
                                     and not r.get("topk")])
                    md.append(f"| {tname} | {run} | {w['steps']} | {cell(avg['auc_clean_vs_noisy'], '.3f')} | "
                              f"{cell(avg['score_clean'], '.4f')} | {cell(avg['score_noisy'], '.4f')} | "
                              f"{cell(avg['score_std'], '.4f')} | {cell(avg['noisy_frac_selected'], '.1f', 100)} | "
                              f"{cell(avg['noisy_first_round'], '.1f', 100)} | {cell(avg['noisy_later_rounds'], '.1f', 100)} | "
                              f"{cell(tau_std, '.2f')} |")
    write_report(args.name, {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                             "machine": machine(), **state}, "\n".join(md) + "\n", out=args.results)
