"""Model loading and the two heads: next-token LM loss and the multiple-choice "which reply is real" head.

GPT and GPT-2 use transformers' own double-heads classes, so checkpoints of the original repo load. Any other
causal LM (Llama family, e.g. the packaged SmolLM2) is wrapped in `DoubleHeads`: the LM's own head plus a linear
multiple-choice head on the hidden state of each candidate's last token, with speaker embeddings added to the
token embeddings TransferTransfo-style. GPT-2 takes its token-type embeddings from its token matrix; ours are
their own two vectors, started at zero, so that the model starts exactly where the pretrained LM is (adding
the freshly made <speaker> token vectors to every position multiplied SmolLM2's starting perplexity by ten).
A run directory holds the LM in the save_pretrained layout (loadable by AutoModelForCausalLM alone) plus
`double_heads.safetensors` (multiple-choice head and speaker embeddings; its metadata names the run's input
format, which every script loading the run then uses).
"""
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2DoubleHeadsModel,
                          OpenAIGPTDoubleHeadsModel)

from layouts import (ATTR_TO_SPECIAL_TOKEN, IGNORE_INDEX, INPUT_FORMATS, InputFormatError, default_input_format,
                     make_layout)
from adapters import has_lora, is_adapter_run, load_lora
from utils import default_model_checkpoint, share_saved_files

logger = logging.getLogger(__name__)

HEADS_FILE = "double_heads.safetensors"
GPT_DOUBLE_HEADS = {"gpt2": GPT2DoubleHeadsModel, "openai-gpt": OpenAIGPTDoubleHeadsModel}


def shifted_nll(hidden_or_logits, lm_labels, project=None):
    """Sum and count of next-token NLL over labelled positions (position t predicts label t+1).

    With `project` (the LM head), hidden states are projected only where a label exists: the original computed
    vocabulary logits for every token of every candidate and kept those of the gold reply alone.
    """
    labels = lm_labels[..., 1:]
    mask = labels != IGNORE_INDEX
    selected = hidden_or_logits[..., :-1, :][mask]
    logits = project(selected) if project is not None else selected
    nll_sum = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
    return nll_sum, mask.sum()


