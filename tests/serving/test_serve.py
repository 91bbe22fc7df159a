"""The model server as a real process (`kubetune serve`, KServe's ModelServer) on the exported tiny
model, published to a registry folder (the session's, tests/conftest.py): v1 and v2 answers equal
OnnxClassifier.predict (the contract batch inference uses), every bad request gets its 4xx and the server keeps answering,
health/readiness/metrics, micro-batching of concurrent requests, a clean SIGTERM shutdown. Then
the pure parts (request parsing, limits, v2 encoding, the batcher, model lookup incl. S3)."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import numpy as np
import pytest
import requests

from kubetune.errors import ConfigError, InputError
from kubetune.onnx.model import OnnxClassifier
from kubetune.pipelines.cli import main as cli_main
from kubetune.release import registry
from kubetune.release.manifests import ServingConfig, inference_service
from kubetune.serving.microbatch import MicroBatcher, Overloaded, TextFailed
from kubetune.serving.protocol import RequestError, TextLimits, apply_limits, texts_from_v1, texts_from_v2, v2_outputs
from kubetune.serving.serve import ServeConfig, locate_model, model_name
from kubetune.storage.store import S3Settings, open_store
from tests.conftest import PUBLISHED_NAME, PUBLISHED_VERSION, publish_version
from tests.helpers.serve import assert_same_predictions, running_server

NAME, VERSION = PUBLISHED_NAME, PUBLISHED_VERSION
LIMITS = ["--max-body-bytes", "65536", "--max-texts", "16", "--max-text-chars", "2000", "--long-texts", "reject",
          "--batch-wait-ms", "50", "--threads", "1", "--grpc-port", "0"]


@pytest.fixture(scope="module")
def store(published_store):
    """The session's published model (tests/conftest.py), as deploy publishes it."""
    return published_store


@pytest.fixture(scope="module")
def classifier(store):
    return OnnxClassifier(store.root / registry.version_prefix(NAME, VERSION))


@pytest.fixture(scope="module")
def server(store):
    # the InferenceService's contract: `kubetune serve --model /mnt/models --name N --port P`, where
    # KServe's storage initializer copied the version folder to /mnt/models
    version_dir = store.root / registry.version_prefix(NAME, VERSION)
    with running_server(["--model", str(version_dir), "--name", NAME, *LIMITS]) as server:
        yield server
    assert server.exit_code == 0, f"SIGTERM did not stop the server cleanly (exit {server.exit_code})"


@pytest.fixture(scope="module")
def texts(sms_rows):
    """Real SMS: ham and spam, short and long, non-ASCII."""
    spam = [t for label, t in sms_rows if label == "spam"][:4]
    ham = [t for label, t in sms_rows if label == "ham"][:6]
    return [*spam, *ham, "Ünïcödé ☺ text, 你好", max((t for _, t in sms_rows), key=len)]


def v1(server, body, **kw) -> requests.Response:
    return server.post(f"/v1/models/{NAME}:predict", json=body, **kw)


def v2_request(data, shape=None, datatype="BYTES", name="text") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}]}


