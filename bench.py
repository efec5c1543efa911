"""Benchmarks that print ratios measured in one run (these machines are noisy: compare within a run only).

    python bench.py train [--examples 32] [--json]
    python bench.py generate [--reply_tokens 20] [--json]
    python bench.py rank [--examples 8] [--json]
    python bench.py quality [--max_steps 200] [--max_examples 200] [--rerank N] [--json]
    python bench.py serve [--clients 8] [--requests 32] [--json]

`train`: training steps of the packaged model on the packaged corpus through our pipeline (length-grouped
batches padded to their own longest sequence, each context computed once for all its candidates), against the
same batches as full sequences (every candidate with its own copy of the context), against the original repo's
batching (full sequences in random batches, every example padded to the dataset's longest, here cut at
--max_seq_len) on the same examples (per example: its batches all cost the same, so a few are timed), and against a bare transformers
forward/backward of the same model on the same batches. MFU counts useful FLOPs, 6 x parameters x the non-pad
tokens a run computes (ours: each context once plus the candidates' own tokens; bare transformers: every full
sequence), against an fp32 matmul measured in the same run. With --compile, the same batches through
train.py --compile's compiled stack too (its compilation timed apart). Then (unless --no-profile) the same
batches once more under torch.profiler, each way: where a step's host time goes, the calls it dispatches, the
top ops, and on a GPU how busy the device was.

`generate`: greedy replies of exactly --reply_tokens tokens after a ConvAI2-sized context (~100 tokens) with
our KV-cache decoding, against re-running the whole sequence for every token (the original's loop, which also
projects every position onto the vocabulary; and a stricter variant projecting the last position only) and
against transformers' own `generate` on the same prompt. Then beam search (--num_beams) for --beam_contexts copies
of that context decoded in one batch, against one context at a time.

`quality`: is the trained agent better than where it started? On held-out dialogs (train.py's split), the
zero-shot model in each input format, then a run of --max_steps optimizer steps from it, each scored by
convai_evaluation.py on the same --max_examples examples (20 candidates): hits@1 by the multiple-choice head and
by LM likelihood, token and word perplexity (and, apart, the reply's own tokens' perplexity and its end token's
NLL), and F1 of greedy replies; plus the untrained MiniLM bi-encoder's hits@1. With --rerank N, also the
trained run's F1 on its multiple-choice head's pick among N sampled replies, and on mc+pmi+biencoder's pick among
the same samples. Prints every row and the trained-minus-zero-shot deltas. Training and evaluation run as the
scripts themselves, in subprocesses.

`serve`: serve.py started as a user starts it, then the same --requests chat completions (the first turns of
held-out dialogs, greedy, streamed) sent one at a time and by --clients concurrent clients: requests/s, reply
tokens/s, p50/p95 latency and time to the first token of each, and `batching_speedup`, the concurrent
requests/s over the one-at-a-time requests/s.

`rank`: hits@1 scoring of 20 candidates per example with the context computed once and the candidates on its
KV cache, against 20 full sequences through the double-heads model (the scores are checked to agree).
"""
import argparse
import copy
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine

from decoding import DecodingConfig, generate
from dialogs import DialogFormatError
from inputs import DoubleHeadDataset, LengthGroupedBatchSampler, collate
from layouts import INPUT_FORMATS, InputFormatError
from modeling import compile_decoder, load_tokenizer_and_model
from ranking import score_candidates
from tokenized import get_dataset
from training import PHASES, amp_dtype, make_update
from utils import seed_type, torchrun_launcher


def matmul_flops(size=2048, repeats=10, dtype=torch.float32, device="cpu"):
    """FLOP/s of a large square matmul: the reference peak for MFU."""
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def warm_trainer(model, batches, device, dtype, shared_context=True, compile=False):
    """A copy of the model on `device` and a run(batches) of one optimizer step per batch through the ignite
    trainer (collation included), after a warm-up step (allocator, kernels; with `compile`, compilation).

    `shared_context=False`: every candidate a full sequence, context included (as the original computed them).
    """
    def make_batch(items):
        return collate(*items, shared_context=shared_context)

    model = copy.deepcopy(model).to(device)
    if compile:
        compile_decoder(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as train.py's
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)
    update = make_update(model, optimizer, scaler, torch.device(device), dtype)
    Engine(update).run([make_batch(batches[0])], max_epochs=1)
    sync(device)
    return lambda: Engine(lambda engine, items: update(engine, make_batch(items))).run(batches, max_epochs=1)


