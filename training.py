"""The process functions of the ignite engines: one training micro-batch, one validation batch.

Kept out of train.py so that their mechanics (autocast, loss, gradient accumulation, clipping, scaling, the
non-finite-loss stop) are tested on their own.
"""
import contextlib
import logging
import re
import resource
import sys
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar, Timer
from torch.profiler import record_function

from modeling import double_head_loss

# record_function labels of a training step's phases, which a profiler (bench.py train) reads back
PHASES = ("train/forward", "train/backward", "train/optimizer")


def amp_dtype(fp16):
    """torch.amp dtype of --fp16: '' or O0 off, O1-O3 or fp16 half precision, bf16 bfloat16."""
    value = fp16.strip().lower()
    if value in ("", "o0", "no", "fp32"):
        return None
    if value in ("o1", "o2", "o3", "fp16", "float16"):
        return torch.float16
    if value in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise ValueError(f"--fp16 {fp16!r}: use fp16 (or O1, O2, O3), bf16, or leave it empty")


def linear_lr(step, lr, total_steps, warmup_steps=0):
    """Learning rate of optimizer step `step` (from 0): linear warm-up to lr, then linear decay towards 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(total_steps - step, 0) / max(total_steps - warmup_steps, 1)


def slow_bf16(device, dtype):
    """Whether bf16 autocast would run on a CPU without bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on Arm),
    where its matmuls are emulated and many times slower than fp32 (`bench.py train` prints bf16_speedup)."""
    if device.type != "cpu" or dtype is not torch.bfloat16:
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch 2.13; an older torch is not asked
    return capabilities is not None and not any(capabilities().get(name)
                                                for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def forward(model, batch):
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mc_token_ids"],
                 batch["lm_labels"], batch.get("context_lens"))


def make_update(model, optimizer, scaler, device, dtype=None, accumulation_steps=1, lm_coef=1.0, mc_coef=1.0,
                max_norm=1.0):
    """Process function of the trainer: backward on every batch, an optimizer step every `accumulation_steps`.

    Each batch's loss is divided by accumulation_steps, so k batches of b examples step as one batch of k*b
    (exactly, when the batches hold equal numbers of reply tokens). Under DDP or FSDP, gradients are only
    reduced on the stepping batch. A non-finite loss raises FloatingPointError naming the step, before anything is saved
    (on every process: one stopping alone would leave the others waiting in the gradients' all-reduce).
    """
    distributed = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    sharded = hasattr(model, "set_requires_gradient_sync")  # FSDP2

    def update(engine, batch):
        model.train()
        batch = {k: v.to(device) for k, v in batch.items()}
        stepping = engine.state.iteration % accumulation_steps == 0
        if sharded:
            model.set_requires_gradient_sync(stepping)
        with contextlib.nullcontext() if stepping or not distributed else model.no_sync():
            with record_function(PHASES[0]):
                with autocast(device, dtype):
                    outputs = forward(model, batch)
                loss, lm_loss, mc_loss = double_head_loss(outputs, batch["mc_labels"], lm_coef, mc_coef)
            finite = torch.isfinite(loss.detach()).float()
            if idist.get_world_size() > 1:
                finite = idist.all_reduce(finite, op="MIN")
            if not finite:
                done = (engine.state.iteration - 1) // accumulation_steps
                raise FloatingPointError(
                    f"loss is {loss.item() if not torch.isfinite(loss) else 'non-finite in another process'} at "
                    f"iteration {engine.state.iteration} "
                    f"({f'after optimizer step {done}' if done else 'before the first optimizer step'})")
            with record_function(PHASES[1]):
                scaler.scale(loss / accumulation_steps).backward()
        if stepping:
            with record_function(PHASES[2]):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "lm_loss": lm_loss.item(), "mc_loss": mc_loss.item(),
                "tokens": int(batch["attention_mask"].sum())}

    return update


def reset_peak_memory():
    """Start this process's peaks afresh, so that they are training's and not loading's (a GGUF file is
    dequantized on load). Returns the RSS peak so far (MiB) where it could be reset (Linux's clear_refs resets
    the VmHWM of /proc/self/status), else None."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return before
    except OSError:
        return None


