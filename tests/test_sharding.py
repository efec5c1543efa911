"""train.py --fsdp under torchrun with gloo on CPU: the weights of plain DDP, whole checkpoints, resume, LoRA."""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import train as train_script
from conftest import ROOT, run_torchrun
from test_train import read_metrics, tiny_args
from utils import torchrun_launcher


def torchrun(args, tmp_path, processes=2):
    cmd = [sys.executable, *torchrun_launcher(processes), os.path.join(ROOT, "train.py"), *args]
    done = run_torchrun(cmd)
    if done.returncode:
        (tmp_path / "torchrun.log").write_text(done.stderr)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "it/s" not in line)[-4000:]
    return done


def assert_same_tensors(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), (name, (a[name] - b[name]).abs().max())


def weights(run_dir, *names):
    """A run's saved tensors, except the MC head's bias: a constant added to every candidate's logit leaves the
    softmax unchanged, so its gradient is zero but for rounding, which Adam then scales into whole steps."""
    return {f"{n}/{k}": v for n in names for k, v in load_file(os.path.join(run_dir, n)).items()
            if k != "mc_head.bias"}


def test_fsdp_takes_the_steps_of_ddp_and_saves_whole_checkpoints_that_resume(tiny_dirs, personachat_file, tmp_path):
    common = ("--max_steps", "3", "--n_epochs", "2")
    torchrun(tiny_args(tiny_dirs, personachat_file, tmp_path, "ddp", *common), tmp_path)
    done = torchrun(tiny_args(tiny_dirs, personachat_file, tmp_path, "fsdp", "--fsdp", *common), tmp_path)
    assert "returned a view tensor" not in done.stderr  # FSDP2's warning on a module's output that is a view
    files = ("model.safetensors", "double_heads.safetensors")
    ddp, fsdp = weights(tmp_path / "ddp", *files), weights(tmp_path / "fsdp", *files)
    assert_same_tensors(fsdp, ddp)  # whole tensors, the same values to fp32 tolerance
    assert read_metrics(tmp_path / "fsdp")[-1]["ppl"] == pytest.approx(read_metrics(tmp_path / "ddp")[-1]["ppl"],
                                                                       rel=1e-4)
    state = torch.load(tmp_path / "fsdp" / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert state["optimizer"]["state"]  # the whole optimizer state was gathered and saved

    torchrun(["--resume", str(tmp_path / "fsdp"), "--max_steps", "5"], tmp_path)  # FSDP again, from the saved flags
    torchrun(["--resume", str(tmp_path / "ddp"), "--max_steps", "5"], tmp_path)
    assert [m["step"] for m in read_metrics(tmp_path / "fsdp")] == [3, 5]
    assert_same_tensors(weights(tmp_path / "fsdp", *files), weights(tmp_path / "ddp", *files))

    # a plain run's optimizer state is not a sharded one's: refused; a sharded run goes on in one process
    cmd = [sys.executable, *torchrun_launcher(2), os.path.join(ROOT, "train.py"), "--resume", str(tmp_path / "ddp"),
           "--fsdp", "--max_steps", "6"]
    refused = run_torchrun(cmd)
    assert refused.returncode and "--fsdp: " in refused.stderr and "resume it without --fsdp" in refused.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "ddp")] == [3, 5]
    with pytest.raises(train_script.RunError, match=r"resume with 2 processes and --train_batch_size 2, or with "
                                                    r"--train_batch_size 4 on these 1$"):
        train_script.train(["--resume", str(tmp_path / "fsdp"), "--no-fsdp", "--max_steps", "6"])
    train_script.train(["--resume", str(tmp_path / "fsdp"), "--no-fsdp", "--max_steps", "6",
                        "--train_batch_size", "4"])  # one process: batches twice the size keep the epochs' length
    assert [m["step"] for m in read_metrics(tmp_path / "fsdp")] == [3, 5, 6]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fsdp_with_lora_gradient_checkpointing_and_mixed_precision_saves_an_fp32_adapter_run(
        tiny_dirs, personachat_file, tmp_path, dtype):
    # 8 steps: fp16's GradScaler skips its first steps while it lowers its scale to where the gradients are finite
    torchrun(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--fsdp", "--lora_r", "4", "--fp16", dtype,
                       "--gradient_checkpointing", "--max_steps", "8", "--n_epochs", "1"), tmp_path)
    names = os.listdir(tmp_path / "run")
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    from modeling import load_tokenizer_and_model
    from adapters import has_lora

    _, model, _ = load_tokenizer_and_model(str(tmp_path / "run"))
    assert has_lora(model)
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # trained away from zero
    assert {v.dtype for v in adapter.values()} == {torch.float32}  # computed in 16 bits, the fp32 master weights saved
    assert read_metrics(tmp_path / "run")[-1]["ppl"] < float("inf")


def test_fsdp_needs_torchrun(tiny_dirs, personachat_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit):  # refused with the flags, before the model loads
        train_script.train(tiny_args(tiny_dirs, personachat_file, tmp_path, "run", "--fsdp", "--max_steps", "1"))
    assert "--fsdp: launch with torchrun" in capsys.readouterr().err