class DoubleHeads(nn.Module):
    """A causal LM with a multiple-choice head and speaker embeddings added where token_type_ids name a speaker."""

    heads_trained = False  # load_tokenizer_and_model: True where a run's heads were loaded

    def __init__(self, lm, speaker_ids, mc_dropout=0.1, input_format="transfertransfo"):
        super().__init__()
        self.lm, self.input_format = lm, input_format
        self.register_buffer("speaker_ids", torch.tensor(speaker_ids, dtype=torch.long), persistent=False)
        self.speaker_embeddings = nn.Parameter(torch.zeros(len(speaker_ids), lm.config.hidden_size))
        self.mc_dropout = nn.Dropout(mc_dropout)
        self.mc_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.mc_head.weight, std=getattr(lm.config, "initializer_range", 0.02))
        nn.init.zeros_(self.mc_head.bias)

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, mc_token_ids=None, lm_labels=None,
                context_lens=None):
        """(lm_nll_sum, lm_token_count, mc_logits) for inputs shaped (batch, candidates, length).

        With `context_lens` (batch,), the length of the context all candidates of an example share, the context
        runs once for all of them (`shared_context_forward`): the same outputs. Attention implementations that take
        no 4D mask (flash attention) get full sequences.
        """
        if context_lens is not None and self.lm.config._attn_implementation in ("sdpa", "eager"):
            return self.shared_context_forward(input_ids, token_type_ids, attention_mask, mc_token_ids, lm_labels,
                                               context_lens)
        batch, n_cand, length = input_ids.shape
        flat = lambda x: x.view(-1, length) if x is not None else None  # noqa: E731  (sequences, length)
        hidden, _ = self.hidden_states(flat(input_ids), flat(token_type_ids), flat(attention_mask), None,
                                       use_cache=False)
        mc_logits = None
        if mc_token_ids is not None:
            mc_logits = self.mc_logits_at(hidden, mc_token_ids.reshape(batch, n_cand))
        nll_sum, count = (shifted_nll(hidden, lm_labels.view(-1, length), self.lm.get_output_embeddings())
                          if lm_labels is not None else (None, None))
        return nll_sum, count, mc_logits

    def shared_context_forward(self, input_ids, token_type_ids, attention_mask, mc_token_ids, lm_labels, context_lens):
        """forward() with each example's context computed once for all its candidates, in one decoder pass.

        ConvAI2's candidates share persona and history (most of the tokens), so full sequences repeat the context
        once per candidate; here a distractor costs its own tokens only. Each example is packed as [context |
        candidate 1 | candidate 2 | ...]: a 4D mask lets every candidate attend to the context and to itself, at
        the positions it has in its full sequence. Context tokens carry no labels. One pass, not the context's and
        then the candidates' on its KV cache: half the calls a step, which is what a GPU waits on at this size.
        """
        batch, n_cand, length = input_ids.shape
        device = input_ids.device
        tail_lens = attention_mask.sum(-1) - context_lens[:, None]  # (batch, candidates)
        ends = context_lens[:, None] + tail_lens.cumsum(1)  # where each candidate's tokens end in the packed row
        starts = ends - tail_lens
        n_packed = int(ends[:, -1].max())
        p = torch.arange(n_packed, device=device).expand(batch, n_packed)
        in_context = p < context_lens[:, None]
        valid = p < ends[:, -1:]
        cand = torch.searchsorted(ends, p.contiguous(), right=True).clamp(max=n_cand - 1)  # which candidate a token is
        start = starts.gather(1, cand)
        token = torch.where(in_context, p, context_lens[:, None] + p - start)  # its index in its full sequence
        source = torch.where(valid, cand * length + token, 0)  # into (batch, candidates x length)
        pick = lambda x: x.reshape(batch, -1).gather(1, source)  # noqa: E731
        segment = torch.where(in_context, 0, cand + 1).masked_fill(~valid, -1)
        seen = (p[:, None, :] <= p[:, :, None]) & (segment[:, None, :] >= 0) \
            & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
        if self.lm.config._attn_implementation != "sdpa":  # eager attention adds its mask
            seen = torch.zeros(seen.shape, device=device).masked_fill(~seen, torch.finfo(torch.float32).min)
        positions = torch.where(valid, token, 0)
        types = pick(token_type_ids) if token_type_ids is not None else None
        hidden, _ = self.hidden_states(pick(input_ids), types, seen[:, None], positions, use_cache=False)
        mc_logits = None
        if mc_token_ids is not None:
            mc_logits = self.mc_logits_at(hidden, starts + mc_token_ids - context_lens[:, None])
        nll_sum = count = None
        if lm_labels is not None:  # a candidate's first token is predicted by its context's last position
            labels = pick(lm_labels).masked_fill(~valid | in_context, IGNORE_INDEX)
            predictor = torch.where(p == start, context_lens[:, None] - 1, p - 1)
            mask = labels != IGNORE_INDEX
            rows = torch.arange(batch, device=device)[:, None].expand_as(p)
            nll_sum = F.cross_entropy(self.lm.get_output_embeddings()(hidden[rows[mask], predictor[mask]]).float(),
                                      labels[mask], reduction="sum")
            count = mask.sum()
        return nll_sum, count, mc_logits

    def hidden_states(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None, use_cache=True):
        """Last-layer hidden states of (sequences, length) inputs, reading and extending the KV cache."""
        inputs_embeds = self.lm.get_input_embeddings()(input_ids)
        if token_type_ids is not None:
            speaker = token_type_ids.unsqueeze(-1) == self.speaker_ids  # (sequences, length, speakers)
            inputs_embeds = inputs_embeds + speaker.to(inputs_embeds.dtype) @ self.speaker_embeddings
        out = self.lm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, use_cache=use_cache)
        return out.last_hidden_state, out.cache

    def lm_logits(self, hidden):
        return self.lm.get_output_embeddings()(hidden).float()

    def mc_logits_at(self, hidden, index):
        """Multiple-choice logits from the hidden states (rows, length, width) at `index`: (rows,), one position
        per row, or (rows, k), k positions per row (a packed row's candidates)."""
        at = index.reshape(hidden.shape[0], -1, 1).expand(-1, -1, hidden.shape[-1])
        last = hidden.gather(1, at).view(*index.shape, hidden.shape[-1])
        # a copy, not a view of the head's output: FSDP2 warns of a sharded module returning a view
        return self.mc_head(self.mc_dropout(last)).squeeze(-1).float().clone()

    def step(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None):
        """Next-token logits at the last position, reading and extending the KV cache (for decoding)."""
        hidden, cache = self.hidden_states(input_ids, token_type_ids, attention_mask, position_ids, cache)
        return self.lm_logits(hidden[:, -1]), cache

    def heads_state(self):
        return {"speaker_embeddings": self.speaker_embeddings.detach(),
                **{f"mc_head.{k}": v.detach() for k, v in self.mc_head.state_dict().items()}}

    def save_pretrained(self, directory, state_dict=None):
        """The LM (a LoRA run: its adapter only, in peft's layout) and the heads, with what loading needs to know.

        `state_dict`: this model's whole state gathered elsewhere (FSDP shards it), saved instead of its own.
        """
        metadata = {"speaker_ids": ",".join(map(str, self.speaker_ids.tolist())), "input_format": self.input_format}
        heads = self.heads_state()
        if state_dict is None:
            self.lm.save_pretrained(directory)
        else:
            # tied weights (lm_head = embed_tokens) are saved once, as save_pretrained does with its own state
            tied = ({n for n, _ in self.lm.named_parameters(remove_duplicate=False)}
                    - {n for n, _ in self.lm.named_parameters()})
            self.lm.save_pretrained(directory, state_dict={k[3:]: v for k, v in state_dict.items()
                                                           if k.startswith("lm.") and k[3:] not in tied})
            heads = {k: state_dict[k] for k in heads}
        if has_lora(self):
            metadata["base_model"] = self.lm.peft_config["default"].base_model_name_or_path or ""
            Path(directory, "README.md").unlink(missing_ok=True)  # peft's model card template, not ours
        save_file({k: v.contiguous() for k, v in heads.items()}, os.path.join(directory, HEADS_FILE),
                  metadata=metadata)

    def load_heads(self, directory):
        """Load the heads saved beside an LM; False when there are none (a plain pretrained LM)."""
        path = os.path.join(directory, HEADS_FILE)
        if not os.path.exists(path):
            return False
        state = load_file(path)
        if set(state) != set(self.heads_state()) or state["speaker_embeddings"].shape != self.speaker_embeddings.shape:
            raise ValueError(f"{path}: expected tensors {sorted(self.heads_state())} of this model's sizes")
        with torch.no_grad():
            self.speaker_embeddings.copy_(state["speaker_embeddings"])
            self.mc_head.load_state_dict({k[len("mc_head."):]: v for k, v in state.items() if k.startswith("mc_head.")})
        return True


