"""A text classifier on a BERT-family encoder: data rows, label space, model, metrics, save and load.

Tasks: multi-class (softmax, cross-entropy), binary (two classes, the second one positive at --threshold) and
multi-label (sigmoid per class, binary cross-entropy). A saved classifier is the encoder and tokenizer in the
save_pretrained layout plus `classifier_head.safetensors` and `classifier.json` (labels and the options that
shape inputs).
"""
import csv
import io
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from utils import share_saved_files

HEAD_FILE = "classifier_head.safetensors"
CONFIG_FILE = "classifier.json"
TASKS = ("multiclass", "binary", "multilabel")
POOLINGS = ("cls", "pooler", "mean")
PAIR_ENCODINGS = ("cross", "siamese")
TRAINABLE = ("additional_layers", "top_layer", "top4_layers", "all_encoder_layers", "all")


class DataError(ValueError):
    """A bad row; the message names the file and line."""


FIELDS = ("text", "text_pair", "label", "labels")
# a text of a few hundred thousand characters is a row, as in JSONL, not an error; csv's own limit is 131,072
csv.field_size_limit(max(csv.field_size_limit(), 2 ** 31 - 1))


def read_text(path):
    """A UTF-8 file's text (a leading BOM dropped); a byte that is not UTF-8 is a DataError naming its line."""
    if Path(path).is_dir():
        raise DataError(f"{path}: a directory; give a file")
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}; save the file as UTF-8)") from None


def read_rows(path, fields=None, labelled=False):
    """Rows of a CSV or TSV (with a header), JSONL or JSON (an array of rows) file: dicts with text, text_pair (or
    None), labels (a list) and line. `fields` names the file's own columns for text, text_pair, label and labels
    (multi-label), e.g. GLUE's `sentence`; a column named there must exist. With `labelled`, a row without a label
    is an error."""
    path = str(path)
    names = {key: (fields or {}).get(key) or key for key in FIELDS}
    rename = {theirs: ours for ours, theirs in names.items() if theirs != ours}
    text = read_text(path)
    rows, seen = [], set()
    if path.endswith(".json") and text.lstrip().startswith("["):  # a JSON array; its rows are counted, not lines
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, obj in enumerate(items):
            seen.update(obj if isinstance(obj, dict) else ())
            rows.append(_row(_renamed(obj, rename), path, f"row {i}", names, labelled))
        _check_columns(path, names, seen, "no row has a")
    elif path.endswith(".jsonl") or path.endswith(".json"):
        for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines: a JSON string may hold U+2028
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
            seen.update(obj if isinstance(obj, dict) else ())
            rows.append(_row(_renamed(obj, rename), path, line_no, names, labelled))
        _check_columns(path, names, seen, "no row has a")
    else:
        # GLUE's TSV files are unquoted: a '"' is text, as in transformers' and datasets' GLUE readers
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE) \
            if path.endswith(".tsv") else csv.DictReader(io.StringIO(text, newline=""), strict=True)
        row_start = 1  # a quoted field may span lines: errors name the line its row starts on
        try:
            seen = set(reader.fieldnames or ())
            _check_columns(path, names, seen, f"the header {reader.fieldnames or []} has no")
            row_start = reader.line_num + 1
            for obj in reader:
                row_start = _first_line(reader, obj)
                if None in obj:
                    raise DataError(f"{path}:{row_start}: more fields than the header's {len(reader.fieldnames)} (a "
                                    f"{'tab' if path.endswith('.tsv') else 'comma'} inside an unquoted text?)")
                obj = _renamed(obj, rename)
                if "labels" in obj:  # a multi-label column: '|' between labels (spaces around them dropped)
                    obj["labels"] = [s.strip() for s in (obj["labels"] or "").split("|") if s.strip()]
                rows.append(_row(obj, path, row_start, names, labelled))
                row_start = reader.reader.line_num + 1  # where the next row starts, if no blank line comes first
        except csv.Error as e:  # a quote not closed, text after a closing quote, or a field over the limit below
            hint = " (a quote opened in this row is never closed)" if "unexpected end of data" in str(e) else ""
            raise DataError(f"{path}:{row_start}: {e}{hint}") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _first_line(reader, obj):
    """The line a DictReader's row starts on: the line it ends on (the inner reader's: DictReader's own count stops
    before the blank lines it skips) less the line breaks inside its quoted fields."""
    values = [v for key, v in obj.items() if key is not None] + list(obj.get(None) or [])
    breaks = sum(v.count("\n") + v.count("\r") - v.count("\r\n") for v in values if isinstance(v, str))
    return reader.reader.line_num - breaks


