import json
import os

import pytest

import train as train_script
from checkpointing import main as checkpointing_main
from checkpointing import read_training_args, summarize_run
from test_train import tiny_args


def test_a_checkpoint_and_a_merged_lora_run_summarize_as_their_run_does(tiny_dirs, personachat_file, tmp_path, capsys):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2",
                                           "--eval_every", "1", "--lora_r", "4"))
    _, history = summarize_run(run_dir)
    assert [r["step"] for r in history] == [1, 2]
    _, history = summarize_run(run_dir / "checkpoint-1")  # the run's history up to the checkpoint's step
    assert [r["step"] for r in history] == [1]

    checkpointing_main([str(run_dir), "--merge", str(tmp_path / "merged")])
    capsys.readouterr()
    checkpointing_main([str(tmp_path / "merged")])
    printed = capsys.readouterr().out
    assert "step     1: ppl" in printed and "step     2: ppl" in printed
    merged_args = read_training_args(tmp_path / "merged")
    assert merged_args["lora_r"] == 0 and merged_args["merged_from"] == os.path.abspath(run_dir)
    assert merged_args["run_dir"] == os.path.abspath(tmp_path / "merged")
    lora_args = read_training_args(run_dir)  # the merged model has the LM's parameters, all trainable
    assert merged_args["parameters"] == merged_args["trainable_parameters"] < lora_args["parameters"]
    assert json.loads((run_dir / "training_args.json").read_text())["lora_r"] == 4  # the LoRA run itself unchanged
    checkpointing_main([str(run_dir / "checkpoint-1"), "--merge", str(tmp_path / "merged-1")])
    _, history = summarize_run(tmp_path / "merged-1")
    assert [r["step"] for r in history] == [1]  # a checkpoint merges with its run's history up to its step


def test_a_model_without_validation_history_still_loads(tiny_dirs, capsys):
    checkpointing_main([tiny_dirs["llama"]])
    assert "no validation history" in capsys.readouterr().out


def test_a_missing_run_is_named_without_a_flag_this_script_lacks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        checkpointing_main([str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nope'}: no such directory or file" in err and "--model_checkpoint" not in err
    with pytest.raises(SystemExit):  # not "has no LoRA adapter"
        checkpointing_main([str(tmp_path / "nope"), "--merge", str(tmp_path / "out")])
    assert f"error: {tmp_path / 'nope'}: no such directory or file" in capsys.readouterr().err


def test_a_bert_classifier_is_not_taken_for_a_run(tiny_bert_dir, tmp_path, capsys):
    from classifier import CONFIG_FILE, LabelSpace, BertClassifier, save_classifier
    from transformers import AutoModel, AutoTokenizer

    model = BertClassifier(AutoModel.from_pretrained(tiny_bert_dir), 2, "cls")
    save_classifier(model, AutoTokenizer.from_pretrained(tiny_bert_dir), LabelSpace(["neg", "pos"], "binary"), {},
                    tmp_path / "clf")
    assert (tmp_path / "clf" / CONFIG_FILE).is_file()
    with pytest.raises(SystemExit):
        checkpointing_main([str(tmp_path / "clf")])
    assert "clf: a classifier of bert_classifier.py, not a train.py run" in capsys.readouterr().err


def test_a_damaged_file_of_a_run_is_named_and_a_torn_last_record_is_left_out(tiny_dirs, personachat_file, tmp_path,
                                                                              caplog):
    from checkpointing import DamagedRunError, read_history

    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "4",
                                           "--eval_every", "2"))
    state = run_dir / "checkpoint-4" / "training_state.pt"
    whole = state.read_bytes()
    for damaged in (whole[:100], b"not a zip" * 10, whole[:5000] + bytes(100) + whole[5100:]):  # cut, other, flipped
        state.write_bytes(damaged)  # as a full disk or a power cut could leave it
        with pytest.raises(DamagedRunError, match=rf"^{state}: damaged, it cannot be read \(.*\); resume from an "
                                                  rf"earlier checkpoint: --resume {run_dir / 'checkpoint-2'}$"):
            train_script.train(["--resume", str(run_dir)])
    metrics = run_dir / "metrics.jsonl"
    records = metrics.read_text().splitlines()
    metrics.write_text(records[0] + "\n" + records[1][:20])  # killed while appending the step-4 record
    assert [record["step"] for record in read_history(run_dir)] == [2]
    assert f"{metrics}:2: a torn last record, left out" in caplog.text
    train_script.train(["--resume", str(run_dir / "checkpoint-2")])  # as the message said
    assert [record["step"] for record in read_history(run_dir)] == [2, 4]
    assert metrics.read_text().count("\n") == 2  # the torn record went with the rewrite
    metrics.write_text(records[0][:20] + "\n" + records[1] + "\n")
    with pytest.raises(DamagedRunError, match=rf"^{metrics}:1: not a JSON record"):
        read_history(run_dir)


def test_a_signal_during_a_save_acts_after_it_and_a_failing_save_keeps_its_own_error(caplog):
    import signal

    from checkpointing import signals_held

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop()

    before = signal.signal(signal.SIGUSR1, stop)
    try:
        done = []
        with pytest.raises(Stop):
            with signals_held((signal.SIGUSR1,)):
                os.kill(os.getpid(), signal.SIGUSR1)
                done.append("the rest of the save")
        assert done == ["the rest of the save"]
        with pytest.raises(OSError, match="No space left"):  # not hidden behind the signal's Stop
            with signals_held((signal.SIGUSR1,)):
                os.kill(os.getpid(), signal.SIGUSR1)
                raise OSError(28, "No space left on device")
        assert "SIGUSR1 came during a save that failed" in caplog.text
        assert signal.getsignal(signal.SIGUSR1) is stop
    finally:
        signal.signal(signal.SIGUSR1, before)
