"""Fine-tune a causal LM with an LM head and a multiple-choice head on dialogs (TransferTransfo).

    python train.py                                   # packaged SmolLM2 on the packaged chit-chat corpus
    python train.py --model_checkpoint gpt2 --dataset_path personachat
    torchrun --nproc_per_node=2 train.py --device cpu --max_steps 10
"""
import hashlib
import logging
import os
import signal
import sys
from argparse import ArgumentParser, BooleanOptionalAction
from functools import partial
from pathlib import Path
from pprint import pformat

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, OutputHandler, TensorboardLogger
from ignite.metrics import Accuracy, RunningAverage
from torch.nn.parallel import DistributedDataParallel

from adapters import add_lora, has_lora, parameter_counts
from checkpointing import (DamagedRunError, RunSaver, has_checkpoint, holds_run, keep_history_until,
                           latest_checkpoint, load_training_state, publish, read_training_args, restore_rotation,
                           signals_held)
from dialogs import DialogFormatError
from inputs import DoubleHeadDataset, LengthGroupedBatchSampler, collate
from layouts import INPUT_FORMATS, InputFormatError
from metrics import TokenNLL, perplexity
from modeling import compile_decoder, has_cxx_compiler, load_tokenizer_and_model, model_max_length
from sharding import WholeOptimizer, shard_model, whole_model_state
from tokenized import get_dataset
from training import (QUIET_STOP, StepsBar, Throughput, amp_dtype, linear_lr, make_inference, make_update,
                      slow_bf16)
from utils import (SEED_MIXINGS, append_jsonl, is_main_process, make_run_dir, resolve_local_rank, seed_type,
                   set_seed, setup_distributed, setup_logging, write_json)

logger = logging.getLogger(__file__)


NOT_RESUMED = ("resume", "output_dir", "local_rank")


class RunError(ValueError):
    """Flags that do not fit the data, the model or the run resumed: reported in one line, without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's time limit, torchrun stopping its workers): the run stops as on Ctrl-C, keeping
    its last checkpoint and saying how to go on."""


def raise_terminated(signum, frame):
    raise Terminated()


