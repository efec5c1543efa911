import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_script
from conftest import ROOT, run_torchrun
from modeling import load_tokenizer_and_model
from test_dialogs import CONVAI2_NO_CANDS, CONVAI2_WITH_CANDS
from test_modeling import needs_cxx
from utils import free_port


def tiny_args(tiny_dirs, data, tmp_path, out="run", *extra):
    return ["--model_checkpoint", tiny_dirs["llama"], "--dataset_path", data,
            "--dataset_cache", str(tmp_path / "cache"), "--train_batch_size", "2", "--valid_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--device", "cpu", "--lr", "1e-2",
            "--output_dir", str(tmp_path / out), *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_directory_holds_what_later_scripts_load(tiny_dirs, personachat_file, tmp_path):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--n_epochs", "2",
                                           "--eval_before_start"))
    names = set(os.listdir(run_dir))
    assert {"config.json", "model.safetensors", "double_heads.safetensors", "tokenizer.json", "training_args.json",
            "metrics.jsonl"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert sorted(n for n in names if n.startswith("checkpoint-")) == ["checkpoint-12", "checkpoint-6"]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [0, 6, 12]
    for m in metrics:
        assert m["ppl"] == pytest.approx(math.exp(m["nll"])) and 0 <= m["mc_accuracy"] <= 1
    assert metrics[-1]["nll"] < metrics[0]["nll"]
    assert "tokens_per_s" not in metrics[0]  # before any step
    assert all(m["tokens_per_s"] > 0 and m["steps_per_s"] > 0 for m in metrics[1:])
    assert metrics[2]["train_seconds"] > metrics[1]["train_seconds"]
    args = json.load(open(os.path.join(run_dir, "training_args.json")))
    assert args["n_epochs"] == 2 and args["total_steps"] == 12
    tokenizer, model, layout = load_tokenizer_and_model(str(run_dir))
    saved = load_file(os.path.join(run_dir, "double_heads.safetensors"))
    assert torch.equal(model.mc_head.weight, saved["mc_head.weight"])
    assert torch.equal(model.speaker_embeddings, saved["speaker_embeddings"])
    assert saved["speaker_embeddings"].abs().sum() > 0  # trained away from their zero start


def test_max_steps_stops_then_validates_and_saves(tiny_dirs, personachat_file, tmp_path):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2",
                                           "--max_valid_examples", "3"))
    assert [m["step"] for m in read_metrics(run_dir)] == [2]
    assert os.path.isdir(os.path.join(run_dir, "checkpoint-2"))


