"""Readers of dialog formats, all returning PersonaChat's shape.

    {"train": [dialog, ...], "valid": [dialog, ...]}
    dialog = {"personality": [str, ...], "utterances": [{"history": [str, ...], "candidates": [str, ..., gold]}]}

The gold reply is always the last candidate, as in the original repo. Formats: PersonaChat JSON, ParlAI ConvAI2
text files (with or without candidates) and the packaged chit-chat corpus (no persona). Where a file has no
candidates, distractors are drawn from other dialogs, of any split, with a fixed seed.
"""
import argparse
import json
import re
from pathlib import Path

import numpy as np

from utils import resolve_dataset_path, seed_type, write_json

NUM_DISTRACTORS = 19  # ConvAI2 has 20 candidates per utterance: 19 distractors + gold
VALID_FRACTION = 0.05


class DialogFormatError(ValueError):
    """Malformed dialog data; the message names the file and the line or JSON path."""


def read_dialogs(path, seed=42, num_distractors=NUM_DISTRACTORS, valid_fraction=VALID_FRACTION,
                 prompt_as_persona=False, need_train=True):
    """Read any supported file into {"train", "valid"} dialogs, splitting or pairing files where needed.

    `prompt_as_persona`: the chit-chat corpus only; each conversation's opening prompt becomes its one-line persona.
    `need_train=False` (evaluation) accepts PersonaChat JSON with a 'valid' list and no dialogs in 'train'.
    """
    path = str(path)
    obj = None if path.endswith(".txt") else _load_json(path)
    if prompt_as_persona and not _is_chitchat(obj):
        raise DialogFormatError(f"{path}: prompt_as_persona applies to the chit-chat corpus only (its "
                                f"conversations have a 'prompt'); this file's dialogs have their own personas")
    if obj is None:
        splits = read_parlai_splits(path, seed, valid_fraction)
    elif isinstance(obj, dict) and ("train" in obj or "valid" in obj):
        splits = read_personachat(obj, path)
        if "train" not in splits and (need_train or not splits.get("valid")):
            raise DialogFormatError(f"{path}: missing the 'train' list")
        if not splits.get("valid"):  # a train-only file: hold out dialogs, as for the other formats
            splits = split_dialogs(splits["train"], seed, valid_fraction)
        splits.setdefault("train", [])
    elif _is_chitchat(obj):
        splits = split_dialogs(read_chitchat(obj, path, prompt_as_persona), seed, valid_fraction)
    else:
        raise DialogFormatError(
            f"{path}: unknown JSON layout: expected PersonaChat ({{'train': [...], 'valid': [...]}}) "
            f"or the chit-chat corpus ({{id: {{'messages': [...]}}}})")
    for name, dialogs in splits.items():
        splits[name] = dialogs = [d for d in dialogs if d["utterances"]]  # a dialog without a reply gives nothing
        if not dialogs and (need_train or name == "valid"):
            raise DialogFormatError(f"{path}: the {name} split has no dialog with a reply (valid is held out "
                                    f"from the dialogs of train when the file has no valid part: give more dialogs)")
    add_distractors([d for name in sorted(splits) for d in splits[name]], num_distractors, seed, where=path)
    return splits


def _is_chitchat(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, dict) and "messages" in v for v in obj.values())


def read_personas(path):
    """Every non-empty persona of a file (all splits), without building or tokenizing anything else."""
    path = str(path)
    if path.endswith(".txt"):
        personas = [d["personality"] for d in read_parlai(path)]
    else:
        obj = _load_json(path)
        dialogs = [d for split in ("train", "valid") for d in obj.get(split, [])] \
            if isinstance(obj, dict) and ("train" in obj or "valid" in obj) else []
        personas = [d.get("personality", []) for d in dialogs if isinstance(d, dict)]
        for i, persona in enumerate(personas):
            _require_strings(persona, f"{path}: persona {i}")
    return [p for p in personas if p]


def _load_json(path):
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors write one) is not text
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DialogFormatError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DialogFormatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _require_strings(value, where):
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise DialogFormatError(f"{where}: expected a list of strings, got {type(value).__name__}")


