"""Config and CLI findings of the red-team pass (numbers as in its report): each test fails on the code
before the fix. Bad input is a ValueError naming the field (one line from `aced`, exit 1), never a
traceback and never a silently wrong run."""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.recipes import TrainConfig, recipe
from pipeline.selection import SelectionConfig

REPO = Path(__file__).resolve().parents[2]


def _main(capsys, *argv) -> tuple[int, str]:
    """`aced ARGV` in this process: (exit code, stderr)."""
    from flows.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors and `raise SystemExit(message)`
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- 5. --config JSON with wrong types

@pytest.mark.parametrize("fields,named", [
    ({"steps": "2"}, "steps"),
    ({"lr": "0.1"}, "lr"),
    ({"steps": 1.5}, "steps"),
    ({"checkpoint_every": 0.5}, "checkpoint_every"),
    ({"steps": True}, "steps"),  # was: trained "True steps"
    ({"batch_size": True}, "batch_size"),
    ({"steps": 10**23}, "steps"),
    ({"tau": None}, "tau"),
    ({"n_chunks": 2.5}, "n_chunks"),
    ({"n_chunks": True}, "n_chunks"),
    ({"topk": "yes"}, "topk"),
    ({"method": ["iid"]}, "method"),
    ({"model": {"a": 1}}, "model"),
    ({"eval_retrieval": [1]}, "eval_retrieval"),
    ({"train_data": "/some/dataset"}, "train_data"),  # was: read character by character
    ({"teacher": "ref"}, "teacher"),
    ({"score_dtype": None}, "score_dtype"),
    ({"selection": 5}, "selection"),
    ({"selection": {"tau": 1, "foo": 2}}, "foo"),
    ({"foo": 1}, "foo"),
])
def test_config_fields_of_the_wrong_type_are_named(fields, named):
    with pytest.raises(ValueError, match=named):
        recipe("tiny", **{"train_data": ["d"], **fields})
    with pytest.raises(ValueError, match=named):
        TrainConfig.from_dict({"train_data": ["d"], **fields})


def test_a_string_train_data_is_refused_not_split_into_characters():
    with pytest.raises(ValueError, match=r"train_data must be a list of strings, got the string '/data/s'"):
        TrainConfig(train_data="/data/s")
    cfg = TrainConfig.from_dict(json.loads(json.dumps({"train_data": ["/data/s"], "lr": 1, "steps": 3})))
    assert cfg.train_data == ("/data/s",) and cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "notjson.json"
    bad.write_text("notjson")
    rc, err = _main(capsys, "--root", tmp_path, "train", "r", "--recipe", "tiny", "--config", bad)
    assert rc == 1 and str(bad) in _one_line(err)
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    rc, err = _main(capsys, "--root", tmp_path, "train", "r", "--recipe", "tiny", "--config", listed)
    assert rc == 1 and str(listed) in _one_line(err) and "JSON object" in err
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"train_data": ["x"], "steps": "2"}))
    rc, err = _main(capsys, "--root", tmp_path, "train", "r", "--recipe", "tiny", "--config", typed)
    assert rc == 1 and "steps must be an integer" in _one_line(err)


# --------------------------------------------------------------------------- 8. TrainConfig value gaps

@pytest.mark.parametrize("fields,message", [
    ({"score_resolution": 0}, "score_resolution"),
    ({"score_resolution": -8}, "score_resolution"),
    ({"score_resolution": 100000}, "score_resolution .*image size 64"),  # was: a 4.8 TB allocation at step 1
    ({"score_resolution": 36}, "multiple of the patch size 8"),
    ({"weight_decay": -5.0}, "weight_decay must be >= 0"),
    ({"tau": math.nan}, "tau"),
    ({"grad_clip": math.nan}, "grad_clip must be a finite number"),
    ({"kd_lambda": math.nan}, "kd_lambda must be a finite number"),
    ({"lr": math.inf}, "lr must be a finite number"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"beta2": 1.0}, "beta2"),
    ({"grad_clip": 0.0}, "grad_clip must be > 0"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
])
def test_out_of_range_values_are_named_at_config_creation(fields, message):
    for method in ("iid", "h-acid"):  # iid used to accept them silently
        with pytest.raises(ValueError, match=message):
            recipe("tiny", method=method, train_data=["d"], reference="r", cache_root="c", **fields)