def train_interrupted_in_epoch_2(monkeypatch, argv):
    """train.py with argv, killed (KeyboardInterrupt) at the first batch of epoch 2."""
    real_make_update = train_script.make_update

    def make_update_that_dies_in_epoch_2(*args, **kwargs):
        update = real_make_update(*args, **kwargs)

        def dying(engine, batch):
            if engine.state.epoch == 2:
                raise KeyboardInterrupt
            return update(engine, batch)
        return dying

    with monkeypatch.context() as patch:
        patch.setattr(train_script, "make_update", make_update_that_dies_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train_script.train(argv)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_dirs, personachat_file, tmp_path,
                                                                  monkeypatch):
    whole = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "whole", "--n_epochs", "2"))
    train_interrupted_in_epoch_2(monkeypatch, tiny_args(tiny_dirs, personachat_file, tmp_path, "cut", "--n_epochs", "2"))
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-6"]  # the last good one stays
    with pytest.raises(train_script.RunError, match=r"its epochs were 12 batches per process .* these flags make 24 .*: "
                                                    r"resume with 1 processes and --train_batch_size 2$"):
        train_script.train(["--resume", str(cut), "--train_batch_size", "1"])  # epochs would misalign
    with open(cut / "metrics.jsonl", "a") as f:  # a validation logged, then stopped before its checkpoint was saved
        f.write(json.dumps({"step": 9, "ppl": 1.0}) + "\n")
    resumed = train_script.train(["--resume", str(cut)])  # the saved flags come back
    assert resumed == cut
    a, b = load_file(os.path.join(whole, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert [m["step"] for m in read_metrics(cut)] == [6, 12]


def test_a_run_stopped_before_its_first_checkpoint_starts_over_on_resume(tiny_dirs, personachat_file, tmp_path,
                                                                         monkeypatch):
    flags = ("--n_epochs", "1", "--eval_before_start")
    whole = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "whole", *flags))
    real_make_update = train_script.make_update

    def dies_at_once(*args, **kwargs):
        def dying(engine, batch):
            raise KeyboardInterrupt
        return dying

    with monkeypatch.context() as patch:
        patch.setattr(train_script, "make_update", dies_at_once)
        with pytest.raises(KeyboardInterrupt):
            train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "cut", *flags))
    cut = tmp_path / "cut"
    assert not list(cut.glob("checkpoint-*")) and [m["step"] for m in read_metrics(cut)] == [0]
    assert train_script.make_update is real_make_update
    assert train_script.train(["--resume", str(cut)]) == cut
    assert [m["step"] for m in read_metrics(cut)] == [0, 6]  # the step-0 validation once, not twice
    a, b = load_file(os.path.join(whole, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_sharding_and_recomputation_can_be_turned_off_on_resume_and_a_missing_gpu_is_named(capsys):
    args = train_script.build_parser().parse_args(["--no-fsdp", "--no-gradient_checkpointing"])
    assert args.fsdp is False and args.gradient_checkpointing is False
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train_script.get_args(["--device", "cuda"])
        assert "--device cuda: this torch sees no CUDA GPU" in capsys.readouterr().err


def test_resume_after_max_steps_takes_the_remaining_steps_and_a_finished_run_stays(tiny_dirs, personachat_file,
                                                                                    tmp_path):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2",
                                           "--n_epochs", "1", "--eval_before_start"))
    train_script.train(["--resume", str(run_dir), "--max_steps", "0"])  # step 2 is not validated again
    assert [(m["step"], m["epoch"]) for m in read_metrics(run_dir)] == [(0, 0), (2, 1), (6, 1)]
    train_script.train(["--resume", str(run_dir)])  # already done: nothing runs, nothing is added
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 2, 6]


def test_resume_refuses_another_output_dir(tiny_dirs, personachat_file, tmp_path, capsys):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_script.get_args(["--resume", str(run_dir), "--output_dir", str(tmp_path / "elsewhere")])
    assert "error: --output_dir: a resumed run goes on in the directory given to --resume" in capsys.readouterr().err


def test_a_directory_holding_a_run_is_not_trained_into_again(tiny_dirs, personachat_file, tmp_path, capsys):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "1"))
    with pytest.raises(SystemExit):
        train_script.get_args(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--lr", "1e-3"))
    assert f"--output_dir {run_dir} already holds a run" in capsys.readouterr().err
    assert train_script.get_args(tiny_args(tiny_dirs, personachat_file, tmp_path, "new")).output_dir
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "classifier.json").write_text("{}")  # a BERT classifier's directory: not overwritten either
    with pytest.raises(SystemExit):
        train_script.get_args(tiny_args(tiny_dirs, personachat_file, tmp_path, "clf"))
    assert f"--output_dir {tmp_path / 'clf'} holds a saved model (classifier.json)" in capsys.readouterr().err


def test_a_resumed_run_goes_on_rotating_the_checkpoints_saved_before_it(tiny_dirs, personachat_file, tmp_path):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "3",
                                           "--n_epochs", "1", "--eval_every", "1"))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    train_script.train(["--resume", str(run_dir), "--max_steps", "0"])  # saves steps 4, 5 and 6
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    assert len(list(run_dir.glob("best-checkpoint-*"))) == 1


def test_nan_loss_stops_the_run_without_saving(tiny_dirs, personachat_file, tmp_path):
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama"])
    with torch.no_grad():
        model.lm.get_input_embeddings().weight.fill_(float("nan"))
    model.lm.save_pretrained(tmp_path / "nan_model")
    tokenizer.save_pretrained(tmp_path / "nan_model")
    args = tiny_args(tiny_dirs, personachat_file, tmp_path)
    args[1] = str(tmp_path / "nan_model")
    with pytest.raises(train_script.RunError, match=r"^loss is nan at iteration 1 \(before the first optimizer step\): stopped; "
                                                    r"nothing saved yet in .*run \(lower --lr"):
        train_script.train(args)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("text", [CONVAI2_WITH_CANDS * 3, CONVAI2_NO_CANDS], ids=["cands", "no_cands"])
