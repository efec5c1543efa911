import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_personachat
from inputs import DoubleHeadDataset, collate
from layouts import SPECIAL_TOKENS, TransferTransfoLayout
from modeling import (CheckpointError, DoubleHeads, GPTDoubleHeads, compile_decoder, double_head_loss, has_cxx_compiler,
                      load_tokenizer_and_model, save_model)
from tokenized import tokenize_dialogs
from training import forward


def batch_for(tokenizer, n=3, num_candidates=3, pad_to=None):
    data = tokenize_dialogs(make_personachat(), tokenizer)
    ds = DoubleHeadDataset(data, "train", TransferTransfoLayout(tokenizer), num_candidates=num_candidates)
    return collate([ds[i] for i in range(n)], TransferTransfoLayout(tokenizer).pad, pad_to=pad_to)


@pytest.fixture(params=["llama", "gpt2"])
def loaded(request, tiny_dirs):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs[request.param])
    return request.param, tokenizer, model.eval()


def test_gpt_family_uses_transformers_double_heads_and_others_get_ours(loaded):
    name, tokenizer, model = loaded
    assert isinstance(model, GPTDoubleHeads if name == "gpt2" else DoubleHeads)
    assert type(model.lm).__name__ == ("GPT2DoubleHeadsModel" if name == "gpt2" else "LlamaForCausalLM")
    assert model.lm.get_input_embeddings().num_embeddings == len(tokenizer)
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in SPECIAL_TOKENS)


def test_gpt2_losses_equal_transformers_own(tiny_dirs):
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["gpt2"])
    model.eval()
    batch = batch_for(tokenizer)
    with torch.no_grad():
        _, lm_loss, mc_loss = double_head_loss(forward(model, batch), batch["mc_labels"])
        hf = model.lm(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                      attention_mask=batch["attention_mask"], mc_token_ids=batch["mc_token_ids"],
                      labels=batch["lm_labels"], mc_labels=batch["mc_labels"])
    assert lm_loss.item() == pytest.approx(hf.loss.item(), rel=1e-5)
    assert mc_loss.item() == pytest.approx(hf.mc_loss.item(), rel=1e-5)


def test_llama_losses_equal_an_independent_computation(tiny_dirs):
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama"])
    model.eval()
    torch.nn.init.normal_(model.speaker_embeddings)
    batch = batch_for(tokenizer)
    b, c, length = batch["input_ids"].shape
    with torch.no_grad():
        loss, lm_loss, mc_loss = double_head_loss(forward(model, batch), batch["mc_labels"], lm_coef=2.0, mc_coef=0.5)
        ids, types = batch["input_ids"].view(-1, length), batch["token_type_ids"].view(-1, length)
        s1, s2 = tokenizer.convert_tokens_to_ids(["<speaker1>", "<speaker2>"])
        speaker = torch.zeros(ids.shape + (model.config.hidden_size,))
        speaker[types == s1] = model.speaker_embeddings[0]
        speaker[types == s2] = model.speaker_embeddings[1]
        embeds = model.lm.get_input_embeddings()(ids) + speaker
        out = model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"].view(-1, length))
        labels = batch["lm_labels"].view(-1, length)
        expected_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                                      ignore_index=-100)
        hidden = model.lm.model(inputs_embeds=embeds,
                                attention_mask=batch["attention_mask"].view(-1, length)).last_hidden_state
        hidden = hidden.view(b, c, length, -1)
        mc_logits = torch.stack([torch.stack([model.mc_head(hidden[i, j, batch["mc_token_ids"][i, j]])[0]
                                              for j in range(c)]) for i in range(b)])
        expected_mc = F.cross_entropy(mc_logits, batch["mc_labels"])
    assert lm_loss.item() == pytest.approx(expected_lm.item(), rel=1e-5)
    assert mc_loss.item() == pytest.approx(expected_mc.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * expected_lm.item() + 0.5 * expected_mc.item(), rel=1e-5)


def test_speaker_embeddings_start_at_zero_then_change_the_output(tiny_dirs):
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama"])
    model.eval()
    batch = batch_for(tokenizer)
    no_types = (batch["input_ids"], None, batch["attention_mask"], batch["mc_token_ids"], batch["lm_labels"],
                batch["context_lens"])
    with torch.no_grad():
        assert torch.equal(forward(model, batch)[0], model(*no_types)[0])  # starts as the pretrained LM
        torch.nn.init.normal_(model.speaker_embeddings)
        assert not torch.allclose(forward(model, batch)[0], model(*no_types)[0])


