"""End-to-end on the real packaged parts (SmolLM2-135M GGUF, chit-chat corpus), bounded to a handful of steps."""
import json

import train as train_script
from modeling import load_tokenizer_and_model


def test_default_run_fine_tunes_the_packaged_model_and_reloads(tmp_path):
    run_dir = tmp_path / "run"
    assert run_dir == train_script.train(["--max_steps", "3", "--gradient_accumulation_steps", "1", "--train_batch_size", "2",
                                  "--max_valid_examples", "12", "--eval_before_start", "--lr", "1e-4",
                                  "--dataset_cache", str(tmp_path / "cache"), "--output_dir", str(run_dir)])
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 3]
    assert metrics[1]["ppl"] < metrics[0]["ppl"]
    tokenizer, model, layout = load_tokenizer_and_model(str(run_dir))
    assert type(model.lm).__name__ == "LlamaForCausalLM"
    assert layout.name == "chat_template" == json.load(open(run_dir / "training_args.json"))["input_format"]
    assert len(tokenizer) == 49152 == model.lm.get_input_embeddings().num_embeddings  # no token added
    assert "quantization_config" not in json.load(open(run_dir / "config.json"))
    # the layout built from separately tokenized texts is what SmolLM2's own template gives
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    persona, turns, reply = ["i love cats.", "i am a nurse."], ["hi! how are you?", "great, and you?", "fine."], "ok!"
    messages = [{"role": "system", "content": "\n".join(persona)}] + [
        {"role": r, "content": t} for r, t in zip(["user", "assistant", "user", "assistant"], turns + [reply])]
    own = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert layout.build([encode(p) for p in persona], [encode(t) for t in turns], encode(reply))["input_ids"] == own[:-1]


def test_classifier_trains_on_the_packaged_minilm_and_reloads(tmp_path):
    import bert_classifier
    from test_classifier import sentiment_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", sentiment_rows(40, 1))
    out = tmp_path / "clf"
    bert_classifier.main(["train", "--train_file", train, "--valid_file", valid, "--output_dir", str(out),
                          "--n_epochs", "3", "--lr", "2e-4", "--batch_size", "16", "--device", "cpu"])
    assert json.load(open(out / "config.json"))["model_type"] == "bert"
    metrics = bert_classifier.main(["eval", "--model_checkpoint", str(out), "--input_file", valid, "--device", "cpu"])
    assert metrics["accuracy"] > 0.6 and metrics["examples"] == 40
    from classifier import load_classifier
    assert set(load_classifier(out)[2].classes) == {"neg", "pos"}