def test_trains_on_a_parlai_convai2_file(tiny_dirs, tmp_path, text):
    path = tmp_path / "train_self_original.txt"
    path.write_text(text)
    run_dir = train_script.train(tiny_args(tiny_dirs, str(path), tmp_path, "run", "--n_epochs", "1",
                                           "--gradient_accumulation_steps", "1"))
    last = read_metrics(run_dir)[-1]
    assert last["step"] > 0 and 0 <= last["mc_accuracy"] <= 1 and last["ppl"] > 1  # validated on its held-out part


def test_gpt2_double_heads_train_and_reload(tiny_dirs, personachat_file, tmp_path):
    args = tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2")
    args[1] = tiny_dirs["gpt2"]
    run_dir = train_script.train(args)
    _, model, layout = load_tokenizer_and_model(str(run_dir))
    assert type(model.lm).__name__ == "GPT2DoubleHeadsModel"
    saved = load_file(run_dir / "model.safetensors")
    base = load_file(os.path.join(tiny_dirs["gpt2"], "model.safetensors"))
    assert any(k in base and not torch.equal(t, base[k]) for k, t in saved.items())  # trained, not the base resaved
    head = {k: t for k, t in saved.items() if k.startswith("multiple_choice_head.")}
    loaded = model.lm.state_dict()
    assert head and all(torch.equal(loaded[k], t) for k, t in head.items())  # the trained head inside the LM


@pytest.mark.parametrize("launcher", [["torch.distributed.run"], ["torch.distributed.launch"]],
                         ids=["torchrun", "legacy_launch"])
def test_two_process_cpu_training_ends_with_identical_weights(tiny_dirs, personachat_file, tmp_path, launcher):
    port = str(free_port())  # for the rendezvous
    cmd = [sys.executable, "-m", *launcher, "--nproc_per_node=2", "--master_port", port,
           os.path.join(ROOT, "train.py"), *tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2")]
    done = run_torchrun(cmd, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Weights identical on all 2 ranks" in done.stderr
    args = json.load(open(tmp_path / "run" / "training_args.json"))
    assert args["world_size"] == 2
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [2]


# Run the script named by the first argument as __main__, after a prelude (a test's patch or signal handler).
RUN_SCRIPT = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

POISON_RANK_1 = """
import torch.distributed as dist
import training
real, calls = training.double_head_loss, []


def poisoned(*args, **kwargs):  # the loss of rank 1's second training batch is NaN, rank 0's stay finite
    loss, lm_loss, mc_loss = real(*args, **kwargs)
    calls.append(1)
    return (loss * float("nan") if dist.get_rank() == 1 and len(calls) == 2 else loss), lm_loss, mc_loss


training.double_head_loss = poisoned
"""


def test_a_nan_loss_in_one_process_stops_every_process_keeping_the_last_checkpoint(tiny_dirs, personachat_file,
                                                                                    tmp_path):
    script = tmp_path / "poison.py"
    script.write_text(POISON_RANK_1 + RUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           str(script), os.path.join(ROOT, "train.py"),
           *tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--gradient_accumulation_steps", "1",
                      "--eval_every", "1", "--max_steps", "3")]
    done = run_torchrun(cmd, timeout=180)  # no process left waiting
    assert done.returncode != 0
    kept = "after optimizer step 1\\): stopped; the checkpoint of step 1 stays in "
    assert re.search("train.py: error: loss is nan at iteration 2 \\(" + kept, done.stderr), done.stderr[-3000:]
    assert re.search("train.py: error: loss is non-finite in another process at iteration 2 \\(" + kept, done.stderr)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]


def test_gradient_accumulation_larger_than_the_data_is_refused(tiny_dirs, personachat_file, tmp_path):
    with pytest.raises(ValueError, match=r"--gradient_accumulation_steps 500: more than the batches of 2 that "
                                         r"\d+ training examples make per process \(of 1\); lower it or "
                                         r"--train_batch_size"):
        train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--n_epochs", "1",
                                     "--gradient_accumulation_steps", "500"))