def read_personachat(obj, path):
    """Validate PersonaChat JSON as the original repo reads it; errors give the JSON path of the fault. The splits
    are those the file has: read_dialogs holds dialogs of train out where 'valid' is missing or empty."""
    splits = {}
    for split in [name for name in ("train", "valid") if name in obj]:
        if not isinstance(obj[split], list):
            raise DialogFormatError(f"{path}: {split}: expected a list of dialogs")
        for i, dialog in enumerate(obj[split]):
            where = f"{path}: {split}[{i}]"
            if not isinstance(dialog, dict) or "utterances" not in dialog:
                raise DialogFormatError(f"{where}: expected an object with 'personality' and 'utterances'")
            dialog.setdefault("personality", [])
            _require_strings(dialog["personality"], f"{where}.personality")
            if not isinstance(dialog["utterances"], list):
                raise DialogFormatError(f"{where}.utterances: expected a list")
            for j, utterance in enumerate(dialog["utterances"]):
                u_where = f"{where}.utterances[{j}]"
                if not isinstance(utterance, dict):
                    raise DialogFormatError(f"{u_where}: expected an object with 'history' and 'candidates'")
                for key in ("history", "candidates"):
                    if key not in utterance:
                        raise DialogFormatError(f"{u_where}: missing '{key}'")
                    _require_strings(utterance[key], f"{u_where}.{key}")
                if not utterance["candidates"]:
                    raise DialogFormatError(f"{u_where}.candidates: empty (the gold reply must be the last one)")
                utterance["candidates"] = gold_last(utterance["candidates"][:-1], [utterance["candidates"][-1]])
        splits[split] = obj[split]
    return splits


def read_chitchat(obj, path, prompt_as_persona=False):
    """The chit-chat corpus: consecutive messages of one sender form a turn; every turn after the first is a reply.

    Both speakers were shown an opening prompt ("What's your favorite smell?"); `prompt_as_persona` keeps it as
    the dialog's one-line persona, where the corpus has one.
    """
    dialogs = []
    for conv_id, conv in obj.items():
        messages = conv["messages"]
        if not isinstance(messages, list):
            raise DialogFormatError(f"{path}: {conv_id}.messages: expected a list of turns")
        turns = []
        for k, turn in enumerate(messages):
            try:
                text = " ".join(m["text"].strip() for m in turn)
            except (TypeError, KeyError, AttributeError):
                raise DialogFormatError(
                    f"{path}: {conv_id}.messages[{k}]: expected a list of {{'text': str}} messages") from None
            if text:
                turns.append(text)
        utterances = [{"history": turns[:i], "candidates": [turns[i]]} for i in range(1, len(turns))]
        prompt = conv.get("prompt") if prompt_as_persona else None
        if prompt is not None and not isinstance(prompt, str):
            raise DialogFormatError(f"{path}: {conv_id}.prompt: expected a string, got {type(prompt).__name__}")
        if utterances:
            dialogs.append({"personality": [prompt.strip()] if prompt and prompt.strip() else [],
                            "utterances": utterances})
    return dialogs


_PARLAI_LINE = re.compile(r"^(\d+) (.*)$")


