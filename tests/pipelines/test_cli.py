"""CLI checks that need no pipeline run: options rejected before anything starts."""

from __future__ import annotations

import pytest

from kubetune.pipelines.cli import main


@pytest.mark.parametrize("args,message", [
    (["--epochs", "-1"], "epochs=-1: train at least 1 epoch"),
    (["--max-length", "4"], "max_length=4"),
    (["--eval-fraction", "0.6", "--test-fraction", "0.4"], "leaves too little to train on"),
    (["--name", "Bad_Name"], "model name 'Bad_Name'"),
    (["--gate-tolerance", "-1"], "gate tolerance -1.0: must be >= 0"),
])
def test_bad_options_exit_2_before_running(args, message, tmp_path, capsys):
    assert main(["run", *args, "--store", str(tmp_path / "store")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store" / "runs").exists()  # nothing started


def test_run_id_is_never_reused(tmp_path, capsys):
    (tmp_path / "store/runs/r1").mkdir(parents=True)
    (tmp_path / "store/runs/r1/run.json").write_text("{}")
    assert main(["run", "--store", str(tmp_path / "store"), "--run-id", "r1"]) == 2
    assert "run id 'r1' already has records" in capsys.readouterr().err


def test_unknown_gate_metric_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--gate-metric", "f2", "--store", str(tmp_path)])
    assert exc.value.code == 2
