"""Tokenized dialogs: every distinct text tokenized once, in batches, and cached in a safe format.

Dialog structure is kept as flat index arrays into one table of token strings, so the cache is a single
safetensors file (no pickle): it is written atomically, keyed by the data files, the reader options and the
tokenizer, validated on load, and rebuilt when stale or corrupt.
"""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save
from tqdm import tqdm

import dialogs
from dialogs import NUM_DISTRACTORS, VALID_FRACTION, read_dialogs, source_files
from utils import atomic_write, file_sha256, resolve_dataset_path

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"
SPLITS = ("train", "valid")
SPLIT_ARRAYS = ("persona_offsets", "persona_ids", "utt_dialog", "history_offsets", "history_ids",
                "cand_offsets", "cand_ids")


class TokenizedDialogs:
    """Token ids of every text once, plus, per split, which texts make each dialog's persona, history and candidates."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.tokens = arrays["tokens"]
        self.token_offsets = arrays["token_offsets"]

    def text(self, i):
        """Token ids of text i as a list of ints (model inputs are built from plain lists)."""
        return self.tokens[self.token_offsets[i]:self.token_offsets[i + 1]].tolist()

    def texts(self, ids):
        return [self.text(i) for i in ids]

    def num_utterances(self, split):
        return len(self.arrays[f"{split}.utt_dialog"])

    def utterance_ids(self, split, u):
        """Text-table ids of utterance u's persona, history and candidates (gold last)."""
        a = {name: self.arrays[f"{split}.{name}"] for name in SPLIT_ARRAYS}
        d = a["utt_dialog"][u]
        return (a["persona_ids"][a["persona_offsets"][d]:a["persona_offsets"][d + 1]],
                a["history_ids"][a["history_offsets"][u]:a["history_offsets"][u + 1]],
                a["cand_ids"][a["cand_offsets"][u]:a["cand_offsets"][u + 1]])

    def utterance(self, split, u):
        """(persona, history, candidates) of utterance u, each a list of token-id arrays; gold candidate last."""
        return tuple(self.texts(ids) for ids in self.utterance_ids(split, u))

    def text_lengths(self):
        return np.diff(self.token_offsets)


def tokenize_dialogs(splits, tokenizer, batch_size=10_000):
    """Tokenize each distinct text of all splits once with the (fast, batched) tokenizer."""
    table = {}

    def ids_of(texts):
        return [table.setdefault(t, len(table)) for t in texts]

    arrays = {}
    for split in SPLITS:
        persona_offsets, persona_ids, utt_dialog = [0], [], []
        history_offsets, history_ids, cand_offsets, cand_ids = [0], [], [0], []
        for d, dialog in enumerate(splits.get(split, [])):
            persona_ids += ids_of(dialog["personality"])
            persona_offsets.append(len(persona_ids))
            for utterance in dialog["utterances"]:
                utt_dialog.append(d)
                history_ids += ids_of(utterance["history"])
                history_offsets.append(len(history_ids))
                cand_ids += ids_of(utterance["candidates"])
                cand_offsets.append(len(cand_ids))
        for name, values in zip(SPLIT_ARRAYS, (persona_offsets, persona_ids, utt_dialog, history_offsets,
                                               history_ids, cand_offsets, cand_ids)):
            arrays[f"{split}.{name}"] = np.asarray(values, dtype=np.int64)

    texts = list(table)
    pieces = []
    for start in tqdm(range(0, len(texts), batch_size), desc="Tokenizing", unit="batch",
                      disable=len(texts) <= batch_size):
        pieces += tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    arrays["token_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays["tokens"] = (np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=int(lengths.sum()))
                        if pieces else np.zeros(0, dtype=np.int32))
    return TokenizedDialogs(arrays)


