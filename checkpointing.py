"""Checkpoints of a run: `checkpoint-<step>/` directories written atomically, rotated by ignite's Checkpoint.

Each holds the model and tokenizer in the save_pretrained layout plus `training_state.pt` (optimizer, scaler,
engine, best checkpoint: tensors and numbers only, read back with `weights_only=True`, so nothing is unpickled). The run
directory's top level always mirrors the newest checkpoint, by hard links, for the scripts that load a run.
"""
import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from ignite.handlers.checkpoint import BaseSaveHandler

from adapters import ADAPTER_CONFIG, has_lora, is_adapter_run, merge_lora, parameter_counts
from classifier import CONFIG_FILE as CLASSIFIER_CONFIG
from modeling import load_tokenizer_and_model, save_model
from utils import atomic_write, write_json

TRAINING_STATE = "training_state.pt"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class RunSaver(BaseSaveHandler):
    """ignite save handler writing a whole checkpoint directory; a crash mid-write leaves the previous intact.

    `newest=True`: the checkpoint holds the training state, its model files are hard links to the best
    checkpoint's of the same step when there is one (no second copy), and the run directory's top level mirrors
    it; else (the best checkpoint) the model and tokenizer only. A checkpoint ignite drops is deleted only once
    the next one is written, so that a crash in between still leaves one.
    """

    def __init__(self, run_dir, model, tokenizer, newest=True, state_dict=None):
        self.run_dir, self.model, self.tokenizer, self.newest = Path(run_dir), model, tokenizer, newest
        self.state_dict = state_dict  # FSDP: a callable giving the model's whole state, gathered before the save
        self.stale = []

    def __call__(self, checkpoint, filename, metadata=None):
        final = self.run_dir / filename
        tmp = self.run_dir / f".{filename}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        twin = self.run_dir / f"best-{filename}"
        if self.newest and twin.is_dir():  # written whole or not at all
            tmp.mkdir(parents=True)
            publish(twin, tmp)
        else:
            save_model(self.model, self.tokenizer, tmp, self.state_dict() if self.state_dict else None)
        if self.newest:
            torch.save(checkpoint, tmp / TRAINING_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.newest:
            publish(final, self.run_dir)
        for name in self.stale:
            if name != filename:
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
        self.stale = []

    def remove(self, filename):
        self.stale.append(filename)


def publish(checkpoint_dir, run_dir):
    """Hard-link (else copy) a checkpoint's model and tokenizer files into another directory, each atomically."""
    for src in Path(checkpoint_dir).iterdir():
        if src.name == TRAINING_STATE or not src.is_file():
            continue
        tmp = Path(run_dir) / f".{src.name}.link"
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            shutil.copy2(src, tmp)
        os.replace(tmp, Path(run_dir) / src.name)


def restore_rotation(checkpoint, saver, step):
    """On resume, hand ignite's Checkpoint the run's checkpoint-<step> directories up to `step` to go on rotating.

    It only knows what its own process saved, so a resumed run would otherwise keep every older checkpoint
    forever. Directories beyond its `n_saved` go, as a dropped one does, once the next checkpoint is written.
    """
    found = [s for s, _ in checkpoint_dirs(saver.run_dir) if s <= step]
    keep = found[-checkpoint.n_saved:]
    checkpoint.load_state_dict({"_saved": [(s, f"checkpoint-{s}") for s in keep]})
    saver.stale += [f"checkpoint-{s}" for s in found[:-checkpoint.n_saved]]


def checkpoint_dirs(run_dir):
    """(step, path) of a run's checkpoint-<step> directories, oldest first."""
    return sorted((int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*")
                  if (m := _CHECKPOINT_DIR.match(p.name)))


def has_checkpoint(path):
    """Whether `path` is a checkpoint to resume from, or a run directory holding one."""
    path = Path(path)
    return (path / TRAINING_STATE).is_file() or any((p / TRAINING_STATE).is_file() for _, p in checkpoint_dirs(path))


def keep_history_until(run_dir, step):
    """Drop a run's validation records past `step` (-1: all): a resumed run validates those steps again."""
    history = read_history(run_dir)
    kept = [record for record in history if record["step"] <= step]
    if len(kept) < len(history):
        write_history(run_dir, kept)


def write_history(run_dir, records):
    """Replace a run's metrics.jsonl with `records`, atomically."""
    atomic_write(Path(run_dir) / "metrics.jsonl",
                 lambda f: f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records), mode="w")


def latest_checkpoint(path):
    """The checkpoint directory to resume from: `path` itself when it is one, else its newest checkpoint-<step>."""
    path = Path(path)
    if (path / TRAINING_STATE).is_file():
        return path
    found = [(step, p) for step, p in checkpoint_dirs(path) if (p / TRAINING_STATE).is_file()]
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoint-<step>/ with {TRAINING_STATE} in it")
    return found[-1][1]


def holds_run(path):
    """Whether a directory holds a run's files already (its flags, metrics or checkpoints)."""
    path = Path(path)
    return (any((path / name).exists() for name in ("training_args.json", "metrics.jsonl"))
            or bool(checkpoint_dirs(path)) or any(path.glob("best-checkpoint-*")))


def _run_file(run_dir, name):
    """(path of a run's file `name`, None), or for a checkpoint directory without one (its run's file, its step)."""
    path, match = Path(run_dir) / name, _CHECKPOINT_DIR.match(Path(run_dir).name.removeprefix("best-"))
    if not path.is_file() and match:
        return Path(run_dir).parent / name, int(match.group(1))
    return path, None


def read_training_args(run_dir):
    """A run's training_args.json (its flags, seed, world size, ...), or {} where there is none (not a run).

    A checkpoint directory inside a run reads the run's.
    """
    path, _ = _run_file(run_dir, "training_args.json")
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def load_training_state(checkpoint_dir):
    return torch.load(Path(checkpoint_dir) / TRAINING_STATE, map_location="cpu", weights_only=True)


def summarize_run(run_dir):
    """Load a run back as later scripts do, and return its validation history (one dict per validation)."""
    _, model, _ = load_tokenizer_and_model(str(run_dir))
    return model, read_history(run_dir)


def read_history(run_dir):
    """A run's validation records (metrics.jsonl); a checkpoint's are its run's up to its step; none: []."""
    path, step = _run_file(run_dir, "metrics.jsonl")
    if not path.is_file():  # a model saved by other means, or a run that never validated
        return []
    with open(path) as f:
        history = [json.loads(line) for line in f]
    return [record for record in history if step is None or record["step"] <= step]


def merge_run(run_dir, out_dir):
    """Write a LoRA run with its adapter merged into the LM: a plain run every script loads without peft."""
    tokenizer, model, _ = load_tokenizer_and_model(str(run_dir))
    if not has_lora(model):
        raise ValueError(f"--merge: {run_dir} has no LoRA adapter ({ADAPTER_CONFIG}); it is a plain run already")
    merged = merge_lora(model)
    save_model(merged, tokenizer, out_dir)
    args = read_training_args(run_dir)
    if args:  # the run's flags, as a plain run's: the adapter is in the weights now, all of them trainable
        trainable, total = parameter_counts(merged)
        write_json(Path(out_dir) / "training_args.json",
                   dict(args, lora_r=0, merged_from=os.path.abspath(run_dir), run_dir=os.path.abspath(out_dir),
                        parameters=total, trainable_parameters=trainable))
    history = read_history(run_dir)
    if history:
        write_history(out_dir, history)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Load a run back and print its validation history; or merge it.")
    parser.add_argument("run_dir", help="A run directory written by train.py")
    parser.add_argument("--merge", default="", metavar="OUT",
                        help="Write the run with its LoRA adapter merged into the LM's weights to OUT")
    args = parser.parse_args(argv)
    if os.path.isfile(os.path.join(args.run_dir, CLASSIFIER_CONFIG)):
        parser.error(f"{args.run_dir}: a classifier of bert_classifier.py, not a train.py run (its metrics: "
                     f"bert_classifier.py eval --model_checkpoint {args.run_dir} --input_file FILE)")
    if args.merge and not os.path.exists(args.run_dir):
        parser.error(f"{args.run_dir}: no such directory or file (give a run directory written by train.py)")
    if args.merge and not is_adapter_run(args.run_dir):
        parser.error(f"--merge: {args.run_dir} has no LoRA adapter ({ADAPTER_CONFIG}); it is a plain run already")
    if args.merge and os.path.exists(args.merge) and (not os.path.isdir(args.merge) or os.listdir(args.merge)):
        parser.error(f"--merge {args.merge}: already exists and is not an empty directory (the run itself, another "
                     f"run or other files, which the merged run would overwrite): give a new directory")
    try:
        if args.merge:
            merge_run(args.run_dir, args.merge)
            print(f"Merged {args.run_dir} into {args.merge} (load it with --model_checkpoint {args.merge})")
            return
        model, history = summarize_run(args.run_dir)
    except FileNotFoundError as e:  # not a run: the message names the path (this script has no --model_checkpoint)
        parser.error(str(e).removeprefix("--model_checkpoint "))
    print(f"Loaded {args.run_dir}: {type(model.lm).__name__}, {model.lm.num_parameters():,} parameters")
    if not history:
        print("  no validation history (metrics.jsonl)")
    for record in history:
        print(f"  step {record['step']:>5}: ppl {record['ppl']:9.2f}  nll {record['nll']:.4f}  "
              f"mc_accuracy {record['mc_accuracy']:.3f}")
    if len(history) > 1:
        first, last = history[0]["ppl"], history[-1]["ppl"]
        print(f"Validation perplexity {first:.2f} -> {last:.2f} ({'lower' if last < first else 'NOT lower'})")


if __name__ == "__main__":
    main()
