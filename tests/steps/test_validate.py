"""Validation on the real SMS data: expectations, warnings, splits; and rejected inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from kubetune.errors import ConfigError, InputError
from kubetune.steps.validate import ValidateConfig, load_dataset, validate
from kubetune.storage.contracts import DatasetMeta
from kubetune.validation.splits import split_frame, subsample
from tests.conftest import write_csv


def test_sms_passes_with_warnings_and_splits(tmp_path, sms_rows):
    report, meta = validate("builtin:sms-spam", "", "", ValidateConfig(), tmp_path / "ds")
    assert report.passed
    warned = {c.name for c in report.failures("warning")}
    assert warned == {"unique_text", "class_balance"}  # 403 repeated texts; spam is 13%
    frames, meta2 = load_dataset(tmp_path / "ds")
    assert meta2 == DatasetMeta(**meta) and meta["labels"] == ["ham", "spam"]
    assert sum(len(f) for f in frames.values()) == len(sms_rows)
    # stratified: each split keeps the overall spam share (13.4%) within 1.5 points
    for split, frame in frames.items():
        assert abs((frame["label"] == "spam").mean() - 747 / 5574) < 0.015, split
    # grouped by text: no duplicate straddles two splits, so the test split is unseen text
    texts = {s: set(f["text"]) for s, f in frames.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["eval"] and not texts["eval"] & texts["test"]
    assert 0.08 < len(frames["test"]) / len(sms_rows) < 0.12
    report_md = report.markdown(meta)
    assert "# Data validation: PASSED" in report_md
    assert f"| test | {len(frames['test'])} | " in report_md and "684 of 5574 rows repeat another row's text" in report_md


def test_split_and_subsample_are_seeded(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(200)], "label": ["a"] * 150 + ["b"] * 50})
    frame["source_row"] = range(1, 201)
    one, two = split_frame(frame, {"eval": 0.1, "test": 0.1}, seed=1), split_frame(frame, {"eval": 0.1, "test": 0.1}, seed=1)
    other = split_frame(frame, {"eval": 0.1, "test": 0.1}, seed=2)
    assert all(one[s]["text"].tolist() == two[s]["text"].tolist() for s in one)
    assert one["test"]["text"].tolist() != other["test"]["text"].tolist()
    assert {s: (f["label"] == "b").sum() for s, f in one.items()} == {"train": 40, "eval": 5, "test": 5}
    small = subsample(frame, 40, seed=0)
    assert len(small) == 40 and (small["label"] == "b").sum() == 10
    assert small["source_row"].is_monotonic_increasing


def test_limit_and_explicit_eval_test_files(tmp_path, sms_rows):
    rows = [(t, l) for l, t in sms_rows]
    train = write_csv(tmp_path / "train.csv", rows[:3000])
    test = write_csv(tmp_path / "test.csv", rows[3000:3600])
    report, meta = validate(str(train), "", str(test), ValidateConfig(limit=500), tmp_path / "ds")
    assert report.passed and meta["split_made_here"] == ["eval"]
    assert meta["splits"]["test"]["rows"] == 500  # --limit caps every file
    assert meta["splits"]["train"]["rows"] + meta["splits"]["eval"]["rows"] == 500


def rejected(tmp_path, train_rows, eval_rows=None, **cfg):
    train = write_csv(tmp_path / "train.csv", train_rows)
    ev = str(write_csv(tmp_path / "eval.csv", eval_rows)) if eval_rows is not None else ""
    report, meta = validate(str(train), ev, "", ValidateConfig(**cfg), tmp_path / "ds")
    assert not report.passed and meta is None
    assert not (tmp_path / "ds").exists()  # nothing written for a rejected input
    return report, report.error_message()


def test_empty_and_null_texts_are_rejected_with_rows(tmp_path, sms_rows):
    rows = [(t, l) for l, t in sms_rows[:60]]
    rows[4] = ("", "ham")
    rows[9] = ("   ", "spam")
    report, msg = rejected(tmp_path, rows)
    assert "train.csv: column 'text': 2 of 60 rows are empty or whitespace-only; e.g. line 6: '', line 11: '   '" in msg


def test_missing_labels(tmp_path, sms_rows):
    rows = [(t, l) for l, t in sms_rows[:60]]
    rows[2] = (rows[2][0], "")
    report, msg = rejected(tmp_path, rows)
    assert "column 'label': 1 of 60 rows have no label; e.g. line 4: None" in msg


def test_eval_label_not_in_train(tmp_path, sms_rows):
    rows = [(t, l) for l, t in sms_rows[:80]]
    ev = [(t, l) for l, t in sms_rows[80:100]]
    ev[3] = (ev[3][0], "spma")
    report, msg = rejected(tmp_path, rows, ev)
    assert "eval.csv: column 'label': 1 of 20 rows have labels that are not in the train labels ['ham', 'spam']; e.g. line 5: 'spma'" in msg


def test_single_class(tmp_path, sms_rows):
    rows = [(t, l) for l, t in sms_rows if l == "ham"][:50]
    report, msg = rejected(tmp_path, rows)
    assert "has 1 distinct label(s) ['ham']: a classifier needs at least two classes" in msg


def test_too_few_rows_per_class_and_long_texts(tmp_path, sms_rows):
    rows = [(t, l) for l, t in sms_rows if l == "ham"][:40] + [("win a prize now", "spam")] * 2
    report, msg = rejected(tmp_path, rows, max_text_chars=100)
    assert "has classes with fewer than 5 rows: 'spam': 2" in msg
    assert "rows are longer than 100 characters" in msg


def test_report_files_for_a_rejected_run(tmp_path, sms_rows):
    from kubetune.steps.validate import run_step

    rows = [(t, l) for l, t in sms_rows[:60]]
    rows[0] = ("", "ham")
    train = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(Exception, match="input rejected by validation"):
        run_step(store_uri=str(tmp_path / "store"), run_id="r1", train_uri=str(train), eval_uri="", test_uri="",
                 cfg=ValidateConfig(), dataset_dir=tmp_path / "ds", report_path=tmp_path / "report.md",
                 expectations_path=tmp_path / "exp.json")
    assert "# Data validation: FAILED" in (tmp_path / "report.md").read_text()
    results = json.loads((tmp_path / "exp.json").read_text())
    assert results["passed"] is False and set(results["great_expectations"]) == {"train"}
    step = json.loads((tmp_path / "store/runs/r1/steps/validate.json").read_text())
    assert step["status"] == "failed" and step["error"]["exit_code"] == 2
    assert (tmp_path / "store/runs/r1/validation/report.md").exists()


def test_bad_config_is_rejected_early():
    with pytest.raises(ConfigError, match="leaves too little to train on"):
        ValidateConfig(eval_fraction=0.5, test_fraction=0.5).check()


def _outcome(report, meta, ds):
    checks = [(c.split, c.name, c.success, c.unexpected_count, c.element_count, [(int(r), v) for r, v in c.examples])
              for c in report.checks]
    frames = {s: pd.read_parquet(ds / f"{s}.parquet") for s in ("train", "eval", "test")} if meta else {}
    return checks, meta, frames


def test_batches_give_the_same_checks_and_splits(tmp_path, sms_rows, monkeypatch):
    """Checked and written a record batch at a time (tiny batches here, files of a folder): the same
    counts, examples, splits and fingerprints as in one batch; duplicates, conflicts and leakage span
    batches and files."""
    from kubetune.validation import tables

    rows = [(t, l) for l, t in sms_rows[:1500]]
    rows[1400] = (rows[3][0], "spam" if rows[3][1] == "ham" else "ham")  # a conflicting duplicate 1,397 rows apart
    (tmp_path / "train").mkdir()
    write_csv(tmp_path / "train/part-0.csv", rows[:700])
    write_csv(tmp_path / "train/part-1.csv", rows[700:])
    test = write_csv(tmp_path / "test.csv", [(t, l) for l, t in sms_rows[1500:1800]] + [rows[1000]])  # one leaked row
    results = []
    for batch_rows in (100_000, 97):
        monkeypatch.setattr(tables, "BATCH_ROWS", batch_rows)
        ds = tmp_path / f"ds-{batch_rows}"
        report, meta = validate(str(tmp_path / "train"), "", str(test), ValidateConfig(limit=1200), ds)
        results.append(_outcome(report, meta, ds))
    (checks, meta, frames), (checks97, meta97, frames97) = results
    assert checks == checks97 and meta == meta97
    assert all(frames[s].equals(frames97[s]) for s in frames)
    by_name = {(c[0], c[1]): c for c in checks97}
    assert by_name[("train", "consistent_labels")][3] >= 2 and by_name[("test", "no_train_overlap")][3] >= 1
    assert by_name[("train", "unique_text")][5][0][0] < by_name[("train", "unique_text")][5][-1][0]  # examples in row order
    assert meta97["splits"]["test"]["rows"] == 301 and meta97["splits"]["train"]["rows"] + meta97["splits"]["eval"]["rows"] == 1200


def test_a_bad_row_deep_in_a_later_batch_is_named(tmp_path, sms_rows, monkeypatch):
    from kubetune.validation import tables

    monkeypatch.setattr(tables, "BATCH_ROWS", 50)
    rows = [(t, l) for l, t in sms_rows[:400]]
    rows[371] = ("  ", "ham")
    report, msg = rejected(tmp_path, rows)
    assert "column 'text': 1 of 400 rows are empty or whitespace-only; e.g. line 373: '  '" in msg


def test_a_dataset_validated_again_in_place(tmp_path, monkeypatch):
    """The splits are written to hidden partial files and renamed when all are written, so an input
    that is also the output (a dataset folder validated again) is read whole first; a failure while
    writing leaves the folder as it was."""
    from kubetune.storage import formats
    from kubetune.validation import splits, tables

    # small row groups, read a few rows at a time: the new train.parquet is opened (truncated, were it
    # written in place) while the old one is still being read
    monkeypatch.setattr(formats, "SPLIT_ROW_GROUP", 500)
    monkeypatch.setattr(formats, "PARQUET_BATCH", 100)
    monkeypatch.setattr(tables, "BATCH_ROWS", 400)
    ds = tmp_path / "ds"
    _, meta = validate("builtin:sms-spam", "", "", ValidateConfig(), ds)
    before = pd.read_parquet(ds / "train.parquet")
    _, again = validate(str(ds / "train.parquet"), str(ds / "eval.parquet"), str(ds / "test.parquet"), ValidateConfig(), ds)
    assert pd.read_parquet(ds / "train.parquet")[["text", "label"]].equals(before[["text", "label"]])
    assert {s: again["splits"][s]["fingerprint"] for s in again["splits"]} == {s: meta["splits"][s]["fingerprint"] for s in meta["splits"]}
    assert not list(ds.glob(".*partial"))

    add, calls = splits._SplitWriter.add, []

    def broken(self, frame):  # the disk fills up after some row groups were written
        calls.append(1)
        if len(calls) == 6:
            raise OSError(28, "No space left on device")
        add(self, frame)

    monkeypatch.setattr(splits._SplitWriter, "add", broken)
    with pytest.raises(OSError, match="No space left"):
        validate(str(ds / "train.parquet"), str(ds / "eval.parquet"), str(ds / "test.parquet"), ValidateConfig(), ds)
    assert pd.read_parquet(ds / "train.parquet")[["text", "label"]].equals(before[["text", "label"]])
    assert not list(ds.glob(".*partial"))


# ---- fan-out: a split's files checked by parallel tasks, merged by validate ------------------------


def _files(folder, rows, parts, header):
    folder.mkdir()
    size = -(-len(rows) // parts)
    for k in range(parts):
        write_csv(folder / f"part-{k}.csv", rows[k * size:(k + 1) * size], header=header)
    return str(folder)


def _both(tmp_path, train, test, cfg):
    """validate run as one task and as the pipeline's fan-out (plan, a piece task per piece in any
    order, the merge): (outcome, report files, the pieces), each path's."""
    from kubetune.steps.validate import piece_step, plan_step, run_step

    store, out = str(tmp_path / "store"), []
    for run_id in ("one", "fan"):
        c = replace(cfg, fanout_mb=0 if run_id == "one" else cfg.fanout_mb)
        common = {"store_uri": store, "run_id": run_id}
        pieces = plan_step(**common, train_uri=train, eval_uri="", test_uri=test, cfg=c)
        assert [piece_step(**common, cfg=c, piece=p) for p in reversed(pieces)] == pieces[::-1]
        ds, files = tmp_path / f"ds-{run_id}", tmp_path / f"report-{run_id}"
        try:
            result = run_step(**common, train_uri=train, eval_uri="", test_uri=test, cfg=c, dataset_dir=ds, report_path=files / "r.md",
                              expectations_path=files / "e.json", pieces=pieces)
        except InputError as e:
            result = str(e)
        frames = {s: pd.read_parquet(ds / f"{s}.parquet") for s in ("train", "eval", "test")} if isinstance(result, dict) else {}
        out.append((result, frames, (files / "r.md").read_text(), json.loads((files / "e.json").read_text()), pieces))
        assert not (Path(store) / f"runs/{run_id}/pieces").exists() or not any((Path(store) / f"runs/{run_id}/pieces").iterdir())
    return out


