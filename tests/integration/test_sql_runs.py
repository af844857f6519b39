"""`aced sql` over a workspace after real training runs: questions that join the run logs
(metrics, selections) with the pairs and the embedding cache, asked through the CLI.

One module-scoped workspace: a synthetic dataset (20% noisy captions), a tiny reference cached by
the plain engine, an h-acid run (selection logged) and an iid run (no selection), both trained by
the real trainer. Queries go through `flows.cli.main([... "sql", ..., "--format", "json"])`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main as aced

STEPS = {"hacid": 3, "iid": 2}
PAIRS = 96


@pytest.fixture(scope="module")
def trained_workspace(tmp_path_factory) -> Path:
    from pipeline.models import create_model, save_model
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from pipeline.recipes import recipe
    from pipeline.synthetic import generate_pairs
    from pipeline.trainer import train
    from storage.shards import write_shards

    root = tmp_path_factory.mktemp("sqlws")
    data = root / "datasets" / "synth"
    write_shards(generate_pairs(PAIRS, seed=5, noise_frac=0.2), data, name="synth", source="synthetic",
                 samples_per_shard=48)
    save_model(create_model("aced-vit-t", seed=1), root / "models" / "reference")
    embed_shards_plain(plan_cache(root, ["synth"], ["reference"]), chunk_size=48, torch_threads=1)
    common = dict(train_data=(str(data),), checkpoint_every=2, cache_root=str(root / "cache"))
    train(recipe("tiny", method="h-acid", reference="reference", steps=STEPS["hacid"], **common),
          root / "runs" / "hacid", progress=False)
    train(recipe("tiny", method="iid", steps=STEPS["iid"], **common), root / "runs" / "iid", progress=False)
    return root


def sql(capsys, root: Path, query: str) -> list[dict]:
    capsys.readouterr()
    rc = aced(["--root", str(root), "sql", query, "--format", "json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_metrics_and_selections_views_name_their_run(trained_workspace, capsys):
    rows = sql(capsys, trained_workspace,
               "SELECT run, count(*) AS n, count(DISTINCT step) AS steps, min(step) AS lo, max(step) AS hi "
               "FROM metrics GROUP BY run ORDER BY run")
    assert rows == [{"run": "hacid", "n": 3, "steps": 3, "lo": 0, "hi": 2},
                    {"run": "iid", "n": 2, "steps": 2, "lo": 0, "hi": 1}]
    rows = sql(capsys, trained_workspace,
               "SELECT run, step, count(*) AS candidates, count(*) FILTER (WHERE selected) AS chosen "
               "FROM selections GROUP BY ALL ORDER BY run, step")
    # tiny recipe: b = 16, filter_ratio 0.8 -> super-batch B = 80; the iid run logs no selection
    assert rows == [{"run": "hacid", "step": s, "candidates": 80, "chosen": 16} for s in range(3)]


def test_selected_noisy_pairs_per_step_match_the_logged_fraction(trained_workspace, capsys):
    """Join selections with pairs on uid: the noisy flag of the pair shards, counted over each
    step's selected candidates, reproduces the trainer's metrics.noisy_frac_selected."""
    rows = sql(capsys, trained_workspace, """
        WITH per_step AS (
            SELECT s.run, s.step, count(*) AS selected, count(*) FILTER (WHERE p.noisy) AS noisy
            FROM selections s JOIN pairs p ON p.uid = s.uid
            WHERE s.selected GROUP BY ALL)
        SELECT per_step.*, m.noisy_frac_selected
        FROM per_step JOIN metrics m USING (run, step) ORDER BY step""")
    assert [r["step"] for r in rows] == list(range(STEPS["hacid"]))
    for r in rows:
        assert r["selected"] == 16
        assert r["noisy"] / r["selected"] == pytest.approx(r["noisy_frac_selected"], abs=1e-6), r
    # the noisy flag copied into the selection log agrees with the pair shards, row for row
    rows = sql(capsys, trained_workspace, "SELECT count(*) AS n, count(*) FILTER (WHERE s.noisy <> p.noisy) AS bad "
                                          "FROM selections s JOIN pairs p USING (uid)")
    assert rows == [{"n": 3 * 80, "bad": 0}]
    # at least one noisy pair was a candidate: the check above is not vacuous
    rows = sql(capsys, trained_workspace, "SELECT count(*) AS n FROM selections WHERE noisy")
    assert rows[0]["n"] > 0


def test_every_candidate_has_a_reference_embedding_in_the_cache(trained_workspace, capsys):
    rows = sql(capsys, trained_workspace, """
        SELECT count(*) AS n, count(c.uid) AS cached, min(len(c.image_emb)) AS dim
        FROM selections s LEFT JOIN cache c ON c.uid = s.uid AND c.model_id = 'reference'""")
    assert rows == [{"n": 3 * 80, "cached": 3 * 80, "dim": 128}]
    # sum() of a BIGINT is a HUGEINT (Arrow decimal128), which --format json writes as a string: cast
    rows = sql(capsys, trained_workspace,
               "SELECT model_id, dataset, sum(rows)::BIGINT AS rows FROM manifest GROUP BY ALL")
    assert rows == [{"model_id": "reference", "dataset": "synth", "rows": PAIRS}]


@pytest.mark.parametrize("query", [
    "COPY (SELECT * FROM metrics) TO '{out}' (FORMAT csv)",
    "CREATE TABLE stolen AS SELECT * FROM pairs",
])
def test_writes_are_refused_at_the_cli(trained_workspace, tmp_path, capsys, query):
    out = tmp_path / "leak.csv"
    capsys.readouterr()
    rc = aced(["--root", str(trained_workspace), "sql", query.format(out=out), "--format", "json"])
    res = capsys.readouterr()
    assert rc == 2 and res.err.startswith("refused:") and res.out == ""
    assert not out.exists()