def test_extra_padding_changes_nothing(loaded):
    _, tokenizer, model = loaded
    tight, padded = batch_for(tokenizer), batch_for(tokenizer, pad_to=80)
    assert padded["input_ids"].shape[-1] == 80 > tight["input_ids"].shape[-1]
    with torch.no_grad():
        a, b = forward(model, tight), forward(model, padded)
    assert a[1] == b[1]
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-4)
    assert torch.allclose(a[2], b[2], atol=1e-5)


def test_save_and_reload_gives_the_same_outputs_and_adds_tokens_once(loaded, tmp_path):
    _, tokenizer, model = loaded
    with torch.no_grad():  # trained-looking heads, so that the round trip has something to carry
        for name, p in model.named_parameters():
            if "mc_head" in name or "multiple_choice" in name or "speaker" in name:
                torch.nn.init.normal_(p)
    save_model(model, tokenizer, tmp_path)
    tokenizer2, model2, _ = load_tokenizer_and_model(str(tmp_path))
    model2.eval()
    assert len(tokenizer2) == len(tokenizer)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert model2.lm.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<eos>")
    assert model2.lm.config.pad_token_id == tokenizer.convert_tokens_to_ids("<pad>")
    assert model2.lm.get_input_embeddings().num_embeddings == len(tokenizer)
    batch = batch_for(tokenizer)
    with torch.no_grad():
        a, b = forward(model, batch), forward(model2, batch)
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-6)
    assert torch.allclose(a[2], b[2], atol=1e-6)
    assert model2.heads_trained  # a run's multiple-choice head can rank (--rerank)


def test_a_pretrained_lm_says_its_multiple_choice_head_is_untrained(tiny_dirs, tmp_path):
    from transformers import GPT2LMHeadModel

    assert not load_tokenizer_and_model(tiny_dirs["llama"])[1].heads_trained
    assert load_tokenizer_and_model(tiny_dirs["gpt2"])[1].heads_trained  # a whole double-heads model, head saved
    GPT2LMHeadModel.from_pretrained(tiny_dirs["gpt2"]).save_pretrained(tmp_path)  # the LM alone, as on the hub
    load_tokenizer_and_model(tiny_dirs["gpt2"])[0].save_pretrained(tmp_path)
    assert not load_tokenizer_and_model(str(tmp_path))[1].heads_trained


def test_heads_file_of_another_model_is_refused(tiny_dirs, tmp_path):
    from safetensors.torch import save_file
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama"])
    save_model(model, tokenizer, tmp_path)
    save_file({"speaker_embeddings": torch.zeros(2, 7)}, tmp_path / "double_heads.safetensors")
    with pytest.raises(ValueError, match="double_heads.safetensors: expected tensors"):
        load_tokenizer_and_model(str(tmp_path))


def test_a_checkpoint_that_is_not_a_model_is_named_in_one_line(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "notes.json").write_text("{}")
    for name, says in [("missing", "no such directory or file"), ("empty_dir", "a directory without a model"),
                       ("empty.gguf", "an empty file"), ("notes.json", "a file, but not a .gguf one"),
                       ("missing.gguf", "no such GGUF file")]:
        with pytest.raises(CheckpointError, match=f"--model_checkpoint {tmp_path / name}: {says}"):
            load_tokenizer_and_model(str(tmp_path / name))



def test_a_mistyped_run_under_a_local_directory_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("runs/typo", "runs/typo/checkpoint-4"):  # no network call: refused at once
        with pytest.raises(CheckpointError, match=f"--model_checkpoint {name}: no such directory or file"):
            load_tokenizer_and_model(name)
    import modeling  # a hub id whose org is also a local directory still loads when the hub's cache has it
    monkeypatch.setattr(modeling, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert modeling._split_gguf("runs/cached") == ("runs/cached", None)


def test_saved_files_take_the_umask_not_private_modes(loaded, tmp_path):
    import os
    _, tokenizer, model = loaded
    old = os.umask(0o022)
    try:
        save_model(model, tokenizer, tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("*.safetensors")}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}  # and the heads' file (not GPT-2's)