def timed_training(model, batches, device, dtype, shared_context=True, compile=False):
    """Seconds for one optimizer step per batch (see warm_trainer)."""
    run = warm_trainer(model, batches, device, dtype, shared_context, compile)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def profile_training(model, batches, device, dtype, seconds_unprofiled, top=8, shared_context=True, compile=False):
    """Where a training step's time goes, from torch.profiler over the batches timed in `seconds_unprofiled`.

    The host's time in each phase of training.make_update (forward with the loss, backward, clipping and the
    optimizer; `other`: the rest, data and the waits for the device included) and the calls it dispatched; on a
    GPU, the device's busy time and kernels. `device_busy_fraction` (kernel time over the unprofiled step time)
    far under 1 means the host, not the GPU, sets the pace: launches and Python, not FLOPs. The profiler slows
    the host, so phases are comparable to each other, not to the unprofiled time.
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    run = warm_trainer(model, batches, device, dtype, shared_context, compile)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        start = time.perf_counter()
        run()
        sync(device)
        wall = time.perf_counter() - start
    return summarize_profile(prof.key_averages(), len(batches), wall, seconds_unprofiled, on_gpu, top)


def summarize_profile(averages, steps, wall, seconds_unprofiled, on_gpu, top=8):
    """profile_training's figures from the profiler's key_averages() (times there are in microseconds).

    A record_function label appears twice on a GPU: the host's range and the device's annotation; the phases are
    the host's, and the device's busy time counts its own events (kernels, copies, memsets), not the annotations.
    """
    annotation = lambda e: getattr(e, "is_user_annotation", False)  # noqa: E731
    on_host = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU]
    by_name = {e.key: e for e in on_host}
    phases = {name.split("/")[-1]: by_name[name].cpu_time_total / 1e3 / steps for name in PHASES if name in by_name}
    phases["other"] = max(wall * 1e3 / steps - sum(phases.values()), 0.0)
    rows = lambda events, key: [[e.key, getattr(e, key) / 1e3 / steps, e.count / steps]  # noqa: E731
                                for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]]
    result = {"steps": steps, "host_ms_per_step": phases,
              "aten_calls_per_step": sum(e.count for e in on_host if e.key.startswith("aten::")) / steps,
              "top_host_ops": rows([e for e in on_host if not annotation(e)], "self_cpu_time_total")}
    if on_gpu:
        device_ops = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA and not annotation(e)]
        busy = sum(e.self_device_time_total for e in device_ops) / 1e6
        result.update(device_ops_per_step=sum(e.count for e in device_ops) / steps,
                      device_ms_per_step=busy * 1e3 / steps, device_busy_fraction=busy / seconds_unprofiled,
                      top_kernels=rows(device_ops, "self_device_time_total"))
    return result


def print_profile(title, profile):
    print(f"{title}, per step ({profile['steps']} steps, {profile['aten_calls_per_step']:.0f} aten calls): host ms "
          + ", ".join(f"{k} {v:.1f}" for k, v in profile["host_ms_per_step"].items()))
    for table in ("top_host_ops", "top_kernels"):
        for name, ms, calls in profile.get(table, []):
            print(f"{table:>12} {ms:10.2f} ms {calls:8.1f} calls  {name[:80]}")


def timed_optimizer_step(model, device, fused, repeats=5):
    """Seconds for one clipping + AdamW step over the model's parameters, random gradients (train.py's optimizer
    phase alone)."""
    params = [torch.nn.Parameter(p.detach().to(device, copy=True)) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return best_time(lambda: (step(), sync(device)), repeats)


def timed_bare_hf(model, batches, device, dtype):
    """Seconds for transformers' own forward/backward + AdamW step of the bare LM on the same padded batches."""
    lm = copy.deepcopy(model.lm).to(device)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    tensors = [collate(*items) for items in batches]

    def step(batch):
        length = batch["input_ids"].shape[-1]
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = lm(input_ids=batch["input_ids"].view(-1, length).to(device),
                     attention_mask=batch["attention_mask"].view(-1, length).to(device),
                     labels=batch["lm_labels"].view(-1, length).to(device))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(tensors[0])
    sync(device)
    start = time.perf_counter()
    for batch in tensors:
        step(batch)
    sync(device)
    return time.perf_counter() - start