def v2_predictions(body: dict) -> list[dict]:
    """An OIP response back into predict()'s dicts."""
    out = {o["name"]: o for o in body["outputs"]}
    labels = json.loads(out["probabilities"]["parameters"]["labels"])
    probs = np.asarray(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    return [{"label": lab, "score": score, "probabilities": dict(zip(labels, row))}
            for lab, score, row in zip(out["label"]["data"], out["score"]["data"], probs.tolist())]


# ---- good requests ------------------------------------------------------------------------------


def test_v1_predictions_equal_the_shared_contract(server, classifier, texts):
    r = v1(server, {"instances": texts})
    assert r.status_code == 200, r.text
    expected = classifier.predict(texts)
    assert_same_predictions(r.json()["predictions"], expected)
    assert {p["label"] for p in expected} == {"ham", "spam"}  # a trained model: the comparison covers both labels
    # objects with a "text" field are the same request
    r2 = v1(server, {"instances": [{"text": t} for t in texts]})
    assert_same_predictions(r2.json()["predictions"], expected)
    # curl -d sends form-encoded content-type: still read as JSON
    r3 = server.post(f"/v1/models/{NAME}:predict", data=json.dumps({"instances": texts[:2]}),
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert r3.status_code == 200, r3.text
    assert_same_predictions(r3.json()["predictions"], expected[:2])


def test_v2_infer_equal_the_shared_contract(server, classifier, texts):
    r = server.post(f"/v2/models/{NAME}/infer", json={"id": "req-1", **v2_request(texts)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == NAME and body["model_version"] == VERSION
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("label", "BYTES", [len(texts)]), ("score", "FP64", [len(texts)]), ("probabilities", "FP64", [len(texts), 2])]
    assert_same_predictions(v2_predictions(body), classifier.predict(texts))
    # shape [N, 1] with nested data, and asking for one output only
    nested = {**v2_request([[t] for t in texts[:3]], shape=[3, 1]), "outputs": [{"name": "label"}]}
    r2 = server.post(f"/v2/models/{NAME}/infer", json=nested)
    assert r2.status_code == 200, r2.text
    assert [o["name"] for o in r2.json()["outputs"]] == ["label"]
    assert r2.json()["outputs"][0]["data"] == [p["label"] for p in classifier.predict(texts[:3])]
    # curl -d (form content type) works for v2 too
    r3 = server.post(f"/v2/models/{NAME}/infer", data=json.dumps(v2_request(texts[:1])),
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert r3.status_code == 200, r3.text


def test_concurrent_requests_are_batched_and_answered_correctly(server, classifier, texts):
    before = batch_counts(server)
    results: dict[int, requests.Response] = {}
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = v1(server, {"instances": [texts[i]]})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(results[i].status_code == 200 for i in range(len(texts)))
    assert_same_predictions([results[i].json()["predictions"][0] for i in range(len(texts))], classifier.predict(texts))
    after = batch_counts(server)
    calls, answered = after[0] - before[0], after[1] - before[1]
    assert answered == len(texts)
    assert calls < len(texts), f"{len(texts)} concurrent requests took {calls} model calls: nothing was batched"


def batch_counts(server) -> tuple[float, float]:
    """(model calls, requests answered by them) from the kubetune_serve_batch_requests histogram."""
    m = metrics(server)
    return m[f'kubetune_serve_batch_requests_count{{model_name="{NAME}"}}'], m[f'kubetune_serve_batch_requests_sum{{model_name="{NAME}"}}']


def metrics(server) -> dict[str, float]:
    r = server.get("/metrics")
    assert r.status_code == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines() if line and not line.startswith("#")}


# ---- bad requests: the right 4xx, and the server keeps serving -----------------------------------

V1_PATH, V2_PATH = f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer"
BAD = [
    # (path, body (bytes or JSON), status, words the answer must contain)
    (V1_PATH, b'{"instances": ["unterminated', 400, "Unrecognized request format"),  # KServe's JSON decoding
    (V1_PATH, b'\xff\xfe{"instances": []}', 400, "Unrecognized request format"),
    (V1_PATH, b'["a", "b"]', 400, "got a JSON array"),
    (V1_PATH, b'5', 400, "got a JSON int"),
    (V1_PATH, b'{"inputs": ["a"]}', 400, 'no "instances" field'),
    (V1_PATH, b'{"instances": "just one string"}', 400, '"instances" must be a list'),
    (V1_PATH, b'{"instances": []}', 400, "no texts"),
    (V1_PATH, b'{"instances": ["ok", 42]}', 400, "instances[1]: expected a string"),
    (V1_PATH, b'{"instances": ["ok", null]}', 400, "got a JSON null"),
    (V1_PATH, b'{"instances": [["nested"]]}', 400, "instances[0]: expected a string"),
    (V1_PATH, b'{"instances": [{"txt": "typo"}]}', 400, 'exactly one field "text"'),
    (V1_PATH, b'{"instances": [{"text": 7}]}', 400, "instances[0]: expected a string"),
    (V1_PATH, {"instances": ["x"] * 17}, 413, "17 texts in one request; the limit is 16"),
    (V1_PATH, {"instances": ["ok", "y" * 2001]}, 413, "text 1 has 2001 characters; the limit is 2000"),
    (V1_PATH, {"instances": ["z" * 1000] * 70}, 413, "over the limit of 65536 bytes"),
    (V2_PATH, v2_request(["a"], datatype="INT32"), 400, "datatype must be BYTES"),
    (V2_PATH, {"inputs": [v2_request(["a"])["inputs"][0], {**v2_request(["b"])["inputs"][0], "name": "t2"}]}, 400, "exactly one input"),
    (V2_PATH, v2_request(["a", "b"], shape=[3]), 400, "says 3 texts, data holds 2"),
    (V2_PATH, v2_request(["a", "b"], shape=[1, 2]), 400, "shape must be [N] or [N, 1]"),
    (V2_PATH, v2_request(["a", 5]), 400, "item 1: expected a string"),
    (V2_PATH, v2_request([]), 400, "no texts"),
    (V2_PATH, {"inputs": "texts"}, 422, ""),  # not an OIP request at all: FastAPI's schema validation
    (V2_PATH, b'{"inputs": [', 422, ""),
]


def still_serving(server, text="are we still on for tonight?"):
    r = v1(server, {"instances": [text]})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("ham", "spam"), r.text


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p.split('/')[1]}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, path, body, status, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.post(path, data=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status == 422:  # FastAPI's own schema validation, in its own format
        assert "detail" in r.json()
    else:
        assert words in r.json()["error"]
    still_serving(server)


def test_body_limit_also_holds_without_content_length(server):
    chunks = (b'{"instances": ["' + b"w" * 8000 + b'"]}' for _ in range(10))  # a generator: sent chunked
    r = server.post(f"/v1/models/{NAME}:predict", data=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]
    still_serving(server)


def test_unknown_model_and_admin_routes(server):
    assert v1(server, {"instances": ["x"]}).status_code == 200
    assert server.post("/v1/models/no-such-model:predict", json={"instances": ["x"]}).status_code == 404
    r = server.post(f"/v2/repository/models/{NAME}/unload")
    assert r.status_code == 403 and "disabled" in r.json()["error"]
    still_serving(server)


# ---- health, readiness, metadata, metrics --------------------------------------------------------


def listening_sockets(proc):
    conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections(kind="inet")
    return conns


def test_server_listens_on_loopback_only_by_default(server):
    """`kubetune serve` without --host answers on 127.0.0.1 only (it used to bind 0.0.0.0 and [::]);
    the image and the InferenceService pass --host 0.0.0.0 themselves."""
    import psutil

    listening = {c.laddr for c in listening_sockets(psutil.Process(server.proc.pid)) if c.status == psutil.CONN_LISTEN}
    port = int(server.url.rsplit(":", 1)[1])
    assert {(ip, p) for ip, p in listening if p == port} == {("127.0.0.1", port)}, listening
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _ in listening), listening  # gRPC too, when on
    args = inference_service(NAME, VERSION, "s3://b/m", "run", ServingConfig())["spec"]["predictor"]["containers"][0]["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_health_readiness_and_metadata(server):
    assert server.get("/").status_code == 200
    assert server.get("/v2/health/live").json() == {"live": True}
    assert server.get("/v2/health/ready").json() == {"ready": True}
    assert server.get(f"/v1/models/{NAME}").json() == {"name": NAME, "ready": True}
    assert server.get(f"/v2/models/{NAME}/ready").json()["ready"] is True
    assert server.get("/v1/models").json() == {"models": [NAME]}
    meta = server.get(f"/v2/models/{NAME}").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "score", "probabilities"]
    assert server.get("/v1/models/no-such-model").status_code == 404
    # the log names the path that runs: the variant and the kernels this CPU dispatches it to
    assert re.search(rf"\[kubetune serve\] model {NAME}: variant optimized, fp32 [\w -]+, \d+ threads", server.output())
    # the probes of the InferenceService deploy renders hit these endpoints
    container = inference_service(NAME, VERSION, "s3://b/m", "run", ServingConfig())["spec"]["predictor"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == 8080  # the --port the container runs with
        assert server.get(container[probe]["httpGet"]["path"]).status_code == 200, probe


def test_metrics_count_texts_rejections_and_latency(server):
    v1(server, {"instances": ["one", "two", "three"]})
    server.post(f"/v1/models/{NAME}:predict", data=b"[]", headers={"content-type": "application/json"})
    m = metrics(server)
    label = f'{{model_name="{NAME}"}}'
    assert m[f"kubetune_serve_texts_total{label}"] >= 3
    assert m[f'kubetune_serve_rejected_requests_total{{model_name="{NAME}",reason="bad_shape"}}'] >= 1
    assert m[f"kubetune_serve_batch_texts_count{label}"] >= 1
    assert m[f"request_predict_seconds_count{label}"] >= 1  # KServe's own latency histograms
    assert m[f'kubetune_serve_model_info{{model_name="{NAME}",task="sequence-classification",version="{VERSION}"}}'] == 1


# ---- the pure parts ---------------------------------------------------------------------------------


def test_text_limits_truncate_or_reject():
    texts = ["short", "x" * 50]
    assert apply_limits(texts, TextLimits(4, 10, "truncate")) == (["short", "x" * 10], 1)
    with pytest.raises(RequestError) as e:
        apply_limits(texts, TextLimits(4, 10, "reject"))
    assert e.value.status == 413 and "text 1 has 50 characters" in e.value.message
    with pytest.raises(RequestError) as e:
        apply_limits(texts, TextLimits(1, 100, "truncate"))
    assert e.value.status == 413 and e.value.reason == "too_many_texts"
    # the character cut keeps what the model's token truncation keeps
    text = "".join(chr(ord("a") + i % 26) for i in range(50))
    assert apply_limits([text], TextLimits(4, 8, "truncate", keep="tail"))[0] == [text[-8:]]
    assert apply_limits([text], TextLimits(4, 8, "truncate", keep="head+tail"))[0] == [text[:2] + text[-6:]]
    assert apply_limits([text], TextLimits(4, 8, "truncate", keep="head"))[0] == [text[:8]]


def test_v1_and_v2_parsing_accept_what_they_should():
    assert texts_from_v1({"instances": ["a", {"text": "b"}]}) == ["a", "b"]
    assert texts_from_v1(b'{"instances": ["a"]}') == ["a"]  # a body sent with a non-JSON content type
    with pytest.raises(RequestError, match="not valid JSON"):
        texts_from_v1(b'{"instances": [')

    class Input:
        name, datatype = "text", "BYTES"

        def __init__(self, data, shape):
            self.data, self.shape = data, shape

    assert texts_from_v2([Input(["a", "b"], [2])]) == ["a", "b"]
    assert texts_from_v2([Input([b"caf\xc3\xa9"], [1, 1])]) == ["café"]  # binary-data extension items
    with pytest.raises(RequestError, match="not valid UTF-8"):
        texts_from_v2([Input([b"\xff"], [1])])


def test_v2_outputs_pass_through_other_prediction_shapes():
    """A token classifier's predict() returns {"entities": [...]}: served as JSON strings, unchanged."""
    results = [{"entities": [{"word": "Paris", "label": "LOC", "score": 0.9}]}, {"entities": []}]
    (out,) = v2_outputs(results)
    assert out["datatype"] == "BYTES" and out["shape"] == [2] and out["parameters"] == {"content_type": "application/json"}
    assert [json.loads(d) for d in out["data"]] == [r["entities"] for r in results]


def test_serve_config_rejects_incompatible_options():
    ServeConfig().check()
    with pytest.raises(ConfigError, match="--max-queue-texts 10 is below --max-texts 20"):
        ServeConfig(max_texts=20, max_queue_texts=10).check()
    with pytest.raises(ConfigError, match="--long-texts 'drop'"):
        ServeConfig(long_texts="drop").check()


def test_microbatcher_batches_concurrent_submits_and_isolates_failures():
    calls = []

    def upper(texts):
        calls.append(len(texts))
        if "boom" in texts:
            raise ValueError("boom")
        return [t.upper() for t in texts]

    async def scenario():
        b = MicroBatcher(upper, max_batch=8, max_wait_s=0.05, max_queue=10)
        got = await asyncio.gather(*(b.submit([f"t{i}", f"u{i}"]) for i in range(4)))
        assert got == [[f"T{i}", f"U{i}"] for i in range(4)]
        assert calls == [8]  # four requests, one call
        with pytest.raises(TextFailed) as e:  # the request's own text, named (issue 12)
            await b.submit(["boom"])
        assert e.value.index == 0 and isinstance(e.value.cause, ValueError)
        assert await b.submit(["after"]) == ["AFTER"]  # the worker survived the failure
        with pytest.raises(Overloaded):
            await b.submit(["x"] * 11)
        big = await b.submit([str(i) for i in range(10)])  # larger than max_batch: runs alone, unsplit
        assert big == [str(i) for i in range(10)] and calls[-1] == 10

    asyncio.run(scenario())


def test_locate_model_by_folder_registry_path_name_and_s3(store, tmp_path, s3_bucket, exported_model, tmp_path_factory):
    downloads = []

    def workdir():
        downloads.append(tmp_path / f"dl{len(downloads)}")
        downloads[-1].mkdir()
        return downloads[-1]

    version_dir = store.root / registry.version_prefix(NAME, VERSION)
    settings = S3Settings.from_env()
    by_folder = locate_model(str(version_dir), "", settings, workdir)
    assert by_folder.path == version_dir and by_folder.name is None
    assert model_name(by_folder, "") == NAME  # from the InferenceService manifest deploy writes beside the model
    assert model_name(by_folder, "other-name") == "other-name"
    assert locate_model(f"{store.root}/models/{NAME}/production", "", settings, workdir).path == version_dir
    by_name = locate_model(NAME, str(store.root), settings, workdir)
    assert (by_name.path, by_name.name, by_name.version) == (version_dir, NAME, VERSION)
    assert downloads == []  # local models are served in place: nothing written (read-only root filesystems)

    s3 = open_store(f"s3://{s3_bucket}/kt", settings)
    publish_version(s3, exported_model, tmp_path_factory.mktemp("staging"))
    via_alias = locate_model(f"s3://{s3_bucket}/kt/models/{NAME}/production", "", settings, workdir)
    assert via_alias.version == VERSION and (via_alias.path / "model.onnx").read_bytes() == (version_dir / "model.onnx").read_bytes()
    s3.publish_dir(version_dir, "exports/m1")  # any folder with model.onnx, outside a registry
    plain = locate_model(f"s3://{s3_bucket}/kt/exports/m1", "", settings, workdir)
    assert plain.name is None and (plain.path / "model.onnx").is_file() and len(downloads) == 2
    with pytest.raises(InputError, match="no version or alias 'staging'"):
        locate_model(f"s3://{s3_bucket}/kt/models/{NAME}/staging", "", settings, workdir)


def test_cli_rejects_bad_serve_arguments_before_starting(tmp_path, capsys):
    assert cli_main(["serve", "--model", "no-such-model", "--store", str(tmp_path)]) == 2
    assert "no-such-model has no version or alias 'production'" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tmp_path), "--max-texts", "0"]) == 2
    assert "--max-texts 0: must be at least 1" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tmp_path)]) == 2
    assert "no model.onnx in this folder" in capsys.readouterr().err