def get_args(argv=None):
    """Parse the flags; with --resume, the run's saved flags are the defaults and the given ones override them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    started_over = False
    if args.resume:
        if args.output_dir:
            parser.error("--output_dir: a resumed run goes on in the directory given to --resume")
        if not has_checkpoint(args.resume) and (Path(args.resume) / "training_args.json").is_file():
            # stopped before its first checkpoint: nothing to go on from, so the run starts over with its flags
            logger.warning("%s has no checkpoint yet: starting the run over, with its flags", args.resume)
            saved, started_over = read_training_args(args.resume), True
        else:
            saved = read_training_args(latest_checkpoint(args.resume).parent)
        if not saved:
            logger.warning("No training_args.json beside %s: resuming with the flags given only", args.resume)
        if saved and "seed_mixing" not in saved:  # saved before seeds were mixed: its batch order and dropout go on
            saved["seed_mixing"] = "sum"
        parser.set_defaults(**{k: v for k, v in saved.items() if k in vars(args) and k not in NOT_RESUMED})
        args = parser.parse_args(argv)
        if started_over:
            args.output_dir, args.resume = str(Path(args.resume)), ""
    for name in ("dataset_path", "model_checkpoint"):  # saved so, the run's data and base are found from anywhere
        value = getattr(args, name)
        if value and os.path.exists(value):
            setattr(args, name, os.path.abspath(value))
    args.dataset_cache = os.path.abspath(args.dataset_cache)  # and its cache, made or not yet
    if args.num_candidates < 2:
        parser.error("--num_candidates: the multiple-choice head needs at least 2 (the gold reply and a distractor)")
    if args.max_reply_len < 0:
        parser.error("--max_reply_len: 0 (whole replies) or a number of tokens")
    if args.max_seq_len and args.max_seq_len < 32:
        parser.error("--max_seq_len: at least 32 tokens (or 0 for the model's own limit)")
    if args.gradient_accumulation_steps < 1:
        parser.error("--gradient_accumulation_steps: at least 1")
    if args.eval_every < 0:
        parser.error("--eval_every: 0 (off) or a number of optimizer steps")
    if os.path.exists(args.dataset_cache) and not os.path.isdir(args.dataset_cache):
        parser.error(f"--dataset_cache {args.dataset_cache}: a file, not a directory")
    if args.compile and args.fsdp:
        parser.error("--compile: not with --fsdp (FSDP2's hooks sit between the layers of the compiled stack)")
    if args.compile and not has_cxx_compiler():
        parser.error("--compile: torch.compile needs a C++ compiler (g++, c++ or clang++ on PATH, or $CXX)")
    if args.lr <= 0:
        parser.error(f"--lr {args.lr}: a positive peak learning rate")
    if args.mc_lr < 0:
        parser.error(f"--mc_lr {args.mc_lr}: a positive peak learning rate, or 0 for --lr's")
    if args.n_epochs < 1:
        parser.error(f"--n_epochs {args.n_epochs}: at least 1")
    if args.max_steps < 0:
        parser.error(f"--max_steps {args.max_steps}: 0 (as many steps as the epochs take) or more")
    if args.lora_r < 0 or args.lora_alpha < 0 or not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora_r {args.lora_r} / --lora_alpha {args.lora_alpha} / --lora_dropout {args.lora_dropout}: "
                     f"a rank of 0 (off) or more, an alpha of 0 (2 x rank) or more, a dropout in [0, 1)")
    for flag, given in (("--lora_target_modules", args.lora_target_modules), ("--lora_alpha", args.lora_alpha)):
        if given and not args.lora_r:
            parser.error(f"{flag}: adapters need --lora_r (their rank); without it the whole model trains")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU (use --device cpu)")
    try:
        amp_dtype(args.fp16)
    except ValueError as e:
        parser.error(str(e))
    if args.fsdp and int(os.environ.get("WORLD_SIZE", 1)) <= 1 and resolve_local_rank(args.local_rank) < 0:
        parser.error("--fsdp: launch with torchrun (e.g. torchrun --nproc_per_node=2 train.py --fsdp ...)")
    if not args.resume and not started_over and args.output_dir and holds_run(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} already holds a run: go on with it with --resume "
                     f"{args.output_dir}, or give a new directory (two runs in one would mix their checkpoints "
                     f"and metrics)")
    model_files = [name for name in ("classifier.json", "config.json", "model.safetensors")
                   if not args.resume and args.output_dir and os.path.exists(os.path.join(args.output_dir, name))]
    if model_files:
        parser.error(f"--output_dir {args.output_dir} holds a saved model ({model_files[0]}), which the run's files "
                     f"would overwrite: give a new directory")
    return args


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_path", type=str, default="",
                        help="PersonaChat JSON, ParlAI ConvAI2 .txt, chit-chat JSON, a URL, or 'personachat' "
                             "(default: the packaged chit-chat corpus)")
    parser.add_argument("--dataset_cache", type=str, default="./dataset_cache",
                        help="Directory of downloads and tokenized-dataset caches (default: ./dataset_cache)")
    parser.add_argument("--model_checkpoint", type=str, default="",
                        help="Hub id, local directory (e.g. a run) or .gguf file (default: the packaged SmolLM2)")
    parser.add_argument("--input_format", type=str, default="", choices=("",) + INPUT_FORMATS,
                        metavar="{" + ",".join(INPUT_FORMATS) + "}",
                        help="How a candidate is laid out: the tokenizer's chat_template, transfertransfo's "
                             "<speaker> tokens, or a plain-text transcript (A:/B: lines) (default: a run's own; else "
                             "chat_template where the tokenizer has one)")
    parser.add_argument("--num_candidates", type=int, default=2, help="Candidates per example, gold included (default: 2)")
    parser.add_argument("--max_history", type=int, default=2, help="Previous exchanges kept in history (default: 2)")
    parser.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process for training (default: 4)")
    parser.add_argument("--valid_batch_size", type=int, default=4, help="Batch size per process for validation (default: 4)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8,
                        help="Batches whose gradients make one optimizer step (default: 8)")
    parser.add_argument("--lr", type=float, default=6.25e-5, help="Peak learning rate (default: 6.25e-5)")
    parser.add_argument("--mc_lr", type=float, default=0.0,
                        help="Peak learning rate of the multiple-choice head, which starts untrained while the rest "
                             "is pretrained (default: 0, the same as --lr)")
    parser.add_argument("--lm_coef", type=float, default=1.0, help="LM loss coefficient (default: 1.0)")
    parser.add_argument("--mc_coef", type=float, default=1.0, help="Multiple-choice loss coefficient (default: 1.0)")
    parser.add_argument("--max_norm", type=float, default=1.0, help="Gradient clipping norm (default: 1.0)")
    parser.add_argument("--n_epochs", type=int, default=3, help="Training epochs (default: 3)")
    parser.add_argument("--max_steps", type=int, default=0,
                        help="Stop after this many optimizer steps, then validate and save (default: 0, no limit)")
    parser.add_argument("--warmup_steps", type=int, default=0, help="Linear warm-up optimizer steps (default: 0)")
    parser.add_argument("--personality_permutations", type=int, default=1,
                        help="Rotations of the persona sentences per example (default: 1)")
    parser.add_argument("--max_valid_examples", type=int, default=0,
                        help="Validate on this many examples, spread evenly over the valid split (default: 0, all)")
    parser.add_argument("--max_seq_len", type=int, default=512,
                        help="Longest input in tokens; longer ones lose their oldest history. Batches group similar "
                             "lengths, so the rare long dialogs (chit-chat's longest: 7,310 tokens) would otherwise "
                             "fill one batch that needs more than an H200's 140 GiB (default: 512, the original GPT's; "
                             "0: the model's)")
    parser.add_argument("--max_reply_len", type=int, default=0,
                        help="Cut every training candidate after this many tokens (ParlAI's label_truncate; a cut reply "
                             "gets no end-of-turn token); validation keeps whole replies (default: 0, whole replies)")
    parser.add_argument("--eval_before_start", action="store_true", help="Validate once before training")
    parser.add_argument("--eval_every", type=int, default=0,
                        help="Also validate and checkpoint every N optimizer steps (default: 0, at epoch ends only)")
    parser.add_argument("--lora_r", type=int, default=0,
                        help="Train LoRA adapters of this rank (peft) with the heads, the LM frozen (default: 0, "
                             "every parameter trains)")
    parser.add_argument("--lora_alpha", type=int, default=0, help="LoRA scaling numerator (default: 0, 2 x --lora_r)")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="Dropout on the LoRA path (default: 0.05)")
    parser.add_argument("--lora_target_modules", nargs="*", default=[],
                        help="Names of the layers given adapters, e.g. q_proj v_proj (default: every linear layer)")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--fp16", type=str, default="",
                        help="Mixed precision with torch.amp: fp16 (O1/O2/O3 also mean fp16) or bf16 (default: off)")
    parser.add_argument("--fsdp", action=BooleanOptionalAction, default=False,
                        help="Shard parameters, gradients and optimizer state across torchrun's processes (FSDP2); "
                             "checkpoints are saved whole (--no-fsdp: resume a sharded run in one process)")
    parser.add_argument("--compile", action=BooleanOptionalAction, default=False,
                        help="torch.compile the transformer stack (inductor, shapes dynamic): fused kernels for a "
                             "GPU that waits on the host; the first step and the first validation compile "
                             "(--no-compile: resume a compiled run without it)")
    parser.add_argument("--gradient_checkpointing", action=BooleanOptionalAction, default=False,
                        help="Recompute activations in backward: less memory for long histories and many candidates")
    parser.add_argument("--seed", type=seed_type, default=42, help="Seed of data order, dropout and splits (default: 42)")
    parser.add_argument("--seed_mixing", default="mixed", choices=tuple(SEED_MIXINGS),
                        help="How --seed meets the epoch (batch order) and the iteration (dropout): mixed (default); "
                             "sum, as runs saved before 2026-12-06 did, which --resume of such a run uses")
    parser.add_argument("--resume", type=str, default="",
                        help="Run directory or checkpoint-<step> directory to resume from; the run goes on there, "
                             "with its saved flags unless given again")
    parser.add_argument("--output_dir", type=str, default="",
                        help="Run directory (default: runs/<date>_<host>_<model>)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="Set by torch.distributed.launch; torchrun sets LOCAL_RANK instead")
    return parser


def get_data_loaders(args, tokenizer, layout, max_len, world_size, rank):
    """Length-grouped loaders, each batch padded to its own longest sequence."""
    if not is_main_process():
        torch.distributed.barrier()  # rank 0 downloads and tokenizes first; the others read its cache
    try:
        data = get_dataset(tokenizer, args.dataset_path, args.dataset_cache, args.seed)
    finally:  # also when rank 0 fails: the others then meet the same error instead of waiting forever
        if is_main_process() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    common = dict(max_history=args.max_history, max_len=max_len, num_candidates=args.num_candidates)
    train_set = DoubleHeadDataset(data, "train", layout, personality_permutations=args.personality_permutations,
                                  max_reply_len=args.max_reply_len, **common)
    valid_set = DoubleHeadDataset(data, "valid", layout, max_examples=args.max_valid_examples or None, **common)
    if train_set.num_candidates < 2:
        raise RunError(f"--dataset_path {args.dataset_path}: some utterances have a single candidate")
    train_sampler = LengthGroupedBatchSampler(train_set.lengths(), args.train_batch_size, seed=args.seed,
                                              seed_of=SEED_MIXINGS[args.seed_mixing],
                                              num_replicas=world_size, rank=rank,
                                              multiple_of=args.gradient_accumulation_steps)
    # FSDP's forwards are collectives, so every process validates every batch (the metrics' means are unchanged)
    valid_replicas, valid_rank = (1, 0) if args.fsdp else (world_size, rank)
    valid_sampler = LengthGroupedBatchSampler(valid_set.lengths(), args.valid_batch_size, shuffle=False,
                                              num_replicas=valid_replicas, rank=valid_rank, even=False)
    if len(train_sampler) == 0:
        raise RunError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: more than the batches "
                       f"of {args.train_batch_size} that {len(train_set)} training examples make per process (of "
                       f"{world_size}); lower it or --train_batch_size")
    if -(-len(valid_set) // args.valid_batch_size) < valid_replicas:
        raise RunError(f"{len(valid_set)} validation examples in batches of {args.valid_batch_size} leave a "
                       f"process of {world_size} without a batch: lower --valid_batch_size")
    collate_fn = partial(collate, pad_id=layout.pad)
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=train_sampler, collate_fn=collate_fn)
    valid_loader = torch.utils.data.DataLoader(valid_set, batch_sampler=valid_sampler, collate_fn=collate_fn)
    logger.info("Train: %d examples of %d candidates; valid: %d examples of %d candidates; input format %s",
                len(train_set), train_set.num_candidates, len(valid_set), valid_set.num_candidates, layout.name)
    return train_loader, valid_loader, train_sampler


def param_groups(model, lr, mc_lr):
    """AdamW groups, each with its peak learning rate: the multiple-choice head at mc_lr, the rest at lr.

    Without mc_lr one group, as runs saved before --mc_lr have (so that they resume).
    """
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # LoRA: the LM's are frozen
    if not mc_lr:
        return [{"params": [p for _, p in trained], "lr": lr, "peak_lr": lr}]
    head = [p for name, p in trained if name.startswith("mc_head.") or "multiple_choice_head" in name]
    ids = {id(p) for p in head}
    rest = [p for _, p in trained if id(p) not in ids]
    return [{"params": rest, "lr": lr, "peak_lr": lr}, {"params": head, "lr": mc_lr, "peak_lr": mc_lr}]


def check_replicas_agree(model):
    """Raise unless every rank holds the same weights: DDP's promise, checked once at the end of a run."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest.hexdigest())
    if any(d != digests[0] for d in digests):
        raise RuntimeError("ranks ended with different weights")
    logger.info("Weights identical on all %d ranks", len(digests))