def test_a_valid_score_resolution_is_kept():
    cfg = recipe("tiny", method="h-acid", train_data=["d"], reference="r", cache_root="c", score_resolution=32)
    assert cfg.score_resolution == 32


@pytest.mark.parametrize("item,message", [
    ("steps=abc", "--set steps=abc: expected an integer"),
    ("lr=fast", "--set lr=fast: expected a number"),
    ("score_resolution=big", "--set score_resolution=big: expected an integer or none"),
    ("tau=warm", "--set tau=warm: expected a number"),
    ("seed=-1", "seed must be >= 0"),
    ("weight_decay=-5", "weight_decay must be >= 0"),
    ("kd_lambda=nan", "kd_lambda must be a finite number"),
])
def test_set_values_are_named(tmp_path, capsys, item, message):
    rc, err = _main(capsys, "--root", tmp_path, "train", "r", "--recipe", "tiny", "--set", item)
    assert rc == 1 and message in _one_line(err)


def test_selection_config_types():
    for bad in ({"tau": None}, {"tau": "1"}, {"tau": True}, {"n_chunks": True}, {"topk": 1}):
        with pytest.raises(ValueError, match=f"SelectionConfig.{next(iter(bad))}"):
            SelectionConfig(**bad)


# --------------------------------------------------------------------------- 6. hand-edited model folders

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from pipeline.models import create_model, save_model

    return save_model(create_model("aced-vit-t"), tmp_path_factory.mktemp("m") / "model")