class GPTDoubleHeads(nn.Module):
    """transformers' GPT/GPT-2 double-heads model behind the same forward as DoubleHeads."""

    input_format = "transfertransfo"  # its token types go through the token matrix: they must be tokens
    heads_trained = False

    def __init__(self, model):
        super().__init__()
        self.lm = model

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, mc_token_ids=None, lm_labels=None,
                context_lens=None):
        """As DoubleHeads.forward; full sequences always (`context_lens` is not used)."""
        out = self.lm(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                      mc_token_ids=mc_token_ids)
        nll_sum, count = shifted_nll(out.logits, lm_labels) if lm_labels is not None else (None, None)
        return nll_sum, count, out.mc_logits.float() if mc_token_ids is not None else None

    def hidden_states(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None):
        """Last-layer hidden states of (sequences, length) inputs, reading and extending the KV cache."""
        out = self.lm.transformer(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=True)
        return out.last_hidden_state, out.cache

    def lm_logits(self, hidden):
        return self.lm.lm_head(hidden).float()

    def mc_logits_at(self, hidden, index):
        """Multiple-choice logit of each sequence from its hidden state at `index`."""
        return self.lm.multiple_choice_head(hidden, index).squeeze(-1).float()

    def step(self, input_ids, token_type_ids, attention_mask, position_ids, cache=None):
        """Next-token logits at the last position, reading and extending the KV cache (for decoding)."""
        hidden, cache = self.hidden_states(input_ids, token_type_ids, attention_mask, position_ids, cache)
        return self.lm_logits(hidden[:, -1]), cache

    def save_pretrained(self, directory, state_dict=None):
        self.lm.save_pretrained(directory, state_dict=state_dict)


def has_cxx_compiler():
    return any(shutil.which(name) for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if name)