def bench_train(args):
    # first, while this process is small: on Linux a child starts with its parent's peak RSS
    memory = memory_variants(args) if args.memory_steps else None
    device = args.device
    dtype = amp_dtype(args.fp16)
    tokenizer, model, layout = load_tokenizer_and_model(args.model_checkpoint, input_format=args.input_format)
    data = get_dataset(tokenizer, args.dataset_path, args.dataset_cache)
    full = DoubleHeadDataset(data, "train", layout, num_candidates=args.num_candidates, max_len=args.max_seq_len)
    lengths = full.lengths()
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(full), size=args.examples, replace=False)
    items = [full[int(i)] for i in picked]
    dataset_longest = int(lengths.max())

    ours = [[items[i] for i in b] for b in LengthGroupedBatchSampler(lengths[picked], args.batch_size, seed=args.seed)]
    ours = [(b, layout.pad) for b in ours]
    order = rng.permutation(len(items))
    original = [([items[i] for i in order[k:k + args.batch_size]], layout.pad, dataset_longest)
                for k in range(0, len(items), args.batch_size)][:args.baseline_batches]

    tokens = sum(len(inst["input_ids"]) for item in items for inst in item["instances"])
    # what the shared-context path computes: each context once, then every candidate's own tokens
    computed = sum(item["instances"][0]["reply_start"] + sum(len(inst["input_ids"]) - inst["reply_start"]
                                                             for inst in item["instances"]) for item in items)
    params = model.lm.num_parameters()
    peak = matmul_flops(device=device)
    t_ours = timed_training(model, ours, device, dtype)
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the baselines add theirs
    t_full = timed_training(model, ours, device, dtype, shared_context=False)
    t_original = timed_training(model, original, device, dtype, shared_context=False)  # equal batches: a few suffice
    n_original = sum(len(b[0]) for b in original)
    t_bare = timed_bare_hf(model, ours, device, dtype)
    # what --fp16 bf16 gains on this machine (CPUs with AVX512-BF16 or AMX have bf16 matmuls too)
    t_bf16 = timed_training(model, ours, device, torch.bfloat16) if dtype is None else None
    # what train.py --max_reply_len gains: the same examples with every candidate cut there, grouped anew
    capped = DoubleHeadDataset(data, "train", layout, num_candidates=args.num_candidates, max_len=args.max_seq_len,
                               max_reply_len=args.max_reply_len)
    capped_items = [capped[int(i)] for i in picked]
    capped_batches = [([capped_items[i] for i in b], layout.pad)
                      for b in LengthGroupedBatchSampler(capped.lengths()[picked], args.batch_size, seed=args.seed)]
    t_capped = timed_training(model, capped_batches, device, dtype)
    result = {
        "device": str(device), "dtype": str(dtype or torch.float32).replace("torch.", ""), "input_format": layout.name,
        "examples": len(items), "candidates": full.num_candidates, "batch_size": args.batch_size,
        "non_pad_tokens": tokens, "computed_tokens": computed, "dataset_longest": dataset_longest, "parameters": params,
        "tokens_per_s": tokens / t_ours, "examples_per_s": len(items) / t_ours,
        "peak_rss_mb": rss_ours,
        "matmul_tflops": peak / 1e12,
        "mfu": 6 * params * computed / t_ours / peak,
        "bare_hf_mfu": 6 * params * tokens / t_bare / peak,
        "speedup_vs_full_sequences": t_full / t_ours,
        "speedup_vs_dataset_padding": (t_original / n_original) / (t_ours / len(items)),
        "pipeline_vs_bare_hf": t_bare / t_ours,
        "max_reply_len": args.max_reply_len,
        "max_reply_len_speedup": t_ours / t_capped,
        "candidates_cut_by_max_reply_len": sum(len(inst["input_ids"]) - inst["reply_start"] - len(layout.reply_end)
                                               > args.max_reply_len for item in items for inst in item["instances"]),
    }
    if t_bf16:
        result["bf16_speedup"] = t_ours / t_bf16
    # train.py's fused AdamW against torch's default for these parameters (a loop over them on a CPU, foreach on a GPU)
    result["fused_adamw_speedup"] = (timed_optimizer_step(model, device, fused=None)
                                     / timed_optimizer_step(model, device, fused=True))
    if args.compile:  # train.py --compile: the same batches through the compiled stack, compilation timed apart
        start = time.perf_counter()
        t_compiled = timed_training(model, ours, device, dtype, compile=True)
        result["compile_warmup_seconds"] = time.perf_counter() - start - t_compiled
        result["compile_speedup"] = t_ours / t_compiled
    if args.profile:  # on a host-bound device, calls (not tokens) set the pace
        result["profile"] = profile_training(model, ours, device, dtype, t_ours)
        result["profile_full_sequences"] = profile_training(model, ours, device, dtype, t_full, shared_context=False)
        if args.compile:
            result["profile_compiled"] = profile_training(model, ours, device, dtype, t_compiled, compile=True)
    if memory:
        result["memory"] = memory
    return result


MEMORY_VARIANTS = {"full": [], "full_ckpt": ["--gradient_checkpointing"], "lora": ["--lora_r", "8"],
                   "lora_ckpt": ["--lora_r", "8", "--gradient_checkpointing"], "fsdp": ["--fsdp"]}


