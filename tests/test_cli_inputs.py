"""The command line against what users really feed it: a review ran adversarial inputs through every command, and
each test here failed on the code before its fix (the review's findings: silent wrong results first, then files
lost or clobbered, then tracebacks and misleading messages)."""

import json
import os
import stat

import pytest
import torch

from neuroada_recipes import cli
from neuroada_recipes.cli import main
from test_cli import (read_json, run_cli, save_classifier, tiny_encoder,  # noqa: F401 (a fixture)
                      write_sentiment_csv, write_unbalanced_csv)


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


# ------------------------------------------------------------------------------------- silent wrong results


def accuracies_before_training(tmp_path, tiny_bert, classifiers):
    """Train one step (at a rate too small to matter) from each of ``classifiers`` ((name, class names, flip), see
    save_classifier) on the unbalanced tweets; check that each kept its own classes; their accuracies before."""
    sentiment = write_unbalanced_csv(tmp_path)
    befores = []
    for name, order, flip in classifiers:
        path = save_classifier(tmp_path, tiny_bert, name, order, flip)
        code, out, _ = run_cli(train_flags(path, sentiment, tmp_path / f"run-{name}", "--max_steps", "1",
                                           "--learning_rate", "1e-9"))
        assert code == 0, out
        assert "classes: " + path + "'s own, in its order" in out
        befores.append(read_json(tmp_path / f"run-{name}" / "metrics.json")["before"]["accuracy"])
        assert read_json(tmp_path / f"run-{name}" / "adapter" / "neuroada_run.json")["labels"] == order
    return befores


def test_training_from_a_classifier_keeps_its_classes_and_head(tmp_path, tiny_bert):
    """A classifier whose ids run the other way round is the same model: its accuracy before training is the same,
    and training goes on from its head (the data's own sorted order used to scramble it)."""
    befores = accuracies_before_training(tmp_path, tiny_bert, [("plain", ["negative", "positive"], False),
                                                               ("flipped", ["positive", "negative"], True)])
    assert befores[0] == befores[1]
    assert befores[0] != 0.5  # (the head predicts one class more often, so that a scramble shows)


def test_a_classifier_whose_class_names_differ_in_case_keeps_its_classes_and_head(tmp_path, tiny_bert):
    """POSITIVE/NEGATIVE in the model, positive/negative in the data: the same classes. The data's sorted order used
    to take the ids and kept the base head, scrambled (accuracy before training was that of the flipped head)."""
    befores = accuracies_before_training(tmp_path, tiny_bert, [("plain", ["negative", "positive"], False),
                                                               ("upper", ["POSITIVE", "NEGATIVE"], True)])
    assert befores[0] == befores[1] != 0.5
    # eval of the run on the data as written (lower case) scores the same classes
    code, out, _ = run_cli(["eval", "--adapter", str(tmp_path / "run-upper" / "adapter"), "--output",
                            str(tmp_path / "m.json")])
    assert code == 0, out
    assert read_json(tmp_path / "m.json")["accuracy"] == befores[1]


def test_labels_that_differ_only_in_case_from_two_classes_are_not_merged(tmp_path, tiny_bert):
    """Data holding both 'pos' and 'POS' names two classes of its own: a base naming 'POS' alone does not absorb
    both."""
    data = tmp_path / "cases.csv"
    data.write_text("text,label\n" + "".join(f"row {i} is {w},{c}\n" for i in range(30)
                                             for w, c in (("good", "pos"), ("great", "POS"))))
    path = save_classifier(tmp_path, tiny_bert, "upper", ["POS", "NEG"])
    code, out, _ = run_cli(train_flags(path, str(data), tmp_path / "run", "--max_steps", "1"))
    assert code == 0, out
    assert read_json(tmp_path / "run" / "adapter" / "neuroada_run.json")["labels"] == ["POS", "pos"]


def test_a_classifier_with_another_number_of_classes_gets_a_new_head(tmp_path, tiny_bert):
    data = tmp_path / "three.csv"
    data.write_text("text,label\n" + "".join(f"row {i} is {w},{c}\n" for i in range(30)
                                             for w, c in (("good", "pos"), ("bad", "neg"), ("so so", "mid"))))
    code, out, _ = run_cli(train_flags(tiny_bert, str(data), tmp_path / "run"))
    assert code == 0, out
    assert "is a classifier with 2 outputs, so its head is replaced by a new 3-class head" in out


