"""Tiny random models, a word-level tokenizer and dialog files made by the tests themselves (seconds, offline)."""
import json
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("hello hi how are you i am fine good great thanks what do like to play football music read books "
         "cats dogs my name is from the city love cooking and running today weather nice yes no maybe sure "
         "really cool fun work school friend family eat pizza").split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


# SmolLM2's own chat template (ChatML with a default system prompt), over words the test vocabulary has
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nyou are my nice friend<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_chat_tokenizer():
    """The test words plus newline, role names (ChatML's and the transcript's) and ChatML's special tokens, with a
    chat template and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "\n", "system", "user", "assistant", "nice", "A:", "B:", "Persona:", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_byte_level_tokenizer():
    """One token per byte, as GPT-2's for rare characters: a character can span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                      merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=byte_level)


def save_run_with_a_trained_head(checkpoint, directory):
    """A run directory of `checkpoint` whose multiple-choice head is random but marked trained (sharp preferences)."""
    import torch

    from modeling import load_tokenizer_and_model, save_model

    torch.manual_seed(0)
    tokenizer, model, _ = load_tokenizer_and_model(checkpoint)
    torch.nn.init.normal_(model.mc_head.weight)
    save_model(model, tokenizer, directory)
    return tokenizer


def spy_on_choices(monkeypatch):
    """Make Rankers.part_scores record (context, candidate ids, scores by part) of each call, in the list returned."""
    from rankers import Rankers

    calls, part_scores = [], Rankers.part_scores

    def spy(self, parts, persona, history, context, cand_ids, candidates, own=None):
        by_part = part_scores(self, parts, persona, history, context, cand_ids, candidates, own)
        calls.append((context, cand_ids, by_part))
        return by_part

    monkeypatch.setattr(Rankers, "part_scores", spy)
    return calls


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(2, 6)))


def make_personachat(n_train=8, n_valid=3, n_utts=3, n_cands=3, seed=0, reply_len=None):
    rng = random.Random(seed)

    def dialog():
        turns = [sentence(rng, reply_len) for _ in range(2 * n_utts)]
        return {"personality": [sentence(rng) for _ in range(2)],
                "utterances": [{"history": turns[:2 * i + 1],
                                "candidates": [sentence(rng, reply_len) for _ in range(n_cands - 1)]
                                + [turns[2 * i + 1]]} for i in range(n_utts)]}

    return {"train": [dialog() for _ in range(n_train)], "valid": [dialog() for _ in range(n_valid)]}



def run_torchrun(cmd, timeout=300, **env):
    """Run a torchrun command line in its own process group: on a timeout its workers are killed with it, not left
    running (waiting on each other) after the test failed."""
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Directories holding a tiny random Llama and a tiny random GPT-2, each with the word-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2DoubleHeadsModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    n = len(tokenizer)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=True))
    gpt2 = GPT2DoubleHeadsModel(GPT2Config(vocab_size=n, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           summary_first_dropout=0.0))
    chat_tokenizer = make_chat_tokenizer()
    llama_chat = LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, tie_word_embeddings=True))
    dirs = {}
    for name, model, tok in (("llama", llama, tokenizer), ("gpt2", gpt2, tokenizer),
                             ("llama_chat", llama_chat, chat_tokenizer)):
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = str(d)
    return dirs


@pytest.fixture
def personachat_file(tmp_path):
    path = tmp_path / "personachat.json"
    path.write_text(json.dumps(make_personachat()))
    return str(path)


@pytest.fixture(scope="session")
def chatty_dir(tmp_path_factory):
    """A tiny random Llama with large weights (sharp preferences, varied replies) and the word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    tokenizer = make_tokenizer()
    d = tmp_path_factory.mktemp("chatty")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT with the word-level tokenizer plus [PAD] [CLS] [SEP]."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    d = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)