def _check_columns(path, names, seen, where):
    """Every column named by a flag (or by the trained classifier) must be in the file."""
    for key, name in names.items():
        if (key == "text" or name != key) and name not in seen:
            raise DataError(f"{path}:1: {where} {name!r} column (--{key}_field names the {key} column; eval and "
                            f"predict default to the classifier's training columns)")


def _renamed(obj, rename):
    """The row with its columns under our names; a column that has one of our names but is not the one chosen for it
    is dropped (the file's `text` when --text_field names another column)."""
    if not isinstance(obj, dict) or not rename:
        return obj
    replaced = set(rename.values())
    return {rename.get(key, key): value for key, value in obj.items() if key in rename or key not in replaced}


def _row(obj, path, line_no, names, labelled):
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise DataError(f"{path}:{line_no}: a row needs a non-empty {names['text']!r}")
    labels = obj.get("labels")
    if labels is None and obj.get("label") not in (None, ""):
        if isinstance(obj["label"], (list, dict)):
            raise DataError(f"{path}:{line_no}: {names['label']!r} holds one label; a list of labels goes in "
                            f"{names['labels']!r} (--labels_field)")
        labels = [obj["label"]]
    if labels is not None and not isinstance(labels, list):
        raise DataError(f"{path}:{line_no}: {names['labels']!r} must be a list")
    if labels is None and labelled:
        raise DataError(f"{path}:{line_no}: this row has no label (columns {names['label']!r} or {names['labels']!r}: "
                        "--label_field, --labels_field)")
    return {"text": obj["text"], "text_pair": obj.get("text_pair") or None,
            "labels": None if labels is None else [str(x) for x in labels],
            "multi": obj.get("labels") is not None, "line": line_no, "path": path}


class LabelSpace:
    """The classes, in order, and how rows' labels become targets."""

    def __init__(self, classes, task):
        if task not in TASKS:
            raise ValueError(f"--task {task!r}: one of {TASKS}")
        if task == "binary" and len(classes) != 2:
            raise ValueError(f"binary classification needs exactly 2 classes, got {classes}")
        if len(classes) < (1 if task == "multilabel" else 2):
            raise ValueError(f"at least {1 if task == 'multilabel' else 2} classes are needed, got {classes}"
                             + (" (no row has a label)" if not classes else ""))
        self.classes, self.task = list(classes), task
        self.index = {c: i for i, c in enumerate(self.classes)}

    @property
    def n_outputs(self):
        return len(self.classes)

    def target(self, row):
        """The row's target: a class index, or a multi-hot vector for multi-label."""
        if row["labels"] is None:
            raise DataError(f"{row['path']}:{row['line']}: this row has no label")
        unknown = [x for x in row["labels"] if x not in self.index]
        if unknown:
            raise DataError(f"{row['path']}:{row['line']}: unknown label {unknown[0]!r} (classes: {self.classes})")
        if self.task == "multilabel":
            vector = [0.0] * len(self.classes)
            for x in row["labels"]:
                vector[self.index[x]] = 1.0
            return vector
        if len(row["labels"]) != 1:
            raise DataError(f"{row['path']}:{row['line']}: one label expected for {self.task}, got {row['labels']}")
        return self.index[row["labels"][0]]


NEGATIVE_FIRST = [("0", "1"), ("-1", "1"), ("false", "true"), ("no", "yes"), ("neg", "pos"), ("negative", "positive")]


def classes_from_rows(rows):
    """The training data's classes: numbers in numeric order (as scikit-learn's LabelEncoder sorts them), a known
    negative/positive pair negative first (binary's second class is the positive one, whatever row comes first),
    else in order of first appearance."""
    seen = {}
    for row in rows:
        for x in row["labels"] or []:
            seen.setdefault(x, None)
    classes = list(seen)
    try:
        return sorted(classes, key=_finite_number)
    except ValueError:  # not all numbers
        pass
    for pair in NEGATIVE_FIRST:
        if len(classes) == 2 and sorted(c.lower() for c in classes) == sorted(pair):
            return sorted(classes, key=lambda c: pair.index(c.lower()))
    return classes


def _finite_number(text):
    """float(text), which must be finite: "nan" (a missing value as pandas writes it) is no number to sort by."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def mean_pool(hidden, attention_mask):
    """The mean of each sequence's unpadded token vectors."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def model_inputs(batch, device):
    """The encoder inputs of a padded batch (and its siamese `pair_` inputs), on device."""
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids", "pair_input_ids",
                                             "pair_attention_mask") if k in batch}


