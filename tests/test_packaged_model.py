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
    tokenizer, model = load_tokenizer_and_model(str(run_dir))
    assert type(model.lm).__name__ == "LlamaForCausalLM"
    assert len(tokenizer) == 49152 + 5 == model.lm.get_input_embeddings().num_embeddings
    assert "quantization_config" not in json.load(open(run_dir / "config.json"))
