import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, save_run_with_a_trained_head, spy_on_choices
from dialogs import read_personas
from utils import newest_run


def run_interact(args, stdin, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "interact.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("name", ["llama", "llama_chat"])
def test_piped_conversation_gets_one_reply_per_line_and_ends_at_eof(tiny_dirs, name):
    args = ["--model_checkpoint", tiny_dirs[name], "--personality", "i like cats", "--personality", "i read books",
            "--max_length", "5", "--no_sample"]
    done = run_interact(args, "hello how are you\n\n/persona\nwhat do you like\n/reset\ngood\n")
    assert done.returncode == 0, done.stderr[-2000:]
    replies = done.stdout.splitlines()
    assert len(replies) == 3  # three messages; the empty line and commands get no reply
    assert done.stderr.count("Persona: i like cats i read books") == 2  # at the start and for /persona
    assert "(a new conversation)" in done.stderr and "Unknown command" not in done.stderr
    assert replies[-1] == run_interact(args, "good\n").stdout.strip()  # after /reset, as in a new chat


def test_bytes_that_are_not_utf8_and_unknown_commands_do_not_end_the_chat(tiny_dirs):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "interact.py"), "--model_checkpoint", tiny_dirs["llama"],
                           "--max_length", "4"], input=b"caf\xe9 au lait\n/help\nhi\n", capture_output=True,
                          timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 0, err[-2000:]
    assert len(done.stdout.splitlines()) == 2  # two messages; the unknown command gets no reply but a hint
    assert "Unknown command /help: /reset starts over" in err
    assert any(line.startswith("Chatting with") and "/persona shows" in line for line in err.splitlines())


