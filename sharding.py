"""train.py --fsdp: parameters, gradients and optimizer state sharded across torchrun's processes with FSDP2
(`fully_shard`), and whole state dicts gathered for checkpoints in the usual run-directory layout.
"""
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model, dtype=None):
    """Shard each decoder layer, then the rest (embeddings, final norm, heads) as the root unit.

    With a mixed-precision dtype, layers compute in it from fp32 master shards and gradients reduce in fp32.
    """
    if not hasattr(model, "speaker_embeddings"):
        raise ValueError("--fsdp: GPT/GPT-2 double-heads models are not supported; use a Llama-family model")
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for layer in model.lm.get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def whole_model_state(model):
    """The full state dict on CPU (keys as the unsharded model's); every process must call it."""
    return get_model_state_dict(model, options=WHOLE)


class WholeOptimizer:
    """The optimizer as ignite's Checkpoint saves and loads it: whole, as one process would have it.

    `gather()` runs on every process before a save (a collective); `state_dict()` then returns what it gathered,
    on the process that writes. Loading puts each process's shard of a whole state back.
    """

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.gathered = model, optimizer, None

    def gather(self):
        self.gathered = get_optimizer_state_dict(self.model, self.optimizer, options=WHOLE)

    def state_dict(self):
        return self.gathered

    def load_state_dict(self, state):
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
