"""Token classification (NER) on the real CoNLL-2003 English data: reading, IOB2 validation and its
rejections, word-piece alignment, entity metrics against seqeval, entity offsets in raw text, and
the whole pipeline under kfp.local."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kubetune import tasks
from kubetune.errors import InputError
from kubetune.pipelines.cli import main
from kubetune.steps.validate import ValidateConfig, validate
from kubetune.storage.shards import IGNORE, load_split
from kubetune.tasks import resolve_metric
from kubetune.tasks.metrics import entity_metrics, entity_spans
from kubetune.validation.tagging import Sentence, read_sentences

TOKEN = "token-classification"


@pytest.fixture(scope="module")
def conll_train():
    return read_sentences("builtin:conll2003", split="train")[0]


@pytest.fixture(scope="module")
def conll_test():
    return read_sentences("builtin:conll2003", split="test")[0]


def write_conll(path, sentences, docstart=True):
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for s in sentences:
        lines += [f"{tok} X X {tag}" for tok, tag in zip(s.tokens, s.tags)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path, sentences):
    path.write_text("".join(json.dumps({"tokens": s.tokens, "tags": s.tags}) + "\n" for s in sentences))
    return path


# ---- reading --------------------------------------------------------------------------------


def test_builtin_conll2003_official_splits(conll_train, conll_test):
    valid = read_sentences("builtin:conll2003", split="eval")[0]
    assert (len(conll_train), len(valid), len(conll_test)) == (14041, 3250, 3453)
    first = conll_train[0]
    assert first.tokens == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert first.tags == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"] and first.line == 3
    assert not any("-DOCSTART-" in s.tokens for s in conll_train)
    assert sum(len(entity_spans(s.tags)) for s in conll_test) == 5648  # the published test entity count


# ---- metrics: seqeval semantics ---------------------------------------------------------------


def test_entity_spans_hand_checked():
    tags = ["I-PER", "I-PER", "O", "B-LOC", "I-ORG", "B-ORG", "B-ORG", "I-ORG", "O", "I-MISC"]
    assert entity_spans(tags) == [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 4, 4), ("ORG", 5, 5), ("ORG", 6, 7), ("MISC", 9, 9)]
    m = entity_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "O", "O", "B-LOC"]])
    assert m["entity_micro_precision"] == 0.5 and m["entity_micro_recall"] == 0.5 and m["token_accuracy"] == 0.75
    assert m["per_type"]["LOC"]["f1"] == 1.0 and m["per_type"]["PER"]["f1"] == 0.0


def test_entity_metrics_match_seqeval_on_corrupted_conll(conll_test):
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    rng = np.random.default_rng(0)
    tagset = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    gold = [s.tags for s in conll_test]
    # 15% of words get a random tag: stray I- tags, type changes, split and merged entities
    pred = [[tagset[rng.integers(9)] if rng.random() < 0.15 else t for t in tags] for tags in gold]
    ours = entity_metrics(gold, pred)
    assert ours["entity_micro_f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
    assert ours["entity_micro_precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert ours["entity_micro_recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
    report = classification_report(gold, pred, output_dict=True)
    assert ours["entity_macro_f1"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-12)
    for kind in ("PER", "ORG", "LOC", "MISC"):
        for ours_key, theirs_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"), ("support", "support")):
            assert ours["per_type"][kind][ours_key] == pytest.approx(report[kind][theirs_key], abs=1e-12), (kind, ours_key)
    assert 0.5 < ours["entity_micro_f1"] < 0.9  # the corruption really changed entities


def test_gate_metric_names_are_task_aware():
    assert resolve_metric(TOKEN, "", "gate metric") == "entity_micro_f1"
    assert resolve_metric("sequence-classification", "", "gate metric") == "macro_f1"
    with pytest.raises(Exception, match="'macro_f1' cannot score a token-classification model: it is a sequence-classification metric"):
        resolve_metric(TOKEN, "macro_f1", "gate metric")


def test_cli_rejects_a_sequence_metric_for_ner(tmp_path, capsys):
    code = main(["run", "--task", TOKEN, "--gate-metric", "accuracy", "--store", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err
    assert "gate_metric='accuracy' cannot score a token-classification model" in err and "entity_micro_f1" in err


# ---- validation -----------------------------------------------------------------------------


def ner_cfg(**kw):
    return ValidateConfig(task=TOKEN, **kw)


def test_valid_conll_files_pass(tmp_path, conll_train, conll_test):
    train = write_conll(tmp_path / "train.conll", conll_train[:120])
    test = write_conll(tmp_path / "test.conll", conll_test[:40])
    report, meta = validate(str(train), "", str(test), ner_cfg(), tmp_path / "ds")
    assert report.passed and meta["task"] == TOKEN and meta["split_made_here"] == ["eval"]
    assert meta["labels"] == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert meta["splits"]["train"]["rows"] + meta["splits"]["eval"]["rows"] == 120 and meta["splits"]["test"]["rows"] == 40
    assert meta["splits"]["test"]["words"] == sum(len(s.tokens) for s in conll_test[:40])
    # the file has 2 header lines: sentence 1 starts on line 3
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "ds" / "test.parquet")
    assert list(frame["tokens"][0]) == conll_test[0].tokens and frame["source_row"][0] == 3


def rejected(tmp_path, train, test=None, **kw) -> str:
    report, meta = validate(str(train), "", str(test) if test else "", ner_cfg(**kw), tmp_path / "ds")
    assert not report.passed and meta is None and not (tmp_path / "ds").exists()
    return report.error_message()


def test_length_mismatch_is_rejected_with_its_line(tmp_path, conll_train):
    sentences = [s for s in conll_train[:50]]
    broken = type(sentences[2])(sentences[2].tokens, sentences[2].tags[:-1], 0)
    msg = rejected(tmp_path, write_jsonl(tmp_path / "train.jsonl", sentences[:2] + [broken] + sentences[3:]))
    n = len(broken.tokens)
    assert (f"train.jsonl: column 'tags': 1 of 50 sentences have a different number of tokens and tags; every token needs "
            f"exactly one tag; e.g. line 3: '{n} tokens, {n - 1} tags'") in msg


def test_invalid_tag_sequence_is_rejected_or_repaired(tmp_path, conll_train):
    sentences = [type(s)(list(s.tokens), list(s.tags), 0) for s in conll_train[:60]]
    sentences[0].tags[0] = "I-ORG"  # "EU" opens sentence 1 with I-ORG: IOB1 style
    train = write_conll(tmp_path / "train.conll", sentences)
    msg = rejected(tmp_path, train)
    assert ("train.conll: column 'tags': 1 of 60 sentences have an I-<type> tag that does not follow B-/I- of the same type; "
            "fix the annotation, or pass --repair-tags to turn it into B-<type> (e.g. IOB1 data); "
            "e.g. line 3: \"token 1 'EU': (sentence start) -> I-ORG\"") in msg

    report, meta = validate(str(train), "", "", ner_cfg(repair_tags=True), tmp_path / "ok")
    assert report.passed and [c.name for c in report.failures("warning")] == ["iob2_sequence_repaired"]
    import pandas as pd

    frames = {s: pd.read_parquet(tmp_path / "ok" / f"{s}.parquet") for s in ("train", "eval", "test")}
    eu = next(f for f in frames.values() if (f["source_row"] == 3).any())
    assert list(eu[eu["source_row"] == 3]["tags"].iloc[0])[0] == "B-ORG"


def test_unseen_and_non_iob2_tags_are_rejected(tmp_path, conll_train, conll_test):
    test = [type(s)(list(s.tokens), list(s.tags), 0) for s in conll_test[:30]]
    test[1].tags[0] = "B-DATE"
    test[4].tags[1] = "PER"
    train = write_conll(tmp_path / "train.conll", conll_train[:80])
    msg = rejected(tmp_path, train, write_conll(tmp_path / "test.conll", test))
    line = 3 + len(test[0].tokens) + 1  # sentence 2 starts after sentence 1 and its blank line
    assert ("test.conll: column 'tags': 1 of 30 sentences have a tag that never occurs in the train file (the model cannot "
            f"predict it); fix the tag or add training examples of it; e.g. line {line}: \"token 1 {test[1].tokens[0]!r}: tag 'B-DATE'\"") in msg
    assert "have a tag that is not IOB2 (O, B-<type> or I-<type>)" in msg and "tag 'PER'" in msg


def test_empty_sentences_and_wrong_builtin(tmp_path, conll_train):
    sentences = list(conll_train[:40]) + [Sentence([], [], 0)]
    report, meta = validate(str(write_jsonl(tmp_path / "t.jsonl", sentences)), "", "", ner_cfg(), tmp_path / "ds")
    assert report.passed and "t.jsonl: column 'tokens': 1 of 41 sentences are empty (no tokens) and were dropped; e.g. line 41" in \
        report.describe(report.failures("warning")[0])
    assert sum(meta["splits"][s]["rows"] for s in meta["splits"]) == 40
    with pytest.raises(InputError, match="builtin:sms-spam is TSV data, which token-classification does not read; use builtin:conll2003"):
        validate("builtin:sms-spam", "", "", ner_cfg(), tmp_path / "x")
    with pytest.raises(InputError, match=r"bad.conll: line 3: expected at least 2 whitespace-separated columns"):
        (tmp_path / "bad.conll").write_text("EU B-ORG\nrejects O\nGerman\n")
        validate(str(tmp_path / "bad.conll"), "", "", ner_cfg(), tmp_path / "y")


# ---- tokenize: word-piece alignment ---------------------------------------------------------


@pytest.fixture(scope="module")
def ner_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ner-dataset")
    report, meta = validate("builtin:conll2003", "", "", ner_cfg(limit=200), out)
    assert report.passed and meta["splits"]["test"]["rows"] == 200
    return out


def test_alignment_labels_first_subtoken_of_each_word(tmp_path, ner_dataset, model_dir):
    import pandas as pd
    from transformers import AutoTokenizer

    from kubetune.steps.tokenize import TokenizeConfig, tokenize

    info = tokenize(ner_dataset, model_dir, tmp_path / "tok", TokenizeConfig(max_length=64), store=None)
    assert info["task"] == TOKEN
    tok = AutoTokenizer.from_pretrained(model_dir)
    frame = pd.read_parquet(ner_dataset / "train.parquet")
    split = load_split(tmp_path / "tok", "train")
    labels = info["labels"]
    assert (split.labels == IGNORE).all() and split.token_labels.shape == split.ids.shape
    checked = 0
    for i, (words, tags) in enumerate(zip(frame["tokens"], frame["tags"])):
        ids, lab = split.row(i), split.row_labels(i)
        assert ids[0] == tok.cls_token_id and lab[0] == IGNORE and lab[-1] == IGNORE
        first = np.flatnonzero(lab != IGNORE)
        if len(ids) < 64:  # untruncated: one label per word, the word's own tag, on a sub-token the word starts with
            assert [labels[k] for k in lab[first]] == list(tags)
            for pos, word in zip(first, words):
                piece = tok.convert_ids_to_tokens(int(ids[pos]))
                assert piece == tok.unk_token or word.lower().startswith(piece), (word, piece)
            checked += 1
    assert checked > 190

    # the training batch: labels padded with IGNORE to exactly the padded ids' shape
    import torch

    from kubetune.training.modeling import DeviceSplit

    index = np.array([0, 5, 17])
    data = DeviceSplit(split, info["pad_token_id"], torch.device("cpu"))
    batch = data.batch(torch.from_numpy(index), data.width(index), info["model_input_names"])
    ids, mask, target = batch["inputs"]["input_ids"].numpy(), batch["inputs"]["attention_mask"].numpy(), batch["labels"].numpy()
    assert target.shape == ids.shape and (target[mask == 0] == IGNORE).all()
    assert (target[0, : split.lengths[0]] == split.row_labels(0)).all()
    assert (ids[0, : split.lengths[0]] == split.row(0)).all()
    # a split too big to keep padded is padded per batch: the same batch
    per_batch = DeviceSplit(split, info["pad_token_id"], torch.device("cpu"), max_bytes=0)
    assert not per_batch.resident and data.resident
    again = per_batch.batch(torch.from_numpy(index), data.width(index), info["model_input_names"])
    assert all(torch.equal(batch["inputs"][k], again["inputs"][k]) for k in batch["inputs"]) and torch.equal(batch["labels"], again["labels"])


def test_token_loss_averages_over_labelled_tokens_only():
    import torch
    import torch.nn.functional as F

    task_loss = tasks.get(TOKEN).loss
    sequence_loss = tasks.get("sequence-classification").loss
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9)
    target = torch.tensor([[IGNORE, 3, IGNORE, 0, IGNORE, IGNORE], [IGNORE, 7, 7, IGNORE, IGNORE, IGNORE]])
    keep = target != IGNORE
    manual = F.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(task_loss(logits, target), manual)
    # the sequence path is unchanged: one label per row
    assert torch.allclose(sequence_loss(logits[:, 0], torch.tensor([1, 2])), F.cross_entropy(logits[:, 0], torch.tensor([1, 2])))


def test_truncation_reports_words_lost(tmp_path, ner_dataset, model_dir):
    import pandas as pd
    from transformers import AutoTokenizer

    from kubetune.steps.tokenize import TokenizeConfig, tokenize

    info = tokenize(ner_dataset, model_dir, tmp_path / "tok", TokenizeConfig(max_length=16), store=None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lost_words = lost_tokens = rows = 0
    for words in pd.read_parquet(ner_dataset / "test.parquet")["tokens"]:
        enc = tok(list(words), is_split_into_words=True)
        if len(enc["input_ids"]) > 16:
            rows += 1
            lost_tokens += len(enc["input_ids"]) - 16
            kept = {w for w in enc.word_ids()[:15] if w is not None}  # 15 positions + [SEP]
            lost_words += len(words) - len(kept)
    stats = info["splits"]["test"]
    assert (stats["truncated_rows"], stats["truncated_tokens"], stats["truncated_words"]) == (rows, lost_tokens, lost_words)
    assert rows > 50


# ---- entities with character offsets --------------------------------------------------------


def test_entity_offsets_on_real_sentences(model_dir, conll_test):
    from transformers import AutoTokenizer

    from kubetune.tasks.token import group_entities, word_spans

    tok = AutoTokenizer.from_pretrained(model_dir)
    checked = 0
    for s in conll_test[:300]:
        text = " ".join(s.tokens)
        spans = word_spans(text)
        if [text[a:b] for a, b in spans] != s.tokens:  # e.g. "U.S." is one CoNLL token, two regex words
            continue
        enc = tok(s.tokens, is_split_into_words=True, return_offsets_mapping=True)
        got = group_entities(text, spans, enc.word_ids(), enc["offset_mapping"], s.tags, [1.0] * len(s.tokens))
        want = [(kind, " ".join(s.tokens[a:b + 1])) for kind, a, b in entity_spans(s.tags)]
        assert [(e["type"], e["text"]) for e in got] == want
        assert all(text[e["start"]:e["end"]] == e["text"] for e in got)
        checked += 1
    assert checked > 200

    # irregular spacing, punctuation glued to words, accents the uncased tokenizer strips
    text = "  José Müller-Lüdenscheidt met\tAT&T's CEO in São Paulo, Brazil. O'Neill"
    spans = word_spans(text)
    words = [text[a:b] for a, b in spans]
    assert words == ["José", "Müller-Lüdenscheidt", "met", "AT&T", "'s", "CEO", "in", "São", "Paulo", ",", "Brazil", ".", "O'Neill"]
    tags = ["B-PER", "I-PER", "O", "B-ORG", "O", "O", "O", "B-LOC", "I-LOC", "O", "B-LOC", "O", "B-PER"]
    enc = tok(words, is_split_into_words=True, return_offsets_mapping=True)
    got = group_entities(text, spans, enc.word_ids(), enc["offset_mapping"], tags, [0.9] * len(words))
    assert [(e["type"], e["text"], e["start"]) for e in got] == [
        ("PER", "José Müller-Lüdenscheidt", 2), ("ORG", "AT&T", 31), ("LOC", "São Paulo", 45), ("LOC", "Brazil", 56), ("PER", "O'Neill", 64)]
    assert got[0]["score"] == pytest.approx(0.9)


# ---- the pipeline end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_ner_pipeline_end_to_end(tmp_path, capsys, conll_test):
    from kubetune.onnx.model import OnnxClassifier
    from kubetune.release import registry
    from kubetune.steps.evaluate import champion_score
    from kubetune.storage.store import open_store

    store = tmp_path / "store"
    args = ["run", "--task", TOKEN, "--limit", "200", "--max-length", "64", "--epochs", "2", "--batch-size", "16",
            "--learning-rate", "3e-4", "--gate-threshold", "0", "--onnx-variants", "fp32,optimized", "--store", str(store), "--run-id", "ner",
            "--keep-kfp-runs", "1",  # the test reads the validate step's dataset from kfp-local
            "--summary", str(tmp_path / "summary.json")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = capsys.readouterr().out
    assert "kubetune run ner: conll2003 from builtin:conll2003" in out and "test: entity micro-F1 " in out
    assert summary["outcome"] == "deployed" and summary["task"] == TOKEN
    assert all(s["status"] == "succeeded" for s in summary["steps"])
    m = summary["metrics"]
    assert set(m["per_type"]) <= {"PER", "ORG", "LOC", "MISC"} and 0 <= m["entity_micro_f1"] <= 1
    assert m["token_accuracy"] > 0.8  # "O" alone is 83% of the words: at least that
    assert summary["gate"]["metric"] == "entity_micro_f1" and summary["gate"]["value"] == m["entity_micro_f1"]
    assert summary["onnx"]["max_abs_diff"] < 1e-3 and summary["onnx"]["argmax_agreement"] >= 0.995

    version_dir = store / "models/conll2003" / summary["deployment"]["version"]
    assert json.loads((version_dir / "kubetune.json").read_text())["task"] == TOKEN
    assert "entity micro-F1" in (version_dir / "MODEL_CARD.md").read_text()
    clf = OnnxClassifier(version_dir)
    texts = [" ".join(s.tokens) for s in conll_test[:20]] + ["", "   ", "Peter Blackburn flew to Brussels on Monday ."]
    results = clf.predict(texts)
    assert len(results) == len(texts) and results[20] == {"entities": []} and results[21] == {"entities": []}
    for text, r in zip(texts, results):
        for e in r["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and e["type"] in m["per_type"] and 0 < e["score"] <= 1

    # the champion path re-scores the production ONNX model on the test words: it must agree with torch's score
    import pandas as pd

    dataset = next((store / "kfp-local").glob("*/validate/dataset"))
    frame = pd.read_parquet(dataset / "test.parquet")
    champ = champion_score(open_store(str(store)), "conll2003", tasks.get(TOKEN), json.loads((version_dir / "labels.json").read_text())["labels"],
                           [list(t) for t in frame["tokens"]], [list(t) for t in frame["tags"]], "entity_micro_f1", tmp_path / "champ")
    assert champ["version"] == registry.read_alias(open_store(str(store)), "conll2003")["version"]
    assert champ["value"] == pytest.approx(m["entity_micro_f1"], abs=0.01)

    # batch inference and serving answer with the same entities as OnnxClassifier.predict
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "raw.csv", index=False)
    assert main(["infer", "--store", str(store), "--model", "conll2003", "--input", str(tmp_path / "raw.csv"),
                 "--output", str(tmp_path / "scored"), "--shard-rows", "10"]) == 0
    scored = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "scored").glob("shards/*/predictions.parquet"))])
    by_row = {int(r.source_row) - 1: json.loads(r.entities) for r in scored.itertuples()}  # source_row is 1-based
    assert set(by_row) >= {i for i, t in enumerate(texts) if t.strip()}
    for i, found in by_row.items():
        want = results[i]["entities"]
        assert [(e["type"], e["start"], e["end"]) for e in found] == [(e["type"], e["start"], e["end"]) for e in want]
        assert [e["score"] for e in found] == pytest.approx([e["score"] for e in want], abs=1e-5)

    from tests.helpers.serve import running_server

    with running_server(["--model", str(version_dir), "--name", "conll2003", "--threads", "1"]) as server:
        answer = server.post("/v1/models/conll2003:predict", json={"instances": texts[:20] + texts[22:]})
        assert answer.status_code == 200, answer.text
        served = answer.json()["predictions"]
    for got, want in zip(served, results[:20] + results[22:]):
        assert [(e["type"], e["start"], e["end"], e["text"]) for e in got["entities"]] == \
            [(e["type"], e["start"], e["end"], e["text"]) for e in want["entities"]]


def test_ner_profile_counts_entities_the_same_from_gold_and_from_predictions(model_dir, conll_test):
    """The NER profile parts (kubetune.monitoring): entity types counted from the gold tags equal
    those counted from predict-shaped entities made of the same tags, through the batch columns too."""
    import json

    import pandas as pd
    from transformers import AutoTokenizer

    from kubetune.monitoring.profile import histogram
    from kubetune.tasks.token import ENTITY_COUNT_EDGES, group_entities, word_spans

    task, tok = tasks.get(TOKEN), AutoTokenizer.from_pretrained(model_dir)
    labels = sorted({t for s in conll_test for t in s.tags})
    kept = []
    for s in conll_test[:300]:
        text = " ".join(s.tokens)
        spans = word_spans(text)
        if [text[a:b] for a, b in spans] == s.tokens:
            enc = tok(s.tokens, is_split_into_words=True, return_offsets_mapping=True)
            kept.append((s, group_entities(text, spans, enc.word_ids(), enc["offset_mapping"], s.tags, [0.8] * len(s.tokens))))
    assert len(kept) > 200
    frame = pd.DataFrame({"tokens": [list(s.tokens) for s, _ in kept], "tags": [list(s.tags) for s, _ in kept]})
    gold = task.profile_gold(frame, labels)["entity_type"]
    predictions = [{"entities": e} for _, e in kept]
    out = task.profile_outputs(predictions, labels)
    assert set(gold) == {"LOC", "MISC", "ORG", "PER"} and sum(gold.values()) > 100
    assert out["distributions"]["predicted_entity_type"] == gold
    per_sentence, edges = out["histograms"]["entities_per_sentence"]
    assert sum(per_sentence) == sum(gold.values()) and edges == ENTITY_COUNT_EDGES
    assert sum(histogram(per_sentence, edges)["counts"]) == len(kept)
    assert out["histograms"]["confidence"][0] == [pytest.approx(0.8)] * sum(gold.values())
    columns = task.output_columns(predictions, labels)
    assert columns["entities"] == [json.dumps(e, ensure_ascii=False) for _, e in kept]
    assert columns["entity_count"].tolist() == [len(e) for _, e in kept]
    assert task.profile_texts(frame)[0] == " ".join(kept[0][0].tokens)