def test_scoring_a_classifier_on_data_that_lacks_a_class_keeps_its_head(tmp_path, tiny_bert, capsys):
    path = save_classifier(tmp_path, tiny_bert, "three", ["0", "1", "2"])
    data = tmp_path / "two.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(40)))
    assert main(["eval", "--model", path, "--data", str(data), "--max_length", "16", "--test_size", "20",
                 "--output", str(tmp_path / "m.json")]) == 0
    assert read_json(tmp_path / "m.json")["examples_scored"] == 20
    wrong = tmp_path / "four.csv"
    wrong.write_text("text,label\n" + "".join(f"row {i},{i % 4}\n" for i in range(40)))
    assert main(["eval", "--model", path, "--data", str(wrong), "--max_length", "16", "--test_size", "20"]) == 2
    assert "not among the classes" in capsys.readouterr().err


@pytest.fixture
def word_answers(tmp_path):
    records = [{"instruction": f"Name colour {i}.", "input": "", "output": c, "answer": c}
               for i, c in enumerate(["red", "blue", "green", "Red."] * 10)]
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("kind", ["number", "option"])
def test_answers_the_answer_kind_cannot_read_are_refused(tmp_path, tiny_llama_dir, word_answers, capsys, kind):
    assert main(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data", word_answers,
                 "--answer_kind", kind, "--test_size", "8", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"are not {'numbers' if kind == 'number' else 'option labels'}" in err and "(e.g. 'red')" in err
    assert "--answer_kind text" in err and not (tmp_path / "run").exists()


def test_text_answers_are_read_and_compared_as_text():
    from neuroada_recipes.tasks import answers_match, extract_answer

    assert extract_answer("  Red.\nI hope that helps", "text") == "red"
    assert extract_answer('"Dark   Blue!"', "text") == "dark blue"
    assert extract_answer("\n\n### Instruction:\nred", "text") is None
    assert answers_match(extract_answer("Red.", "text"), "red", "text")
    assert answers_match(extract_answer("red", "text"), "Red.", "text")
    assert not answers_match(extract_answer("reddish", "text"), "red", "text")
    assert not answers_match(extract_answer("red blue", "text"), "red", "text")


def test_a_run_with_text_answers_scores_them(tmp_path, tiny_llama_dir, word_answers):
    code, out, _ = run_cli(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data", word_answers,
                            "--answer_kind", "text", "--test_size", "4", "--max_length", "48",
                            "--max_new_tokens", "3", "--max_steps", "1", "--output_dir", str(tmp_path / "run")])
    assert code == 0, out
    assert "exact_match" in out


def test_a_max_length_without_room_for_text_is_refused(tmp_path, tiny_encoder, sentiment, capsys):
    for length in ("1", "2"):
        assert main(train_flags(tiny_encoder, sentiment, tmp_path / "run", "--max_length", length)) == 2
        err = capsys.readouterr().err
        assert "leaves no room for text: the tokenizer adds 2 special tokens" in err
    assert not (tmp_path / "run").exists()


def test_a_max_length_beyond_the_models_positions_is_lowered_to_them(tmp_path, tiny_encoder):
    long = tmp_path / "long.csv"  # texts longer than the model's 64 positions
    long.write_text("text,label\n" + "".join(f"{'word ' * 100}{i},{i % 2}\n" for i in range(40)))
    code, out, _ = run_cli(train_flags(tiny_encoder, str(long), tmp_path / "run", "--max_length", "1000"))
    assert code == 0, out
    assert "max length: 64 tokens, all the positions" in out
    # the same command resumes: the run records the flag as given
    code, out, _ = run_cli(train_flags(tiny_encoder, str(long), tmp_path / "run", "--max_length", "1000",
                                       "--max_steps", "3", "--resume_from_checkpoint", "last"))
    assert code == 0, out


@pytest.mark.parametrize("targets, message", [
    ("query,valu", "names ['valu'] that no module"),
    ("nothing_here", "names ['nothing_here'] that no module"),
    (".*nomatch.*", "matches no module"),
])
def test_target_modules_that_name_no_module_are_refused(tmp_path, tiny_encoder, sentiment, capsys, targets, message):
    assert main(train_flags(tiny_encoder, sentiment, tmp_path / "run", "--target_modules", targets)) == 2
    err = capsys.readouterr().err
    assert message in err and "'value'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_eval_on_the_runs_own_training_data_says_the_score_is_not_held_out(trained, tmp_path, sentiment):
    code, out, _ = run_cli(["eval", "--adapter", str(trained / "adapter"), "--eval_data", sentiment,
                            "--output", str(tmp_path / "m.json")])
    assert code == 0, out
    scored = read_json(tmp_path / "m.json")
    assert scored["examples_scored"] == 120 and scored["training_rows_scored"] == 108
    assert "108 of the 120 rows scored are rows this adapter was trained on" in out
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("text,label\n" + "".join(f"a new sentence {i},{'positive' if i % 2 else 'negative'}\n"
                                             for i in range(10)))
    code, out, _ = run_cli(["eval", "--adapter", str(trained / "adapter"), "--eval_data", str(fresh),
                            "--output", str(tmp_path / "f.json")])
    assert code == 0 and read_json(tmp_path / "f.json")["training_rows_scored"] == 0 and "warning" not in out