def test_bad_data_file_ends_the_script_with_file_and_line(tiny_dirs, tmp_path):
    bad = tmp_path / "train_bad.txt"
    bad.write_text("1 hi\tok\n2 there\n4 oops\tyes\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                           *tiny_args(tiny_dirs, str(bad), tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(f"train.py: error: {bad}:3: line id 4 follows 2")


@pytest.mark.parametrize("signal_name, code, said", [("SIGINT", 130, "Interrupted"),  # Ctrl-C
                                                     ("SIGTERM", 143, r"Terminated \(SIGTERM\)")])  # kill, a scheduler
def test_ctrl_c_or_sigterm_stops_a_run_keeping_its_last_checkpoint(tiny_dirs, personachat_file, tmp_path, signal_name,
                                                                   code, said):
    import signal
    import time

    run_dir = tmp_path / "run"
    script = tmp_path / "ctrl_c_raises.py"  # as in a terminal, even where a shell started the tests in the background
    script.write_text("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n" + RUN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), os.path.join(ROOT, "train.py"),
                             *tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--n_epochs", "200",
                                        "--eval_every", "1")], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.time() + 120
    while not list(run_dir.glob("checkpoint-*/training_state.pt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # some steps on: it may well land mid-save (every step saves)
    proc.send_signal(getattr(signal, signal_name))
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code and "Traceback" not in err, err[-2000:]
    assert re.search(said + r" at optimizer step \d+: the checkpoint of step \d+ stays in .*; go on with --resume ",
                     err)
    assert "ERROR" not in err  # ignite's "Engine run is terminating due to exception" is no error here
    step = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    resumed = train_script.train(["--resume", str(run_dir), "--max_steps", str(step + 1), "--n_epochs", "200"])
    assert read_metrics(resumed)[-1]["step"] == step + 1


def test_a_stop_during_a_save_takes_effect_once_the_checkpoint_is_whole(tiny_dirs, personachat_file, tmp_path,
                                                                         monkeypatch, caplog):
    import signal

    import checkpointing

    run_dir, real_publish = tmp_path / "run", checkpointing.publish

    def stopped_midway(src, dst):  # SIGTERM as the run's top level starts to take checkpoint-2's files
        if Path(dst) == run_dir and Path(src).name == "checkpoint-2":
            os.kill(os.getpid(), signal.SIGTERM)
        real_publish(src, dst)

    monkeypatch.setattr(checkpointing, "publish", stopped_midway)
    before = signal.signal(signal.SIGTERM, train_script.raise_terminated)  # as train.py's __main__ sets it
    try:
        with pytest.raises(train_script.Terminated):
            train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "4",
                                         "--eval_every", "2"))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "at optimizer step 2: the checkpoint of step 2 stays" in caplog.text
    for name in ("model.safetensors", "double_heads.safetensors", "config.json"):  # all of step 2, none missing
        assert (run_dir / name).stat().st_ino == (run_dir / "checkpoint-2" / name).stat().st_ino
    (run_dir / "double_heads.safetensors").unlink()  # as a kill -9 mid-publish could leave it
    train_script.train(["--resume", str(run_dir), "--max_steps", "2"])  # nothing to train: the top level is mended
    assert (run_dir / "double_heads.safetensors").stat().st_ino == (
        run_dir / "checkpoint-2" / "double_heads.safetensors").stat().st_ino