def test_monitoring_metrics_follow_the_traffic(server, sms_rows):
    """Predicted labels, confidence, input lengths and the unknown-token share on /metrics move with
    what is sent: spam texts raise the spam count, Chinese text raises the unknown tokens."""
    from tests.helpers.corpora import chinese_reviews

    label = f'{{model_name="{NAME}"}}'

    def counts():
        m = metrics(server)
        return (m.get(f'kubetune_serve_predictions_total{{label="spam",model_name="{NAME}"}}', 0.0),
                m.get(f'kubetune_serve_predictions_total{{label="ham",model_name="{NAME}"}}', 0.0),
                m[f"kubetune_serve_confidence_count{label}"], m[f"kubetune_serve_input_tokens_count{label}"],
                m[f"kubetune_serve_unknown_tokens_total{label}"], m[f"kubetune_serve_content_tokens_total{label}"])

    before = counts()
    spam = [t for lab, t in sms_rows if lab == "spam"][:8]
    answer = v1(server, {"instances": spam}).json()["predictions"]
    after = counts()
    assert after[0] - before[0] == sum(p["label"] == "spam" for p in answer) > 0
    assert after[1] - before[1] == sum(p["label"] == "ham" for p in answer)
    assert after[2] - before[2] == after[3] - before[3] == len(spam)
    assert after[4] - before[4] < 0.02 * (after[5] - before[5])  # English: almost no unknown tokens
    assert v1(server, {"instances": [t[:200] for t, _ in chinese_reviews(8)]}).status_code == 200
    chinese = counts()
    assert (chinese[4] - after[4]) > 0.3 * (chinese[5] - after[5])  # the vocabulary does not cover the script
    text = server.get("/metrics").text
    assert "# HELP kubetune_serve_unknown_tokens_total tokens the tokenizer mapped to its unknown token" in text
    assert {line.split("{")[0] for line in text.splitlines() if line.startswith("kubetune_serve_predictions_total")} == \
        {"kubetune_serve_predictions_total"}
    assert len([line for line in text.splitlines() if line.startswith("kubetune_serve_predictions_total")]) == 2  # ham, spam
