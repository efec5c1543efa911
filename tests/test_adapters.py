import os

import pytest
import torch
from ignite.engine import Engine
from safetensors.torch import load_file, save_file

import train as train_script
from adapters import ADAPTER_CONFIG, add_lora, has_lora, parameter_counts
from checkpointing import main as checkpointing_main
from checkpointing import merge_run
from conftest import make_personachat
from inputs import DoubleHeadDataset, collate
from modeling import load_tokenizer_and_model, save_model
from test_interact import run_interact
from test_train import tiny_args, train_interrupted_in_epoch_2
from tokenized import tokenize_dialogs
from training import forward, make_update


def lora_model(directory, r=4):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(directory)
    add_lora(model, r, new_token_ids=model.new_token_ids, base_model=directory)
    return tokenizer, model, layout


def batches(tokenizer, layout, n=3):
    ds = DoubleHeadDataset(tokenize_dialogs(make_personachat(), tokenizer), "train", layout, num_candidates=2)
    return [collate([ds[2 * i], ds[2 * i + 1]], layout.pad) for i in range(n)]


def train_steps(model, data):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    Engine(make_update(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))).run(data)


def outputs(model, data):
    model.eval()
    with torch.no_grad():
        return [forward(model, b) for b in data]


def assert_same_outputs(a, b, atol=1e-5):
    for (nll_a, count_a, mc_a), (nll_b, count_b, mc_b) in zip(a, b):
        assert count_a == count_b
        assert torch.allclose(nll_a, nll_b, atol=atol) and torch.allclose(mc_a, mc_b, atol=atol)


@pytest.mark.parametrize("input_format", ["transfertransfo", "chat_template"])
def test_lora_trains_only_the_adapters_the_heads_the_speaker_embeddings_and_new_token_rows(tiny_dirs, input_format):
    directory = tiny_dirs["llama" if input_format == "transfertransfo" else "llama_chat"]
    tokenizer, model, layout = lora_model(directory)
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total / 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batches(tokenizer, layout))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = ("lora_", "trainable_tokens", "mc_head.", "speaker_embeddings")
    assert changed and all(any(a in n for a in allowed) for n in changed), sorted(changed)
    assert {"mc_head.weight", "speaker_embeddings"} <= changed and any("lora_B" in n for n in changed)
    assert len(model.new_token_ids) == {"transfertransfo": 5, "chat_template": 1}[input_format]  # speakers / <pad>
    assert any("trainable_tokens" in n for n in changed)


def test_a_saved_lora_run_loads_back_with_the_same_outputs_and_merges_into_a_plain_run(tiny_dirs, tmp_path):
    tokenizer, model, layout = lora_model(tiny_dirs["llama"])
    data = batches(tokenizer, layout)
    train_steps(model, data)
    expected = outputs(model, data)
    save_model(model, tokenizer, tmp_path / "run")
    names = set(os.listdir(tmp_path / "run"))
    assert {ADAPTER_CONFIG, "adapter_model.safetensors", "double_heads.safetensors"} <= names
    assert "model.safetensors" not in names and "README.md" not in names  # the adapter only, not the whole LM
    _, loaded, _ = load_tokenizer_and_model(str(tmp_path / "run"))
    assert has_lora(loaded)
    assert_same_outputs(outputs(loaded, data), expected)

    checkpointing_main([str(tmp_path / "run"), "--merge", str(tmp_path / "merged")])
    assert "model.safetensors" in os.listdir(tmp_path / "merged") and ADAPTER_CONFIG not in os.listdir(
        tmp_path / "merged")
    _, merged, _ = load_tokenizer_and_model(str(tmp_path / "merged"))
    assert not has_lora(merged)
    assert_same_outputs(outputs(merged, data), expected, atol=1e-4)


def test_merging_a_plain_run_is_refused(tiny_dirs, tmp_path, capsys):
    tokenizer, model, _ = load_tokenizer_and_model(tiny_dirs["llama"])
    save_model(model, tokenizer, tmp_path / "plain")
    with pytest.raises(SystemExit):
        checkpointing_main([str(tmp_path / "plain"), "--merge", str(tmp_path / "out")])
    assert "no LoRA adapter" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no LoRA adapter"):  # called as a function
        merge_run(str(tmp_path / "plain"), str(tmp_path / "out"))


def test_an_interrupted_lora_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_dirs, personachat_file,
                                                                               tmp_path, monkeypatch):
    lora = ("--lora_r", "4", "--n_epochs", "2")
    whole = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "whole", *lora))
    train_interrupted_in_epoch_2(monkeypatch, tiny_args(tiny_dirs, personachat_file, tmp_path, "cut", *lora))
    cut = train_script.train(["--resume", str(tmp_path / "cut")])
    for name in ("adapter_model.safetensors", "double_heads.safetensors"):
        a, b = load_file(os.path.join(whole, name)), load_file(os.path.join(cut, name))
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
    _, model, _ = load_tokenizer_and_model(str(cut))
    assert has_lora(model)
    chat = run_interact(["--runs_dir", str(tmp_path), "--personality", "i like cats", "--max_length", "4"], "hi\n")
    assert chat.returncode == 0 and len(chat.stdout.splitlines()) == 1, chat.stderr[-2000:]  # the newest run: cut


def test_lora_cannot_be_added_to_a_resumed_full_run(tiny_dirs, personachat_file, tmp_path):
    run = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "full", "--max_steps", "1",
                                       "--n_epochs", "1"))
    with pytest.raises(ValueError, match="trained without LoRA"):
        train_script.train(["--resume", str(run), "--lora_r", "4", "--max_steps", "2"])


