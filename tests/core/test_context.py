"""The step context (one S3 settings read, one scratch folder, removed on success and failure) and
the one CPU count every thread pool is sized with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kubetune.core import context
from kubetune.core.context import step_context
from kubetune.core.system import cpu_features, cpu_kernels, usable_cpus
from kubetune.errors import ConfigError
from kubetune.storage.store import S3Settings


def count_settings_reads(monkeypatch) -> list:
    calls = []
    real = S3Settings.from_env.__func__

    def counted(cls, environ=None):
        calls.append(1)
        return real(cls, environ)

    monkeypatch.setattr(S3Settings, "from_env", classmethod(counted))
    return calls


def test_a_step_reads_the_s3_settings_once_and_cleans_its_scratch(tmp_path, monkeypatch, small_dataset):
    from kubetune.steps.tokenize import TokenizeConfig, run_step

    calls = count_settings_reads(monkeypatch)
    made = []
    real_mkdtemp = context.tempfile.mkdtemp
    monkeypatch.setattr(context.tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    run_step(store_uri=str(tmp_path / "store"), run_id="r1", dataset_dir=small_dataset, model_uri="builtin:all-minilm-l6-v2",
             out_dir=tmp_path / "tok", cfg=TokenizeConfig(max_length=32))
    assert len(calls) == 1 and len(made) == 1 and not Path(made[0]).exists()
    record = json.loads((tmp_path / "store/runs/r1/steps/tokenize.json").read_text())
    assert record["status"] == "succeeded" and record["outputs"]["cache"] == "miss"


def test_scratch_is_removed_when_the_step_fails(tmp_path):
    with pytest.raises(ConfigError, match="boom"):
        with step_context("demo", store_uri=str(tmp_path / "store"), run_id="r2") as ctx:
            scratch = ctx.scratch
            (ctx.tmp("work") / "big.bin").write_bytes(b"x" * 1000)
            ctx.outputs["seen"] = 1
            raise ConfigError("boom")
    assert not scratch.exists()
    record = json.loads((tmp_path / "store/runs/r2/steps/demo.json").read_text())
    assert record["status"] == "failed" and record["error"]["exit_code"] == 2 and record["outputs"] == {"seen": 1}


def test_usable_cpus_honours_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("400000 100000\n")  # a pod with a 4-CPU limit
    assert usable_cpus(cpu_max) == 4
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == 64
    cpu_max.write_text("50000 100000\n")  # half a CPU still gets one thread
    assert usable_cpus(cpu_max) == 1
    assert usable_cpus(tmp_path / "missing") == 64  # cgroup v1 or no cgroup: the affinity mask


def test_cpu_features_name_the_kernels_each_variant_runs_on(tmp_path):
    """The flags are read at run time from /proc/cpuinfo; each CPU gets the best path it has."""
    spr = "flags\t\t: fpu sse4_1 avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n" + spr + "\nprocessor\t: 1\n" + spr)
    xeon = cpu_features(info)
    assert xeon == {"model": "Intel(R) Xeon(R) Platinum 8480+",
                    "flags": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]}
    assert cpu_kernels("int8", xeon["flags"]) == "int8 AMX int8" and cpu_kernels("optimized", xeon["flags"]) == "fp32 AVX-512"
    assert cpu_kernels("int8", ["avx2", "fma", "avx512f", "avx512_vnni"]) == "int8 AVX-512 VNNI"
    assert cpu_kernels("int8", ["avx2", "fma"]) == "int8 AVX2" and cpu_kernels("fp32", ["avx2", "fma"]) == "fp32 AVX2 FMA"
    assert cpu_kernels("int8", []) == "int8 SSE4.1" and cpu_kernels("fp32", []) == "fp32 SSE"
    assert cpu_features(tmp_path / "missing") == {"model": "unknown", "flags": []}
    here = cpu_features()  # this machine: whatever it has, a known path
    assert cpu_kernels("int8", here["flags"]).startswith("int8 ")


def test_batch_inference_and_serving_size_their_threads_with_usable_cpus(monkeypatch, tmp_path, exported_model):
    from dataclasses import asdict

    from kubetune.steps import batch_infer
    from kubetune.storage.store import open_store

    monkeypatch.setattr(batch_infer, "usable_cpus", lambda: 3)
    plan = {"config": asdict(batch_infer.BatchConfig()), "model": {"uri": str(exported_model), "name": "sms-spam", "version": "v1"}}
    scorer = batch_infer.ShardScorer(plan, open_store(str(tmp_path / "out")), None, tmp_path)
    assert scorer.clf.session.get_session_options().intra_op_num_threads == 3

    from prometheus_client import CollectorRegistry

    from kubetune.serving import serve  # imports kserve with our argv hidden
    from kubetune.serving.serve import ServeConfig

    with serve.kserve_argv():
        from kubetune.serving import server
    monkeypatch.setattr(server, "usable_cpus", lambda: 3)
    model = server.TextModel("sms-spam", exported_model, "v1", ServeConfig(), server.ServeMetrics("sms-spam", "v1", "t", CollectorRegistry()))
    model.load()
    assert model.classifier.session.get_session_options().intra_op_num_threads == 3
