"""Fine-tune robustness on real data with the tiny model (tests/helpers/tiny.py; CPU): SIGKILL and resume, LoRA, 2-process DDP
with torchrun, and the errors a user hits (label mismatch with a checkpoint, out of memory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubetune.errors import ConfigError
from kubetune.steps.finetune import FinetuneConfig, finetune, out_of_memory
from kubetune.storage.shards import load_split, save_split
from kubetune.storage.store import LocalStore
from kubetune.training.checkpoint import Checkpoints

ROOT = Path(__file__).resolve().parents[2]


def subset(src: Path, out: Path, n_train: int, n_eval: int) -> Path:
    shutil.copy(src / "meta.json", out / "meta.json")
    shutil.copytree(src / "tokenizer", out / "tokenizer")
    for split, n in (("train", n_train), ("eval", n_eval)):
        s = load_split(src, split)
        save_split(out, split, [s.row(i).tolist() for i in range(n)], s.labels[:n], 1000)
    return out


@pytest.fixture(scope="module")
def tokens64(tmp_path_factory, small_tokens):
    """64 train / 16 eval rows of the real SMS tokens (max_length 64): 8 steps of 8 per epoch."""
    return subset(small_tokens, tmp_path_factory.mktemp("t64"), 64, 16)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def step_cmd(tokens: Path, tiny_model_dir: Path, out: Path, store: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "kubetune.steps.finetune", "--tokens", str(tokens), "--model", str(tiny_model_dir), "--out", str(out),
            "--store", str(store), "--run-id", run_id, "--epochs", "2", "--batch-size", "8", "--learning-rate", "2e-4",
            "--seed", "5", "--checkpoint-steps", "4"]


def run_env(tmp: Path | None = None) -> dict:
    """The step's environment; `tmp`: its TMPDIR, for a process the test kills (its scratch stays in the test's folder)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return env


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(small_tokens, tiny_model_dir, tmp_path):
    # the whole 239-row train split: 30 steps per epoch, so the kill lands mid-epoch although the tiny
    # model trains a step in milliseconds (the first checkpoint is at step 4)
    store = tmp_path / "store"
    cmd = step_cmd(small_tokens, tiny_model_dir, tmp_path / "killed", store, "killed")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(tmp_path / "tmp"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint saved (epoch 1 step" in line:  # a mid-epoch checkpoint is in the store: kill now
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert (store / "runs/killed/checkpoints/finetune/state.pt").is_file()
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(r"resumed from checkpoint .*state\.pt: epoch 1, step \d+/30", resumed.stdout), resumed.stdout
    record = json.loads((store / "runs/killed/steps/finetune.json").read_text())
    assert record["status"] == "succeeded" and record["outputs"]["resumed_from"]["epoch"] == 1
    assert not (store / "runs/killed/checkpoints/finetune/state.pt").exists()  # the run finished: nothing to resume

    fresh = subprocess.run(step_cmd(small_tokens, tiny_model_dir, tmp_path / "fresh", store, "fresh"), cwd=ROOT, env=run_env(),
                           capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "resumed" not in fresh.stdout
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "fresh")
    assert a.keys() == b.keys()
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{len(differ)} of {len(a)} tensors differ; max |diff| per tensor: {differ}"
    history = [json.loads((tmp_path / d / "training.json").read_text())["history"] for d in ("killed", "fresh")]
    assert history[0] == history[1] and len(history[0]) == 2


@pytest.mark.parametrize("keep", [False, True])
def test_checkpoints_are_removed_after_a_successful_finetune_unless_kept(tokens64, tiny_model_dir, tmp_path, keep):
    """A default run kept ~350 MB of optimizer state per run in the store forever (issue 12)."""
    from kubetune.steps.finetune import run_step

    store = tmp_path / "store"
    cfg = FinetuneConfig(epochs=1, batch_size=32, checkpoint_steps=0, keep_checkpoints=keep)
    run_step(store_uri=str(store), run_id="r", tokens_dir=tokens64, model_uri=str(tiny_model_dir), out_dir=tmp_path / "m", cfg=cfg)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (store / "runs/r/checkpoints/finetune/state.pt").is_file() == keep
    assert json.loads((store / "runs/r/steps/finetune.json").read_text())["status"] == "succeeded"


def test_checkpoint_from_other_labels_or_settings_is_refused(tokens64, tiny_model_dir, tmp_path):
    ckpt = Checkpoints(LocalStore(tmp_path / "store"), "runs/r/checkpoints/finetune")
    cfg = FinetuneConfig(epochs=1, batch_size=32, checkpoint_steps=0)
    finetune(tokens64, tiny_model_dir, tmp_path / "m", cfg, checkpoints=ckpt)
    assert ckpt.load()["progress"]["epoch"] == 2  # the end-of-epoch checkpoint

    other = tmp_path / "three-labels"
    shutil.copytree(tokens64, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "labels": ["ham", "spam", "promo"]}))
    with pytest.raises(ConfigError, match=r"trained for 2 labels \['ham', 'spam'\], but these tokens have 3 labels"):
        finetune(other, tiny_model_dir, tmp_path / "m3", cfg, checkpoints=ckpt)
    with pytest.raises(ConfigError, match=r"comes from other settings \(learning_rate: checkpoint 0\.0001, now 0\.0003\)"):
        finetune(tokens64, tiny_model_dir, tmp_path / "m4", FinetuneConfig(epochs=1, batch_size=32, learning_rate=3e-4), checkpoints=ckpt)


