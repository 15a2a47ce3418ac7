"""The command line against what users really feed it: a review ran adversarial inputs through every command, and
each test here failed on the code before its fix (the review's findings: silent wrong results first, then files
lost or clobbered, then tracebacks and misleading messages)."""

import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from neuroada_recipes import cli
from neuroada_recipes.cli import main
from test_cli import read_json, run_cli, tiny_encoder, write_sentiment_csv  # noqa: F401 (a fixture)


def train_flags(model, data, output, *extra):
    return ["train", "--model", model, "--data", data, "--output_dir", str(output), "--max_length", "16",
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--seed", "3",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--test_size", "12", *extra]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data"))


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------- files the user owns are left alone


def test_a_run_changes_the_modes_of_only_the_files_it_wrote(tmp_path, tiny_encoder, sentiment):
    run = tmp_path / "run"
    run.mkdir()
    (run / "id_key").write_text("secret")
    os.chmod(run / "id_key", 0o600)
    (run / "hooks").mkdir()
    (run / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    os.chmod(run / "hooks" / "pre-commit", 0o755)
    code, out, _ = run_cli(train_flags(tiny_encoder, sentiment, run, "--overwrite_output_dir"))
    assert code == 0, out
    assert mode(run / "id_key") == 0o600 and mode(run / "hooks" / "pre-commit") == 0o755
    assert mode(run / "adapter" / "adapter_model.safetensors") == 0o666 & ~cli._umask()  # safetensors writes 0600


def test_overwrite_replaces_the_earlier_run_and_keeps_other_files(tmp_path, tiny_encoder, sentiment):
    run = tmp_path / "run"
    assert run_cli(train_flags(tiny_encoder, sentiment, run, "--max_steps", "3"))[0] == 0
    assert (run / "checkpoint-3").is_dir()
    (run / "notes.txt").write_text("mine")
    code, out, _ = run_cli(train_flags(tiny_encoder, sentiment, run, "--overwrite_output_dir"))
    assert code == 0
    assert "replacing the earlier run" in out
    assert not (run / "checkpoint-3").exists()  # the old run's third checkpoint would pass for this run's
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (run / "notes.txt").read_text() == "mine"
    assert read_json(run / "metrics.json")["steps"] == 2


def test_resuming_from_another_folder_does_not_free_an_existing_run(tmp_path, tiny_encoder, sentiment, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(train_flags(tiny_encoder, sentiment, first))[0] == 0
    assert run_cli(train_flags(tiny_encoder, sentiment, second))[0] == 0
    adapter = (second / "adapter" / "adapter_model.safetensors").read_bytes()
    code = main(train_flags(tiny_encoder, sentiment, second, "--max_steps", "3", "--resume_from_checkpoint",
                            str(first / "checkpoint-2")))
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (second / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


@pytest.mark.parametrize("value", ["true", "last"])
def test_resume_true_continues_the_newest_checkpoint_of_the_run(tmp_path, tiny_encoder, sentiment, value):
    run = tmp_path / "run"
    assert run_cli(train_flags(tiny_encoder, sentiment, run))[0] == 0
    code, out, _ = run_cli(train_flags(tiny_encoder, sentiment, run, "--max_steps", "3",
                                       "--resume_from_checkpoint", value))
    assert code == 0, out
    assert read_json(run / "metrics.json")["steps"] == 3


@pytest.mark.parametrize("flags, message", [
    (["--resume_from_checkpoint", "no_such_checkpoint"], "is not a folder"),
    (["--k", "3"], "--k 3 (the checkpoint's: 1)"),
    (["--selection", "random"], "--selection random (the checkpoint's: magnitude)"),
    (["--seed", "7"], "--seed 7 (the checkpoint's: 3)"),
])
def test_resuming_with_other_settings_or_no_checkpoint_is_refused_before_loading(tmp_path, tiny_encoder, sentiment,
                                                                                 capsys, monkeypatch, flags,
                                                                                 message):
    run = tmp_path / "run"
    assert run_cli(train_flags(tiny_encoder, sentiment, run))[0] == 0
    monkeypatch.setattr(cli, "TaskRun", lambda *a, **k: pytest.fail("loaded before the arguments were checked"))
    if "--resume_from_checkpoint" not in flags:
        flags = flags + ["--resume_from_checkpoint", str(run / "checkpoint-2")]
    assert main(train_flags(tiny_encoder, sentiment, run, "--max_steps", "3", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, tiny_encoder, sentiment, capsys,
                                                                    monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setattr(cli, "TaskRun", lambda *a, **k: pytest.fail("loaded before the arguments were checked"))
    for argv, message in [
        (train_flags(tiny_encoder, sentiment, a_file / "sub"), "which is a file"),
        (["eval", "--model", tiny_encoder, "--data", sentiment, "--output", str(tmp_path)], "is a folder"),
        (["merge", "--adapter", str(tmp_path), "--output", str(a_file / "merged")], "which is a file"),
        (train_flags(tiny_encoder, sentiment, tmp_path / "r", "--per_device_train_batch_size", "0"),
         "--per_device_train_batch_size must be at least 1"),
        (["eval", "--model", tiny_encoder, "--data", sentiment, "--batch_size", "0"], "--batch_size must be"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder, sentiment):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert run_cli(train_flags(tiny_encoder, sentiment, run))[0] == 0
    return run


def test_merge_refuses_a_partial_folder_left_behind(trained, tmp_path, capsys):
    (tmp_path / "merged.partial").mkdir()
    (tmp_path / "merged.partial" / "model.safetensors.index.json").write_text("{}")
    assert main(["merge", "--adapter", str(trained / "adapter"), "--output", str(tmp_path / "merged")]) == 2
    assert "merged.partial exists" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_inspect_writes_the_report_where_it_says_and_leaves_folders_alone(trained, tmp_path, capsys):
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "key").write_text("k")
    os.chmod(folder / "key", 0o600)
    for output, message in ((folder, "give a file name ending in"), (tmp_path / "report.txt", "ending in")):
        assert main(["inspect", "--adapter", str(trained / "adapter"), "--output", str(output)]) == 2
        assert message in capsys.readouterr().err
    assert mode(folder / "key") == 0o600 and not (tmp_path / "victim.png").exists()
    assert main(["inspect", "--adapter", str(trained / "adapter"), "--output", str(tmp_path / "r.svg")]) == 0
    assert f"report written to {tmp_path / 'r.svg'}" in capsys.readouterr().out
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_damaged_adapter_files_are_one_line_errors(trained, tmp_path, capsys, damage):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    if damage == "config":
        (adapter / "adapter_config.json").write_text('{"peft_type": "NEUROADA", ')
    else:
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5])
    for argv in (["inspect", "--adapter", str(adapter)], ["eval", "--adapter", str(adapter)],
                 ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert ("is not valid JSON" if damage == "config" else "cannot be read") in err and "Traceback" not in err


@pytest.mark.parametrize("suffix, text", [(".json", '{"k": 2,'), (".yaml", "k: [2\n")])
def test_a_config_file_that_does_not_parse_is_a_one_line_error(tmp_path, capsys, suffix, text):
    path = tmp_path / f"train{suffix}"
    path.write_text(text)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid" in err and "Traceback" not in err


def test_a_yaml_list_of_target_modules_is_a_list_of_names(tmp_path, tiny_encoder, sentiment):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {tiny_encoder}\ndata: {sentiment}\ntarget_modules: [query, value]\nk: 2\n"
                    f"output_dir: {tmp_path / 'run'}\nlabel_names: [labels, extra]\n")
    task, adapter, _, training = cli.parse_train_arguments([str(path)])
    assert adapter.target_modules == "query,value" and training.label_names == ["labels", "extra"]
    assert cli.adapter_config(adapter, "SEQ_CLS").target_modules == {"query", "value"}