@pytest.mark.parametrize("task", ["sequence-classification", "pair-classification"])
def test_fanned_out_validate_equals_one_task(tmp_path, sms_rows, task):
    """The pipeline's fan-out over a split's files (tiny pieces here: fanout_mb 0.02) gives the splits,
    meta, report and expectations of one task over the same files: duplicates, conflicting labels and
    train/test overlap span pieces, and the examples name the file and line."""
    rows = [(t, l) for l, t in sms_rows[:1500]]
    rows[1400] = (rows[3][0], "spam" if rows[3][1] == "ham" else "ham")  # a conflicting duplicate three files apart
    test_rows = [(t, l) for l, t in sms_rows[1500:1800]] + [rows[1000]]  # one leaked row
    header = ("text", "label")
    if task == "pair-classification":  # a question (3 rows each) and its candidate; the same conflict and leak
        rows = [(f"question {i // 3}", t, l) for i, (t, l) in enumerate(rows)]
        rows[1400] = (*rows[3][:2], rows[1400][2])
        test_rows = [(f"question {9000 + i // 3}", t, l) for i, (t, l) in enumerate(test_rows[:-1])] + [rows[1000]]
        header = ("text", "text_pair", "label")
    train, test = _files(tmp_path / "train", rows, 4, header), _files(tmp_path / "test", test_rows, 2, header)
    (one, one_frames, one_md, one_ge, whole), (fan, fan_frames, fan_md, fan_ge, pieces) = _both(
        tmp_path, train, test, ValidateConfig(task=task, limit=1200, fanout_mb=0.02))
    assert whole == ["whole"] and len(pieces) >= 4 and [p for p in pieces if p.startswith("test")]
    assert {**one["config"], "fanout_mb": 0.02} == fan["config"]  # meta.json records the options, the fan-out's too
    assert {**one, "config": None} == {**fan, "config": None} and one_md == fan_md

    def batches(ge):  # how many batches great-expectations ran: one a piece at least
        return {s: r.pop("batches") for s, r in ge["great_expectations"].items()}

    assert batches(one_ge) == {"train": 1, "test": 1} and batches(fan_ge) == {"train": 4, "test": 2} and one_ge == fan_ge
    assert all(one_frames[s].equals(fan_frames[s]) for s in one_frames)
    checks = {(c["split"], c["name"]): c for c in fan_ge["checks"]}
    assert checks[("train", "consistent_labels")]["unexpected_count"] >= 2 and checks[("test", "no_train_overlap")]["unexpected_count"] >= 1
    assert "part-3.csv line" in fan_md  # the conflict's example, located in its file


