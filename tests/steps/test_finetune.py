"""Fine-tuning on real rows (CPU): outputs, seeding, the schedule and clear errors with the tiny
model; the two tests that assert that training learns use the real all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kubetune import tasks
from kubetune.errors import ConfigError, InputError
from kubetune.steps.finetune import FinetuneConfig, FinetuneRun, auto_epochs, finetune
from kubetune.storage.shards import load_split, save_split
from kubetune.training.modeling import resolve_model_dir


@pytest.mark.slow
def test_output_is_a_labelled_safetensors_model(real_trained_model, small_tokens):
    """The SMS quality run: all-MiniLM-L6-v2 fine-tuned with QUICK on 240 real rows learns."""
    trained_model = real_trained_model
    config = json.loads((trained_model / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    files = {p.name for p in trained_model.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert "tokenizer.json" in files  # the tokenizer travels with the weights
    training = json.loads((trained_model / "training.json").read_text())
    assert training["device"] == "cpu" and training["epochs_run"] == 2 and len(training["history"]) == 2
    best = max(training["history"], key=lambda h: h["eval_macro_f1"])
    assert training["best_epoch"] == best["epoch"] and training["best_eval_macro_f1"] == best["eval_macro_f1"]
    # it learned something: eval macro-F1 well above the 0.47 of always answering "ham"
    assert best["eval_macro_f1"] > 0.8


@pytest.fixture(scope="module")
def tiny_tokens(tmp_path_factory, small_tokens):
    """48 train / 16 eval rows of the real tokens: enough to compare two seeded runs quickly."""
    out = tmp_path_factory.mktemp("tiny")
    shutil.copy(small_tokens / "meta.json", out / "meta.json")
    shutil.copytree(small_tokens / "tokenizer", out / "tokenizer")
    for split, n in (("train", 48), ("eval", 16)):
        s = load_split(small_tokens, split)
        save_split(out, split, [s.row(i).tolist() for i in range(n)], s.labels[:n], 1000)
    return out


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_same_seed_same_weights(tiny_tokens, tiny_model_dir, tmp_path):
    cfg = FinetuneConfig(epochs=1, batch_size=8, seed=3)
    finetune(tiny_tokens, tiny_model_dir, tmp_path / "a", cfg)
    finetune(tiny_tokens, tiny_model_dir, tmp_path / "b", cfg)
    finetune(tiny_tokens, tiny_model_dir, tmp_path / "c", FinetuneConfig(epochs=1, batch_size=8, seed=4))
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_a_split_too_big_to_keep_padded_trains_to_the_same_weights(tiny_tokens, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Over CPU_SPLIT_BYTES (DEVICE_SPLIT_BYTES on an accelerator) the train split stays unpadded in host memory and each batch is padded
    when drawn (memory 4 bytes a token, not a row's padded width): the same batches, the same weights."""
    from kubetune.storage import shards
    from kubetune.training import modeling

    cfg = FinetuneConfig(epochs=1, batch_size=8, seed=3, checkpoint_steps=0)
    finetune(tiny_tokens, tiny_model_dir, tmp_path / "resident", cfg)
    assert "kept on cpu: a batch is a gather there" in capsys.readouterr().out
    monkeypatch.setattr(modeling, "CPU_SPLIT_BYTES", 1024)
    finetune(tiny_tokens, tiny_model_dir, tmp_path / "per-batch", cfg)
    assert "> 0 MB: kept unpadded (0 MB of token ids, in host memory)" in capsys.readouterr().out
    monkeypatch.setattr(shards, "MMAP_BYTES", 0)  # the ids read per batch from an unlinked file
    finetune(tiny_tokens, tiny_model_dir, tmp_path / "mapped", cfg)
    assert "of token ids, on disk), each batch padded when drawn" in capsys.readouterr().out
    monkeypatch.setattr(modeling, "CPU_SPLIT_BYTES", 2**31)
    finetune(tiny_tokens, tiny_model_dir, tmp_path / "resident-from-disk", cfg)
    runs = [weights(tmp_path / name) for name in ("resident", "per-batch", "mapped", "resident-from-disk")]
    assert all(torch.equal(runs[0][k], other[k]) for other in runs[1:] for k in runs[0])


def test_a_split_on_disk_is_the_same_split(small_tokens, monkeypatch):
    """Over MMAP_BYTES the ids (and per-token labels) stay in an unlinked temporary file, read a slice
    at a time: equal to the in-memory split, and nothing is left in the temporary folder."""
    import os
    import tempfile

    import numpy as np

    from kubetune.storage import shards

    before = set(os.listdir(tempfile.gettempdir()))
    plain = shards.load_split(small_tokens, "train")
    mapped = shards.load_split(small_tokens, "train", mmap_bytes=0)
    assert isinstance(mapped.ids, shards.DiskArray) and isinstance(plain.ids, np.ndarray)
    assert np.array_equal(plain.ids, np.asarray(mapped.ids)) and np.array_equal(plain.offsets, mapped.offsets)
    assert all(np.array_equal(plain.row(i), mapped.row(i)) for i in (0, 7, len(plain) - 1))
    assert np.array_equal(plain.labels, mapped.labels)
    assert set(os.listdir(tempfile.gettempdir())) == before