class BertClassifier(nn.Module):
    """Encoder, pooling (cls, pooler or mean), dropout and a linear layer to one logit per class.

    Text pairs are read jointly (`cross`: one sequence with both texts) or apart (`siamese`: each text pooled to a
    unit vector, the head reading [u, v, |u-v|, u*v] as Sentence-BERT does)."""

    def __init__(self, encoder, n_outputs, pooling="cls", dropout=0.1, pair_encoding="cross"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling {pooling!r}: one of {POOLINGS}")
        if pair_encoding not in PAIR_ENCODINGS:
            raise ValueError(f"--pair_encoding {pair_encoding!r}: one of {PAIR_ENCODINGS}")
        self.encoder, self.pooling, self.pair_encoding = encoder, pooling, pair_encoding
        self.dropout = nn.Dropout(dropout)
        width = encoder.config.hidden_size * (4 if pair_encoding == "siamese" else 1)
        self.head = nn.Linear(width, n_outputs)

    def pool(self, input_ids, attention_mask, token_type_ids=None):
        """One vector per sequence (unit length for siamese pairs)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError("--pooling pooler: this encoder has no pooler; use cls or mean")
            pooled = out.pooler_output
        elif self.pooling == "mean":
            pooled = mean_pool(out.last_hidden_state, attention_mask)
        else:
            pooled = out.last_hidden_state[:, 0]
        return F.normalize(pooled, dim=-1) if self.pair_encoding == "siamese" else pooled

    def pair_logits(self, u, v):
        """Siamese logits of pooled first texts u and second texts v."""
        return self.head(self.dropout(torch.cat([u, v, (u - v).abs(), u * v], dim=-1)))

    def forward(self, input_ids, attention_mask, token_type_ids=None, pair_input_ids=None, pair_attention_mask=None):
        if self.pair_encoding == "siamese":
            if pair_input_ids is None:
                raise ValueError("--pair_encoding siamese classifies text pairs: every row needs a text_pair")
            u, v = self.pool(input_ids, attention_mask), self.pool(pair_input_ids, pair_attention_mask)
            return self.pair_logits(u, v)
        return self.head(self.dropout(self.pool(input_ids, attention_mask, token_type_ids)))


def set_trainable(model, what):
    """Freeze all but what --type_optimization names (the head always trains)."""
    if what not in TRAINABLE:
        raise ValueError(f"--type_optimization {what!r}: one of {TRAINABLE}")
    for p in model.parameters():
        p.requires_grad = what == "all"
    for p in model.head.parameters():
        p.requires_grad = True
    layers = _encoder_layers(model.encoder)
    chosen = {"top_layer": layers[-1:], "top4_layers": layers[-4:], "all_encoder_layers": layers}.get(what, [])
    for layer in chosen:
        for p in layer.parameters():
            p.requires_grad = True


def _encoder_layers(encoder):
    for path in ("encoder.layer", "transformer.layer", "layers"):
        module = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return list(module)
    raise ValueError(f"cannot find the layers of {type(encoder).__name__} to freeze or train selectively")


def loss_fn(logits, targets, task, class_weights=None):
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, targets, weight=class_weights)
    return F.cross_entropy(logits, targets, weight=class_weights)


def probabilities(logits, task):
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=-1)


def decide(probs, task, threshold=0.5):
    """Predicted class indices (multi-class, binary) or multi-hot rows (multi-label) from probabilities."""
    if task == "multilabel":
        return (probs >= threshold).long()
    if task == "binary":
        return (probs[:, 1] >= threshold).long()
    return probs.argmax(dim=-1)


def roc_auc(scores, labels):
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties count half)."""
    scores, labels = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).bool()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def classification_metric_names(space):
    """The names classification_metrics gives a score under (all but its `examples` count), for checking
    --validation_metric before any training."""
    per_class = ["precision", "recall", "f1"] + (["roc_auc"] if space.task == "multilabel" else [])
    return (["accuracy", "f1_macro"] + (["roc_auc"] if space.task == "binary" else [])
            + [f"{kind}/{name}" for name in space.classes for kind in per_class])


