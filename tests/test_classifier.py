import json
import random

import pytest
import torch

import bert_classifier
from classifier import (BertClassifier, DataError, LabelSpace, classification_metrics, decide, load_classifier,
                        read_rows, roc_auc, set_trainable)

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


def test_a_separable_toy_task_is_learned_and_survives_save_and_load(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(200, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", sentiment_rows(60, 1))
    out = tmp_path / "clf"
    bert_classifier.main(["train", "--train_file", train, "--valid_file", valid, "--output_dir", str(out),
                          "--model_checkpoint", tiny_bert, "--n_epochs", "4", "--lr", "3e-3", "--batch_size", "16",
                          "--device", "cpu", "--pooling", "mean"])
    metrics = bert_classifier.main(["eval", "--model_checkpoint", str(out), "--input_file", valid, "--device", "cpu"])
    assert metrics["accuracy"] >= 0.95 and metrics["roc_auc"] >= 0.95
    predictions = tmp_path / "pred.jsonl"
    decisions = bert_classifier.main(["predict", "--model_checkpoint", str(out), "--input_file", valid,
                                      "--output_file", str(predictions), "--device", "cpu"])
    rows = [json.loads(line) for line in open(predictions)]
    assert len(rows) == 60 and {r["label"] for r in rows} <= {"pos", "neg"}
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


def test_multilabel_decisions_follow_the_threshold():
    probs = torch.tensor([[0.9, 0.4, 0.6], [0.1, 0.2, 0.95]])
    assert decide(probs, "multilabel", 0.5).tolist() == [[1, 0, 1], [0, 0, 1]]
    assert decide(probs, "multilabel", 0.3).tolist() == [[1, 1, 1], [0, 0, 1]]
    binary = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    assert decide(binary, "binary", 0.5).tolist() == [0, 1] and decide(binary, "binary", 0.25).tolist() == [1, 1]


def test_biencoder_scores_are_cosines_of_mean_pooled_embeddings(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    from classifier import biencoder_scores, embed_texts

    encoder, tokenizer = AutoModel.from_pretrained(tiny_bert).eval(), AutoTokenizer.from_pretrained(tiny_bert)
    scores = biencoder_scores(encoder, tokenizer, "i like cats", ["i like cats", "pizza work"], "cpu")
    vectors = embed_texts(encoder, tokenizer, ["i like cats", "pizza work"], "cpu")
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1].item() == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)


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


def test_unknown_labels_are_an_error_not_a_new_class(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, 3))
    valid = write_jsonl(tmp_path / "valid.jsonl", sentiment_rows(5, 4) + [{"text": "hi", "label": "meh"}])
    with pytest.raises(DataError, match=r"valid.jsonl:6: unknown label 'meh'"):
        bert_classifier.main(["train", "--train_file", train, "--valid_file", valid, "--output_dir",
                              str(tmp_path / "clf"), "--model_checkpoint", tiny_bert, "--device", "cpu"])


def test_csv_with_multilabel_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,labels\n"you are bad",toxic|insult\nhello,\n')
    rows = read_rows(path)
    assert rows[0]["labels"] == ["toxic", "insult"] and rows[0]["multi"]
    assert LabelSpace(["toxic", "insult", "threat"], "multilabel").target(rows[0]) == [1.0, 1.0, 0.0]


def test_ranker_rows_pair_each_context_with_its_gold_and_distractors():
    from classifier import ranker_rows

    from conftest import make_personachat

    dialogs = make_personachat(n_train=2, n_utts=2, n_cands=3)["train"]
    rows = ranker_rows(dialogs, negatives=2, max_history=1)
    assert len(rows) == 2 * 2 * 3
    first = dialogs[0]["utterances"][1]
    gold, distractors = rows[3], rows[4:6]
    assert gold["labels"] == ["reply"] and gold["text_pair"] == first["candidates"][-1]
    assert gold["text"] == "\n".join(dialogs[0]["personality"] + first["history"][-3:])
    assert [r["labels"] for r in distractors] == [["distractor"], ["distractor"]]


def test_ranker_trains_on_dialogs_and_ranks_in_evaluation_and_chat(tiny_bert, tiny_dirs, personachat_file, tmp_path):
    import subprocess
    import sys

    import convai_evaluation
    from conftest import ROOT

    ranker = tmp_path / "ranker"
    bert_classifier.main(["train", "--ranker", "--dataset_path", personachat_file, "--dataset_cache",
                          str(tmp_path / "cache"), "--output_dir", str(ranker), "--model_checkpoint", tiny_bert,
                          "--n_epochs", "1", "--device", "cpu"])
    assert json.load(open(ranker / "classifier.json"))["ranker"] is True
    results = convai_evaluation.main(["--model_checkpoint", tiny_dirs["llama"], "--dataset_path", personachat_file,
                                      "--eval_type", "hits@1", "--ranker", "bert", "--ranker_checkpoint", str(ranker),
                                      "--results_file", str(tmp_path / "r.json"), "--device", "cpu"])
    assert results["ranker"] == "bert" and 0 <= results["hits@1"] <= 1 and results["min_candidates"] == 3
    baseline = convai_evaluation.main(["--model_checkpoint", tiny_dirs["llama"], "--dataset_path", personachat_file,
                                       "--eval_type", "hits@1", "--ranker", "biencoder", "--ranker_checkpoint",
                                       tiny_bert, "--results_file", str(tmp_path / "b.json"), "--device", "cpu"])
    assert baseline["ranker"] == "biencoder" and 0 <= baseline["hits@1"] <= 1
    done = subprocess.run([sys.executable, f"{ROOT}/interact.py", "--model_checkpoint", tiny_dirs["llama"],
                           "--personality", "i like cats", "--rerank", "3", "--ranker_checkpoint", str(ranker),
                           "--max_length", "5"], input="hello\nhow are you\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 2