def test_eval_rows_without_text_or_label_are_left_out_and_counted(trained, tmp_path):
    data = tmp_path / "dirty.csv"
    data.write_text("text,label\nthis is good news,positive\n,negative\n   ,positive\nawful day,\nbad one,negative\n")
    code, out, _ = run_cli(["eval", "--adapter", str(trained / "adapter"), "--eval_data", str(data),
                            "--output", str(tmp_path / "m.json")])
    assert code == 0, out
    assert read_json(tmp_path / "m.json")["examples_scored"] == 2
    assert "(5 rows, 3 without a text or label left out)" in out


def test_instruction_rows_without_an_output_do_not_train(tmp_path, tiny_llama_dir):
    records = [{"instruction": f"Calculate {a} + 1.", "input": "", "output": str(a + 1), "answer": str(a + 1)}
               for a in range(40)] + [{"instruction": "Calculate 99 + 1.", "input": "", "output": None,
                                       "answer": "100"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = run_cli(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data", str(path),
                            "--test_size", "4", "--max_length", "48", "--max_new_tokens", "3", "--max_steps", "1",
                            "--output_dir", str(tmp_path / "run")])
    assert code == 0, out
    assert "41 rows, 1 without a output dropped" in out.replace("an output", "a output")


def test_a_k_above_the_layer_widths_gets_the_rate_of_the_k_they_hold(tmp_path, tiny_encoder, sentiment):
    code, out, _ = run_cli(train_flags(tiny_encoder, sentiment, tmp_path / "run", "--k", "100000"))
    assert code == 0, out
    largest = 64  # tiny_encoder's widest input (its intermediate layer's output projection)
    rate = 3e-2 / largest ** 0.5
    assert read_json(tmp_path / "run" / "metrics.json")["learning_rate"] == pytest.approx(rate)
    assert f"the rule for k={largest}" in out


# ------------------------------------------------------------------------------- one-line errors and messages


def test_data_files_are_read_by_extension_or_refused_clearly(tmp_path, tiny_encoder, sentiment, capsys):
    rows = open(sentiment).read()
    upper = tmp_path / "SENTIMENT.CSV"
    upper.write_text(rows)
    tsv = tmp_path / "sentiment.tsv"
    tsv.write_text(rows.replace(",", "\t"))
    for path in (upper, tsv):
        code, out, _ = run_cli(train_flags(tiny_encoder, str(path), tmp_path / f"run-{path.suffix}"))
        assert code == 0, out
        assert "120 rows, 120 distinct texts" in out
    text = tmp_path / "sentiment.txt"
    text.write_text(rows)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\n".encode() + "caf\xe9 ol\xe9,positive\n".encode("latin-1") * 3)
    for source, message in ((str(text), "is not one of the kinds read"),
                            (str(latin), "save the file as UTF-8"),
                            ("no-such-org/no-such-data-set-xyz", "cannot load the data set")):
        assert main(train_flags(tiny_encoder, source, tmp_path / "r")) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_errors_about_eval_data_name_the_eval_file(trained, tmp_path, capsys):
    bad = tmp_path / "eval_badcol.csv"
    bad.write_text("sentence,label\nsome text,positive\n")
    assert main(["eval", "--adapter", str(trained / "adapter"), "--eval_data", str(bad)]) == 2
    assert f"{str(bad)!r} has no column 'text'" in capsys.readouterr().err
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("text,label\nsome text,neutral\n")
    assert main(["eval", "--adapter", str(trained / "adapter"), "--eval_data", str(unseen)]) == 2
    err = capsys.readouterr().err
    assert f"the test rows of {str(unseen)!r} hold labels ['neutral']" in err and "leave those rows out" in err


def test_instruction_column_errors_name_instruction_columns(tmp_path, tiny_llama_dir, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "output": "1", "answer": "1"}) + "\n" for i in range(20)))
    assert main(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data", str(path),
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "has no column 'instruction'" in err and "needs the columns instruction, output and answer" in err
    assert "--label_column" not in err


def test_no_training_rows_left_is_said_as_such(tmp_path, tiny_encoder, sentiment, capsys):
    assert main(train_flags(tiny_encoder, sentiment, tmp_path / "run", "--eval_data", sentiment)) == 2
    assert "no training rows are left" in capsys.readouterr().err


def test_the_run_record_holds_absolute_paths_so_eval_works_from_anywhere(tmp_path, tiny_encoder, sentiment,
                                                                         monkeypatch):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(sentiment, work / "data.csv")
    monkeypatch.chdir(work)
    assert run_cli(train_flags(tiny_encoder, "data.csv", "run"))[0] == 0
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["eval", "--adapter", "work/run/adapter", "--output", "m.json"])
    assert code == 0, out
    assert read_json(tmp_path / "m.json")["examples_scored"] == 12


