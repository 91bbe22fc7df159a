"""The images under images/, built with podman from this repository on a local Debian bookworm base
(no registry: the wheels of the lock come from a local wheelhouse), and the project run inside them:

- the training pipeline under kfp.local's DockerRunner (every step a container of the runtime or
  trainer image, as the image's non-root user, through `podman system service`), against SeaweedFS,
  giving the same summary fields and registry contents as the same run under the SubprocessRunner;
- the batch-inference pipeline in the runtime image over a SeaweedFS prefix;
- `kubetune serve` in the serving and runtime images as the rendered InferenceService runs it:
  non-root, read-only root filesystem, a tmpfs /tmp, all capabilities dropped, the model in
  /mnt/models; v1/v2 predict, health and /metrics, and Prometheus scraping it;
- the trainer image importing torch/transformers/peft and the fine-tune step's CLI.

Setup and skip rules: tests/helpers/containers.py (.ci/containers prepares the machine).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from kubetune.onnx.model import OnnxClassifier
from kubetune.storage.store import S3Settings, open_store
from tests.conftest import write_csv
from tests.helpers import containers as c
from tests.helpers.seaweed import free_ports
from tests.helpers.serve import assert_same_predictions

pytestmark = pytest.mark.slow
UID = 1000  # the images' USER


@pytest.fixture(scope="module")
def images():
    """image -> tag, built once for this module. The tags stay (localhost/kubetune-test:<image>, the
    previous build's replaced): untagging them dropped their layers, so every run re-installed the
    dependencies (~6 minutes); kept, a build with unchanged sources takes seconds."""
    c.preflight()
    tags, built = {}, {}
    for image in c.IMAGES:
        tags[image] = f"{c.TAG_PREFIX}:{image}"
        built[image] = c.build(image, tags[image])
    c.prune_replaced_builds()
    print("\n" + "\n".join(f"image {i}: {b['size_bytes'] / 1e9:.2f} GB, built in {b['seconds']} s" for i, b in built.items()))
    return tags


@pytest.fixture(scope="module")
def docker_host(images):
    with c.docker_socket() as url:
        yield url


def in_image(tag: str, code: str) -> str:
    proc = c.podman("run", "--rm", "--network=none", "--entrypoint=python", tag, "-c", code, timeout=300)
    return proc.stdout


@pytest.mark.parametrize("image", c.IMAGES)
def test_image_runs_the_installed_project_as_non_root_python_311(images, image):
    out = json.loads(in_image(images[image], (
        "import json, os, sys, kubetune; from importlib.metadata import version; "
        "print(json.dumps({'uid': os.getuid(), 'python': list(sys.version_info[:2]), 'prefix': sys.prefix, "
        "'kubetune': kubetune.__file__, 'src_left': os.path.exists('/tmp/kubetune-src'), 'torch': version('torch'), "
        "'writable_site': os.access(kubetune.__file__, os.W_OK)}))")))
    assert out["uid"] == UID and out["python"] == [3, 11] and out["prefix"] == "/opt/kubetune"
    assert out["kubetune"].startswith("/opt/kubetune/lib/python3.11/site-packages/kubetune/")  # installed, not a source tree
    assert not out["src_left"] and not out["writable_site"]  # the user cannot change the installed code
    assert out["torch"].split("+")[0] == "2.13.0"


def test_trainer_image_imports_the_training_stack_and_the_step_cli(images):
    out = json.loads(in_image(images["trainer"], (
        "import json, peft, torch, transformers; "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__, "
        "'peft': peft.__version__}))")))
    assert out["torch"].startswith("2.13.0") and out["transformers"].startswith("5.") and out["peft"]
    # built here from the CPU torch wheel (no GPU, no multi-GB CUDA wheels); the default build takes the CUDA one
    assert out["cuda"] is None, out
    proc = c.podman("run", "--rm", "--network=none", images["trainer"], "python", "-m", "kubetune.steps.finetune", "--help", timeout=300)
    assert "--peft" in proc.stdout and "--tokens" in proc.stdout


# ---- serving: the InferenceService's container, as KServe runs it -----------------------------


@contextlib.contextmanager
def prometheus_scraping(target: str):
    """Debian's prometheus, scraping `target` every second; yields a query function."""
    if shutil.which("prometheus") is None:
        c.unavailable_or_fail("prometheus is not installed (apt-get install prometheus)")
    (port,) = free_ports(1)
    folder = Path(tempfile.mkdtemp(prefix="kt-test-prometheus-"))
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: kubetune-serve, static_configs: [{{targets: ['{target}']}}]}}]\n")
    log = open(folder / "prometheus.log", "wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict]:
        r = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready:\n{(folder / 'prometheus.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield query
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def wait_http(url: str, container: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        state = c.podman("inspect", "--format={{.State.Status}}", container, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise AssertionError(f"container {container} is {state!r}:\n{c.logs(container)[-6000:]}")
        time.sleep(1)
    raise AssertionError(f"{url} not ready after {timeout} s:\n{c.logs(container)[-6000:]}")


@pytest.mark.parametrize("image", ["serving", "runtime"])  # runtime: the rendered InferenceService's default image
def test_server_image_serves_like_the_inference_service_asks(images, image, exported_model, tmp_path, sms_rows):
    from kubetune.release.manifests import ServingConfig, inference_service

    spec = inference_service("sms-spam", "v1", "s3://b/models/sms-spam/v1", "run", ServingConfig())["spec"]["predictor"]
    container = spec["containers"][0]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"]["drop"] == ["ALL"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    model = c.world_readable_copy(exported_model, tmp_path / "mnt-models")
    (port,) = free_ports(1)
    args = [a if a != "8080" else str(port) for a in container["args"]]  # host network: a free port instead of 8080
    options = ["--network=host", "--read-only", "--tmpfs=/tmp:rw,mode=1777,size=256m", "--cap-drop=ALL",
               "--security-opt=no-new-privileges", f"--volume={model}:/mnt/models:ro",
               f"--entrypoint={container['command'][0]}"]
    name = f"kubetune-test-serve-{image}-{os.getpid()}"
    url = f"http://127.0.0.1:{port}"
    texts = [t for _, t in sms_rows[100:132]]
    with c.running(images[image], [*container["command"][1:], *args], name=name, options=options):
        ready = spec["containers"][0]["readinessProbe"]["httpGet"]["path"]
        wait_http(url + ready, name)
        assert c.podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        assert c.podman("exec", name, "sh", "-c", "touch /opt/kubetune/x", check=False).returncode != 0  # read-only root
        assert requests.get(url + container["livenessProbe"]["httpGet"]["path"], timeout=10).status_code == 200
        assert requests.get(f"{url}/v2/health/ready", timeout=10).json() == {"ready": True}

        expected = OnnxClassifier(exported_model).predict(texts)
        r = requests.post(f"{url}/v1/models/sms-spam:predict", json={"instances": texts}, timeout=60)
        assert r.status_code == 200, r.text
        assert_same_predictions(r.json()["predictions"], expected)
        r = requests.post(f"{url}/v2/models/sms-spam/infer", timeout=60, json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [4], "data": texts[:4]}]})
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        assert outputs["label"]["data"] == [e["label"] for e in expected[:4]]
        assert outputs["probabilities"]["shape"] == [4, len(expected[0]["probabilities"])]
        assert requests.post(f"{url}/v1/models/sms-spam:predict", json={"instances": [1]}, timeout=10).status_code == 400

        metrics = requests.get(f"{url}/metrics", timeout=10).text
        counted = [line for line in metrics.splitlines() if line.startswith("kubetune_serve_texts_total")]
        assert counted and float(counted[0].split()[-1]) == len(texts) + 4, counted
        if image == "serving":
            with prometheus_scraping(f"127.0.0.1:{port}") as query:
                deadline = time.monotonic() + 60
                result = []
                while time.monotonic() < deadline and not result:
                    result = query('kubetune_serve_texts_total{job="kubetune-serve"}')
                    time.sleep(1)
                assert result and float(result[0]["value"][1]) == len(texts) + 4, result
                assert query('up{job="kubetune-serve"}')[0]["value"][1] == "1"
        log = c.logs(name)
    assert "Traceback" not in log, log[-4000:]


# ---- pipelines under kfp.local's DockerRunner ---------------------------------------------------


def run_in_containers(pipeline, arguments: dict, pipeline_root: Path, log_path: Path, docker_host: str, s3_env: dict) -> None:
    """Like kubetune.pipelines.local.run_locally, with every task a container (network: the host's,
    for the loopback SeaweedFS; environment: what the kubetune-s3 Secret/ConfigMap give a pod)."""
    from kfp import local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    os.chown(pipeline_root, UID, UID)  # the steps run as the images' user and write their outputs here
    buf = io.StringIO()
    os.environ["DOCKER_HOST"] = docker_host
    try:
        local.init(runner=local.DockerRunner(network_mode="host", environment=dict(s3_env)), pipeline_root=str(pipeline_root),
                   raise_on_error=False)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            pipeline(**arguments)
    finally:
        os.environ.pop("DOCKER_HOST", None)
        log_path.write_text(buf.getvalue())


def keys_of(obj, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (the summary's fields)."""
    if isinstance(obj, dict):
        return {f"{prefix}{k}" for k in obj} | {p for k, v in obj.items() for p in keys_of(v, f"{prefix}{k}.")}
    return set()


def test_training_pipeline_in_the_images_matches_the_subprocess_run(images, docker_host, s3_run, s3_bucket, s3_env, tmp_path):
    """The session's S3 run (tests/conftest.py: s3_run, under the SubprocessRunner) again with the same
    options, every step in its image under the DockerRunner: the same summary and registry."""
    from kubetune.pipelines.cli import build_parser, pipeline_arguments
    from kubetune.pipelines.config import ClusterConfig
    from kubetune.pipelines.training import build_training_pipeline
    from kubetune.storage.records import RunRecord

    settings = S3Settings.from_env(os.environ)
    sub_uri, box_uri = s3_run.store_uri, f"s3://{s3_bucket}/containers"
    assert s3_run.code == 0
    reference = s3_run.summary

    a = build_parser().parse_args(["run", *s3_run.args, "--store", box_uri, "--run-id", "box"])
    arguments = pipeline_arguments(a, box_uri, "box")  # resolves the builtin data and the registry name as `run` does
    cluster = ClusterConfig(image=images["runtime"], trainer_image=images["trainer"], retries=0)
    t0 = time.perf_counter()
    run_in_containers(build_training_pipeline(cluster, default_store=box_uri), arguments, tmp_path / "kfp", tmp_path / "kfp.log",
                      docker_host, s3_env)
    wall = time.perf_counter() - t0
    box = open_store(box_uri, settings)
    summary = RunRecord(box, "box").read_json("summary.json")
    log = (tmp_path / "kfp.log").read_text()
    assert summary is not None, f"no summary written; kfp.local log:\n{log[-8000:]}"
    assert summary["outcome"] == "deployed" and summary["exit_code"] == 0, (summary, log[-8000:])
    # the same fields (the CLI adds wall_seconds to the subprocess run's), the same steps and outcomes
    assert keys_of(summary) == keys_of(reference) - {"wall_seconds"}
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [(s["name"], s["status"]) for s in reference["steps"]]
    assert set(summary["onnx"]["variants"]) == set(reference["onnx"]["variants"]) == {"fp32"}
    # the same data and seed on the same CPU build of torch: the same model quality
    assert summary["metrics"]["macro_f1"] == pytest.approx(reference["metrics"]["macro_f1"], abs=0.02)
    # every step ran in its image (kfp.local names the image of each task), as the images' non-root user
    assert log.count(f"Found image '{images['runtime']}'") >= 5 and f"Found image '{images['trainer']}'" in log
    written = [p for p in (tmp_path / "kfp").rglob("*")]
    assert len(written) > 20 and {p.stat().st_uid for p in written} == {UID}, "outputs not all written by uid 1000"

    def registry(store_uri: str, summary: dict) -> set[str]:
        st = open_store(store_uri, settings)
        version = summary["deployment"]["version"]
        return {k.removeprefix(f"models/sms-spam/{version}/") for k in st.list(f"models/sms-spam/{version}")}

    assert registry(box_uri, summary) == registry(sub_uri, reference)
    alias = box.read_json("models/sms-spam/aliases/production.json")
    assert alias["version"] == summary["deployment"]["version"] and alias["run_id"] == "box"
    run_files = {k.removeprefix("runs/box/") for k in box.list("runs/box")}
    assert {"summary.json", "deployment.json", "export.json", "evaluation.json"} <= run_files
    print(f"\ntraining pipeline in containers: {wall:.0f} s wall (subprocess run: {reference['wall_seconds']} s)")


def test_batch_inference_pipeline_in_the_runtime_image(images, docker_host, s3_bucket, s3_env, exported_model, sms_rows, tmp_path):
    from kubetune.pipelines.batch import build_batch_pipeline
    from kubetune.pipelines.config import ClusterConfig
    from tests.steps.test_batch_infer import publish

    settings = S3Settings.from_env(os.environ)
    store = open_store(f"s3://{s3_bucket}/kubetune", settings)
    version = publish(store, exported_model)
    data = open_store(f"s3://{s3_bucket}/incoming", settings)
    texts_a = [t for _, t in sms_rows[2000:2090]]
    texts_b = [t for _, t in sms_rows[2090:2150]]
    write_csv(tmp_path / "a.csv", [(t,) for t in texts_a], header=("text",))
    pq.write_table(pa.table({"text": texts_b + [""]}), tmp_path / "b.parquet")
    data.upload(tmp_path / "a.csv", "2026/12/a.csv")
    data.upload(tmp_path / "b.parquet", "2026/12/b.parquet")
    output = f"s3://{s3_bucket}/scored/run1"
    run_in_containers(build_batch_pipeline(ClusterConfig(image=images["runtime"], retries=0)),
                      {"input_uri": f"s3://{s3_bucket}/incoming/2026/", "output_uri": output, "store": store.uri, "shard_rows": 50},
                      tmp_path / "kfp", tmp_path / "kfp.log", docker_host, s3_env)
    out = open_store(output, settings)
    log = (tmp_path / "kfp.log").read_text()
    assert out.exists("manifest.json"), f"no manifest; kfp.local log:\n{log[-8000:]}"
    manifest = out.read_json("manifest.json")
    assert manifest["model"]["version"] == version
    assert {k: manifest["totals"][k] for k in ("rows", "predicted", "rejected")} == {"rows": 151, "predicted": 150, "rejected": 1}
    assert len(manifest["shards"]) == 4  # 90 rows -> 2 shards, 61 -> 2: one container per shard
    frames = []
    for s in manifest["shards"]:
        out.download(f"shards/{s['id']}/predictions.parquet", tmp_path / f"{s['id']}.parquet")
        frames.append(pd.read_parquet(tmp_path / f"{s['id']}.parquet"))
    got = pd.concat(frames).sort_values(["source_file", "source_row"])
    expected = OnnxClassifier(exported_model).predict(texts_a + texts_b)
    assert got["label"].tolist() == [e["label"] for e in expected]
    assert got["score"].tolist() == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert f"Found image '{images['runtime']}'" in log