def test_a_chat_template_run_is_read_back_in_its_format(tiny_dirs, personachat_file, tmp_path):
    from layouts import InputFormatError
    from modeling import stored_input_format

    args = tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2")
    args[1] = tiny_dirs["llama_chat"]
    run_dir = train_script.train(args)  # no --input_format: the tokenizer's chat template is the default
    assert json.load(open(os.path.join(run_dir, "training_args.json")))["input_format"] == "chat_template"
    assert stored_input_format(str(run_dir)) == "chat_template"
    tokenizer, model, layout = load_tokenizer_and_model(str(run_dir))
    assert layout.name == "chat_template" and model.input_format == "chat_template"
    assert "<speaker1>" not in tokenizer.get_vocab() and tokenizer.pad_token == "<pad>"  # only a pad was missing
    assert len(tokenizer) == model.lm.get_input_embeddings().num_embeddings
    with pytest.raises(InputFormatError, match="was trained with --input_format chat_template"):
        load_tokenizer_and_model(str(run_dir), input_format="transfertransfo")
    args = tiny_args(tiny_dirs, personachat_file, tmp_path, "tt", "--max_steps", "1", "--input_format", "transfertransfo")
    args[1] = tiny_dirs["llama_chat"]
    tokenizer, _, layout = load_tokenizer_and_model(str(train_script.train(args)))
    assert layout.name == "transfertransfo" and "<speaker1>" in tokenizer.get_vocab()
    args = tiny_args(tiny_dirs, personachat_file, tmp_path, "tr", "--max_steps", "1", "--input_format", "transcript")
    args[1] = tiny_dirs["llama_chat"]
    run_dir = train_script.train(args)
    tokenizer, model, layout = load_tokenizer_and_model(str(run_dir))
    assert layout.name == "transcript" == stored_input_format(str(run_dir)) and "<speaker1>" not in tokenizer.get_vocab()
    with pytest.raises(InputFormatError, match="was trained with --input_format transcript"):
        load_tokenizer_and_model(str(run_dir), input_format="chat_template")


def test_eval_every_validates_mid_epoch_and_keeps_the_best_checkpoint_beside_the_newest(tiny_dirs, personachat_file,
                                                                                         tmp_path):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "5",
                                           "--eval_every", "2", "--lr", "0.7"))  # too high: step 2 stays the best
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [2, 4, 5]
    assert min(metrics, key=lambda m: m["ppl"])["step"] == 2
    names = sorted(p.name for p in run_dir.iterdir() if "checkpoint-" in p.name)
    assert names == ["best-checkpoint-2", "checkpoint-4", "checkpoint-5"]
    best = run_dir / "best-checkpoint-2"
    assert (best / "model.safetensors").is_file() and not (best / "training_state.pt").exists()
    _, model, _ = load_tokenizer_and_model(str(best))
    best_weights = load_file(best / "model.safetensors")
    loaded = model.lm.state_dict()
    assert loaded.keys() >= best_weights.keys() - {"lm_head.weight"}  # tied to the embeddings
    assert all(torch.equal(loaded[k], t) for k, t in best_weights.items() if k in loaded)
    top = load_file(os.path.join(run_dir, "model.safetensors"))  # the run's top level is the newest, not the best
    newest = run_dir / "checkpoint-5" / "model.safetensors"
    assert (run_dir / "model.safetensors").stat().st_ino == newest.stat().st_ino
    assert any(not torch.equal(t, best_weights[k]) for k, t in top.items())


def test_a_resumed_run_replaces_a_worse_best_checkpoint(tiny_dirs, personachat_file, tmp_path):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2",
                                           "--eval_every", "1"))
    train_script.train(["--resume", str(run_dir), "--max_steps", "4"])
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    best_step = min(metrics, key=lambda m: m["ppl"])["step"]
    assert best_step > 2  # a best from before the resume was there to replace
    assert sorted(p.name for p in run_dir.glob("best-checkpoint-*")) == [f"best-checkpoint-{best_step}"]
    same_step = [run_dir / f"{prefix}checkpoint-{best_step}" / "model.safetensors" for prefix in ("", "best-")]
    assert same_step[0].stat().st_ino == same_step[1].stat().st_ino  # one copy of the weights, linked