def compile_decoder(model):
    """torch.compile the transformer stack of a DoubleHeads or GPTDoubleHeads in place, shapes dynamic.

    A step of a model this size is tens of thousands of small kernels, which a GPU waits on the host to launch;
    inductor fuses the elementwise ones (norms, rotary embeddings, activations, residual adds). The stack alone:
    the packing around it reads sizes on the host, which would break the graph. Weights and their names stay as
    they are (checkpoints do not change); the first training step and the first validation compile.
    """
    if not has_cxx_compiler():  # inductor builds its kernels (and, on a GPU, Triton its launchers) with one
        raise RuntimeError("--compile: torch.compile needs a C++ compiler (g++, c++ or clang++ on PATH, or $CXX); "
                           "install one (e.g. apt-get install g++) or train without --compile")
    decoder = model.lm.get_decoder()
    decoder.compile(dynamic=True)  # lengths and rows change from batch to batch: one graph for all of them
    return decoder


def double_head_loss(outputs, mc_labels, lm_coef=1.0, mc_coef=1.0):
    """(loss, lm_loss, mc_loss): LM loss is the mean NLL per labelled token, MC loss the mean cross-entropy."""
    nll_sum, count, mc_logits = outputs
    lm_loss = nll_sum / count.clamp(min=1)
    mc_loss = F.cross_entropy(mc_logits, mc_labels)
    return lm_coef * lm_loss + mc_coef * mc_loss, lm_loss, mc_loss


def prepare_tokenizer_(lm, tokenizer, input_format):
    """Add the tokens the input format needs unless present, and resize the LM's embeddings to match.

    transfertransfo: <bos> <eos> <speaker1> <speaker2> <pad>, and generate() stops at <eos>; chat_template and
    transcript: a pad token only where the tokenizer has none. Returns the ids of the embedding rows it added.
    """
    if input_format == "transfertransfo":
        added = tokenizer.add_special_tokens(ATTR_TO_SPECIAL_TOKEN)
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    else:
        added = tokenizer.add_special_tokens({"pad_token": "<pad>"}) if tokenizer.pad_token is None else 0
        ids = {"pad_token_id": tokenizer.pad_token_id}
    rows = lm.get_input_embeddings().num_embeddings
    if added or rows < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    for config in (lm.config, getattr(lm, "generation_config", None)):
        if config is not None:
            for name, value in ids.items():
                setattr(config, name, value)
    return list(range(rows, len(tokenizer)))


def stored_input_format(source):
    """The input format a run was trained with (its heads file's metadata), or None for a pretrained model.

    Runs saved before the format was recorded used transfertransfo.
    """
    path = os.path.join(source, HEADS_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("input_format", "transfertransfo")


def stored_base_model(run_dir):
    """The base model a LoRA run's adapter goes on, as train.py was given it ("" for the packaged default)."""
    with safe_open(os.path.join(run_dir, HEADS_FILE), framework="pt") as f:
        return (f.metadata() or {}).get("base_model", "")


def choose_input_format(requested, stored, tokenizer, is_gpt, where):
    """The run's own format; else the one asked for; else chat_template where the tokenizer has a usable one."""
    if requested and requested not in INPUT_FORMATS:
        raise InputFormatError(f"--input_format {requested!r}: use one of {', '.join(INPUT_FORMATS)}")
    if stored and requested and requested != stored:
        raise InputFormatError(f"--input_format {requested}: {where} was trained with --input_format {stored}")
    if is_gpt and (requested or stored) not in (None, "", "transfertransfo"):
        raise InputFormatError(f"--input_format {requested or stored}: {where} is a GPT/GPT-2 double-heads model, "
                               f"whose token types are tokens; use --input_format transfertransfo")
    return stored or requested or ("transfertransfo" if is_gpt else default_input_format(tokenizer))


class CheckpointError(FileNotFoundError):
    """--model_checkpoint names no model: reported in one line, not transformers' page of traceback."""


def _split_gguf(checkpoint):
    """(directory or hub id, GGUF file name or None); a local path that holds no model is refused here."""
    path = Path(checkpoint)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"--model_checkpoint {checkpoint}: no such GGUF file")
        if path.stat().st_size == 0:
            raise CheckpointError(f"--model_checkpoint {checkpoint}: an empty file, not a GGUF model")
        return str(path.parent), path.name
    if path.is_file():
        raise CheckpointError(f"--model_checkpoint {checkpoint}: a file, but not a .gguf one (give a run "
                              f"directory, a hub id or a .gguf file)")
    if path.is_dir() and not (path / "config.json").is_file() and not is_adapter_run(path):
        raise CheckpointError(f"--model_checkpoint {checkpoint}: a directory without a model (no config.json); "
                              f"a run directory of train.py, or a checkpoint-<step> inside one, has it")
    # a path, not a hub id ("org/name"): so written, deeper than a hub id, or under a directory that is here
    # (runs/typo) and not a model in the hub's cache
    if not path.exists() and (checkpoint.startswith((".", "/", "~")) or len(path.parts) > 2):
        raise CheckpointError(f"--model_checkpoint {checkpoint}: no such directory or file")
    if (not path.exists() and len(path.parts) == 2 and Path(path.parts[0]).is_dir()
            and not isinstance(try_to_load_from_cache(checkpoint, "config.json"), str)):
        raise CheckpointError(f"--model_checkpoint {checkpoint}: no such directory or file (read as a path, since "
                              f"{path.parts[0]}/ is a local directory; a hub id of that name loads from elsewhere)")
    return checkpoint, None