def memory_variants(args):
    """Trainable parameters and peak memory of train.py itself, each variant in its own process(es), same flags.

    fsdp: 2 processes under torchrun, each with a batch of --batch_size (so twice the examples per step); its
    figures are rank 0's.
    """
    found = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as work:  # five runs of the model: gigabytes
        work = Path(work)
        for name, flags in MEMORY_VARIANTS.items():
            run_script("train.py", [
                "--model_checkpoint", args.model_checkpoint, "--dataset_path", args.dataset_path,
                "--dataset_cache", args.dataset_cache, "--device", args.device, "--fp16", args.fp16,
                "--input_format", args.input_format, "--max_steps", str(args.memory_steps),
                "--train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
                "--num_candidates", str(args.num_candidates), "--max_seq_len", str(args.max_seq_len),
                "--max_valid_examples", "4", "--output_dir", str(work / name), *flags],
                launcher=torchrun_launcher() if "--fsdp" in flags else ())
            run_args = json.loads((work / name / "training_args.json").read_text())
            last = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()][-1]
            found[name] = {"trainable_parameters": run_args["trainable_parameters"],
                           "parameters": run_args["parameters"], "steps_per_s": last["steps_per_s"],
                           **{k: v for k, v in last.items() if "peak_" in k}}
    return found


def print_memory(memory):
    """Peak RSS: the whole process (loading included), then training's alone (where Linux could reset it)."""
    print(f"{'':>10}{'trainable':>14}{'parameters':>14}{'peak RSS MiB':>14}{'training MiB':>14}{'peak GPU MiB':>14}"
          f"{'steps/s':>10}")
    for name, row in memory.items():
        print(f"{name:>10}{row['trainable_parameters']:>14,}{row['parameters']:>14,}{row['peak_rss_mb']:>14.0f}"
              f"{row.get('train_peak_rss_mb', float('nan')):>14.0f}{row.get('peak_gpu_mb', float('nan')):>14.0f}"
              f"{row['steps_per_s']:>10.3f}")


def pick_context(data, layout, target, max_history=2):
    """The first valid-split context (persona + history, up to where the reply starts) of about `target` tokens."""
    for u in range(data.num_utterances("valid")):
        persona, history, _ = data.utterance("valid", u)
        context = layout.context(persona, history[-(2 * max_history + 1):])
        if target <= len(context[0]) <= target * 1.3:
            return context
    raise ValueError(f"no validation context of about {target} tokens")


def greedy_without_cache(model, context, layout, n_tokens, all_logits=True):
    """The original repo's decoding loop: the whole sequence through the model again for every new token.

    Like the original's `model(input_ids, token_type_ids)` it projects every position onto the vocabulary;
    `all_logits=False` projects the last position only (a stricter baseline).
    """
    ids, types = list(context[0]), list(context[1])
    device = next(model.parameters()).device
    for _ in range(n_tokens):
        n = len(ids)
        hidden, _ = model.hidden_states(torch.tensor([ids], device=device), torch.tensor([types], device=device),
                                        None, torch.arange(n, device=device)[None])
        logits = model.lm_logits(hidden[0] if all_logits else hidden[0, -1:])[-1:]
        logits[:, list(layout.stop_ids)] = -float("inf")
        ids.append(int(logits.argmax()))
        types.append(layout.bot_type)
    return ids[len(context[0]):]


