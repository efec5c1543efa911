import copy
import os
import subprocess
import sys
import time

import pytest
import torch
from ignite.engine import Engine, Events

from conftest import ROOT, make_personachat
from inputs import DoubleHeadDataset, collate
from layouts import TransferTransfoLayout
from modeling import DoubleHeads, load_tokenizer_and_model
from tokenized import tokenize_dialogs
from training import (QUIET_STOP, StepsBar, Throughput, amp_dtype, linear_lr, make_inference, make_update,
                      slow_bf16)

CPU = torch.device("cpu")


@pytest.fixture
def setup(tiny_dirs):
    torch.manual_seed(0)
    tokenizer, model, layout = load_tokenizer_and_model(tiny_dirs["llama"])
    model = DoubleHeads(model.lm, model.speaker_ids.tolist(), mc_dropout=0.0)  # no dropout: exact comparisons
    data = tokenize_dialogs(make_personachat(reply_len=4), tokenizer)  # equal reply lengths
    ds = DoubleHeadDataset(data, "train", TransferTransfoLayout(tokenizer), num_candidates=2)
    items = [ds[i] for i in range(4)]
    return model, items, TransferTransfoLayout(tokenizer).pad


def run_updates(model, batches, accumulation_steps, dtype=None, scaler=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    engine = Engine(make_update(model, optimizer, scaler, CPU, dtype, accumulation_steps))
    engine.run(batches, max_epochs=1)
    return engine.state.output


def test_accumulating_k_batches_of_b_equals_one_batch_of_k_times_b(setup):
    model, items, pad = setup
    accumulated, single = copy.deepcopy(model), copy.deepcopy(model)
    run_updates(accumulated, [collate(items[:2], pad), collate(items[2:], pad)], accumulation_steps=2)
    run_updates(single, [collate(items, pad)], accumulation_steps=1)
    moved = 0
    for (name, a), b, before in zip(accumulated.named_parameters(), single.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
        moved += not torch.equal(a, before)
    assert moved > 0


def test_gradient_checkpointing_gives_the_same_step(setup):
    model, items, pad = setup
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    checkpointed.lm.gradient_checkpointing_enable()
    run_updates(plain, [collate(items, pad)], 1)
    run_updates(checkpointed, [collate(items, pad)], 1)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_throughput_counts_optimizer_steps_and_non_pad_tokens_of_training_alone(setup):
    model, items, pad = setup
    batches = [collate(items[:2], pad), collate(items[2:], pad)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(make_update(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), CPU, None, 2))
    throughput = Throughput(accumulation_steps=2).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: time.sleep(1.0))  # stands for validation
    engine.run(batches, max_epochs=1)
    speed = throughput.compute()
    assert throughput.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert throughput.tokens < sum(b["attention_mask"].numel() for b in batches)  # padding is not counted
    assert speed["train_seconds"] < 1.0  # the 2 s of sleeps after the iterations are left out (a loaded CPU's margin)
    assert speed["steps_per_s"] == pytest.approx(1 / speed["train_seconds"])
    assert speed["tokens_per_s"] == pytest.approx(throughput.tokens / speed["train_seconds"])


def test_no_optimizer_step_before_the_accumulation_window_closes(setup):
    model, items, pad = setup
    before = copy.deepcopy(model)
    run_updates(model, [collate(items[:2], pad)], accumulation_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_bf16_autocast_trains_on_cpu(setup):
    model, items, pad = setup
    fp32, bf16 = copy.deepcopy(model), copy.deepcopy(model)
    out32 = run_updates(fp32, [collate(items, pad)], 1)
    out16 = run_updates(bf16, [collate(items, pad)], 1, dtype=torch.bfloat16)
    assert out16["loss"] != out32["loss"]  # autocast really ran in bfloat16
    assert out16["loss"] == pytest.approx(out32["loss"], rel=0.02)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(bf16.parameters(), model.parameters()))


def test_fp16_with_grad_scaler_steps_on_cpu(setup):
    model, items, pad = setup
    fp32, fp16 = copy.deepcopy(model), copy.deepcopy(model)
    out32 = run_updates(fp32, [collate(items, pad)], 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    out16 = run_updates(fp16, [collate(items, pad)], 1, dtype=amp_dtype("O1"), scaler=scaler)
    assert out16["loss"] != out32["loss"] and out16["loss"] == pytest.approx(out32["loss"], rel=0.02)  # in float16
    assert scaler.get_scale() == 2.0 ** 8  # finite gradients: the step was taken, the scale kept
    for a, b, before in zip(fp16.parameters(), fp32.parameters(), model.parameters()):  # the step of fp32, unscaled
        assert torch.allclose(a - before, b - before, atol=1e-3, rtol=0.05)
    assert any(not torch.equal(a, b) for a, b in zip(fp16.parameters(), model.parameters()))


def test_linear_lr_warms_up_then_decays_and_never_sits_at_zero():
    assert [linear_lr(s, 1.0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [linear_lr(s, 1.0, 4, warmup_steps=2) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    assert linear_lr(0, 1.0, 1, warmup_steps=1) == 1.0


@pytest.mark.parametrize("value, dtype", [("", None), ("O0", None), ("O1", torch.float16), ("O2", torch.float16),
                                          ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_flag_values(value, dtype):
    assert amp_dtype(value) == dtype


def test_unknown_fp16_value_is_refused():
    with pytest.raises(ValueError, match="--fp16 'O5'"):
        amp_dtype("O5")


def test_non_finite_loss_stops_with_the_step_named(setup):
    model, items, pad = setup
    with torch.no_grad():
        model.mc_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"loss is nan at iteration 1 \(before the first optimizer step\)"):
        run_updates(model, [collate(items, pad)], 2)


def test_inference_returns_token_nll_and_mc_logits(setup):
    model, items, pad = setup
    batch = collate(items, pad)
    out = make_inference(model, CPU)(None, batch)
    nll_sum, count = out["nll"]
    assert count.item() == 4 * 5  # 4 gold replies of 4 words plus <eos>
    assert nll_sum.item() > 0 and out["mc"][0].shape == (4, 2)
    assert out["mc"][1].tolist() == [1, 1, 1, 1]


PEAK_PROBE = """
import torch
from training import peak_memory, reset_peak_memory
big = torch.ones(128 * 2**20)  # 512 MiB, then freed: a peak of loading, say
del big
peak_before = reset_peak_memory()
before = peak_memory(peak_before)
assert before["train_peak_rss_mb"] <= before["peak_rss_mb"] - 200 and before["peak_rss_mb"] == peak_before, before
grown = torch.ones(32 * 2**20)  # 128 MiB held during "training"
after = peak_memory(peak_before)
assert after["train_peak_rss_mb"] >= before["train_peak_rss_mb"] + 100, (before, after)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak RSS reset only")
def test_the_training_peak_leaves_out_what_came_before_the_reset():
    # in a fresh process: in this one, earlier tests' freed memory would serve the allocations without new pages
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("last_iteration, totals", [(13, [10, 3]), (None, [10, 10]), (20, [10, 10])])
def test_steps_bar_ends_where_max_steps_ends_the_run(last_iteration, totals):
    engine = Engine(lambda engine, batch: {"loss": 0.0})
    bar = StepsBar(last_iteration, persist=False, disable=True)
    bar.attach(engine, output_transform=lambda o: o)
    seen = {}

    @engine.on(Events.ITERATION_COMPLETED)
    def note_total(engine):
        seen[engine.state.epoch] = bar.pbar.total
        if engine.state.iteration == last_iteration:
            engine.terminate()

    engine.run(range(10), max_epochs=2)
    assert [seen[e] for e in sorted(seen)] == totals


@pytest.mark.parametrize("stop, logged", [(KeyboardInterrupt, False), (ValueError, True)])
def test_a_stop_the_user_asked_for_is_not_logged_as_an_error(stop, logged, caplog):
    def process(engine, batch):
        raise stop("boom")

    engine = Engine(process)
    engine.logger.addFilter(QUIET_STOP)
    try:
        with pytest.raises(stop):
            engine.run([0])
    finally:
        engine.logger.removeFilter(QUIET_STOP)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("terminating due to exception" in m for m in errors) is logged, errors


@pytest.mark.parametrize("capabilities, slow", [({"avx2": True}, True), ({"avx2": True, "avx512_bf16": True}, False),
                                                ({"amx_bf16": True}, False), ({"bf16": True}, False)])
def test_bf16_on_a_cpu_without_bf16_instructions_is_called_slow(capabilities, slow, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert slow_bf16(CPU, torch.bfloat16) is slow
    assert not slow_bf16(CPU, None) and not slow_bf16(CPU, torch.float16)
    assert not slow_bf16(torch.device("cuda"), torch.bfloat16)
