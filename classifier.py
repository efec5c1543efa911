"""A text classifier on a BERT-family encoder: data rows, label space, model, metrics, save and load.

Tasks: multi-class (softmax, cross-entropy), binary (two classes, the second one positive at --threshold) and
multi-label (sigmoid per class, binary cross-entropy). A saved classifier is the encoder and tokenizer in the
save_pretrained layout plus `classifier_head.safetensors` and `classifier.json` (labels and the options that
shape inputs).
"""
import csv
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

HEAD_FILE = "classifier_head.safetensors"
CONFIG_FILE = "classifier.json"
TASKS = ("multiclass", "binary", "multilabel")
POOLINGS = ("cls", "pooler", "mean")
TRAINABLE = ("additional_layers", "top_layer", "top4_layers", "all_encoder_layers", "all")


class DataError(ValueError):
    """A bad row; the message names the file and line."""


def read_rows(path):
    """Rows of a CSV (with a header) or JSONL file: dicts with text, text_pair (or None), labels (a list) and line."""
    path = str(path)
    rows = []
    if path.endswith(".jsonl") or path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
                rows.append(_row(obj, path, line_no))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "text" not in reader.fieldnames:
                raise DataError(f"{path}:1: the CSV header needs a 'text' column (and 'label' or 'labels')")
            for obj in reader:
                if "labels" in obj:  # a multi-label column: '|' between labels, empty for none
                    obj["labels"] = [s for s in (obj["labels"] or "").split("|") if s]
                rows.append(_row(obj, path, reader.line_num))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _row(obj, path, line_no):
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise DataError(f"{path}:{line_no}: a row needs a non-empty 'text'")
    labels = obj.get("labels")
    if labels is None and obj.get("label") not in (None, ""):
        labels = [obj["label"]]
    if labels is not None and not isinstance(labels, list):
        raise DataError(f"{path}:{line_no}: 'labels' must be a list")
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
        if len(classes) < 2 and task != "multilabel":
            raise ValueError(f"at least 2 classes are needed, got {classes}")
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


def classes_from_rows(rows):
    """Classes in order of first appearance in the training data."""
    seen = {}
    for row in rows:
        for x in row["labels"] or []:
            seen.setdefault(x, None)
    return list(seen)


class BertClassifier(nn.Module):
    """Encoder, pooling (cls, pooler or mean), dropout and a linear layer to one logit per class."""

    def __init__(self, encoder, n_outputs, pooling="cls", dropout=0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling {pooling!r}: one of {POOLINGS}")
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_outputs)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError("--pooling pooler: this encoder has no pooler; use cls or mean")
            pooled = out.pooler_output
        elif self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = out.last_hidden_state[:, 0]
        return self.head(self.dropout(pooled))


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


def classification_metrics(probs, targets, space, threshold=0.5):
    """Accuracy (exact match for multi-label), per-class precision/recall/F1, macro F1 and ROC AUC where defined."""
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


def load_classifier(directory):
    """(model, tokenizer, space, options) of a saved classifier."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"--model_checkpoint {directory}: no {CONFIG_FILE}: not a trained classifier")
    options = json.loads(config_path.read_text())
    space = LabelSpace(options.pop("classes"), options.pop("task"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertClassifier(AutoModel.from_pretrained(directory), space.n_outputs, options.get("pooling", "cls"))
    model.head.load_state_dict(load_file(os.path.join(directory, HEAD_FILE)))
    return model, tokenizer, space, options


def encode_rows(tokenizer, rows, max_length=256, add_special_tokens=True, sep_last_utt=False):
    """Tokenized (unpadded) inputs of rows; with sep_last_utt the text's last line becomes the second segment."""
    texts, pairs = [], []
    for row in rows:
        text, pair = row["text"], row["text_pair"]
        if sep_last_utt and pair is None and "\n" in text:
            text, pair = text.rsplit("\n", 1)
        texts.append(text)
        pairs.append(pair)
    kwargs = dict(truncation=True, max_length=max_length, add_special_tokens=add_special_tokens)
    if any(p is not None for p in pairs):
        return tokenizer(texts, [p or "" for p in pairs], **kwargs)
    return tokenizer(texts, **kwargs)


RANKER_CLASSES = ["distractor", "reply"]  # binary: the score of a candidate is the probability of "reply"


def context_text(persona, history, max_history=2):
    """One text of a dialog context for a cross-encoder: persona lines, then the kept turns, one per line."""
    return "\n".join(list(persona) + list(history[-(2 * max_history + 1):]))


def ranker_rows(dialogs, negatives=1, max_history=2, max_examples=0):
    """(context, candidate) rows from dialogs: the gold reply labelled reply, `negatives` distractors distractor."""
    rows = []
    for d, dialog in enumerate(dialogs):
        for u, utterance in enumerate(dialog["utterances"]):
            context = context_text(dialog["personality"], utterance["history"], max_history)
            candidates = utterance["candidates"]
            pairs = [(candidates[-1], "reply")] + [(c, "distractor") for c in candidates[:-1][:negatives]]
            for candidate, label in pairs:
                rows.append({"text": context, "text_pair": candidate, "labels": [label], "multi": False,
                             "line": u + 1, "path": f"dialog {d}"})
            if max_examples and len(rows) >= max_examples:
                return rows
    return rows


@torch.no_grad()
def score_pairs(model, tokenizer, options, context, candidates, device):
    """Ranker scores (probability of 'reply') of candidates after one context text."""
    rows = [{"text": context, "text_pair": c or " ", "labels": None} for c in candidates]
    encoded = encode_rows(tokenizer, rows, max_length=options.get("truncate", 256),
                          add_special_tokens=options.get("add_cls_token", True))
    batch = tokenizer.pad(encoded, return_tensors="pt")
    model.eval()
    logits = model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                          "token_type_ids")})
    return torch.softmax(logits.float(), dim=-1)[:, 1]


@torch.no_grad()
def embed_texts(encoder, tokenizer, texts, device, max_length=256):
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for MiniLM)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def biencoder_scores(encoder, tokenizer, context, candidates, device):
    """Cosine similarity of each candidate's embedding with the context's: the untrained bi-encoder baseline."""
    vectors = embed_texts(encoder, tokenizer, [context] + [c or " " for c in candidates], device)
    return vectors[1:] @ vectors[0]