def on_model(checkpoint, args):
    """train.py flags with another --model_checkpoint."""
    i = args.index("--model_checkpoint")
    return args[:i + 1] + [checkpoint] + args[i + 2:]


def test_merge_never_overwrites_a_directory_that_is_not_new_or_empty(tiny_dirs, tmp_path, capsys):
    tokenizer, model, _ = lora_model(tiny_dirs["llama"])
    save_model(model, tokenizer, tmp_path / "run")
    before = sorted(os.listdir(tmp_path / "run"))
    for out in (tmp_path / "run", tmp_path / "other"):
        (tmp_path / "other").mkdir(exist_ok=True)
        (tmp_path / "other" / "training_args.json").write_text("{}")
        with pytest.raises(SystemExit):
            checkpointing_main([str(tmp_path / "run"), "--merge", str(out)])
        assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "run")) == before and os.listdir(tmp_path / "other") == ["training_args.json"]
    (tmp_path / "empty").mkdir()
    checkpointing_main([str(tmp_path / "run"), "--merge", str(tmp_path / "empty")])
    assert "model.safetensors" in os.listdir(tmp_path / "empty")


def test_a_lora_run_names_its_base_so_that_it_loads_from_anywhere(tiny_dirs, personachat_file, tmp_path,
                                                                  monkeypatch):
    import json
    import shutil
    shutil.copytree(tiny_dirs["llama"], tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # the base given relative to here
    run = train_script.train(on_model("base", tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--lora_r", "4",
                                                        "--max_steps", "1", "--n_epochs", "1")))
    assert json.load(open(run / "training_args.json"))["model_checkpoint"] == str(tmp_path / "base")
    monkeypatch.chdir(tmp_path / "run")
    _, model, _ = load_tokenizer_and_model(str(run))
    assert has_lora(model)


def test_a_lora_run_of_the_packaged_default_names_no_path_and_loads_the_installed_default(
        tiny_dirs, personachat_file, tmp_path, monkeypatch):
    import shutil

    import modeling
    from modeling import stored_base_model
    monkeypatch.setattr(modeling, "default_model_checkpoint", lambda: tiny_dirs["llama"])  # the packaged model here
    args = tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--lora_r", "4", "--max_steps", "1")
    run = train_script.train(args[2:])  # no --model_checkpoint
    assert stored_base_model(str(run)) == ""  # no path of this machine's install
    shutil.copytree(run, tmp_path / "moved")  # another machine: its own install is the base
    other = tmp_path / "other_install"
    shutil.copytree(tiny_dirs["llama"], other)
    marked = load_file(other / "model.safetensors")
    marked["model.norm.weight"] += 1.0  # a frozen weight the adapter leaves alone, to tell the bases apart
    save_file(marked, other / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(modeling, "default_model_checkpoint", lambda: str(other))
    _, model, _ = load_tokenizer_and_model(str(tmp_path / "moved"))
    assert has_lora(model)
    assert torch.equal(model.lm.get_base_model().model.norm.weight, marked["model.norm.weight"])


def test_lora_flags_reach_peft_and_the_adapter_covers_only_the_named_modules(tiny_dirs, personachat_file, tmp_path):
    import json
    run = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--lora_r", "4", "--max_steps", "1",
                                       "--lora_target_modules", "q_proj", "v_proj", "--lora_dropout", "0.1"))
    config = json.load(open(run / ADAPTER_CONFIG))
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)  # alpha: 2r by default
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in load_file(run / "adapter_model.safetensors")
               if ".lora_" in key}
    assert adapted == {"q_proj", "v_proj"}


def test_lora_flags_that_cannot_apply_are_refused(tiny_dirs, personachat_file, tmp_path, capsys):
    for extra, message in ((["--lora_r", "-2"], "--lora_r -2 / --lora_alpha 0 / --lora_dropout 0.05: a rank"),
                           (["--lora_r", "4", "--lora_dropout", "1.5"], "a dropout in [0, 1)"),
                           (["--lora_alpha", "16"], "--lora_alpha: adapters need --lora_r")):
        with pytest.raises(SystemExit):
            train_script.get_args(tiny_args(tiny_dirs, personachat_file, tmp_path, "x", *extra))
        assert message in capsys.readouterr().err
    with pytest.raises(train_script.RunError, match="--lora_target_modules: .*foo_proj"):
        train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "y", "--lora_r", "4",
                                     "--lora_target_modules", "foo_proj", "--max_steps", "1"))
    with pytest.raises(train_script.RunError, match="--lora_r: GPT/GPT-2 double-heads models are not supported"):
        train_script.train(on_model(tiny_dirs["gpt2"], tiny_args(tiny_dirs, personachat_file, tmp_path, "z",
                                                                 "--lora_r", "4", "--max_steps", "1")))


def test_a_resumed_lora_run_keeps_its_rank_and_refuses_another(tiny_dirs, personachat_file, tmp_path):
    import json
    run = train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--lora_r", "4",
                                       "--max_steps", "1", "--n_epochs", "2"))
    with pytest.raises(train_script.RunError, match="has an adapter of rank 4, which goes on training"):
        train_script.train(["--resume", str(run), "--lora_r", "16", "--max_steps", "2"])
    on_top = train_script.train(on_model(str(run), tiny_args(tiny_dirs, personachat_file, tmp_path, "on_top",
                                                             "--max_steps", "1")))
    assert json.load(open(on_top / "training_args.json"))["lora_r"] == 4  # the adapter it trained, as it was