def tokenizer_fingerprint(tokenizer):
    """What decides the ids: the serialized fast tokenizer (vocab, merges, added tokens), else the vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def cache_key(data_files, reader_options, tokenizer):
    """What the cached arrays depend on: data, reader options, tokenizer, and the reading/tokenizing code itself."""
    code = [file_sha256(f) for f in (dialogs.__file__, __file__)]
    payload = {"format": CACHE_FORMAT, "data": [file_sha256(f) for f in data_files], "code": code,
               "reader": reader_options, "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_offsets(offsets, n_values, name):
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != n_values \
            or (np.diff(offsets) < 0).any():
        raise ValueError(f"{name} are not valid offsets")


def validate(arrays, vocab_size):
    """Raise ValueError unless the arrays form a consistent tokenized dataset for a vocabulary of vocab_size."""
    for name in ("tokens", "token_offsets") + tuple(f"{s}.{a}" for s in SPLITS for a in SPLIT_ARRAYS):
        if name not in arrays:
            raise ValueError(f"missing array {name}")
    tokens = arrays["tokens"]
    _check_offsets(arrays["token_offsets"], len(tokens), "token_offsets")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids outside the vocabulary of {vocab_size}")
    n_texts = len(arrays["token_offsets"]) - 1
    for s in SPLITS:
        a = {name: arrays[f"{s}.{name}"] for name in SPLIT_ARRAYS}
        n_dialogs, n_utts = len(a["persona_offsets"]) - 1, len(a["utt_dialog"])
        _check_offsets(a["persona_offsets"], len(a["persona_ids"]), f"{s}.persona_offsets")
        _check_offsets(a["history_offsets"], len(a["history_ids"]), f"{s}.history_offsets")
        _check_offsets(a["cand_offsets"], len(a["cand_ids"]), f"{s}.cand_offsets")
        if len(a["history_offsets"]) != n_utts + 1 or len(a["cand_offsets"]) != n_utts + 1:
            raise ValueError(f"{s}: offsets do not match the number of utterances")
        if n_utts and (a["utt_dialog"].min() < 0 or a["utt_dialog"].max() >= n_dialogs):
            raise ValueError(f"{s}.utt_dialog points outside the dialogs")
        if n_utts and (np.diff(a["cand_offsets"]) < 1).any():
            raise ValueError(f"{s}: an utterance without candidates")
        for name in ("persona_ids", "history_ids", "cand_ids"):
            ids = a[name]
            if len(ids) and (ids.min() < 0 or ids.max() >= n_texts):
                raise ValueError(f"{s}.{name} points outside the text table")


def load_or_build(splits_fn, data_files, reader_options, tokenizer, cache_dir):
    """The tokenized dataset from cache_dir when a valid cache of the same key exists, else built and cached.

    `splits_fn()` reads the dialogs; it is only called when the cache cannot be used.
    """
    key = cache_key(data_files, reader_options, tokenizer)
    path = Path(cache_dir) / f"tokenized_{key[:24]}.safetensors"
    vocab_size = len(tokenizer)
    if path.exists():
        try:
            arrays = load_file(str(path))
            with open(path, "rb") as f:  # the metadata lives in the JSON header
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            if header.get("__metadata__", {}).get("key") != key:
                raise ValueError("its key does not match the data and tokenizer")
            validate(arrays, vocab_size)
            logger.info("Loaded tokenized dataset from %s", path)
            return TokenizedDialogs(arrays)
        except Exception as e:  # corrupt or stale: say so and rebuild
            logger.warning("Dataset cache %s is unusable (%s); rebuilding it", path, e)
    tokenized = tokenize_dialogs(splits_fn(), tokenizer)
    validate(tokenized.arrays, vocab_size)
    blob = save(tokenized.arrays, metadata={"key": key, "format": CACHE_FORMAT})
    atomic_write(path, lambda f: f.write(blob))
    logger.info("Cached tokenized dataset in %s", path)
    return tokenized


def get_dataset(tokenizer, dataset_path, dataset_cache, seed=42):
    """Tokenized dialogs of a file, URL or short name (default: the packaged corpus), through the cache."""
    path = resolve_dataset_path(dataset_path, dataset_cache)
    options = {"seed": seed, "num_distractors": NUM_DISTRACTORS, "valid_fraction": VALID_FRACTION}
    return load_or_build(lambda: read_dialogs(path, **options), source_files(path), options, tokenizer,
                         dataset_cache)
