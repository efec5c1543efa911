"""bench.py train, quality and serve end to end on tiny models: the scripts they run and the figures they read back."""
import json
import tempfile

import pytest

import bench
from modeling import has_cxx_compiler, load_tokenizer_and_model


def test_quality_scores_zero_shot_and_trained_models_on_the_same_examples(tiny_dirs, personachat_file, tmp_path,
                                                                          capsys):
    result = bench.main(["quality", "--model_checkpoint", tiny_dirs["llama_chat"], "--dataset_path", personachat_file,
                         "--dataset_cache", str(tmp_path / "cache"), "--device", "cpu", "--max_steps", "2",
                         "--max_examples", "4", "--max_valid_examples", "3", "--work_dir", str(tmp_path / "work"),
                         "--rerank", "3", "--json", "--", "--train_batch_size", "2", "--gradient_accumulation_steps",
                         "1"])
    rows = result["rows"]
    assert list(rows) == ["biencoder (untrained MiniLM)", "zero-shot transfertransfo", "zero-shot chat_template",
                          "zero-shot transcript", "trained chat_template (2 steps)",
                          "same, F1 of the MC head's best of 3 samples", "same, F1 of mc+pmi+biencoder's best of them"]
    reranked = json.load(open(tmp_path / "work" / "trained_rerank3.json"))
    assert reranked["rerank"] == 3 and reranked["examples"] == 4 and reranked["rerank_ranker"] == "mc"
    assert rows["same, F1 of the MC head's best of 3 samples"] == {"f1": reranked["f1"]}
    assert rows["same, F1 of mc+pmi+biencoder's best of them"] == {"f1": reranked["f1_by_ranker"]["mc+pmi+biencoder"]}
    trained, zero_shot = rows["trained chat_template (2 steps)"], rows["zero-shot chat_template"]
    for name in ("mc_hits@1", "lm_hits@1", "pmi_hits@1", "ppl", "word_ppl", "reply_ppl", "end_nll", "f1"):
        assert result["deltas"][name] == pytest.approx(trained[name] - zero_shot[name])
    assert "pmi_hits@1" not in rows["zero-shot transcript"]  # PMI for the trained format's zero-shot row only
    assert result["mc_beats_zero_shot_pmi"] == (trained["mc_hits@1"] > zero_shot["pmi_hits@1"])
    assert result["mc_beats_zero_shot_pmi_and_biencoder_joined"] == (
        trained["mc_hits@1"] > zero_shot["pmi+biencoder_hits@1"])
    assert result["joined_beats_mc"] == (trained["mc+pmi+biencoder_hits@1"] > trained["mc_hits@1"])
    saved = json.load(open(tmp_path / "work" / "trained.json"))
    assert saved["examples"] == 4 and saved["input_format"] == "chat_template"
    assert saved["by_ranker"]["mc"]["hits@1"] == trained["mc_hits@1"]
    assert saved["by_ranker"]["pmi"]["hits@1"] == trained["pmi_hits@1"]
    assert saved["by_ranker"]["mc+pmi+biencoder"]["hits@1"] == trained["mc+pmi+biencoder_hits@1"]
    assert json.load(open(tmp_path / "work" / "zero_shot_transfertransfo.json"))["input_format"] == "transfertransfo"
    assert result["zero_shot_ppl_ratio_transfertransfo_over_chat_template"] == pytest.approx(
        rows["zero-shot transfertransfo"]["ppl"] / zero_shot["ppl"])
    assert result["zero_shot_reply_ppl_ratio_transfertransfo_over_chat_template"] == pytest.approx(
        rows["zero-shot transfertransfo"]["reply_ppl"] / zero_shot["reply_ppl"])
    assert result["zero_shot_ppl_ratio_transfertransfo_over_transcript"] == pytest.approx(
        rows["zero-shot transfertransfo"]["ppl"] / rows["zero-shot transcript"]["ppl"])
    assert json.load(open(tmp_path / "work" / "zero_shot_transcript.json"))["input_format"] == "transcript"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == json.loads(json.dumps(rows))
    zero_shot_file = tmp_path / "work" / "zero_shot_transfertransfo.json"
    before = zero_shot_file.stat().st_mtime_ns
    with pytest.raises(SystemExit, match="work/run exists"):  # refused before any evaluation, not after them
        bench.main(["quality", "--model_checkpoint", tiny_dirs["llama_chat"], "--work_dir", str(tmp_path / "work")])
    assert zero_shot_file.stat().st_mtime_ns == before