def test_out_of_memory_suggests_smaller_batch_with_accumulation():
    err = out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), FinetuneConfig(batch_size=64),
                        torch.device("cuda"))
    assert isinstance(err, ConfigError)
    assert "out of GPU memory at batch_size=64: use --batch-size 32 --grad-accum-steps 2" in str(err)
    assert out_of_memory(RuntimeError("shape mismatch"), FinetuneConfig(), torch.device("cpu")) is None


def test_lora_trains_adapters_only_and_saves_a_merged_plain_model(tokens64, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    ckpt = Checkpoints(LocalStore(tmp_path / "store"), "runs/lora/checkpoints/finetune")
    cfg = FinetuneConfig(epochs=2, batch_size=8, learning_rate=2e-3, peft="lora", lora_rank=8, lora_alpha=16,
                         lora_target_modules="query,value", checkpoint_steps=0)
    result = finetune(tokens64, tiny_model_dir, tmp_path / "m", cfg, checkpoints=ckpt)
    share = result["trainable_parameters"] / result["total_parameters"]
    assert 0 < share < 0.02, share  # adapters + head: well under 2% of the model

    saved = ckpt.load()["weights"]
    assert saved and all("lora_" in k or "classifier" in k for k in saved), sorted(saved)[:8]

    out = weights(tmp_path / "m")
    assert not any("lora" in k or "base_model" in k for k in out), "adapters were not merged into the base model"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).state_dict()
    q, ffn = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(out[q], base[q])  # the adapter is in the targeted weight
    assert torch.equal(out[ffn], base[ffn])  # untargeted weights are the pretrained ones
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label == {0: "ham", 1: "spam"}
    # the adapters learn (a few steps on 160 rows are too few to judge eval quality; the benchmark does that)
    first, second = (h["train_loss"] for h in result["history"])
    assert second < first, result["history"]


def test_lora_for_ner_uses_the_token_task_type(tmp_path, tiny_model_dir):
    """LoRA takes the task's peft task type: a token classifier gets PEFT's token-classification
    wrapper (and its token head trains), not the sequence one every task used to get."""
    from transformers import AutoModelForTokenClassification

    from kubetune import tasks
    from kubetune.steps.tokenize import TokenizeConfig, tokenize
    from kubetune.steps.validate import ValidateConfig, validate
    from kubetune.training.modeling import add_lora, load_classifier

    ner = tasks.get("token-classification")
    report, meta = validate("builtin:conll2003", "", "", ValidateConfig(task=ner.name, limit=60), tmp_path / "ds")
    assert report.passed
    tokenize(tmp_path / "ds", tiny_model_dir, tmp_path / "tok", TokenizeConfig(max_length=32), store=None)
    cfg = FinetuneConfig(epochs=2, batch_size=8, learning_rate=3e-3, peft="lora", lora_target_modules="query,value", checkpoint_steps=0)
    wrapped = add_lora(load_classifier(tiny_model_dir, meta["labels"], ner), cfg, ner)
    assert type(wrapped).__name__ == "PeftModelForTokenClassification"
    trainable = {k for k, p in wrapped.named_parameters() if p.requires_grad}
    assert any("classifier" in k for k in trainable) and all("lora_" in k or "classifier" in k for k in trainable)

    result = finetune(tmp_path / "tok", tiny_model_dir, tmp_path / "m", cfg)
    assert result["task"] == ner.name and 0 < result["trainable_parameters"] / result["total_parameters"] < 0.02
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "BertForTokenClassification" and list(model.config.id2label.values()) == meta["labels"]
    first, second = (h["train_loss"] for h in result["history"])
    assert second < first, result["history"]


def torchrun_finetune(tokens: Path, model: Path, out: Path, store: Path, *flags: str) -> subprocess.CompletedProcess:
    """The finetune step as 2 torchrun CPU processes (gloo), run id "ddp"; it must succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kubetune.steps.finetune",
           "--tokens", str(tokens), "--model", str(model), "--out", str(out), "--store", str(store), "--run-id", "ddp", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env={**run_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tokens64, tiny_model_dir, tmp_path):
    out, store = tmp_path / "ddp", tmp_path / "store"
    proc = torchrun_finetune(tokens64, tiny_model_dir, out, store, "--epochs", "1", "--batch-size", "8", "--learning-rate", "2e-4",
                             "--checkpoint-steps", "2", "--keep-checkpoints", "true")  # the test reads the gathered checkpoint afterwards
    assert "batch 8 x 2 processes" in proc.stdout and "4 steps" in proc.stdout  # 8 batches shared by 2 ranks
    training = json.loads((out / "training.json").read_text())
    assert training["processes"] == 2 and training["epochs_run"] == 1
    assert 0 <= training["history"][0]["eval_macro_f1"] <= 1
    ckpt = torch.load(store / "runs/ddp/checkpoints/finetune/state.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["fingerprint"]["world_size"] == 2
    record = json.loads((store / "runs/ddp/steps/finetune.json").read_text())  # written once, by rank 0
    assert record["status"] == "succeeded" and record["outputs"]["processes"] == 2

    from transformers import AutoModelForSequenceClassification

    from kubetune.training.modeling import predict_logits

    meta = json.loads((tokens64 / "meta.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(out)
    logits = predict_logits(model, load_split(tokens64, "eval"), batch_size=32, pad_id=meta["pad_token_id"],
                            input_names=meta["model_input_names"], device=torch.device("cpu"))
    assert logits.shape == (16, 2) and torch.isfinite(torch.from_numpy(logits)).all()