def train(argv=None):
    args = get_args(argv)
    local_rank = resolve_local_rank(args.local_rank)
    setup_logging(local_rank)
    device = setup_distributed(local_rank, args.device)
    distributed = torch.distributed.is_initialized()
    world_size, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    logger.warning("Running process %d of %d on %s", rank, world_size, device)
    logger.info("Arguments: %s", pformat(vars(args)))
    set_seed(args.seed)
    dtype = amp_dtype(args.fp16)
    if slow_bf16(device, dtype):
        logger.warning("--fp16 %s: this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm's BF16), so autocast "
                       "emulates them, many times slower than fp32; leave --fp16 out here", args.fp16)

    resume_dir = latest_checkpoint(args.resume) if args.resume else None
    tokenizer, model, layout = load_tokenizer_and_model(str(resume_dir) if resume_dir else args.model_checkpoint,
                                                        input_format=args.input_format)
    args.input_format = layout.name  # recorded in training_args.json as used
    run_dir = resume_dir.parent if resume_dir else Path(args.output_dir or make_run_dir(
        args.model_checkpoint or "SmolLM2-135M-Instruct"))
    max_len = min(args.max_seq_len or model_max_length(model), model_max_length(model))
    train_loader, valid_loader, train_sampler = get_data_loaders(args, tokenizer, layout, max_len, world_size, rank)

    accum = args.gradient_accumulation_steps  # each epoch's batches are a multiple of it (the sampler drops the rest)
    total_steps = args.n_epochs * len(train_loader) // accum
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    if total_steps < 1:
        raise RunError(f"--n_epochs {args.n_epochs}: no optimizer step would be taken")

    if has_lora(model):  # a LoRA run resumed or trained on: its adapter trains, of the rank it has
        rank_saved = model.lm.peft_config["default"].r
        if args.lora_r and args.lora_r != rank_saved:
            raise RunError(f"--lora_r {args.lora_r}: {resume_dir or args.model_checkpoint} has an adapter of rank "
                           f"{rank_saved}, which goes on training; drop --lora_r or give {rank_saved}")
        args.lora_r = rank_saved
    elif args.lora_r:
        if resume_dir:
            raise RunError(f"--lora_r: {resume_dir} was trained without LoRA; resume it without --lora_r")
        try:
            add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                     getattr(model, "new_token_ids", ()), base_model=args.model_checkpoint)
        except ValueError as e:  # GPT-2's heads, or target modules the model lacks (peft's error names them)
            raise RunError(str(e) if str(e).startswith("--lora_r") else f"--lora_target_modules: {e}") from None
    trainable, total = parameter_counts(model)
    logger.info("Trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    model.to(device)
    if args.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable()
    if args.fsdp:
        try:
            shard_model(model, dtype)
        except ValueError as e:  # a model it cannot shard
            raise RunError(str(e)) from None
    if args.compile:
        compile_decoder(model)
    raw_model = model
    # fused: one kernel for the whole update (a third of the default's time on a CPU, a handful of launches on a
    # GPU); FSDP's sharded parameters take the default
    optimizer = torch.optim.AdamW(param_groups(raw_model, args.lr, args.mc_lr), fused=not args.fsdp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # FSDP2 too: its grads are DTensors
    if distributed and not args.fsdp:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def step_of(engine):
        return engine.state.iteration // accum

    trainer = Engine(make_update(model, optimizer, scaler, device, dtype, accum, args.lm_coef, args.mc_coef,
                                 args.max_norm))
    evaluator = Engine(make_inference(raw_model, device, dtype))
    TokenNLL(output_transform=lambda o: o["nll"], device=device).attach(evaluator, "nll")
    Accuracy(output_transform=lambda o: o["mc"], device=device).attach(evaluator, "mc_accuracy")

    @trainer.on(Events.ITERATION_STARTED)
    def set_lr_and_seed(engine):  # both depend on the step alone, so a resumed run replays them exactly
        step = (engine.state.iteration - 1) // accum
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(step, group["peak_lr"], total_steps, args.warmup_steps)
        torch.manual_seed(SEED_MIXINGS[args.seed_mixing](args.seed, engine.state.iteration))  # dropout masks

    @trainer.on(Events.EPOCH_STARTED)
    def order_batches(engine):  # batch order depends on (seed, epoch); a resumed epoch skips what it has done
        train_sampler.set_epoch(engine.state.epoch, skip=engine.state.iteration % len(train_loader))

    if args.max_steps:
        @trainer.on(Events.ITERATION_COMPLETED)
        def stop_at_max_steps(engine):
            if engine.state.iteration % accum == 0 and step_of(engine) >= args.max_steps:
                engine.terminate()

    gathered = {}  # --fsdp: whole states, gathered by every process before rank 0 saves
    whole_state = (lambda: gathered["model"]) if args.fsdp else None  # noqa: E731
    saved_optimizer = WholeOptimizer(raw_model, optimizer) if args.fsdp else optimizer
    best_saver = RunSaver(run_dir, raw_model, tokenizer, newest=False, state_dict=whole_state)
    best = Checkpoint({}, best_saver, n_saved=1,
                      filename_pattern="best-checkpoint-{global_step}", score_name="neg_ppl",
                      score_function=lambda _: -perplexity(evaluator.state.metrics["nll"]),
                      global_step_transform=lambda engine, _: step_of(engine))
    # the best checkpoint's bookkeeping is saved with the newest, so a resumed run still replaces a worse one
    to_save = {"trainer": trainer, "optimizer": saved_optimizer, "scaler": scaler, "best_checkpoint": best}
    newest_saver = RunSaver(run_dir, raw_model, tokenizer, state_dict=whole_state, best=best_saver)
    checkpoint = Checkpoint(to_save, newest_saver, n_saved=2,
                            filename_pattern="checkpoint-{global_step}",
                            global_step_transform=lambda engine, _: step_of(engine))
    saved = {"step": None}  # the optimizer step of the newest checkpoint
    if not resume_dir:  # a run started over: a best checkpoint its first attempt left goes with the first checkpoint
        best_saver.stale += sorted(p.name for p in Path(run_dir).glob("best-checkpoint-*") if p.is_dir())
    if resume_dir:  # before anything is written: a refused or finished resume leaves the run as it was
        saved_args = read_training_args(run_dir)
        state = load_training_state(resume_dir)
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(optimizer.param_groups):
            raise RunError(f"--mc_lr: {resume_dir} was trained {'with' if saved_groups > 1 else 'without'} it; "
                           f"resume {'with' if saved_groups > 1 else 'without'} --mc_lr")
        saved_accum = saved_args.get("gradient_accumulation_steps", args.gradient_accumulation_steps)
        if saved_accum != args.gradient_accumulation_steps:  # its steps count iterations in windows of that size
            raise RunError(f"--gradient_accumulation_steps: {resume_dir} was trained with {saved_accum}, and its "
                           f"optimizer steps are counted in those; resume with --gradient_accumulation_steps "
                           f"{saved_accum}")
        if args.fsdp and not saved_args.get("fsdp"):
            raise RunError(f"--fsdp: {resume_dir} was trained without it, and its optimizer state is not a sharded "
                           f"run's; resume it without --fsdp")
        peak_lrs = [group["peak_lr"] for group in optimizer.param_groups]
        # runs saved before the best checkpoint existed have none to restore
        Checkpoint.load_objects(to_load={k: v for k, v in to_save.items() if k in state}, checkpoint=state)
        for group, peak_lr in zip(optimizer.param_groups, peak_lrs):  # the flags given now, not the saved ones
            group["peak_lr"] = peak_lr
        if trainer.state.epoch_length != len(train_loader):  # ignite keeps the saved epoch length
            saved_world, saved_batch = saved_args.get("world_size", 1), saved_args.get("train_batch_size", 0)
            same = saved_world * saved_batch // world_size if saved_world * saved_batch % world_size == 0 else 0
            raise RunError(f"{resume_dir}: its epochs were {trainer.state.epoch_length} batches per process "
                           f"({saved_world} processes, --train_batch_size {saved_batch}); these flags make "
                           f"{len(train_loader)} ({world_size} processes, --train_batch_size "
                           f"{args.train_batch_size}): resume with {saved_world} processes and --train_batch_size "
                           f"{saved_batch}" + (f", or with --train_batch_size {same} on these {world_size}" if same
                                               and world_size != saved_world else ""))
        saved["step"] = step_of(trainer)
        if rank == 0 and resume_dir == latest_checkpoint(run_dir):  # whole again, were the run killed mid-publish
            publish(resume_dir, run_dir)
        logger.info("Resumed from %s at optimizer step %d", resume_dir, step_of(trainer))
        if step_of(trainer) >= total_steps or trainer.state.epoch >= args.n_epochs:
            logger.info("The run already took its %d steps: nothing to resume (raise --n_epochs or --max_steps)",
                        step_of(trainer))
            return run_dir
        removed = restore_rotation(checkpoint, newest_saver, step_of(trainer), best, write=rank == 0)
        if removed and rank == 0:
            logger.warning("Going on from step %d: removed what an earlier attempt wrote past it: %s",
                           step_of(trainer), ", ".join(removed))

    main = rank == 0
    throughput = Throughput(accum).attach(trainer)  # before validation's handlers, so their time is left out
    RunningAverage(output_transform=lambda o: o["loss"]).attach(trainer, "loss")  # all ranks: it all-reduces
    if main:
        os.makedirs(run_dir, exist_ok=True)
        # validations past the step it goes on from (logged before a checkpoint that was not saved) are redone
        keep_history_until(run_dir, saved["step"] if resume_dir else -1)
        write_json(os.path.join(run_dir, "training_args.json"),
                   dict(vars(args), run_dir=str(run_dir), world_size=world_size, max_seq_len_used=max_len,
                        total_steps=total_steps, trainable_parameters=trainable, parameters=total))
        StepsBar(total_steps * accum, persist=True).attach(trainer, metric_names=["loss"])
        tb_logger = TensorboardLogger(log_dir=str(run_dir))
        tb_logger.attach(trainer, OutputHandler(tag="training", output_transform=lambda o: o),
                         event_name=Events.ITERATION_COMPLETED)
        tb_logger.attach(trainer, OptimizerParamsHandler(optimizer), event_name=Events.ITERATION_STARTED)

    def validate(engine):
        evaluator.run(valid_loader)
        metrics = dict(evaluator.state.metrics)
        metrics["ppl"] = perplexity(metrics["nll"])
        speed = throughput.compute() if engine.state.iteration else {}
        if main:
            record = {"step": step_of(engine), "epoch": engine.state.epoch, **metrics, **speed}
            append_jsonl(os.path.join(run_dir, "metrics.jsonl"), record)
            for name, value in metrics.items():
                tb_logger.writer.add_scalar(f"validation/{name}", value, step_of(engine))
            for name, value in speed.items():
                tb_logger.writer.add_scalar(f"training/{name}", value, step_of(engine))
            logger.info("Validation at step %d: %s", step_of(engine), pformat(metrics))
        return metrics

    def validate_and_save(engine):
        if saved["step"] == step_of(engine):  # the last epoch's end and the run's end are the same step
            return
        validate(engine)
        if args.fsdp:  # collectives: every process gathers, rank 0 writes
            gathered["model"] = whole_model_state(raw_model)
            saved_optimizer.gather()
        with signals_held():
            if main:
                best(engine)  # first: the newest checkpoint then records it
                checkpoint(engine)
            saved["step"] = step_of(engine)

    if args.eval_before_start:  # not on a resume: ignite fires STARTED again, and the step resumed was validated
        trainer.add_event_handler(Events.STARTED, lambda engine: engine.state.iteration == 0 and validate(engine))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate_and_save)
    if args.eval_every:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=args.eval_every * accum), validate_and_save)
    trainer.add_event_handler(Events.COMPLETED, validate_and_save)

    kept = lambda: (f"the checkpoint of step {saved['step']} stays" if saved["step"] is not None  # noqa: E731
                    else "nothing saved yet") + f" in {run_dir}"
    trainer.logger.addFilter(QUIET_STOP)  # the evaluator's logger too: ignite's engines share one
    try:
        trainer.run(train_loader, max_epochs=args.n_epochs)
    except KeyboardInterrupt as stop:
        if main:
            logger.warning("%s at optimizer step %d: %s; go on with --resume %s",
                           "Terminated (SIGTERM)" if isinstance(stop, Terminated) else "Interrupted",
                           step_of(trainer), kept(), run_dir)
        raise
    except FloatingPointError as e:
        raise RunError(f"{e}: stopped; {kept()} (lower --lr or --mc_lr, or use bf16 rather than fp16)") from None
    finally:  # other engines of this process keep their error lines
        trainer.logger.removeFilter(QUIET_STOP)
    if distributed and not args.fsdp:  # FSDP's processes hold different shards by design
        check_replicas_agree(raw_model)
    speed = throughput.compute()
    if main:
        tb_logger.close()
        logger.info("Trained %.1f optimizer steps in %.1f s (validation and saving excluded): %.3f steps/s, "
                    "%.0f tokens/s; peak memory %s", speed["steps_per_s"] * speed["train_seconds"],
                    speed["train_seconds"], speed["steps_per_s"], speed["tokens_per_s"],
                    ", ".join(f"{k.replace('peak_', '')} {v:.0f}" for k, v in speed.items() if "peak_" in k))
        logger.info("Run saved in %s (load it with --model_checkpoint %s)", run_dir, run_dir)
    if distributed:
        torch.distributed.barrier()  # leave together: a rank tearing gloo down under another one aborts
        torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        train()
    # bad input: the message names the file, line or flag
    except (DamagedRunError, DialogFormatError, FileNotFoundError, IsADirectoryError, InputFormatError,
            RunError) as e:
        sys.exit(f"train.py: error: {e}")
    except Terminated:
        sys.exit(128 + signal.SIGTERM)  # what the run kept was logged; no traceback
    except KeyboardInterrupt:
        sys.exit(130)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is saved and closed, and the process group destroyed. A finished worker could still abort in
        # the interpreter's teardown ("terminate called without an active exception", SIGABRT, no Python frame),
        # failing a good run under torchrun: leave without that teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