@pytest.mark.parametrize("argv", [["rank", "--examples", "0"], ["serve", "--requests", "0"],
                                  ["serve", "--clients", "0"], ["quality", "--max_steps", "0"]])
def test_sizes_below_one_are_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert f"{argv[1]} 0: at least 1" in capsys.readouterr().err


def test_serve_sends_the_same_requests_one_at_a_time_and_concurrently(tiny_dirs, personachat_file, tmp_path):
    result = bench.main(["serve", "--model_checkpoint", tiny_dirs["llama_chat"], "--dataset_path", personachat_file,
                         "--dataset_cache", str(tmp_path / "cache"), "--device", "cpu", "--requests", "3",
                         "--clients", "2", "--max_tokens", "4"])
    assert result["requests"] == 3 and result["clients"] == 2
    for phase in ("one_at_a_time", "concurrent"):
        assert result[f"{phase}_requests_per_s"] == pytest.approx(3 / result[f"{phase}_wall_s"])
        assert 0 < result[f"{phase}_p50_ttft_s"] <= result[f"{phase}_p95_latency_s"]
        assert 0 < result[f"{phase}_tokens_per_s"]  # reply tokens counted from the streamed usage
    assert result["batching_speedup"] == pytest.approx(result["concurrent_requests_per_s"]
                                                       / result["one_at_a_time_requests_per_s"])


def test_train_reports_speedups_and_the_memory_of_full_lora_and_fsdp_runs(tiny_dirs, personachat_file, tmp_path,
                                                                         monkeypatch):
    compile_flag = ["--compile"] if has_cxx_compiler() else []  # torch.compile needs one
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = bench.main(["train", "--model_checkpoint", tiny_dirs["llama"], "--dataset_path", personachat_file,
                         "--dataset_cache", str(tmp_path / "cache"), "--device", "cpu", "--examples", "4",
                         "--batch_size", "2", "--baseline_batches", "1", "--memory_steps", "1", "--max_seq_len", "64",
                         "--max_reply_len", "3", *compile_flag])
    assert list((tmp_path / "tmp").glob("bench_memory_*")) == []  # the memory runs' checkpoints are gone
    assert result["max_reply_len_speedup"] > 0 and 0 < result["candidates_cut_by_max_reply_len"] < 8
    assert result["examples"] == 4 and result["speedup_vs_full_sequences"] > 0
    assert 0 < result["computed_tokens"] < result["non_pad_tokens"]  # the shared context is computed once
    assert result["dtype"] == "float32" and result["bf16_speedup"] > 0
    assert result["fused_adamw_speedup"] > 0
    full, lora, fsdp = (result["memory"][k] for k in ("full", "lora", "fsdp"))
    assert result["memory"]["full_ckpt"]["trainable_parameters"] == full["trainable_parameters"]
    assert full["trainable_parameters"] == full["parameters"] == fsdp["parameters"]  # every parameter trains
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] < lora["parameters"]  # + the adapters
    assert all(0 < v["train_peak_rss_mb"] <= v["peak_rss_mb"] for v in (full, lora, fsdp))  # training: no loading
    profile = result["profile"]  # the same 2 batches once more, under torch.profiler
    assert profile["steps"] == 2 and set(profile["host_ms_per_step"]) == {"forward", "backward", "optimizer", "other"}
    assert all(ms > 0 for phase, ms in profile["host_ms_per_step"].items() if phase != "other")
    names = [name for name, ms, calls in profile["top_host_ops"]]
    assert len(names) == 8 and any(name.startswith("aten::") for name in names)
    assert profile["aten_calls_per_step"] > 100  # a forward, backward and AdamW step of a Llama dispatch many
    assert "device_busy_fraction" not in profile  # a GPU figure
    # one decoder pass either way; packing adds its own few calls (indices, the 4D mask)
    assert result["profile_full_sequences"]["aten_calls_per_step"] < profile["aten_calls_per_step"]
    if compile_flag:  # train.py --compile: inductor's fused kernels stand for most of the elementwise aten calls
        assert result["compile_warmup_seconds"] > 0 and result["compile_speedup"] > 0
        assert result["profile_compiled"]["aten_calls_per_step"] < 0.7 * profile["aten_calls_per_step"]