def classification_metrics(probs, targets, space, threshold=0.5):
    """Accuracy (exact match for multi-label), per-class precision/recall/F1, macro F1 and ROC AUC where defined.

    Macro F1 averages over the classes of the examples or of the predictions, as scikit-learn's does: a class an
    evaluation file lacks, and that nothing was predicted as, does not count as F1 0. (Multi-label: every class, as
    scikit-learn's, whose label columns are all given.)"""
    pred = decide(probs, space.task, threshold)
    if space.task == "multilabel":
        truth = targets.long()
        accuracy = float((pred == truth).all(dim=1).double().mean())
        hit = lambda c: ((pred[:, c] == 1), (truth[:, c] == 1))  # noqa: E731
    else:
        accuracy = float((pred == targets).double().mean())
        hit = lambda c: ((pred == c), (targets == c))  # noqa: E731
    result = {"accuracy": accuracy, "examples": len(targets)}
    f1s = []
    for c, name in enumerate(space.classes):
        predicted, actual = hit(c)
        tp = int((predicted & actual).sum())
        precision = tp / max(int(predicted.sum()), 1)
        recall = tp / max(int(actual.sum()), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[f"precision/{name}"], result[f"recall/{name}"], result[f"f1/{name}"] = precision, recall, f1
        if space.task == "multilabel" or int((predicted | actual).sum()):
            f1s.append(f1)
        if space.task == "multilabel":
            result[f"roc_auc/{name}"] = roc_auc(probs[:, c], targets[:, c])
    result["f1_macro"] = sum(f1s) / len(f1s)
    if space.task == "binary":
        result["roc_auc"] = roc_auc(probs[:, 1], targets == 1)
    return result


def save_classifier(model, tokenizer, space, options, directory):
    """Encoder and tokenizer (save_pretrained layout), head weights, and classifier.json."""
    os.makedirs(directory, exist_ok=True)
    model.encoder.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()},
              os.path.join(directory, HEAD_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"classes": space.classes, "task": space.task, **options}, f, indent=2)
    share_saved_files(directory)


def load_encoder(checkpoint, flag="--model_checkpoint"):
    """(tokenizer, encoder) of a directory or hub id; one that names no model is a DataError in one line, naming
    `flag`, rather than transformers' traceback (whose message for an empty directory is about sentencepiece)."""
    path = Path(checkpoint)
    if path.is_dir() and not (path / "config.json").is_file():
        raise DataError(f"{flag} {checkpoint}: a directory without a model (no config.json)")
    try:
        return AutoTokenizer.from_pretrained(checkpoint), AutoModel.from_pretrained(checkpoint, use_kernels=False)
    except (OSError, ValueError) as e:  # not there, not a model, or no network: transformers says which
        raise DataError(f"{flag} {checkpoint}: {e}") from None


def load_classifier(directory, flag="--model_checkpoint", ranker=False):
    """(model, tokenizer, space, options) of a saved classifier; with `ranker`, one trained as a reply ranker.

    `flag` is the argument that named the directory, for the errors.
    """
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{flag} {directory}: no {CONFIG_FILE}: not a trained classifier")
    options = json.loads(config_path.read_text())
    if ranker and not options.get("ranker"):
        raise DataError(f"{flag} {directory}: a {options.get('task', '')} classifier of {options.get('classes')}, "
                        "not a reply ranker (train one with `bert_classifier.py train --ranker`)")
    space = LabelSpace(options.pop("classes"), options.pop("task"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertClassifier(AutoModel.from_pretrained(directory, use_kernels=False), space.n_outputs, options.get("pooling", "cls"),
                           pair_encoding=options.get("pair_encoding", "cross"))
    model.head.load_state_dict(load_file(os.path.join(directory, HEAD_FILE)))
    return model, tokenizer, space, options


def encode_rows(tokenizer, rows, max_length=256, add_special_tokens=True, sep_last_utt=False, pair_encoding="cross"):
    """Tokenized (unpadded) inputs of rows; with sep_last_utt the text's last line becomes the second segment.
    Siamese pairs come back as two encodings: the second one's keys start with `pair_`."""
    texts, pairs = [], []
    for row in rows:
        text, pair = row["text"], row["text_pair"]
        if sep_last_utt and pair is None and "\n" in text:
            text, pair = text.rsplit("\n", 1)
        texts.append(text)
        pairs.append(pair)
    kwargs = dict(truncation=True, max_length=max_length, add_special_tokens=add_special_tokens)
    if pair_encoding == "siamese":
        for row, pair in zip(rows, pairs):
            if pair is None:
                raise DataError(f"{row.get('path', '<input>')}:{row.get('line', '?')}: a siamese classifier needs a "
                                "'text_pair' in every row (--text_pair_field names its column)")
        second = tokenizer([p or " " for p in pairs], **kwargs)
        first = tokenizer(texts, **kwargs)
        return {**first, **{f"pair_{k}": second[k] for k in ("input_ids", "attention_mask")}}
    if any(p is not None for p in pairs):
        return tokenizer(texts, [p or "" for p in pairs], **kwargs)
    return tokenizer(texts, **kwargs)


def pad_batch(tokenizer, items):
    """Pad a list of encoded rows (and their `pair_` encodings, apart) into tensors."""
    first = tokenizer.pad([{k: v for k, v in item.items() if not k.startswith("pair_")} for item in items],
                          return_tensors="pt")
    batch = dict(first)
    if "pair_input_ids" in items[0]:
        pairs = [{k[len("pair_"):]: v for k, v in item.items() if k.startswith("pair_")} for item in items]
        second = tokenizer.pad(pairs, return_tensors="pt")
        batch.update({f"pair_{k}": v for k, v in second.items()})
    return batch