def test_best_epoch_and_early_stopping(tiny_tokens, tiny_model_dir, tmp_path, monkeypatch):
    import kubetune.steps.finetune as ft

    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95])  # best at epoch 2, then two epochs without gain

    def fake_scores(*args, **kwargs):  # stands in for the eval split's real scores
        v = next(scores)
        return {"accuracy": v, "macro_f1": v}

    monkeypatch.setattr(ft, "eval_scores", fake_scores)
    result = finetune(tiny_tokens, tiny_model_dir, tmp_path / "m", FinetuneConfig(epochs=5, batch_size=16, early_stopping_patience=2))
    assert result["epochs_run"] == 4 and result["best_epoch"] == 2 and result["best_eval_macro_f1"] == 0.9


def test_epochs_from_the_data_size():
    """epochs=0 (the default): enough epochs for the task's minimum of optimizer steps, capped; full-size
    data (the full SMS train split is 140 steps of 32) keeps 1 epoch; --epochs N is taken as given."""
    seq = tasks.get("sequence-classification")
    assert (seq.auto_min_steps, seq.auto_max_epochs) == (100, 10)
    assert auto_epochs(140, 0, seq)[0] == 1 and auto_epochs(100, 0, seq)[0] == 1  # the full SMS run is unchanged
    assert auto_epochs(13, 0, seq) == (8, "auto: 13 steps per epoch < 100, so 8 epochs = 104 steps")  # --limit 500
    assert auto_epochs(8, 0, seq) == (10, "auto: 8 steps per epoch < 100, so 10 epochs = 80 steps (capped)")  # --limit 300
    assert auto_epochs(99, 0, seq)[0] == 2 and auto_epochs(1, 0, seq)[0] == 10
    assert auto_epochs(13, 1, seq) == (1, "set by --epochs") and auto_epochs(500, 4, seq)[0] == 4
    for name in ("pair-classification", "multiple-choice"):  # sequence classification of pairs / choices: the same rule
        assert (tasks.get(name).auto_min_steps, tasks.get(name).auto_max_epochs) == (100, 10)


def test_ner_gets_more_steps():
    """NER (9 tags per word) needs more steps than a label per text: at least 400, at most 30 epochs.
    The full CoNLL-2003 train split (14,041 sentences, 439 steps of 32) keeps 1 epoch."""
    ner = tasks.get("token-classification")
    assert (ner.auto_min_steps, ner.auto_max_epochs) == (400, 30)
    assert auto_epochs(10, 0, ner) == (30, "auto: 10 steps per epoch < 400, so 30 epochs = 300 steps (capped)")  # --limit 300
    assert auto_epochs(47, 0, ner) == (9, "auto: 47 steps per epoch < 400, so 9 epochs = 423 steps")  # --limit 1500
    assert auto_epochs(439, 0, ner) == (1, "auto: 439 steps per epoch >= 400")  # all of CoNLL-2003
    assert auto_epochs(6, 0, ner) == (30, "auto: 6 steps per epoch < 400, so 30 epochs = 180 steps (capped)")
    assert auto_epochs(47, 5, ner) == (5, "set by --epochs")


def test_finetune_takes_the_ner_minimum(tmp_path, tiny_model_dir):
    """finetune reads the minimum and the cap from the task of the tokens: 60 CoNLL sentences at
    batch 8 are 8 steps per epoch, so NER trains 30 epochs (capped, 240 steps), and early stopping
    waits for 200 steps (a sequence split of that size would get 13 epochs and wait for 50)."""
    from kubetune.steps.tokenize import TokenizeConfig, tokenize
    from kubetune.steps.validate import ValidateConfig, validate

    report, _ = validate("builtin:conll2003", "", "", ValidateConfig(task="token-classification", limit=60), tmp_path / "ds")
    assert report.passed
    tokenize(tmp_path / "ds", tiny_model_dir, tmp_path / "tok", TokenizeConfig(max_length=32), store=None)
    run = FinetuneRun(tmp_path / "tok", tiny_model_dir, FinetuneConfig(batch_size=8), torch.device("cpu"), ft_world())
    assert (run.steps_per_epoch, run.epochs, run.min_steps_before_stop) == (8, 30, 200)
    assert run.epochs_reason == "auto: 8 steps per epoch < 400, so 30 epochs = 240 steps (capped)"
    fixed = FinetuneRun(tmp_path / "tok", tiny_model_dir, FinetuneConfig(epochs=3, batch_size=8), torch.device("cpu"), ft_world())
    assert (fixed.epochs, fixed.min_steps_before_stop) == (3, 0)