def add_run_args(parser):
    """The flags naming the model of interact.py and serve.py: a run (default: the newest) or a pretrained model."""
    parser.add_argument("--model_checkpoint", type=str, default="",
                        help="Run directory, hub id or .gguf file (default: the newest run under --runs_dir)")
    parser.add_argument("--input_format", type=str, default="", choices=("",) + INPUT_FORMATS,
                        metavar="{" + ",".join(INPUT_FORMATS) + "}",
                        help="Layout of a pretrained model's inputs (default: a run's own; else chat_template where "
                             "the tokenizer has one)")
    parser.add_argument("--runs_dir", type=str, default="runs", help="Where to look for the newest run (default: runs)")


def load_tokenizer_and_model(model_checkpoint=None, mc_dropout=0.1, input_format=""):
    """Tokenizer, double-heads model and input layout from a hub id, a local directory (e.g. a run) or a GGUF file.

    GGUF weights are dequantized to full precision. A run keeps the input format it was trained with (asking
    for another is an error); a pretrained model takes `input_format`, by default its chat template where it has
    one. The tokens the format needs are added and embeddings resized once.
    """
    checkpoint = model_checkpoint or default_model_checkpoint()
    source, gguf_file = _split_gguf(checkpoint)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:  # a hub id that is not there, or no network: transformers' message says which
        raise CheckpointError(f"--model_checkpoint {checkpoint}: {e}") from None
    stored = stored_input_format(source) if os.path.isdir(source) else None
    heads_dir = source
    adapter = os.path.isdir(source) and is_adapter_run(source)
    if adapter:  # a LoRA run: the LM is its base model's, the run's adapter goes on top
        source, gguf_file = _split_gguf(stored_base_model(heads_dir) or default_model_checkpoint())
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(source, **kwargs)
    is_gpt = config.model_type in GPT_DOUBLE_HEADS
    input_format = choose_input_format(input_format, stored, tokenizer, is_gpt, checkpoint)
    if is_gpt:
        lm, info = GPT_DOUBLE_HEADS[config.model_type].from_pretrained(source, use_kernels=False,
                                                                       output_loading_info=True, **kwargs)
        prepare_tokenizer_(lm, tokenizer, input_format)
        model = GPTDoubleHeads(lm)
        model.heads_trained = not any(k.startswith("multiple_choice_head") for k in info["missing_keys"])
        return tokenizer, model, make_layout(tokenizer, input_format)
    # no hub kernels: on a GPU transformers would fetch them at run time (offline that fails in model.train())
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_kernels=False, **kwargs)
    if gguf_file:  # dequantized on load: a saved copy is a plain full-precision model
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    new_rows = prepare_tokenizer_(lm, tokenizer, input_format)
    if adapter:
        lm = load_lora(lm, heads_dir)
    layout = make_layout(tokenizer, input_format)
    model = DoubleHeads(lm, [layout.bot_type, layout.user_type], mc_dropout=mc_dropout, input_format=input_format)
    model.new_token_ids = new_rows  # rows a LoRA run must train: the pretrained model has no values for them
    # whether the multiple-choice head was trained (a run's), so that ranking with it means something
    model.heads_trained = stored is not None and model.load_heads(heads_dir)
    if not model.heads_trained:
        logger.warning("No %s in %s: the multiple-choice head and speaker embeddings start untrained",
                       HEADS_FILE, heads_dir)
    return tokenizer, model, layout


def save_model(model, tokenizer, directory, state_dict=None):
    """The save_pretrained layout of model and tokenizer; what load_tokenizer_and_model reads back."""
    os.makedirs(directory, exist_ok=True)
    getattr(model, "module", model).save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    share_saved_files(directory)


def model_max_length(model):
    """The longest sequence the model's positions allow."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 1024