def test_a_terminal_gets_line_editing_and_history():
    """In a terminal, arrow keys edit the line and recall earlier messages (readline), not arrive as escape codes."""
    pty = pytest.importorskip("pty")
    import select
    import time
    main_fd, tty_fd = pty.openpty()
    script = "import interact\nfor line in interact.user_lines('>>> '):\n    print('got', repr(line), flush=True)\n"
    process = subprocess.Popen([sys.executable, "-c", script], stdin=tty_fd, stdout=tty_fd, stderr=tty_fd, cwd=ROOT,
                               env={**os.environ, "TERM": "xterm"})
    os.close(tty_fd)
    left, up = "\x1b[D", "\x1b[A"
    out = b""

    def read_until(text, times=1):
        """Read the terminal until `text` has appeared `times` times (a prompt: readline waits for keys then)."""
        nonlocal out
        while out.count(text.encode()) < times:
            ready, _, _ = select.select([main_fd], [], [], 120)  # importing torch on a loaded CPU is slow
            assert ready, f"no {text!r} from the terminal; it showed {out[-500:]!r}"
            out += os.read(main_fd, 4096)

    try:
        read_until(">>> ")
        os.write(main_fd, f"abc{left}{left}X\r".encode())  # typed abc, moved back two, typed X
        read_until("got 'aXbc\\n'")
        read_until(">>> ", 2)  # keys sent before readline reads them would meet the terminal's own line editing
        os.write(main_fd, f"{up}!\r".encode())  # the last message recalled, ! added
        read_until("got 'aXbc!\\n'")
        read_until(">>> ", 3)
        os.write(main_fd, b"\x04")  # Ctrl-D ends
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline:  # drained, so the child never blocks on output
            if select.select([main_fd], [], [], 1)[0]:
                try:
                    out += os.read(main_fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        assert process.wait(timeout=30) == 0, out[-500:]
    finally:
        process.kill()
        os.close(main_fd)


@pytest.mark.parametrize("flags, message", [(["--max_length", "0"], "--max_length 0: at least 1"),
                                            (["--top_p", "1.5"], "--top_p 1.5: a probability mass"),
                                            (["--min_length", "30"], "--min_length 30: more than --max_length 20"),
                                            (["--num_beams", "0"], "--num_beams 0: at least 1")])
def test_decoding_flags_out_of_range_are_refused(flags, message, capsys):
    import convai_evaluation
    import interact

    for get_args in (interact.get_args, convai_evaluation.get_args):
        with pytest.raises(SystemExit):
            get_args(flags)
        assert message in capsys.readouterr().err

@pytest.mark.parametrize("rerank", [[], ["--rerank", "1"]])
@pytest.mark.parametrize("flag, value", [("--ranker_checkpoint", "r"), ("--ranker", "pmi+biencoder")])
def test_a_ranker_without_replies_to_rank_is_refused(rerank, flag, value, capsys):
    import interact
    import serve

    for get_args in (interact.get_args, serve.get_args):
        with pytest.raises(SystemExit):
            get_args([flag, value, *rerank])
        assert f"{flag} {value}: it ranks the replies of --rerank N (N at least 2)" in capsys.readouterr().err


@pytest.mark.parametrize("rerank", [[], ["--rerank", "1"]])
def test_rerank_greedy_without_samples_beside_it_is_refused(rerank, capsys):
    import convai_evaluation
    import interact
    import serve

    for get_args in (interact.get_args, serve.get_args, convai_evaluation.get_args):
        with pytest.raises(SystemExit):
            get_args(["--rerank_greedy", *rerank])
        assert ("--rerank_greedy: needs --rerank N with N at least 2 (the greedy reply and N-1 samples); --rerank is "
                f"{rerank[1] if rerank else 0}") in capsys.readouterr().err
    assert interact.get_args(["--rerank_greedy", "--rerank", "2"]).rerank_greedy


@pytest.mark.parametrize("flags, ranker, message", [
    ([], "mc", ""), (["--ranker_checkpoint", "r"], "bert", ""),
    (["--ranker_checkpoint", "r", "--ranker", "biencoder"], "biencoder", ""),
    (["--ranker", "mc+pmi+biencoder"], "mc+pmi+biencoder", ""),
    (["--ranker", "bert"], "", "--ranker bert needs --ranker_checkpoint DIR"),
    (["--ranker", "pmi", "--ranker_checkpoint", "r"], "", "--ranker_checkpoint r: only --ranker bert or biencoder"),
    (["--ranker", "bert+biencoder", "--ranker_checkpoint", "r"], "", "--ranker bert and biencoder read "
                                                                       "--ranker_checkpoint each"),
    (["--ranker", "mc+mx"], "", "argument --ranker: 'mc+mx': unknown ranker 'mx'")])
def test_what_rerank_ranks_by(flags, ranker, message, capsys):
    import interact
    import serve

    for get_args in (interact.get_args, serve.get_args):
        if message:
            with pytest.raises(SystemExit):
                get_args(["--rerank", "3", *flags])
            assert message in capsys.readouterr().err
        else:
            assert get_args(["--rerank", "3", *flags]).ranker == ranker


def test_same_seed_same_replies(tiny_dirs):
    args = ["--model_checkpoint", tiny_dirs["llama"], "--personality", "i like cats", "--seed", "7",
            "--temperature", "2.0"]
    first, second = run_interact(args, "hi\nhow are you\n"), run_interact(args, "hi\nhow are you\n")
    assert first.returncode == 0 and first.stdout == second.stdout
    assert run_interact([*args, "--seed", "8"], "hi\nhow are you\n").stdout != first.stdout


def test_a_max_length_the_model_cannot_hold_is_refused_before_chatting(tiny_dirs, tmp_path):
    import convai_evaluation

    done = run_interact(["--model_checkpoint", tiny_dirs["llama_chat"], "--max_length", "300"], "hi\n")
    assert done.returncode == 1 and re.search(r"interact.py: error: --max_length 300: does not fit: this model reads "
                                              r"256 tokens, and the shortest prompt takes \d+ of them; at most \d+$",
                                              done.stderr.strip())
    with pytest.raises(convai_evaluation.DataError, match="--max_length 300: does not fit: this model reads 256"):
        convai_evaluation.main(["--model_checkpoint", tiny_dirs["llama_chat"], "--eval_type", "f1", "--device", "cpu",
                                "--max_length", "300", "--results_file", str(tmp_path / "r.json")])


def test_without_runs_it_says_how_to_make_one(tmp_path):
    done = run_interact(["--runs_dir", str(tmp_path / "runs")], "hi\n")
    assert done.returncode == 1 and "make demo" in done.stderr


@pytest.mark.parametrize("script", ["interact.py", "serve.py"])
def test_ctrl_c_while_the_imports_load_exits_130_without_a_traceback(script, tmp_path):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--model_checkpoint", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = f"/proc/{process.pid}/maps"
    while process.poll() is None and "libtorch" not in open(maps).read():  # torch loading: transformers follows
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err


def test_newest_run_is_the_last_written(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    os.utime(tmp_path / "a" / "config.json", (2e9, 2e9))
    assert newest_run(tmp_path) == str(tmp_path / "a")
    assert newest_run(tmp_path / "none") is None


def test_personas_are_read_without_the_rest(personachat_file, tmp_path):
    personas = read_personas(personachat_file)
    assert len(personas) == 11 and all(len(p) == 2 for p in personas)
    chat = tmp_path / "chat.json"
    chat.write_text('{"c1": {"messages": [[{"text": "hi"}], [{"text": "yo"}]]}}')
    assert read_personas(chat) == []


def test_a_format_the_tokenizer_cannot_give_is_a_clear_error(tiny_dirs):
    done = run_interact(["--model_checkpoint", tiny_dirs["llama"], "--input_format", "chat_template"], "hi\n")
    assert done.returncode != 0
    assert "interact.py: error:" in done.stderr and "no chat template" in done.stderr


def test_a_persona_is_drawn_from_the_runs_own_training_data(personachat_file, tmp_path):
    import argparse
    import json

    from interact import choose_persona

    run = tmp_path / "run"
    run.mkdir()
    (run / "training_args.json").write_text(json.dumps({"dataset_path": personachat_file}))
    args = argparse.Namespace(personality=[], personality_file="", dataset_path="", dataset_cache=str(tmp_path),
                              seed=0)
    assert choose_persona(args, str(run)) in read_personas(personachat_file)
    persona_file = tmp_path / "persona.txt"
    persona_file.write_text("i like cats .\n\n  i read books .  \n")
    args.personality_file = str(persona_file)
    assert choose_persona(args, str(run)) == ["i like cats .", "i read books ."]  # its lines, blank ones dropped
    args.personality_file = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="--personality_file .*missing.txt: No such file"):
        choose_persona(args, str(run))


def test_rerank_greedy_ranks_the_greedy_reply_among_the_samples(tiny_dirs, monkeypatch, capsys):
    import io

    import interact
    from decoding import DecodingConfig, generate
    from modeling import load_tokenizer_and_model

    calls = spy_on_choices(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you\nwhat do you like\n"))
    interact.run(interact.get_args(["--model_checkpoint", tiny_dirs["llama_chat"], "--device", "cpu", "--personality",
                                    "i like cats", "--rerank", "3", "--rerank_greedy", "--ranker", "pmi",
                                    "--max_length", "5", "--temperature", "2.0"]))
    assert len(capsys.readouterr().out.splitlines()) == len(calls) == 3
    _, model, layout = load_tokenizer_and_model(tiny_dirs["llama_chat"])
    greedy = DecodingConfig(max_length=5, temperature=2.0, no_sample=True)
    for context, replies, _ in calls:
        assert len(replies) == 3 and replies[0] == generate(model.eval(), [context], layout, greedy)[0]
    assert any(reply != replies[0] for _, replies, _ in calls for reply in replies[1:])  # the others sampled


def test_rerank_by_the_runs_multiple_choice_head_and_refused_without_a_trained_one(tiny_dirs, tmp_path, monkeypatch,
                                                                                   capsys):
    import io

    import torch

    import interact
    from modeling import load_tokenizer_and_model
    from ranking import score_candidates

    tokenizer = save_run_with_a_trained_head(tiny_dirs["llama_chat"], tmp_path / "run")
    common = ["--personality", "i like cats", "--rerank", "3", "--max_length", "5", "--temperature", "2.0"]
    calls = spy_on_choices(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you\nwhat do you like\n"))
    interact.run(interact.get_args(["--model_checkpoint", str(tmp_path / "run"), "--device", "cpu", *common]))
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(calls) == 3
    _, model, layout = load_tokenizer_and_model(str(tmp_path / "run"))
    bests = []
    for line, (context, replies, by_part) in zip(printed, calls):
        mc_logits = score_candidates(model.eval(), context, replies, layout)[0]
        assert len(replies) == 3 and list(by_part) == ["mc"] and torch.allclose(by_part["mc"], mc_logits, atol=1e-5)
        bests.append(int(mc_logits.argmax()))
        assert line == " ".join(tokenizer.decode(replies[bests[-1]], skip_special_tokens=True).split())
    assert any(best > 0 for best in bests)  # not just the first sample

    refused = run_interact(["--model_checkpoint", tiny_dirs["llama_chat"], *common], "hi\n")
    assert refused.returncode != 0 and refused.stdout == ""
    assert "--rerank 3: " in refused.stderr and "no trained multiple-choice head" in refused.stderr
    assert "another --ranker" in refused.stderr and "--ranker_checkpoint" in refused.stderr
    by_pmi = run_interact(["--model_checkpoint", tiny_dirs["llama_chat"], *common, "--ranker", "pmi"], "hi\n")
    assert by_pmi.returncode == 0 and len(by_pmi.stdout.splitlines()) == 1  # PMI needs no trained head
    greedy = run_interact(["--model_checkpoint", str(tmp_path / "run"), *common, "--no_sample"], "hi\n")
    assert greedy.returncode == 2 and "--rerank 3: reranks sampled replies" in greedy.stderr