def _edited(saved: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    cfg, aced = (json.loads((folder / f).read_text()) for f in ("open_clip_config.json", "aced_model.json"))
    edit(cfg, aced)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    (folder / "aced_model.json").write_text(json.dumps(aced))
    return folder


@pytest.mark.parametrize("edit,message", [
    (lambda c, a: c["model_cfg"].update(foo=1), r"unknown model config keys \['foo'\]"),
    (lambda c, a: c["model_cfg"]["vision_cfg"].update(foo=1), r"unknown vision_cfg keys \['foo'\]"),
    (lambda c, a: c["model_cfg"]["vision_cfg"].update(layers=3.0), "vision_cfg.layers must be a positive integer"),
    (lambda c, a: c["model_cfg"]["text_cfg"].update(width="128"), "text_cfg.width must be a positive integer"),
    (lambda c, a: c["model_cfg"]["text_cfg"].update(heads=3), "text_cfg.width 128 is not a multiple of heads 3"),
    (lambda c, a: c["model_cfg"].update(embed_dim=10**12), "about 1.*e\\+2.* parameters"),
    (lambda c, a: c["model_cfg"]["text_cfg"].update(width=2**20), "parameters"),
    (lambda c, a: c["preprocess_cfg"].update(interpolation="evil"), "preprocess_cfg.interpolation must be one of"),
    (lambda c, a: c["preprocess_cfg"].update(std=[0, 0, 0]), "preprocess_cfg.std"),
    (lambda c, a: c["preprocess_cfg"].update(mean=[0.5, 0.5]), "preprocess_cfg.mean"),
    (lambda c, a: c["preprocess_cfg"].update(size=-5), "preprocess_cfg.size"),
    (lambda c, a: c["preprocess_cfg"].update(mode="CMYK"), "preprocess_cfg.mode"),
    (lambda c, a: c.update(preprocess_cfg=[1]), "preprocess_cfg must be a JSON object"),
    # no fingerprint: any preprocessing edit would pass, so the folder is refused
    (lambda c, a: (a.pop("fingerprint"), c["preprocess_cfg"].update(mean=[5, 5, 5], std=[1e-9] * 3)),
     "no fingerprint recorded"),
    (lambda c, a: a.update(fingerprint=12345), "fingerprint must be 64 hex digits"),
])
def test_hand_edited_model_folders_are_named_errors(saved_model, tmp_path, edit, message):
    from pipeline.models import load_model

    folder = _edited(saved_model, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def test_model_folder_file_shapes(saved_model, tmp_path):
    from pipeline.models import load_model

    folder = tmp_path / "m"
    shutil.copytree(saved_model, folder)
    (folder / "aced_model.json").write_text("[1]")
    with pytest.raises(ValueError, match="aced_model.json: must be a JSON object"):
        load_model(folder)
    (folder / "aced_model.json").unlink()
    with pytest.raises(ValueError, match="no aced_model.json"):
        load_model(folder)
    assert load_model(folder, verify=False).name == "m"  # unverified loads are explicit


def test_weights_of_another_shape_are_one_line(saved_model, tmp_path):
    from pipeline.models import load_model

    folder = tmp_path / "m"
    shutil.copytree(saved_model, folder)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["layers"] += 1
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weights do not fit .*: 12 missing key\(s\) \(visual.transformer.resblocks.3") as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def test_a_hub_model_name_is_one_line(tmp_path, capsys):
    rc, err = _main(capsys, "--root", tmp_path, "model", "info", "hf-hub:timm/x")
    assert rc == 1 and "runs offline" in _one_line(err)


def test_every_bundled_config_passes_the_checks():
    import open_clip

    from pipeline.models import estimate_params, model_config

    for name in open_clip.list_models():
        assert estimate_params(model_config(name)) < 10**10, name


def test_eval_of_a_hand_edited_folder_is_one_line(saved_model, pair_root, tmp_path, capsys):
    folder = _edited(saved_model, tmp_path, lambda c, a: c["model_cfg"]["vision_cfg"].update(layers=3.0))
    rc, err = _main(capsys, "--root", pair_root, "eval", folder, "--retrieval", "tiny")
    assert rc == 1 and "vision_cfg.layers must be a positive integer" in _one_line(err)


# --------------------------------------------------------------------------- 4. aced cache / train --flow

@pytest.mark.parametrize("option,value", [("--actors", "0"), ("--actor-cpus", "-1"), ("--num-cpus", "0"),
                                          ("--object-store-mb", "-1"), ("--torch-threads", "0"),
                                          ("--chunk-size", "0"), ("--actor-cpus", "nan")])
def test_bad_numeric_cache_options_are_refused_while_parsing(option, value, capsys):
    from flows.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["cache", "--models", "m", option, value])
    assert exit_.value.code == 2
    assert option in _one_line(capsys.readouterr().err)


def _no_flow(monkeypatch):
    """Fail the test if a command gets as far as starting Prefect."""
    import flows._prefect_env
    import flows.cmd_flows

    def started(*a, **k):
        raise AssertionError("the flow was started before the input was checked")
    monkeypatch.setattr(flows.cmd_flows, "_run", started)
    monkeypatch.setattr(flows._prefect_env, "use_workspace_state", started)


def test_cache_checks_models_and_datasets_before_the_flow(pair_root, tmp_path, capsys, monkeypatch):
    _no_flow(monkeypatch)
    rc, err = _main(capsys, "--root", pair_root, "cache", "--datasets", "tiny", "--models", "nope", "--engine", "plain")
    assert rc == 1 and "model 'nope'" in _one_line(err)
    rc, err = _main(capsys, "--root", pair_root, "cache", "--datasets", "nope", "--models", tmp_path, "--engine", "plain")
    assert rc == 1 and "not a model folder" in _one_line(err)


def test_train_flow_checks_the_run_before_the_flow(pair_root, capsys, monkeypatch):
    _no_flow(monkeypatch)
    rc, err = _main(capsys, "--root", pair_root, "train", "x", "--flow", "--recipe", "tiny", "--data", "tiny",
                    "--method", "h-acid", "--reference", "nope")
    assert rc == 1 and "nope" in _one_line(err)


def test_prefect_console_copies_of_an_expected_error_are_dropped():
    from flows.cmd_flows import ExpectedErrorFilter

    filt = ExpectedErrorFilter()
    err = ValueError("model 'nope': neither nope nor /x is a folder")

    def record(name, msg, exc=None, level=logging.ERROR):
        return logging.LogRecord(name, level, __file__, 1, msg, None, (type(exc), exc, None) if exc else None)

    assert filt.filter(record("prefect.flow_runs", "Beginning flow run 'x'", level=logging.INFO))
    assert not filt.filter(record("prefect.task_runs", f"Task run failed with exception: {err!r}", err))
    assert not filt.filter(record("prefect.task_runs", f"Finished in state Failed('Task run encountered an "
                                                       f"exception ValueError: {err}')"))
    assert not filt.filter(record("prefect.flow_runs", f"Encountered exception during execution: {err!r}", err))
    bug = RuntimeError("a bug")  # not bad input: its traceback stays
    assert filt.filter(record("prefect.task_runs", "Task run failed with exception", bug))
    assert filt.filter(record("pipeline.trainer", "unrelated", ValueError("x")))


# --------------------------------------------------------------------------- 15. synthetic image size

def test_synthetic_image_size_is_bounded_at_the_call():
    from pipeline.synthetic import MAX_IMAGE_SIZE, generate_classification, generate_pairs

    with pytest.raises(ValueError, match=f"image_size must be an integer in \\[16, {MAX_IMAGE_SIZE}\\]"):
        generate_pairs(5, seed=0, noise_frac=0.0, image_size=100000)  # was: a 112 GiB allocation
    with pytest.raises(ValueError, match="image_size"):
        generate_classification(1, seed=0, image_size=100000)
    with pytest.raises(ValueError, match="noise_frac"):
        generate_pairs(5, seed=0, noise_frac=2.0)
    with pytest.raises(ValueError, match="seed"):
        generate_pairs(5, seed=-1, noise_frac=0.0)
    assert len(list(generate_pairs(2, seed=0, noise_frac=0.0, image_size=MAX_IMAGE_SIZE // 32))) == 2


def test_synth_cli_image_size(tmp_path, capsys):
    rc, err = _main(capsys, "--root", tmp_path, "data", "synth", "--name", "x", "--n", "2", "--image-size", "2000")
    assert rc == 1 and "image_size must be an integer in [16, 1024]" in _one_line(err)
    assert not (tmp_path / "datasets" / "x").exists()


# --------------------------------------------------------------------------- 16. CLI messages

def test_export_of_a_missing_run_names_it(tmp_path, capsys):
    rc, err = _main(capsys, "--root", tmp_path, "export", "nope")
    line = _one_line(err)
    assert rc == 1 and "no run 'nope'" in line and "Errno" not in line


def test_overlong_names_are_refused_by_name(tmp_path, capsys):
    from storage.workspace import check_name

    with pytest.raises(ValueError, match="longer than 200 bytes"):
        check_name("a" * 300)
    with pytest.raises(ValueError, match="longer than 1000 bytes"):
        check_name("/".join(["b" * 150] * 8))
    assert check_name("c" * 200) == "c" * 200
    rc, err = _main(capsys, "--root", tmp_path, "data", "synth", "--name", "n" * 300, "--n", "2")
    line = _one_line(err)
    assert rc == 1 and "longer than 200 bytes" in line and "Errno" not in line


def test_importing_evaluate_prints_no_faiss_loader_noise():
    code = ("import logging; logging.basicConfig(level=logging.INFO); import pipeline.evaluate; "
            "logging.getLogger('faiss.loader').warning('still shown')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ModuleNotFoundError" not in out.stderr and "swigfaiss" not in out.stderr
    assert "still shown" in out.stderr