def test_a_label_column_of_scores_is_not_taken_for_classes(tmp_path, tiny_encoder, capsys):
    data = tmp_path / "scores.csv"
    data.write_text("text,label\n" + "".join(f"review number {i},{(i * 37 % 100) / 10:.1f}\n" for i in range(60)))
    assert main(train_flags(tiny_encoder, str(data), tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "a score or an id, not classes" in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- found by a review of the fixes above


def test_integer_training_labels_and_named_eval_labels_are_refused_not_relabelled(tmp_path, tiny_encoder, capsys):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"good thing {i},0\nbad thing {i},1\n" for i in range(30)))
    named = tmp_path / "named.csv"
    named.write_text("text,label\nanother good one,positive\nanother bad one,negative\n")
    assert main(train_flags(tiny_encoder, str(train), tmp_path / "run", "--eval_data", str(named))) == 2
    assert "not among the classes the model was trained on, ['0', '1']" in capsys.readouterr().err


def test_a_run_resumes_from_another_folder_with_relative_paths(tmp_path, tiny_encoder, sentiment, monkeypatch):
    import shutil

    work = tmp_path / "a"
    (work / "sub").mkdir(parents=True)
    shutil.copy(sentiment, work / "data.csv")
    monkeypatch.chdir(work)
    assert run_cli(train_flags(tiny_encoder, "data.csv", "run"))[0] == 0
    monkeypatch.chdir(work / "sub")
    code, out, _ = run_cli(train_flags(tiny_encoder, "../data.csv", "../run", "--max_steps", "3",
                                       "--resume_from_checkpoint", "last"))
    assert code == 0, out


def test_a_run_that_stopped_before_training_leaves_its_folder_free(tmp_path, tiny_encoder, sentiment, capsys):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="torchdistx"):  # transformers' own error, once the Trainer is made
        main(train_flags(tiny_encoder, sentiment, run, "--optim", "adamw_anyprecision"))
    assert os.listdir(run) == ["config.json"]  # (the premise: only the start record was written)
    code, out, _ = run_cli(train_flags(tiny_encoder, sentiment, run))
    assert code == 0, out


def test_answers_that_can_never_match_are_counted_and_warned_about_when_few():
    from neuroada_recipes.tasks import answer_readable

    assert answer_readable("1,234", "number") and answer_readable("-3", "number") and answer_readable(".5", "number")
    assert not answer_readable("1/2", "number") and not answer_readable("nan", "number")
    assert not answer_readable("", "text") and answer_readable("Paris.", "text")
    assert answer_readable("answer2", "option") and answer_readable("B", "option") and answer_readable("4", "option")
    assert not answer_readable("7", "option") and not answer_readable("red", "option")


def test_a_few_unreadable_answers_warn_and_count_as_wrong(tmp_path, tiny_llama_dir):
    import re

    records = [{"instruction": f"Calculate {a} + 1.", "input": "", "output": str(a + 1),
                "answer": "1/2" if a % 6 == 0 else str(a + 1)} for a in range(60)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = run_cli(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data", str(path),
                            "--test_size", "20", "--max_length", "48", "--max_new_tokens", "3",
                            "--max_steps", "1", "--evaluate_before", "false", "--output_dir", str(tmp_path / "run")])
    assert code == 0, out
    assert re.search(r"[1-9]\d* of 20 test answers .* are not numbers \(e.g. '1/2'\)", out)
    assert "they count as wrong" in out