def test_fanned_out_validate_rejects_as_one_task_does(tmp_path, sms_rows):
    """An empty text deep in a later file and a test label train does not have: the same error,
    naming the file and line, from the merged pieces as from one task; nothing is written."""
    rows = [(t, l) for l, t in sms_rows[:1200]]
    rows[1000] = ("   ", "ham")
    test_rows = [(t, l) for l, t in sms_rows[1200:1400]] + [("a text with an unknown label", "maybe")]
    train, test = _files(tmp_path / "train", rows, 4, ("text", "label")), _files(tmp_path / "test", test_rows, 2, ("text", "label"))
    (one, _, _, _, _), (fan, _, fan_md, _, pieces) = _both(tmp_path, train, test, ValidateConfig(fanout_mb=0.02))
    assert len(pieces) >= 4 and isinstance(fan, str) and one == fan
    assert "part-3.csv line 102: '   '" in fan and "have labels that are not in the train labels ['ham', 'spam']" in fan
    assert not (tmp_path / "ds-fan").exists() and fan_md.startswith("# Data validation: FAILED")


def test_fan_out_plan(tmp_path, sms_rows):
    """No fan-out below fanout_mb, for one file, for a builtin or a task that reads in memory; pieces
    of whole files otherwise, and a bad piece name is refused before any key is built from it."""
    from kubetune.core.fanout import WHOLE
    from kubetune.steps.validate import piece_step, plan_pieces

    rows = [(t, l) for l, t in sms_rows[:1000]]
    train = _files(tmp_path / "train", rows, 5, ("text", "label"))
    sizes = [p.stat().st_size for p in sorted((tmp_path / "train").iterdir())]
    mb = 2.5 * max(sizes) / (1 << 20)  # two files a piece
    pieces, plan = plan_pieces(train, "", "", ValidateConfig(fanout_mb=mb), None)
    assert pieces == ["train-00000-00002", "train-00002-00002", "train-00004-00001"] and len(plan["files"]["train"]) == 5
    for cfg, uri in ((ValidateConfig(fanout_mb=1.0), train), (ValidateConfig(fanout_mb=0), train),
                     (ValidateConfig(fanout_mb=0.001), str(tmp_path / "train/part-0.csv")), (ValidateConfig(fanout_mb=0.001), ""),
                     (ValidateConfig(fanout_mb=0.001, task="multiple-choice"), train)):
        assert plan_pieces(uri, "", "", cfg, None) == ([WHOLE], {})
    with pytest.raises(ConfigError, match="piece"):
        piece_step(store_uri=str(tmp_path / "s"), run_id="r", cfg=ValidateConfig(), piece="../train-00000-00001")