def read_parlai(path):
    """ParlAI / ConvAI2 text: `N your persona: ...` lines, then `N text\\tlabel[\\t\\treward\\tcand1|cand2|...]`.

    `\\n` in a field is a newline, as in ParlAI's FbDialogTeacher. Texts, labels and candidates are stripped, so that a
    gold reply with trailing spaces is still the gold, not one of its own distractors.
    """
    dialogs, dialog, history, last_id = [], None, [], 0
    for line_no, raw in _numbered_lines(path):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        match = _PARLAI_LINE.match(line)
        if not match:
            raise DialogFormatError(f"{path}:{line_no}: expected 'N text[<tab>label...]', got {line[:60]!r}")
        line_id, rest = int(match.group(1)), match.group(2)
        if line_id <= last_id or dialog is None:  # numbering restarts: a new episode
            if line_id != 1:
                raise DialogFormatError(f"{path}:{line_no}: an episode must start at line id 1, got {line_id}")
            dialog, history = {"personality": [], "utterances": []}, []
            dialogs.append(dialog)
        elif line_id != last_id + 1:
            raise DialogFormatError(f"{path}:{line_no}: line id {line_id} follows {last_id}")
        last_id = line_id
        fields = [field.replace("\\n", "\n") for field in rest.split("\t")]
        text = fields[0].strip()
        if len(fields) == 1:
            if text.startswith("your persona:"):
                dialog["personality"].append(text[len("your persona:"):].strip())
            elif not text.startswith("partner's persona:"):
                history.append(text)  # context line without a label
            continue
        labels = _bar_separated(fields[1])
        if not labels:
            raise DialogFormatError(f"{path}:{line_no}: a tab but no label after it")
        candidates = gold_last(_bar_separated(fields[3]) if len(fields) > 3 else [], labels)
        utterance = {"history": history + [text], "candidates": candidates}
        if len(labels) > 1:  # the other right answers: F1 takes the best of them, as ParlAI's does
            utterance["labels"] = labels
        dialog["utterances"].append(utterance)
        history = history + [text, labels[0]]
    dialogs = [d for d in dialogs if d["utterances"]]
    if not dialogs:
        raise DialogFormatError(f"{path}: no dialog with a labelled line ('N text<tab>label')")
    return dialogs


def gold_last(candidates, labels):
    """The candidates with the first label, the gold, last, and no label among the others: a right answer is
    never one of its own distractors (to train against, or to count as a miss when ranked first)."""
    return [c for c in candidates if c not in labels] + [labels[0]]


def _bar_separated(field):
    """The non-empty texts of a `a|b|c` field, stripped."""
    return [s.strip() for s in field.split("|") if s.strip()]


