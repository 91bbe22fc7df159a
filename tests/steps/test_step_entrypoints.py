"""Every step through its `python -m kubetune.steps.<step>` entry, as a container or a GPU box without
kfp would run it: kfp is made unimportable in each process, so a stray kfp import fails the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, cli_args

pytestmark = pytest.mark.slow

NO_KFP = (
    "import runpy, sys; sys.modules['kfp'] = None; "  # `import kfp` now raises ImportError
    "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def step(name: str, *args, store: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", NO_KFP, f"kubetune.steps.{name}", *map(str, args), "--store", str(store), "--run-id", "manual"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_steps_chain_without_kfp(tmp_path, tiny_model_dir):
    store, d = tmp_path / "store", tmp_path
    r = step("validate", "--train", "builtin:sms-spam", "--limit", 300, "--out", d / "ds", "--report", d / "report.md",
             "--expectations", d / "exp.json", store=store)
    assert r.returncode == 0, r.stderr
    assert "[kubetune validate] done in" in r.stdout and (d / "ds" / "train.parquet").exists()

    r = step("tokenize", "--dataset", d / "ds", "--model", "builtin:all-minilm-l6-v2", "--out", d / "tok", "--max-length", 64, store=store)
    assert r.returncode == 0, r.stderr

    r = step("finetune", "--tokens", d / "tok", "--model", tiny_model_dir, "--out", d / "model", *cli_args(TINY), store=store)
    assert r.returncode == 0, r.stderr
    assert f"[kubetune finetune] epoch 1/{TINY['epochs']} [" in r.stdout  # the progress bar

    common = ["--model", d / "model", "--tokens", d / "tok", "--dataset", d / "ds", "--out", d / "evaluation.json", "--name", "sms-spam"]
    r = step("evaluate", *common, "--threshold", 1.01, store=store)
    assert r.returncode == 3 and "gate REJECTED" in r.stdout  # a shell pipeline can stop on the gate
    r = step("evaluate", *common, "--threshold", 0.5, store=store)
    assert r.returncode == 0, r.stderr

    r = step("export", "--model", d / "model", "--tokens", d / "tok", "--out", d / "onnx", "--parity-rows", 32, store=store)
    assert r.returncode == 0, r.stderr

    r = step("deploy", "--onnx", d / "onnx", "--evaluation", d / "evaluation.json", "--name", "sms-spam",
             "--manifest-out", d / "isvc.yaml", store=store)
    assert r.returncode == 0, r.stderr
    assert "kind: InferenceService" in (d / "isvc.yaml").read_text()

    r = step("summary", "--out", d / "summary.json", store=store)
    assert r.returncode == 0, r.stderr
    summary = json.loads((d / "summary.json").read_text())
    assert summary["outcome"] == "deployed" and [s["status"] for s in summary["steps"]] == ["succeeded"] * 6


def test_input_error_exit_code(tmp_path):
    r = step("validate", "--train", tmp_path / "missing.csv", "--out", tmp_path / "ds", "--report", tmp_path / "r.md",
             "--expectations", tmp_path / "e.json", store=tmp_path / "store")
    assert r.returncode == 2 and "missing.csv: no such file" in r.stderr
    assert "Traceback" not in r.stderr  # a message, not a stack trace


def test_one_exit_code_table(tmp_path):
    """An option error inside a step is exit 2 wherever it is caught: the step process, its record,
    and the run summary built from that record, whose exit_code equals the process's."""
    store = tmp_path / "store"
    r = step("tokenize", "--dataset", tmp_path / "ds", "--model", "builtin:all-minilm-l6-v2", "--out", tmp_path / "tok",
             "--max-length", 4, store=store)
    assert r.returncode == 2 and "max_length=4: use a value between 8 and 8192 tokens" in r.stderr
    record = json.loads((store / "runs/manual/steps/tokenize.json").read_text())
    assert record["status"] == "failed" and record["error"]["kind"] == "config" and record["error"]["exit_code"] == 2
    r = step("summary", "--out", tmp_path / "summary.json", store=store)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcome"] == "input_rejected" and summary["exit_code"] == r.returncode == 2


def test_the_fan_out_runs_from_the_command_line(tmp_path, sms_rows, model_dir):
    """The fan-out outside KFP (an Argo DAG, a shell loop): --plan prints the pieces, --piece runs one,
    --pieces merges them; the dataset and the tokens equal one task's, made here through the same entry."""
    from tests.conftest import write_csv

    (tmp_path / "train").mkdir()
    rows = [(t, l) for l, t in sms_rows[:900]]
    for k in range(3):
        write_csv(tmp_path / f"train/part-{k}.csv", rows[300 * k:300 * (k + 1)])
    out = {}
    for mode, mb, fanout_rows in (("one", 0, 0), ("fan", 0.01, 300)):
        store, d = tmp_path / f"store-{mode}", tmp_path / mode
        validate = ["--train", tmp_path / "train", "--fanout-mb", mb]
        files = ["--out", d / "ds", "--report", d / "report.md", "--expectations", d / "exp.json"]
        tokenize = ["--dataset", d / "ds", "--model", model_dir, "--max-length", 64, "--shard-rows", 100, "--fanout-rows", fanout_rows]
        if mode == "one":
            assert step("validate", *validate, *files, store=store).returncode == 0
            assert step("tokenize", *tokenize, "--out", d / "tok", store=store).returncode == 0
        else:
            for name, args, merge in (("validate", validate, files), ("tokenize", tokenize, ["--out", d / "tok"])):
                r = step(name, *args, "--plan", store=store)
                assert r.returncode == 0, r.stderr
                pieces = json.loads(r.stdout.strip().splitlines()[-1])
                assert len(pieces) >= 3, pieces
                for piece in pieces:
                    r = step(name, *args, "--piece", piece, store=store)
                    assert r.returncode == 0, r.stderr
                r = step(name, *args, *merge, "--pieces", ",".join(pieces), store=store)
                assert r.returncode == 0, r.stderr
        out[mode] = [json.loads((d / f).read_text()) for f in ("ds/meta.json", "tok/meta.json")]
    (ds_one, tok_one), (ds_fan, tok_fan) = out["one"], out["fan"]
    assert {**ds_one, "config": None} == {**ds_fan, "config": None} and tok_one == tok_fan
    r = step("validate", "--piece", "train-00000-00001", store=tmp_path / "store-none")  # no plan under that run: a clear error
    assert r.returncode != 0 and "plan.json" in r.stderr