def best_time(fn, repeats):
    """Fastest of `repeats` runs (after one warm-up): the least disturbed by the machine's noise."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_generate(args):
    tokenizer, model, layout = load_tokenizer_and_model(args.model_checkpoint, input_format=args.input_format)
    model.to(args.device).eval()
    data = get_dataset(tokenizer, args.dataset_path, args.dataset_cache)
    context = pick_context(data, layout, args.context_tokens)
    n = args.reply_tokens
    config = DecodingConfig(no_sample=True, min_length=n, max_length=n)
    ours = generate(model, [context], layout, config)[0]
    with torch.no_grad():
        assert ours == greedy_without_cache(model, context, layout, n), "cached and uncached replies differ"
        t_ours = best_time(lambda: generate(model, [context], layout, config), args.repeats)
        t_no_cache = best_time(lambda: greedy_without_cache(model, context, layout, n), args.repeats)
        t_no_cache_last = best_time(lambda: greedy_without_cache(model, context, layout, n, all_logits=False),
                                    args.repeats)
        prompt = torch.tensor([context[0]], device=args.device)
        t_hf = best_time(lambda: model.lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                   max_new_tokens=n, min_new_tokens=n), args.repeats)
        beam = DecodingConfig(no_sample=True, num_beams=args.num_beams, min_length=n, max_length=n)
        contexts = [context] * args.beam_contexts
        assert generate(model, contexts, layout, beam) == [generate(model, [context], layout, beam)[0]] * len(contexts)
        t_beam = best_time(lambda: generate(model, contexts, layout, beam), args.repeats)
        t_beam_alone = best_time(lambda: [generate(model, [c], layout, beam) for c in contexts], args.repeats)
    return {"device": str(args.device), "context_tokens": len(context[0]), "reply_tokens": n,
            "tokens_per_s": n / t_ours, "no_cache_tokens_per_s": n / t_no_cache, "hf_generate_tokens_per_s": n / t_hf,
            "speedup_vs_no_cache": t_no_cache / t_ours,
            "speedup_vs_no_cache_last_position_logits": t_no_cache_last / t_ours,
            "ratio_vs_hf_generate": t_hf / t_ours, "num_beams": args.num_beams, "beam_contexts": args.beam_contexts,
            "beam_tokens_per_s": n * len(contexts) / t_beam,
            "beam_batch_speedup_vs_one_at_a_time": t_beam_alone / t_beam}


def bench_rank(args):
    tokenizer, model, layout = load_tokenizer_and_model(args.model_checkpoint, input_format=args.input_format)
    model.to(args.device).eval()
    data = get_dataset(tokenizer, args.dataset_path, args.dataset_cache)
    examples = []
    for u in range(data.num_utterances("valid")):  # ConvAI2-sized contexts (~100 tokens), as hits@1 meets them
        persona, history, candidates = data.utterance("valid", u)
        history, candidates = history[-5:], candidates[-args.num_candidates:]
        context = layout.context(persona, history)
        if args.context_tokens <= len(context[0]) <= 1.3 * args.context_tokens:
            examples.append((context, (persona, history), candidates))
        if len(examples) == args.examples:
            break
    if not examples:
        sys.exit(f"bench.py rank: no validation example has a context of {args.context_tokens} to "
                 f"{int(1.3 * args.context_tokens)} tokens: change --context_tokens")

    def shared():  # ranking by the MC head: no LM projection needed
        return [score_candidates(model, context, candidates, layout, lm_rows=[])[0]
                for context, _, candidates in examples]

    def full():
        out = []
        for _, (persona, history), candidates in examples:
            batch = collate([{"instances": [layout.build(persona, history, c) for c in candidates],
                              "mc_labels": 0}], layout.pad)
            batch = {k: v.to(args.device) for k, v in batch.items()}
            out.append(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                             batch["mc_token_ids"])[2][0])
        return out

    with torch.no_grad():
        agree = max(float((a - b).abs().max()) for a, b in zip(shared(), full()))
        t_shared, t_full = best_time(shared, args.repeats), best_time(full, args.repeats)
    context_tokens = sum(len(c[0]) for c, _, _ in examples) / len(examples)
    n_candidates = sum(len(cands) for _, _, cands in examples)  # the data's, where it has fewer than asked
    candidate_tokens = sum(len(c) + 1 for _, _, cands in examples for c in cands) / n_candidates
    return {"device": str(args.device), "examples": len(examples), "candidates": n_candidates / len(examples),
            "mean_context_tokens": context_tokens, "mean_candidate_tokens": candidate_tokens, "max_abs_score_difference": agree,
            "examples_per_s": len(examples) / t_shared, "full_sequences_examples_per_s": len(examples) / t_full,
            "speedup_vs_full_sequences": t_full / t_shared}


AT_LEAST_ONE = ("examples", "batch_size", "num_candidates", "max_seq_len", "baseline_batches", "context_tokens",
                "reply_tokens", "repeats", "num_beams", "beam_contexts", "clients", "requests", "max_tokens",
                "max_steps", "max_examples", "max_valid_examples")  # the sizes of the benchmarks' flags
QUALITY_METRICS = ("mc_hits@1", "lm_hits@1", "pmi_hits@1", "ppl", "word_ppl", "reply_ppl", "end_nll", "f1")
JOINED = "mc+pmi+biencoder"  # the trained run's rankers joined (convai_evaluation.py --ranker a+b)


def run_script(script, argv, launcher=()):
    """Run one of the repo's entry scripts as a user would (under `launcher`, e.g. torchrun's); output to this terminal."""
    command = [sys.executable, *launcher, str(Path(__file__).parent / script), *argv]
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def evaluate(model_checkpoint, args, results_file, *extra, eval_type="all"):
    """convai_evaluation.py's results on the held-out examples: each ranker's hits@1 and the QUALITY_METRICS."""
    run_script("convai_evaluation.py", ["--model_checkpoint", model_checkpoint, "--eval_type", eval_type,
                                        "--max_examples", str(args.max_examples), "--dataset_path", args.dataset_path,
                                        "--dataset_cache", args.dataset_cache, "--device", args.device,
                                        "--results_file", results_file, "--split_seed", str(args.seed), *extra])
    with open(results_file) as f:
        results = json.load(f)
    by_ranker = results.get("by_ranker", {results["ranker"]: results} if "ranker" in results else {})
    row = {f"{name}_hits@1": metrics["hits@1"] for name, metrics in by_ranker.items()}
    row.update({k: results[k] for k in QUALITY_METRICS if k in results})  # the hits@1 keys are the rankers' own
    row.update({f"f1_by_{name}": f1 for name, f1 in results.get("f1_by_ranker", {}).items()})  # --rerank's picks
    return row


def bench_quality(args):
    from utils import default_model_checkpoint

    model = args.model_checkpoint or default_model_checkpoint()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_quality_"))
    run_dir = work / "run"
    if run_dir.exists():  # found now, not after the zero-shot evaluations (train.py would refuse it then)
        sys.exit(f"bench.py quality: {run_dir} exists (an earlier benchmark's run): give another --work_dir")
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for input_format in INPUT_FORMATS:
        # PMI costs as much again as the LM ranker; PMI joined with the bi-encoder is the best zero-shot ranker
        rankers = ["mc", "lm"] + (["pmi", "pmi+biencoder"] if input_format == args.input_format else []) + (
            ["biencoder"] if input_format == "transfertransfo" else [])
        row = evaluate(model, args, str(work / f"zero_shot_{input_format}.json"), "--input_format", input_format,
                       "--ranker", *rankers)
        if "biencoder_hits@1" in row:
            rows["biencoder (untrained MiniLM)"] = {"biencoder_hits@1": row.pop("biencoder_hits@1")}
        rows[f"zero-shot {input_format}"] = row
    start = time.perf_counter()
    run_script("train.py", ["--model_checkpoint", model, "--input_format", args.input_format, "--output_dir",
                            str(run_dir), "--max_steps", str(args.max_steps), "--dataset_path", args.dataset_path,
                            "--dataset_cache", args.dataset_cache, "--device", args.device, "--seed", str(args.seed),
                            "--max_valid_examples", str(args.max_valid_examples), *args.train_args])
    train_seconds = time.perf_counter() - start
    trained = f"trained {args.input_format} ({args.max_steps} steps)"
    rows[trained] = evaluate(str(run_dir), args, str(work / "trained.json"), "--ranker", "mc", "lm", "pmi",
                             JOINED)
    if args.rerank > 1:  # F1 of what interact.py --rerank N answers: the head's, or the join's, pick of N samples
        picks = evaluate(str(run_dir), args, str(work / f"trained_rerank{args.rerank}.json"), "--rerank",
                         str(args.rerank), "--ranker", "mc", JOINED, eval_type="f1")
        rows[f"same, F1 of the MC head's best of {args.rerank} samples"] = {"f1": picks["f1"]}
        rows[f"same, F1 of {JOINED}'s best of them"] = {"f1": picks[f"f1_by_{JOINED}"]}
    zero_shot = rows[f"zero-shot {args.input_format}"]
    deltas = {k: rows[trained][k] - zero_shot[k] for k in QUALITY_METRICS if k in zero_shot and k in rows[trained]}
    return {"examples": args.max_examples, "candidates": 20, "max_steps": args.max_steps,
            "train_seconds": train_seconds, "rows": rows, "deltas": deltas,
            "mc_beats_zero_shot_lm_and_biencoder": rows[trained]["mc_hits@1"] > max(
                zero_shot["lm_hits@1"], rows["biencoder (untrained MiniLM)"]["biencoder_hits@1"]),
            "mc_beats_zero_shot_pmi": rows[trained]["mc_hits@1"] > zero_shot["pmi_hits@1"],
            "mc_beats_zero_shot_pmi_and_biencoder_joined": rows[trained]["mc_hits@1"] > zero_shot[
                "pmi+biencoder_hits@1"],
            "joined_beats_mc": rows[trained][f"{JOINED}_hits@1"] > rows[trained]["mc_hits@1"],
            **{f"zero_shot_{kind}_ratio_transfertransfo_over_{other}":
               rows["zero-shot transfertransfo"][kind] / rows[f"zero-shot {other}"][kind]
               for other in INPUT_FORMATS[1:] for kind in ("ppl", "reply_ppl")},
            "work_dir": str(work)}


def print_quality(result):
    """The rows as a table (one column per metric), then the deltas."""
    print(f"{'':>40}" + "".join(f"{m:>18}" for m in ("biencoder_hits@1",) + QUALITY_METRICS))
    for name, row in result["rows"].items():
        print(f"{name:>40}" + "".join(f"{row[m]:>18.4f}" if m in row else f"{'':>18}"
                                      for m in ("biencoder_hits@1",) + QUALITY_METRICS))
    print(f"{'trained - zero-shot':>40}{'':>18}" + "".join(f"{result['deltas'].get(m, float('nan')):>+18.4f}"
                                                          for m in QUALITY_METRICS))
    for name, row in result["rows"].items():  # rankers joined by '+': too wide for a column each
        for key in (k for k in row if "+" in k):
            print(f"{name:>40}  {key} {row[key]:.4f}")


def stream_request(url, body):
    """(seconds, seconds to the first token, reply tokens) of one streamed chat completion.

    The first token is the first chunk after the role announcement (an empty reply's is its closing chunk).
    """
    request = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any("role" not in c["delta"] for c in event["choices"]):  # a token, or the end
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return time.perf_counter() - start, first, tokens


def serve_phase(url, bodies, clients):
    """Every body sent once by `clients` closed-loop clients: the figures of that load."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        timings = list(pool.map(lambda body: stream_request(url, body), bodies))
    wall = time.perf_counter() - start
    latency, first, tokens = map(np.array, zip(*timings))
    return {"requests_per_s": len(bodies) / wall, "tokens_per_s": tokens.sum() / wall,
            "p50_latency_s": float(np.percentile(latency, 50)), "p95_latency_s": float(np.percentile(latency, 95)),
            "p50_ttft_s": float(np.percentile(first, 50)), "p95_ttft_s": float(np.percentile(first, 95)),
            "wall_s": wall}


def bench_serve(args):
    from dialogs import read_dialogs
    from serving import launch
    from utils import default_model_checkpoint, resolve_dataset_path

    dialogs = read_dialogs(resolve_dataset_path(args.dataset_path, args.dataset_cache))["valid"]
    histories = [u["history"] for d in dialogs for u in d["utterances"][:1]][:args.requests]
    bodies = [{"messages": [{"role": "user" if (len(h) - i) % 2 else "assistant", "content": t}
                            for i, t in enumerate(h[-3:], start=len(h) - len(h[-3:]))],
               "max_tokens": args.max_tokens, "temperature": 0} for h in histories]
    model = args.model_checkpoint or default_model_checkpoint()
    with tempfile.NamedTemporaryFile("w", suffix=".log") as log:
        process, url = launch(["--model_checkpoint", model, "--device", args.device, "--max_batch_size",
                               str(args.clients), "--max_concurrency", str(max(args.clients, 32)),
                               "--max_tokens_limit", str(max(args.max_tokens, 512)), "--log_level", "warning"]
                              + (["--input_format", args.input_format] if args.input_format else []), log)
        try:
            stream_request(url, bodies[0])  # warm-up
            one_at_a_time = serve_phase(url, bodies, 1)
            concurrent = serve_phase(url, bodies, args.clients)
        finally:
            process.terminate()
            process.wait(30)
    return {"requests": len(bodies), "clients": args.clients, "max_tokens": args.max_tokens,
            **{f"concurrent_{k}": v for k, v in concurrent.items()},
            **{f"one_at_a_time_{k}": v for k, v in one_at_a_time.items()},
            "batching_speedup": concurrent["requests_per_s"] / one_at_a_time["requests_per_s"]}


def add_command(sub, name, help_text):
    """A subcommand with the flags every benchmark takes."""
    command = sub.add_parser(name, help=help_text)
    command.add_argument("--model_checkpoint", default="", help="Model (default: the packaged SmolLM2)")
    command.add_argument("--dataset_path", default="", help="Dialog data (default: the packaged chit-chat corpus)")
    command.add_argument("--dataset_cache", default="./dataset_cache", help="Cache directory (default: ./dataset_cache)")
    command.add_argument("--input_format", default="", choices=("",) + INPUT_FORMATS,
                         metavar="{" + ",".join(INPUT_FORMATS) + "}",
                         help="Input layout (default: chat_template where the tokenizer has one; quality: chat_template)")
    command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                         help="cuda or cpu (default: cuda when available)")
    command.add_argument("--json", action="store_true", help="End with one JSON object on the last line")
    return command


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = add_command(sub, "train", "training throughput, MFU and the speedup of per-batch padding")
    train.add_argument("--examples", type=int, default=32, help="Examples trained on per variant (default: 32)")
    train.add_argument("--batch_size", type=int, default=4, help="Examples per optimizer step (default: 4)")
    train.add_argument("--num_candidates", type=int, default=2, help="Candidates per example (default: 2)")
    train.add_argument("--max_seq_len", type=int, default=512,
                       help="Longest input in tokens, longer ones cut as in training (default: 512, GPT's context)")
    train.add_argument("--max_reply_len", type=int, default=64,
                       help="Candidate cut timed against whole candidates, as train.py --max_reply_len (default: 64)")
    train.add_argument("--baseline_batches", type=int, default=2,
                       help="Batches timed for the dataset-padding baseline, all of equal cost (default: 2)")
    train.add_argument("--fp16", default="", help="Mixed precision: fp16 or bf16 (default: off)")
    train.add_argument("--seed", type=seed_type, default=0, help="Which examples are drawn (default: 0)")
    train.add_argument("--memory_steps", type=int, default=3,
                       help="Steps of train.py per memory variant (full fine-tune, LoRA r=8, each with and "
                            "without --gradient_checkpointing, FSDP over 2 processes), each in its own "
                            "process(es), on the same batches; 0: skip them (default: 3)")
    train.add_argument("--compile", action="store_true",
                       help="Also time train.py --compile's path: compile_warmup_seconds, compile_speedup")
    train.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                       help="Profile our steps once more (torch.profiler): host time per phase, calls, top ops, "
                            "and on a GPU the device's busy fraction (default: on)")
    gen = add_command(sub, "generate", "decoding speed with the KV cache, without it, and transformers' generate")
    gen.add_argument("--context_tokens", type=int, default=100, help="Context length to look for (default: 100)")
    gen.add_argument("--reply_tokens", type=int, default=20, help="Tokens per reply (default: 20)")
    gen.add_argument("--repeats", type=int, default=3, help="Timed runs per variant, the fastest kept (default: 3)")
    gen.add_argument("--num_beams", type=int, default=4, help="Beams of the beam-search timing (default: 4)")
    gen.add_argument("--beam_contexts", type=int, default=8,
                     help="Contexts beam-searched in one batch, against one at a time (default: 8)")
    rank = add_command(sub, "rank", "hits@1 scoring with a shared context against full sequences")
    rank.add_argument("--examples", type=int, default=8, help="Validation examples scored (default: 8)")
    rank.add_argument("--context_tokens", type=int, default=100, help="Context length to look for (default: 100)")
    rank.add_argument("--num_candidates", type=int, default=20, help="Candidates per example (default: 20)")
    rank.add_argument("--repeats", type=int, default=1, help="Timed runs per variant, the fastest kept (default: 1)")
    serve = add_command(sub, "serve", "serve.py under concurrent clients against the same requests one at a time")
    serve.add_argument("--clients", type=int, default=8, help="Concurrent clients, and the batch size (default: 8)")
    serve.add_argument("--requests", type=int, default=32, help="Requests sent in each phase (default: 32)")
    serve.add_argument("--max_tokens", type=int, default=32, help="max_tokens of each request (default: 32)")
    quality = add_command(sub, "quality", "held-out hits@1 / ppl / F1: zero-shot in every format, then trained")
    quality.add_argument("--max_steps", type=int, default=200, help="Optimizer steps of the run (default: 200)")
    quality.add_argument("--max_examples", type=int, default=200,
                         help="Held-out examples every model is scored on (default: 200)")
    quality.add_argument("--max_valid_examples", type=int, default=100,
                         help="train.py's validation examples (default: 100)")
    quality.add_argument("--seed", type=seed_type, default=42, help="Seed of the split and of training (default: 42)")
    quality.add_argument("--work_dir", default="", help="Where the run and results go (default: a new temporary dir)")
    quality.add_argument("--rerank", type=int, default=0,
                         help="Also score the trained run's F1 on the best of N sampled replies by its multiple-choice "
                              "head, as interact.py --rerank N answers, and by mc+pmi+biencoder among the same "
                              "samples (default: 0, off)")
    quality.add_argument("train_args", nargs=argparse.REMAINDER,
                         help="After --: more train.py flags (e.g. -- --lr 1e-4 --num_candidates 4)")
    args = parser.parse_args(argv)
    for name in AT_LEAST_ONE:
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} {getattr(args, name)}: at least 1")
    if args.command == "quality":
        args.train_args = [a for a in args.train_args if a != "--"]
        args.input_format = args.input_format or "chat_template"
    result = {"train": bench_train, "generate": bench_generate, "rank": bench_rank, "serve": bench_serve,
              "quality": bench_quality}[args.command](args)
    if args.command == "quality":
        print_quality(result)
    if result.get("memory"):
        print_memory(result["memory"])
    for name in ("profile", "profile_full_sequences", "profile_compiled"):
        if result.get(name):
            print_profile(name, result[name])
    for name, value in result.items():
        if isinstance(value, dict):
            continue
        print(f"{name:>28}: {value:.4g}" if isinstance(value, float) else f"{name:>28}: {value}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # the script's own error is above
        script = next((Path(a).name for a in e.cmd if a.endswith(".py")), e.cmd[0])
        sys.exit(f"bench.py: error: {script} failed (exit {e.returncode}); its error is above")
    except (DialogFormatError, FileNotFoundError, InputFormatError) as e:  # FileNotFoundError: a CheckpointError too
        sys.exit(f"bench.py: error: {e}")