def _numbered_lines(path):
    """(line number, line) of a UTF-8 text file; a byte that is not UTF-8 is reported with its line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DialogFormatError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None


def source_files(path):
    """The files read_dialogs(path) reads: a ConvAI2 train file brings its valid sibling."""
    sibling = _valid_sibling(path)
    return [str(path)] + ([str(sibling)] if sibling is not None else [])


def _valid_sibling(path):
    name = Path(path).name
    if str(path).endswith(".txt") and name.startswith("train"):
        sibling = Path(path).with_name("valid" + name[len("train"):])
        if sibling.exists():
            return sibling
    return None


def read_parlai_splits(path, seed, valid_fraction):
    """A ConvAI2 `train_*.txt` is paired with its `valid_*.txt` sibling; any other file is split by dialog."""
    sibling = _valid_sibling(path)
    if sibling is not None:
        return {"train": read_parlai(path), "valid": read_parlai(str(sibling))}
    return split_dialogs(read_parlai(path), seed, valid_fraction)


def split_dialogs(dialogs, seed, valid_fraction):
    """Hold out whole dialogs (never utterances of one dialog on both sides), chosen with a fixed seed."""
    order = np.random.default_rng(seed).permutation(len(dialogs))
    n_valid = max(1, int(round(len(dialogs) * valid_fraction))) if len(dialogs) > 1 else 0
    valid_ids = set(order[:n_valid].tolist())
    return {"train": [d for i, d in enumerate(dialogs) if i not in valid_ids],
            "valid": [d for i, d in enumerate(dialogs) if i in valid_ids]}


def add_distractors(dialogs, num_distractors, seed, where=""):
    """Give every utterance that has only its gold reply `num_distractors` replies drawn from other dialogs.

    A distractor never comes from the same dialog and never equals the gold reply's text, and an utterance's
    distractors differ from each other unless fewer distinct replies than `num_distractors` are allowed. Pass the
    dialogs of all splits: a small held-out split draws its distractors from the training replies too (they are
    negatives only, so nothing of the held-out gold leaks).
    """
    pool, owner = [], []
    for d_index, dialog in enumerate(dialogs):
        for utterance in dialog["utterances"]:
            pool.append(utterance["candidates"][-1])
            owner.append(d_index)
    if not pool or num_distractors <= 0:
        return
    owner, texts = np.asarray(owner), np.asarray(pool, dtype=object)
    rng = np.random.default_rng(seed)
    spare = np.random.default_rng([seed, 1])  # repeats are redrawn from their own stream: other draws stay as they were
    for d_index, dialog in enumerate(dialogs):
        for utterance in dialog["utterances"]:
            if len(utterance["candidates"]) > 1:
                continue
            gold = utterance["candidates"][-1]
            drawn = rng.integers(0, len(pool), size=num_distractors)
            bad = (owner[drawn] == d_index) | (texts[drawn] == gold)
            for _ in range(8):  # redraw the rare bad picks
                if not bad.any():
                    break
                drawn[bad] = rng.integers(0, len(pool), size=int(bad.sum()))
                bad = (owner[drawn] == d_index) | (texts[drawn] == gold)
            if bad.any():  # a small pool: draw from the allowed replies only
                allowed = np.flatnonzero((owner != d_index) & (texts != gold))
                if not len(allowed):
                    raise DialogFormatError(f"{where}: no reply outside dialog {d_index} differs from its gold "
                                            f"replies, so no distractor can be drawn; give more dialogs")
                drawn[bad] = rng.choice(allowed, size=int(bad.sum()))
            if len(set(texts[drawn])) < num_distractors:
                drawn = _without_repeats(drawn, texts, owner, d_index, gold, spare)
            utterance["candidates"] = [pool[k] for k in drawn] + utterance["candidates"]


def _without_repeats(drawn, texts, owner, d_index, gold, rng):
    """Redraw the picks whose text an earlier pick already has, keeping them out of dialog `d_index` and off `gold`.

    Random redraws first, as the pool is usually large; then the allowed texts not yet drawn, as far as there are
    any: with fewer than the picks, the last picks repeat.
    """
    def unfit(picks):
        seen, out = set(), np.zeros(len(picks), dtype=bool)
        for i, k in enumerate(picks):
            out[i] = owner[k] == d_index or texts[k] == gold or texts[k] in seen
            if not out[i]:
                seen.add(texts[k])
        return out, seen

    for _ in range(8):
        bad, kept = unfit(drawn)
        if not bad.any():
            return drawn
        drawn[bad] = rng.integers(0, len(texts), size=int(bad.sum()))
    bad, kept = unfit(drawn)
    allowed = (owner != d_index) & (texts != gold)
    fresh = {}  # a text not drawn yet -> one reply of it
    for k in np.flatnonzero(allowed):
        if texts[k] not in kept:
            fresh.setdefault(texts[k], k)
    spots = np.flatnonzero(bad)
    some = min(len(spots), len(fresh))
    drawn[spots[:some]] = rng.choice(np.fromiter(fresh.values(), dtype=int, count=len(fresh)), size=some,
                                     replace=False)
    if some < len(spots):
        drawn[spots[some:]] = rng.choice(np.flatnonzero(allowed), size=len(spots) - some)
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write a dialog file as PersonaChat JSON, as every script reads it: the train/valid split and the "
                    "drawn distractors fixed in the file (gold reply last).")
    parser.add_argument("output", help="The PersonaChat JSON file to write")
    parser.add_argument("--dataset_path", default="",
                        help="A dialog file, URL or short name as train.py takes (default: the packaged corpus)")
    parser.add_argument("--dataset_cache", default="./dataset_cache",
                        help="Where a URL or short name is downloaded (default: ./dataset_cache)")
    parser.add_argument("--seed", type=seed_type, default=42, help="Seed of the split and the distractors (train.py's)")
    parser.add_argument("--num_distractors", type=int, default=NUM_DISTRACTORS,
                        help="Distractors drawn where a file has none")
    parser.add_argument("--prompt_as_persona", action="store_true",
                        help="Chit-chat corpus: each conversation's opening prompt becomes its one-line persona")
    args = parser.parse_args(argv)
    try:
        path = resolve_dataset_path(args.dataset_path, args.dataset_cache)
        splits = read_dialogs(path, args.seed, args.num_distractors, prompt_as_persona=args.prompt_as_persona)
    except (DialogFormatError, OSError) as e:
        parser.error(str(e))
    write_json(args.output, splits)
    counts = {name: sum(len(d["utterances"]) for d in dialogs) for name, dialogs in splits.items()}
    print(f"Wrote {args.output}: " + ", ".join(f"{name} {len(splits[name])} dialogs, {counts[name]} replies"
                                               for name in sorted(splits)))


if __name__ == "__main__":
    main()