def test_resuming_from_an_older_checkpoint_abandons_what_the_attempt_after_it_wrote(tiny_dirs, personachat_file,
                                                                                    tmp_path, caplog):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "6",
                                           "--eval_every", "2"))
    names = lambda: sorted(p.name for p in run_dir.iterdir() if "checkpoint-" in p.name)  # noqa: E731
    inode = lambda d: (run_dir / d / "model.safetensors").stat().st_ino  # noqa: E731
    assert names() == ["best-checkpoint-6", "checkpoint-4", "checkpoint-6"]  # the best one of step 4 is gone
    first = load_file(run_dir / "checkpoint-6" / "model.safetensors")
    train_script.train(["--resume", str(run_dir / "checkpoint-4"), "--lr", "0.7"])  # another, worse, step 6
    assert "removed what an earlier attempt wrote past it: checkpoint-6, best-checkpoint-6" in caplog.text
    # checkpoint-4 records best-checkpoint-4, made again from its own weights: the step-6 one is worse
    assert names() == ["best-checkpoint-4", "checkpoint-4", "checkpoint-6"]
    assert inode("best-checkpoint-4") == inode("checkpoint-4") and inode("") == inode("checkpoint-6")
    again = load_file(run_dir / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(t, first[k]) for k, t in again.items())  # this attempt's weights, not the first's
    state = torch.load(run_dir / "checkpoint-6" / "training_state.pt", weights_only=True)
    assert [f for _, f in state["best_checkpoint"]["_saved"]] == ["best-checkpoint-4"]
    history = read_metrics(run_dir)
    assert [m["step"] for m in history] == [2, 4, 6] and history[2]["ppl"] > history[1]["ppl"]
    train_script.train(["--resume", str(run_dir / "checkpoint-4"), "--max_steps", "5"])
    assert names() == ["best-checkpoint-4", "checkpoint-4", "checkpoint-5"]  # nothing left of the step-6 attempts


def test_a_crash_between_the_best_and_the_newest_checkpoint_keeps_the_best_one_the_newest_records(
        tiny_dirs, personachat_file, tmp_path, monkeypatch):
    import checkpointing

    real_save, calls = torch.save, []

    def full_disk_at_the_second_state(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    flags = ("--max_steps", "4", "--eval_every", "2")
    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.torch, "save", full_disk_at_the_second_state)
        with pytest.raises(OSError, match="No space left"):
            train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", *flags))
    run_dir = tmp_path / "run"
    names = lambda: sorted(p.name for p in run_dir.iterdir() if "checkpoint-" in p.name)  # noqa: E731
    # step 4 was the better one, but checkpoint-2, the one to resume from, records best-checkpoint-2: it stays
    assert names() == ["best-checkpoint-2", "best-checkpoint-4", "checkpoint-2"]
    train_script.train(["--resume", str(run_dir)])
    assert names() == ["best-checkpoint-4", "checkpoint-2", "checkpoint-4"]
    whole = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "whole", *flags))
    a, b = load_file(whole / "best-checkpoint-4" / "model.safetensors"), load_file(
        run_dir / "best-checkpoint-4" / "model.safetensors")
    assert all(torch.allclose(t, b[k], atol=1e-6) for k, t in a.items())


def test_max_reply_len_cuts_the_training_replies_and_validation_keeps_them_whole(tiny_dirs, personachat_file,
                                                                                  tmp_path):
    runs = [train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, name, "--max_steps", "1",
                                         "--eval_before_start", *flags))
            for name, flags in (("whole", []), ("cut", ["--max_reply_len", "1"]))]
    before = [read_metrics(run)[0] for run in runs]
    assert before[0]["step"] == before[1]["step"] == 0 and before[0]["nll"] == before[1]["nll"]
    weights = [load_file(run / "model.safetensors") for run in runs]
    assert any(not torch.equal(t, weights[1][k]) for k, t in weights[0].items())  # trained on other tokens


def test_mc_lr_gives_the_multiple_choice_head_its_own_peak_learning_rate(tiny_dirs, personachat_file, tmp_path):
    from training import linear_lr

    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2",
                                           "--gradient_accumulation_steps", "1", "--lr", "0.001", "--mc_lr", "0.05"))
    groups = torch.load(run_dir / "checkpoint-2" / "training_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["peak_lr"] for g in groups] == [0.001, 0.05]
    assert [g["lr"] for g in groups] == [linear_lr(1, 0.001, 2), linear_lr(1, 0.05, 2)]  # one schedule, two peaks
    _, model, _ = load_tokenizer_and_model(str(run_dir))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(groups[1]["params"]) == sum(name.startswith("mc_head.") for name in names) > 0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)