def test_default_schedule_on_few_steps(tiny_tokens, tiny_model_dir):
    """48 train rows at batch 8 = 6 steps per epoch: the default trains 10 epochs (60 steps), warms up
    over the first 10% of them, then decays linearly to 0 at the last step."""
    run = FinetuneRun(tiny_tokens, tiny_model_dir, FinetuneConfig(batch_size=8), torch.device("cpu"), ft_world())
    assert (run.steps_per_epoch, run.epochs) == (6, 10)
    lrs = []
    for _ in range(60):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()
        run.scheduler.step()
    peak = FinetuneConfig().learning_rate
    assert lrs[0] == 0 and lrs[6] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:]))  # decays every step after the warm-up
    assert run.optimizer.param_groups[0]["lr"] == 0  # reaches 0 after the 60th step, not before


@pytest.mark.slow
def test_the_default_epochs_learn_a_small_split(tiny_tokens, model_dir, tmp_path):
    """1 epoch of a small split is a handful of steps that learns nothing (a 500-row sample trained
    13 steps and always answered "ham"); the default epochs=0 trains enough steps to learn it."""
    result = finetune(tiny_tokens, model_dir, tmp_path / "m", FinetuneConfig(batch_size=8, checkpoint_steps=0))
    assert (result["epochs"], result["steps_per_epoch"]) == (10, 6) and result["epochs_reason"].startswith("auto: 6 steps")
    eval_labels = load_split(tiny_tokens, "eval").labels
    assert 0 < eval_labels.sum() < len(eval_labels)  # both classes: always answering one scores macro-F1 < 0.5
    assert result["best_eval_macro_f1"] > 0.8, result["history"]


def test_auto_epochs_wait_for_enough_steps_before_early_stopping(tiny_tokens, tiny_model_dir, tmp_path, monkeypatch):
    """A small split may score one class for a few epochs before it learns: with epochs chosen from
    the data size, epochs before the task's auto_min_steps // 2 steps do not count towards early stopping."""
    import kubetune.steps.finetune as ft

    monkeypatch.setattr(ft, "eval_scores", lambda *a, **k: {"accuracy": 0.87, "macro_f1": 0.47})  # "always ham", every epoch
    monkeypatch.setattr(ft.FinetuneRun, "train_epoch", lambda self, epoch, save: None)  # what is tested is the stopping rule
    # 48 rows at batch 4: 12 steps per epoch, 9 epochs; epochs 1-4 are < 50 steps, 5 and 6 count, stop after 6
    auto = finetune(tiny_tokens, tiny_model_dir, tmp_path / "a", FinetuneConfig(batch_size=4, checkpoint_steps=0))
    assert (auto["epochs"], auto["epochs_run"], auto["best_epoch"]) == (9, 6, 1)
    fixed = finetune(tiny_tokens, tiny_model_dir, tmp_path / "b", FinetuneConfig(epochs=9, batch_size=4, checkpoint_steps=0))
    assert (fixed["epochs"], fixed["epochs_run"]) == (9, 3)  # --epochs N: the plain rule, 2 epochs without gain


def ft_world():
    from kubetune.training.parallel import World

    return World()


def test_clear_errors(tmp_path, tiny_tokens):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda was requested but torch sees no CUDA device"):
            finetune(tiny_tokens, tmp_path, tmp_path / "o", FinetuneConfig(device="cuda"))
    with pytest.raises(InputError, match="is not a transformers model folder \\(no config.json\\)"):
        resolve_model_dir(str(tmp_path), None, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(InputError, match="not a transformers model that can classify sequences"):
        finetune(tiny_tokens, tmp_path, tmp_path / "o", FinetuneConfig())
    with pytest.raises(ConfigError, match="selection_metric='loss'"):
        FinetuneConfig(selection_metric="loss").check()
    with pytest.raises(ConfigError, match="epochs=-1: train at least 1 epoch \\(0: chosen from the data size\\)"):
        FinetuneConfig(epochs=-1).check()


def test_predictions_match_plain_transformers(trained_model, small_dataset, small_tokens):
    """Our shard batching (length-sorted, padded to x8) gives the same logits as tokenizer padding."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune.training.modeling import predict_logits

    model = AutoModelForSequenceClassification.from_pretrained(trained_model).eval()
    meta = json.loads((small_tokens / "meta.json").read_text())
    ours = predict_logits(model, load_split(small_tokens, "test"), batch_size=16, pad_id=meta["pad_token_id"],
                          input_names=meta["model_input_names"], device=torch.device("cpu"))
    texts = pd.read_parquet(small_dataset / "test.parquet")["text"].tolist()
    tokenizer = AutoTokenizer.from_pretrained(trained_model)
    with torch.no_grad():
        plain = model(**tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits.numpy()
    assert np.abs(ours - plain).max() < 1e-4
