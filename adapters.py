"""LoRA adapters through peft: the LM frozen, low-rank adapters trained beside our heads; load and merge.

A LoRA run saves peft's layout (`adapter_config.json`, `adapter_model.safetensors`) next to our heads file,
whose metadata names the base model; PeftModel.from_pretrained(base, run) reads the adapter on its own too.
"""
import os
import warnings
from contextlib import contextmanager

from peft import LoraConfig, PeftModel, get_peft_model

ADAPTER_CONFIG = "adapter_config.json"


@contextmanager
def _quiet_peft():
    """peft asks transformers a deprecated question on every wrap and load: its FutureWarning says nothing to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_adapter_run(directory):
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def has_lora(model):
    return isinstance(getattr(model, "lm", None), PeftModel)


def add_lora(model, r, alpha=0, dropout=0.05, target_modules=(), new_token_ids=(), base_model=""):
    """Freeze model.lm and wrap it with LoRA adapters of rank r; the heads and speaker embeddings stay trainable.

    Tokens the input format added (new_token_ids) get trainable rows (peft's trainable tokens), the rest of the
    embedding matrix stays frozen. alpha 0 means 2r; target_modules empty means every linear layer of the LM.
    """
    if not hasattr(model, "speaker_embeddings"):
        raise ValueError("--lora_r: GPT/GPT-2 double-heads models are not supported; use a Llama-family model "
                         "(its heads live outside the LM)")
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout,
                        target_modules=list(target_modules) or "all-linear",
                        trainable_token_indices={"embed_tokens": sorted(new_token_ids)} if new_token_ids else None)
    with _quiet_peft():
        model.lm = get_peft_model(model.lm, config)
    model.lm.peft_config["default"].base_model_name_or_path = base_model
    return model


def load_lora(lm, directory):
    """The LM with a run's adapter on it, trainable (so that a resumed run goes on training it)."""
    with _quiet_peft():
        return PeftModel.from_pretrained(lm, directory, is_trainable=True)


def merge_lora(model):
    """The adapter folded into the LM's weights: a plain model, the same outputs, no peft needed to load it."""
    model.lm = model.lm.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def parameter_counts(model):
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