def test_resume_takes_the_learning_rate_given_now_and_reads_checkpoints_from_before_the_best_one(
        tiny_dirs, personachat_file, tmp_path):
    run_dir = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--max_steps", "2"))
    saved_args = json.loads((run_dir / "training_args.json").read_text())
    assert saved_args.pop("seed_mixing") == "mixed"  # as saved before seeds were mixed: they resume summed
    (run_dir / "training_args.json").write_text(json.dumps(saved_args))
    assert train_script.get_args(["--resume", str(run_dir)]).seed_mixing == "sum"
    path = run_dir / "checkpoint-2" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    del state["best_checkpoint"]  # as saved before the best checkpoint and per-group peaks existed
    for group in state["optimizer"]["param_groups"]:
        del group["peak_lr"]
    torch.save(state, path)
    train_script.train(["--resume", str(run_dir), "--max_steps", "4", "--lr", "0.02"])
    groups = torch.load(run_dir / "checkpoint-4" / "training_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["peak_lr"] for g in groups] == [0.02]
    saved = (run_dir / "training_args.json").read_text(), sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ValueError, match="--mc_lr"):
        train_script.train(["--resume", str(run_dir), "--max_steps", "6", "--mc_lr", "0.1"])
    with pytest.raises(ValueError, match="^--gradient_accumulation_steps: .* was trained with 2, .* resume with "
                                         "--gradient_accumulation_steps 2$"):
        train_script.train(["--resume", str(run_dir), "--max_steps", "6", "--gradient_accumulation_steps", "3"])
    train_script.train(["--resume", str(run_dir), "--max_steps", "4"])  # nothing left to do
    # neither a refused nor an idle resume rewrites the saved flags or adds an events file
    assert ((run_dir / "training_args.json").read_text(), sorted(p.name for p in run_dir.iterdir())) == saved
    train_script.train(["--resume", str(run_dir), "--max_steps", "5"])  # as the refusal said: without --mc_lr
    assert json.loads((run_dir / "training_args.json").read_text())["max_steps"] == 5


@pytest.mark.parametrize("flags, named", [(["--num_candidates", "1"], "--num_candidates"),
                                          (["--max_reply_len", "-1"], "--max_reply_len"),
                                          (["--max_seq_len", "16"], "--max_seq_len"),
                                          (["--eval_every", "-2"], "--eval_every"),
                                          (["--compile", "--fsdp"], "--compile"),
                                          (["--fp16", "O9"], "--fp16"),
                                          (["--max_steps", "-1"], "--max_steps"),
                                          (["--lr", "-1"], "--lr"),
                                          (["--mc_lr", "-1"], "--mc_lr"),
                                          (["--n_epochs", "0"], "--n_epochs"),
                                          (["--lora_target_modules", "q_proj"], "--lora_target_modules"),
                                          (["--dataset_cache", __file__], "--dataset_cache")])  # a file
def test_bad_flags_are_refused_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit):
        train_script.get_args(flags)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the message, not the usage line that names every flag
    assert last.split(": error: ", 1)[1].startswith(named)


@needs_cxx
def test_compiled_training_steps_as_eager_training_and_saves_loadable_weights(tiny_dirs, personachat_file, tmp_path):
    """--compile changes how kernels run, not what is learned nor how the run is saved."""
    runs = {name: train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, name, "--max_steps", "2",
                                               "--max_valid_examples", "3", *flags))
            for name, flags in (("eager", []), ("compiled", ["--compile"]))}
    eager, compiled = (load_file(os.path.join(runs[n], "model.safetensors")) for n in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()  # no _orig_mod. prefixes: the run loads as any other
    start = load_file(os.path.join(tiny_dirs["llama"], "model.safetensors"))
    for name in eager:
        assert torch.allclose(compiled[name], eager[name], atol=1e-5), name
    assert any(not torch.equal(eager[n], start[n]) for n in start)  # the steps did change the weights
    assert read_metrics(runs["compiled"])[-1]["nll"] == pytest.approx(read_metrics(runs["eager"])[-1]["nll"], rel=1e-4)
    assert json.load(open(os.path.join(runs["compiled"], "training_args.json")))["compile"] is True
    load_tokenizer_and_model(str(runs["compiled"]))
    # a resumed run takes its saved flags; --no-compile turns this one off (e.g. on a machine without a compiler)
    assert train_script.get_args(["--resume", str(runs["compiled"])]).compile is True
    assert train_script.get_args(["--resume", str(runs["compiled"]), "--no-compile"]).compile is False