def peak_memory(peak_before_reset=None):
    """Peak resident memory of the whole process (MiB), `train_peak_rss_mb` since reset_peak_memory() where it
    worked (pass what it returned), and peak GPU memory since that reset where a GPU is used.

    The training peak is VmHWM, not getrusage's maxrss: that one also keeps a peak inherited across exec."""
    peak = {"peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_before_reset or 0.0)}
    if peak_before_reset is not None:
        status = Path("/proc/self/status").read_text()
        peak["train_peak_rss_mb"] = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024
        peak["peak_rss_mb"] = max(peak["peak_rss_mb"], peak["train_peak_rss_mb"])  # maxrss can lag VmHWM
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class Throughput:
    """Optimizer steps and tokens per second of training time alone (validation and checkpoints excluded).

    Tokens are the non-pad tokens of every candidate sequence, summed over the processes: what a
    full-sequence forward would read, whichever path computed them.
    """

    def __init__(self, accumulation_steps=1):
        self.accumulation_steps = accumulation_steps
        self.timer = Timer(average=False)
        self.tokens = 0
        self.iterations = 0
        self.peak_before = None  # the process's RSS peak when training started

    def attach(self, engine):
        self.timer.attach(engine, start=Events.STARTED, resume=Events.ITERATION_STARTED,
                          pause=Events.ITERATION_COMPLETED, step=Events.ITERATION_COMPLETED)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.count)
        engine.add_event_handler(Events.STARTED, self.reset_peaks)
        return self

    def reset_peaks(self, engine):
        self.peak_before = reset_peak_memory()

    def count(self, engine):
        self.tokens += engine.state.output["tokens"]
        self.iterations += 1

    def compute(self):
        """{train_seconds, steps_per_s, tokens_per_s} since the run (or its resumption) started; collective."""
        seconds = max(self.timer.value(), 1e-9)
        tokens = idist.all_reduce(float(self.tokens))
        steps = self.iterations / self.accumulation_steps
        return {"train_seconds": seconds, "steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds,
                **peak_memory(self.peak_before)}


class StepsBar(ProgressBar):
    """ignite's progress bar, whose length is the iterations an epoch will run: under --max_steps, often fewer
    than the epoch holds, and the bar and its time left should end where the run does."""

    def __init__(self, last_iteration=None, **kwargs):
        super().__init__(**kwargs)
        self.last_iteration = last_iteration  # the run's last iteration over all epochs; None: every epoch runs whole
        self.engine = None

    def attach(self, engine, *args, **kwargs):
        self.engine = engine
        return super().attach(engine, *args, **kwargs)

    def _reset(self, pbar_total):  # where ignite (0.5) makes each epoch's tqdm bar
        state = self.engine.state if self.engine is not None else None
        if self.last_iteration and pbar_total and state is not None and state.epoch_length == pbar_total:
            left = self.last_iteration - (state.epoch - 1) * state.epoch_length
            pbar_total = max(1, min(pbar_total, left))
        super()._reset(pbar_total)


class QuietStop(logging.Filter):
    """Drops ignite's ERROR "Engine run is terminating due to exception" when train.py reports the stop itself, with
    what the run kept: Ctrl-C or SIGTERM (no error: the user asked for it), or a non-finite loss."""

    def filter(self, record):
        return not isinstance(sys.exc_info()[1], (KeyboardInterrupt, FloatingPointError))  # inside ignite's except


QUIET_STOP = QuietStop()  # one instance: addFilter skips a filter already added, so repeated runs add it once


def make_inference(model, device, dtype=None):
    """Process function of the evaluator: (nll_sum, token_count) and (mc_logits, mc_labels) per batch.

    Give it the bare module, not DDP's wrapper: no collectives, so ranks may hold unequal numbers of batches.
    """

    def inference(engine, batch):
        model.eval()
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), autocast(device, dtype):
            nll_sum, count, mc_logits = forward(model, batch)
        return {"nll": (nll_sum, count), "mc": (mc_logits, batch["mc_labels"])}

    return inference