def test_profile_counts_the_calls_of_one_step_and_orders_ops_by_time(tiny_dirs):
    _, model, layout = load_tokenizer_and_model(tiny_dirs["llama"])
    item = {"instances": [{"input_ids": [5, 6, 7, 8], "token_type_ids": [-1, -1, -2, -2], "mc_token_ids": 3,
                           "lm_labels": [-100, -100, 7, 8], "reply_start": 2},
                          {"input_ids": [5, 6, 9], "token_type_ids": [-1, -1, -2], "mc_token_ids": 2,
                           "lm_labels": [-100, -100, 9], "reply_start": 2}], "mc_labels": 0}
    one = bench.profile_training(model, [([item], layout.pad)], "cpu", None, seconds_unprofiled=1.0)
    two = bench.profile_training(model, [([item], layout.pad)] * 2, "cpu", None, seconds_unprofiled=1.0)
    assert one["steps"] == 1 and two["steps"] == 2
    assert two["aten_calls_per_step"] == pytest.approx(one["aten_calls_per_step"], rel=0.05)  # per step, not total
    assert not any(name.startswith("train/") for name, ms, calls in two["top_host_ops"])  # ops, not the phases


def test_a_gpu_profile_takes_the_phases_from_the_host_and_the_busy_time_from_the_device():
    """A GPU profile (built by hand: no GPU here) holds each phase label twice, the host's range and the device's
    annotation; the phases must come from the host, the busy time from kernels and copies only."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def event(i, name, start, end, device_type, annotation=False):
        return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end, device_type=device_type,
                             is_user_annotation=annotation, use_device="cuda", stack=[], input_shapes=[])

    events = [event(1, "train/forward", 0, 1000, DeviceType.CPU, True),  # 1 ms on the host
              event(2, "aten::mm", 10, 50, DeviceType.CPU),
              event(3, "train/forward", 400, 1400, DeviceType.CUDA, True),  # the device's copy of the label
              event(4, "gemm_kernel", 420, 900, DeviceType.CUDA),  # 0.48 ms
              event(5, "Memcpy HtoD", 950, 970, DeviceType.CUDA)]  # 0.02 ms
    events = EventList(sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end)), use_device="cuda")
    events._build_tree()
    result = bench.summarize_profile(events.key_averages(), steps=1, wall=0.002, seconds_unprofiled=0.001,
                                     on_gpu=True)
    assert result["host_ms_per_step"]["forward"] == pytest.approx(1.0)
    assert result["host_ms_per_step"]["other"] == pytest.approx(1.0)  # 2 ms of wall time in all
    assert result["device_ms_per_step"] == pytest.approx(0.5) and result["device_ops_per_step"] == 2
    assert result["device_busy_fraction"] == pytest.approx(0.5)
    assert [row[0] for row in result["top_kernels"]] == ["gemm_kernel", "Memcpy HtoD"]
    assert [row[0] for row in result["top_host_ops"]] == ["aten::mm"] and result["aten_calls_per_step"] == 1