def test_a_failed_piece_is_named_and_is_the_run_s_failure(tmp_path, sms_rows):
    """A file the reader rejects fails its piece task with the file's name, exit 2; the run summary
    reports it as validate's failure (validate itself never ran)."""
    from kubetune.core.fanout import WHOLE
    from kubetune.steps.summary import build_summary
    from kubetune.steps.validate import piece_step, plan_step
    from kubetune.storage.records import RunRecord
    from kubetune.storage.store import open_store

    rows = [(t, l) for l, t in sms_rows[:900]]
    train = _files(tmp_path / "train", rows, 3, ("text", "label"))
    write_csv(tmp_path / "train/part-2.csv", rows[600:], header=("text", "stars"))
    store, cfg = str(tmp_path / "store"), ValidateConfig(fanout_mb=0.02)
    pieces = plan_step(store_uri=store, run_id="r", train_uri=train, eval_uri="", test_uri="", cfg=cfg)
    assert pieces[-1] == "train-00002-00001" and WHOLE not in pieces
    with pytest.raises(InputError, match=r"part-2\.csv.*'label'") as e:
        piece_step(store_uri=store, run_id="r", cfg=cfg, piece=pieces[-1])
    assert e.value.exit_code == 2
    summary = build_summary(RunRecord(open_store(store), "r"))
    assert summary["outcome"] == "input_rejected" and summary["exit_code"] == 2
    assert summary["error"]["step"] == "validate-train-00002-00001" and "part-2.csv" in summary["error"]["message"]
    assert summary["steps"][0] == {"name": "validate", "status": "failed", "seconds": summary["steps"][0]["seconds"]}