def test_input_format_defaults_to_the_chat_template_and_gpt_models_keep_transfertransfo(tiny_dirs):
    from layouts import InputFormatError

    assert load_tokenizer_and_model(tiny_dirs["llama_chat"])[2].name == "chat_template"
    assert load_tokenizer_and_model(tiny_dirs["llama"])[2].name == "transfertransfo"  # no template
    assert load_tokenizer_and_model(tiny_dirs["gpt2"])[2].name == "transfertransfo"
    with pytest.raises(InputFormatError, match="GPT/GPT-2.*--input_format transfertransfo"):
        load_tokenizer_and_model(tiny_dirs["gpt2"], input_format="chat_template")
    with pytest.raises(InputFormatError, match="no chat template"):
        load_tokenizer_and_model(tiny_dirs["llama"], input_format="chat_template")


@pytest.mark.parametrize("name, attention", [("llama", "sdpa"), ("llama_chat", "sdpa"), ("llama_chat", "eager")])
def test_shared_context_forward_gives_the_losses_and_gradients_of_full_sequences(tiny_dirs, name, attention):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs[name], mc_dropout=0.0)
    model.lm.config._attn_implementation = attention  # sdpa takes the packed mask as booleans, eager adds it
    torch.nn.init.normal_(model.speaker_embeddings)
    data = tokenize_dialogs(make_personachat(n_cands=4), tokenizer)
    ds = DoubleHeadDataset(data, "train", layout, num_candidates=4, max_history=2)
    batch = collate([ds[i] for i in (0, 4, 7)], layout.pad)  # contexts of different lengths in one batch
    assert len(set(batch["context_lens"].tolist())) > 1
    results = []
    for context_lens in (None, batch["context_lens"]):
        model.zero_grad()
        outputs = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mc_token_ids"],
                        batch["lm_labels"], context_lens)
        loss = double_head_loss(outputs, batch["mc_labels"])[0]
        loss.backward()
        results.append((outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (shared, shared_grads) = results
    assert shared[0].item() == pytest.approx(full[0].item(), rel=1e-5) and shared[1] == full[1]
    assert torch.allclose(shared[2], full[2], atol=1e-5)
    assert full_grads.keys() == shared_grads.keys()
    for n in full_grads:
        assert torch.allclose(shared_grads[n], full_grads[n], atol=1e-5), n


needs_cxx = pytest.mark.skipif(not has_cxx_compiler(), reason="torch.compile needs a C++ compiler")


def test_compile_without_a_cxx_compiler_says_so(tiny_dirs, monkeypatch):
    _, model, _ = load_tokenizer_and_model(tiny_dirs["llama"])
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match="--compile: torch.compile needs a C\\+\\+ compiler"):
        compile_decoder(model)


@needs_cxx
def test_compiled_decoder_gives_eager_losses_and_gradients_for_every_batch_shape_from_one_compilation(tiny_dirs):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama_chat"], mc_dropout=0.0)
    torch.nn.init.normal_(model.speaker_embeddings)
    compiled = copy.deepcopy(model)
    compile_decoder(compiled)
    assert compiled.state_dict().keys() == model.state_dict().keys()  # weights keep their names
    data = tokenize_dialogs(make_personachat(n_cands=4), tokenizer)
    ds = DoubleHeadDataset(data, "train", layout, num_candidates=4, max_history=2)
    batches = [collate([ds[i] for i in (0, 4, 7)], layout.pad), collate([ds[i] for i in (2, 5)], layout.pad)]
    assert batches[0]["input_ids"].shape[-1] != batches[1]["input_ids"].shape[-1]
    for k, batch in enumerate(batches):
        results = []
        for m in (model, compiled):
            m.zero_grad()
            with torch._dynamo.config.patch(error_on_recompile=k > 0):  # shapes are dynamic: one graph for all
                outputs = forward(m, batch)
                double_head_loss(outputs, batch["mc_labels"])[0].backward()
            results.append((outputs, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
        (eager_out, eager_grads), (compiled_out, compiled_grads) = results
        assert compiled_out[0].item() == pytest.approx(eager_out[0].item(), rel=1e-5)
        assert torch.allclose(compiled_out[2], eager_out[2], atol=1e-5)
        assert eager_grads.keys() == compiled_grads.keys()
        for n in eager_grads:
            assert torch.allclose(compiled_grads[n], eager_grads[n], atol=1e-5), n
