"""Checkpoints of a run: `checkpoint-<step>/` directories written atomically, rotated by ignite's Checkpoint.

Each holds the model and tokenizer in the save_pretrained layout plus `training_state.pt` (optimizer, scaler,
engine, best checkpoint: tensors and numbers only, read back with `weights_only=True`, so nothing is unpickled). The run
directory's top level always mirrors the newest checkpoint, by hard links, for the scripts that load a run.
"""
import argparse
import json
import logging
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from ignite.handlers.checkpoint import BaseSaveHandler

from adapters import ADAPTER_CONFIG, has_lora, is_adapter_run, merge_lora, parameter_counts
from classifier import CONFIG_FILE as CLASSIFIER_CONFIG
from modeling import load_tokenizer_and_model, save_model
from utils import atomic_write, fsync_path, fsync_tree, write_json

logger = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class RunSaver(BaseSaveHandler):
    """ignite save handler writing a whole checkpoint directory; a crash mid-write leaves the previous intact.

    `newest=True`: the checkpoint holds the training state, its model files are hard links to the best
    checkpoint's of the same step when `best` (the best checkpoint's saver) has just written it (no second copy),
    and the run directory's top level mirrors it; else (the best checkpoint) the model and tokenizer only. A
    checkpoint ignite drops is deleted only once the next one is written, so that a crash in between still leaves
    one; a best checkpoint replaced by a better one only once the newest checkpoint, which records the new one, is.
    """

    def __init__(self, run_dir, model, tokenizer, newest=True, state_dict=None, best=None):
        self.run_dir, self.model, self.tokenizer, self.newest = Path(run_dir), model, tokenizer, newest
        self.state_dict = state_dict  # FSDP: a callable giving the model's whole state, gathered before the save
        self.best = best
        self.stale = []
        self.written = None  # the directory this process wrote last

    def __call__(self, checkpoint, filename, metadata=None):
        final = self.run_dir / filename
        twin = f"best-{filename}"

        def fill(tmp):
            if self.newest and self.best is not None and self.best.written == twin:  # not one an older attempt left
                publish(self.run_dir / twin, tmp)
            else:
                save_model(self.model, self.tokenizer, tmp, self.state_dict() if self.state_dict else None)
            if self.newest:
                torch.save(checkpoint, tmp / TRAINING_STATE)
        write_dir(final, fill)
        self.written = filename
        if self.newest:
            publish(final, self.run_dir)
            for saver in filter(None, (self, self.best)):
                saver.remove_stale()

    def remove_stale(self):
        """Delete the directories ignite dropped (a best checkpoint's saver leaves that to the newest's)."""
        for name in self.stale:
            if name != self.written:
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
        self.stale = []

    def remove(self, filename):
        self.stale.append(filename)


def write_dir(final, fill):
    """Write a directory whole or not at all: `fill(tmp)` fills a hidden sibling, which is flushed to disk before
    it replaces `final` (a power cut then leaves the old or the new) and removed if filling fails (a full disk, a
    signal); the rename is flushed too, before anything older goes."""
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


@contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Act on Ctrl-C and SIGTERM only once the block is done: a save is never left half published.

    The run directory's top level is replaced file by file; a stop in between would leave the weights of one
    step beside the heads of another. Outside the main thread (where handlers cannot be set) it holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    handlers = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in signums}
    try:
        yield
    except BaseException:  # the block's own error is the one to see; the signal stops the run as well
        if pending:
            logger.warning("%s came during a save that failed", signal.Signals(pending[0]).name)
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if pending:  # the save went through
        signal.raise_signal(pending[0])  # now handled as it would have been: Terminated, KeyboardInterrupt, ...


def publish(checkpoint_dir, run_dir):
    """Hard-link (else copy) a checkpoint's model and tokenizer files into another directory, each atomically."""
    for src in Path(checkpoint_dir).iterdir():
        dst = Path(run_dir) / src.name
        if src.name == TRAINING_STATE or not src.is_file() or (dst.is_file() and os.path.samefile(src, dst)):
            continue  # (a rename onto another link of the same file does nothing, and would leave `tmp` behind)
        tmp = Path(run_dir) / f".{src.name}.link"
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def restore_rotation(checkpoint, saver, step, best, write=True):
    """On resume from `step`, hand ignite's Checkpoints the run's directories to go on with; the names removed.

    ignite only knows what its own process saved, so a resumed run would otherwise keep every older checkpoint
    forever: the checkpoint-<step> directories up to `step` beyond its `n_saved` go, as a dropped one does, once
    the next checkpoint is written. What an earlier attempt wrote past `step` (resuming from an older checkpoint
    abandons it) and best checkpoints other than the one `best` (the best Checkpoint, restored) tracks are removed
    now, before a crash could set them beside this attempt's. A tracked best checkpoint that is gone is made again
    from the checkpoint of its step where that stays, else forgotten (the next validation writes one).
    `write`: whether this process writes the run (rank 0); the others keep the bookkeeping only.
    """
    run_dir = saver.run_dir
    found = [s for s, _ in checkpoint_dirs(run_dir)]
    mine = [s for s in found if s <= step]
    keep = mine[-checkpoint.n_saved:]
    checkpoint.load_state_dict({"_saved": [(s, f"checkpoint-{s}") for s in keep]})
    saver.stale += [f"checkpoint-{s}" for s in mine[:-checkpoint.n_saved]]
    tracked = []
    for priority, name in best.state_dict()["_saved"]:
        source = run_dir / name.removeprefix("best-")
        if not (run_dir / name).is_dir() and (source / TRAINING_STATE).is_file():
            if write:
                write_dir(run_dir / name, lambda tmp: publish(source, tmp))  # hard links: the same files
            tracked.append((priority, name))
        elif (run_dir / name).is_dir():
            tracked.append((priority, name))
    best.load_state_dict({"_saved": tracked})
    abandoned = [run_dir / f"checkpoint-{s}" for s in found if s > step] + sorted(
        p for p in run_dir.glob("best-checkpoint-*") if p.is_dir() and p.name not in {name for _, name in tracked})
    if write:
        for path in abandoned:
            shutil.rmtree(path)
        fsync_path(run_dir)
    return [path.name for path in abandoned]


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
    if (Path(run_dir) / "metrics.jsonl").is_file():  # rewritten whole: a torn last record goes too
        write_history(run_dir, [record for record in read_history(run_dir) if record["step"] <= step])


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


class DamagedRunError(ValueError):
    """A damaged file of a run; the message names it."""


def load_training_state(checkpoint_dir):
    path = Path(checkpoint_dir) / TRAINING_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  truncated, flipped bytes, not torch.save's zip at all: unpickling fails
        match = _CHECKPOINT_DIR.match(Path(checkpoint_dir).name)
        older = [p for step, p in checkpoint_dirs(Path(checkpoint_dir).parent)
                 if match and step < int(match.group(1)) and (p / TRAINING_STATE).is_file()]
        raise DamagedRunError(f"{path}: damaged, it cannot be read ({e.__class__.__name__}: {str(e)[:200]})"
                              + (f"; resume from an earlier checkpoint: --resume {older[-1]}" if older else "")
                              ) from None


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
        lines = f.read().splitlines()
    history = []
    for number, line in enumerate(lines, 1):
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise DamagedRunError(f"{path}:{number}: not a JSON record ({e})") from None
            # a crash mid-append: that validation's checkpoint was never written (it is saved after), so it goes
            logger.warning("%s:%d: a torn last record, left out (a run stopped while writing it)", path, number)
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
    except DamagedRunError as e:
        parser.error(str(e))
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
