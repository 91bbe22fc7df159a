"""One bad request never hurts another (issue 12): per-item validation before any model work
(lone surrogates, nesting depth, v2 shapes and binary lengths), the micro-batcher failing only the
request whose text fails the model, unexpected errors as a 500 for that request only with a
rate-limited one-line log, and a real `kubetune serve` under concurrent good + malformed traffic
(bounded counts, loopback only): no good request fails and health answers throughout. Also the
one-line exit-2 errors of `serve` on folders that are not a servable model."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests

from kubetune.errors import InputError
from kubetune.release import registry
from kubetune.serving.microbatch import MicroBatcher
from kubetune.serving.protocol import RequestError, decode_json, texts_from_v1, texts_from_v2
from tests.helpers.serve import ROOT, free_port, running_server
from tests.serving.test_serve import NAME, VERSION, listening_sockets

V1_PATH, V2_PATH = f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer"
DEEP = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


class Input:
    name, datatype = "text", "BYTES"

    def __init__(self, data, shape):
        self.data, self.shape = data, shape


def packed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def v2_binary(raw: bytes, shape: list[int]) -> tuple[bytes, dict]:
    """A v2 request in the binary-data extension: JSON header, then the tensor's bytes."""
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"}


# ---- the pure parts ---------------------------------------------------------------------------------


def test_items_are_validated_before_the_model_runs():
    with pytest.raises(RequestError, match=r"instances\[1\]: not valid Unicode \(a lone surrogate at character 2\)") as e:
        texts_from_v1({"instances": ["ok", "ab\ud800"]})
    assert e.value.status == 400
    with pytest.raises(RequestError, match=r"instances\[0\]: not valid Unicode"):
        texts_from_v1(b'{"instances": [{"text": "\\udfff"}]}')
    with pytest.raises(RequestError, match="item 0: not valid Unicode"):
        texts_from_v2([Input(["\ud800"], [1])])
    with pytest.raises(RequestError, match="nested too deeply") as e:
        decode_json(DEEP)
    assert e.value.status == 400
    with pytest.raises(RequestError, match="shape must be"):
        texts_from_v2([Input(["a"], ["1"])])


def test_v2_binary_lengths_are_checked_before_kserve_decodes_them():
    from kubetune.serving.protocol import check_binary_request, split_bytes

    # binary-data extension: lengths checked against the data and the shape
    assert split_bytes(packed(b"a", b"caf\xc3\xa9"), 2, "text") == [b"a", b"caf\xc3\xa9"]
    with pytest.raises(RequestError, match="length prefix says 1000 bytes, 3 are left"):
        split_bytes(struct.pack("<I", 1000) + b"abc", 1, "text")
    with pytest.raises(RequestError, match="ends inside a 4-byte length prefix"):
        split_bytes(packed(b"a") + b"\x01\x00", 2, "text")
    body, headers = v2_binary(packed(b"a", b"b"), [3])
    with pytest.raises(RequestError, match="shape says 3 texts, the binary data holds 2"):
        check_binary_request(body, int(headers["inference-header-content-length"]))
    body, headers = v2_binary(packed(b"a"), [1])
    check_binary_request(body, int(headers["inference-header-content-length"]))
    with pytest.raises(RequestError, match="runs past the end of the body"):
        check_binary_request(body[:-1], int(headers["inference-header-content-length"]))
    with pytest.raises(RequestError, match="larger than the body"):
        check_binary_request(body, len(body) + 1)
    body, headers = v2_binary(packed(b"ok", b"\xed\xa0\x80"), [2])  # an encoded surrogate is not UTF-8
    with pytest.raises(RequestError, match="item 1: not valid UTF-8"):
        check_binary_request(body, int(headers["inference-header-content-length"]))


def test_microbatcher_fails_only_the_request_whose_text_fails():
    """A text the model cannot take fails its own request (naming the text); the requests that
    shared its batch get their answers."""
    calls = []

    def model(texts):
        calls.append(list(texts))
        if any("poison" in t for t in texts):
            raise ValueError("cannot tokenize")
        return [t.upper() for t in texts]

    async def scenario():
        b = MicroBatcher(model, max_batch=16, max_wait_s=0.05, max_queue=100)
        got = await asyncio.gather(b.submit(["a", "b"]), b.submit(["c", "poison", "d"]), b.submit(["e"]),
                                   return_exceptions=True)
        assert got[0] == ["A", "B"] and got[2] == ["E"]  # before issue 12: both got the ValueError
        from kubetune.serving.microbatch import TextFailed

        assert isinstance(got[1], TextFailed) and got[1].index == 1 and isinstance(got[1].cause, ValueError)
        assert calls[0] == ["a", "b", "c", "poison", "d", "e"]  # one call for all three, then isolation
        # a request that fails on its own with one text: TextFailed(0) without further calls
        before = len(calls)
        with pytest.raises(TextFailed) as e:
            await b.submit(["poison"])
        assert e.value.index == 0 and len(calls) == before + 1
        assert await b.submit(["after"]) == ["AFTER"]

    asyncio.run(scenario())


def test_microbatcher_keeps_an_error_only_the_combination_raises():
    """No single text fails: the request gets the call's error (a 500 later), still alone."""

    def model(texts):
        if len(texts) > 2:
            raise RuntimeError("batch too big for this fake")
        return list(texts)

    async def scenario():
        b = MicroBatcher(model, max_batch=16, max_wait_s=0.05, max_queue=100)
        got = await asyncio.gather(b.submit(["a"]), b.submit(["b", "c", "d"]), return_exceptions=True)
        assert got[0] == ["a"] and isinstance(got[1], RuntimeError)

    asyncio.run(scenario())


def test_error_log_is_one_line_per_error_and_rate_limited(caplog):
    from kubetune.serving.server import ErrorLog, request_id

    log = ErrorLog(burst=3, window_s=0.3)
    with caplog.at_level(logging.ERROR, logger="kubetune.serve"):
        logged = [log.error(f"request r{i}: boom") for i in range(10)]
        assert logged == [True] * 3 + [False] * 7
        time.sleep(0.35)
        assert log.error("request r10: boom")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and "7 similar errors not logged" in lines[-1]
    assert not any(r.exc_info for r in caplog.records)  # no traceback per request
    assert request_id({"x-request-id": "abc-123"}) == "abc-123"
    assert len(request_id({"x-request-id": "bad id\nwith newline"})) == 16  # not logged as given


# ---- a real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(published_store):
    return published_store


@pytest.fixture(scope="module")
def server(store):
    version_dir = store.root / registry.version_prefix(NAME, VERSION)
    with running_server(["--model", str(version_dir), "--name", NAME, "--batch-wait-ms", "20", "--threads", "1",
                         "--grpc-port", str(free_port())]) as server:
        yield server


MALFORMED = [
    # (path, body, extra headers, status)
    (V1_PATH, '{"instances": ["fine", "\\ud800"]}'.encode(), {}, 400),
    (V1_PATH, '{"instances": [{"text": "\\udbff"}]}'.encode(), {}, 400),
    (V2_PATH, json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]}).encode(), {}, 400),
    (V1_PATH, DEEP, {}, 400),
    (V2_PATH, *v2_binary(struct.pack("<I", 1000) + b"abc", [1]), 400),
    (V2_PATH, *v2_binary(packed(b"a", b"b"), [3]), 400),
    (V2_PATH, *v2_binary(packed(b"\xed\xa0\x80"), [1]), 400),  # an encoded surrogate: not UTF-8
    (V1_PATH, b'{"instances": ["ok", 7]}', {}, 400),
    (V1_PATH, DEEP, {"content-type": "application/x-www-form-urlencoded"}, 400),  # curl -d: parsed by kubetune, not KServe
    (V2_PATH, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400),  # FastAPI's parser: RecursionError
]


def post(server, path, body, headers, timeout=60):
    return requests.post(server.url + path, data=body, headers={"content-type": "application/json", **headers}, timeout=timeout)


@pytest.mark.parametrize("i", range(len(MALFORMED)))
def test_each_malformed_request_gets_its_4xx(server, i):
    path, body, headers, status = MALFORMED[i]
    r = post(server, path, body, headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_grpc_also_listens_on_loopback_only(server):
    import psutil

    listening = {c.laddr for c in listening_sockets(psutil.Process(server.proc.pid)) if c.status == psutil.CONN_LISTEN}
    # HTTP and gRPC (which may take 127.0.0.1 on an IPv6 socket: ::ffff:127.0.0.1)
    assert len(listening) == 2 and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), listening


def test_binary_v2_request_is_answered_like_json(server):
    texts = ["WINNER! claim your prize now", "see you at 6, café?"]
    body, headers = v2_binary(packed(*(t.encode() for t in texts)), [2])
    r = post(server, V2_PATH, body, headers)
    assert r.status_code == 200, r.text
    j = post(server, V2_PATH, json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}]}).encode(), {})
    assert r.json()["outputs"] == j.json()["outputs"]


def test_good_requests_never_fail_under_malformed_traffic(server, sms_rows):
    """8 clients of good traffic (15 requests each, 1-3 real SMS) while 2 clients send malformed
    requests and one polls health: every good request answered 200 with a label per text, every bad
    one a 4xx, health 200 throughout, and no traceback in the server log."""
    texts = [t for _, t in sms_rows[:60]]
    good, bad, health, errors = [], [], [], []
    done = threading.Event()

    def good_client(c: int) -> None:
        for i in range(15):
            batch = texts[(c * 15 + i) % 58:(c * 15 + i) % 58 + 1 + i % 3]
            try:
                r = post(server, V1_PATH, json.dumps({"instances": batch}).encode(), {})
                ok = r.status_code == 200 and len(r.json()["predictions"]) == len(batch)
                good.append(ok or r.status_code)
            except requests.RequestException as e:
                good.append(repr(e))

    def bad_client(c: int) -> None:
        i = c
        while not done.is_set():
            path, body, headers, status = MALFORMED[i % len(MALFORMED)]
            try:
                bad.append(post(server, path, body, headers).status_code)
            except requests.RequestException as e:
                errors.append(repr(e))
            i += 1

    def health_client() -> None:
        while not done.is_set():
            try:
                health.append(requests.get(server.url + "/v2/health/ready", timeout=10).status_code)
            except requests.RequestException as e:
                health.append(repr(e))
            time.sleep(0.2)

    extra = [threading.Thread(target=bad_client, args=(c,)) for c in range(2)] + [threading.Thread(target=health_client)]
    goods = [threading.Thread(target=good_client, args=(c,)) for c in range(8)]
    for t in extra + goods:
        t.start()
    for t in goods:
        t.join(timeout=120)
    done.set()
    for t in extra:
        t.join(timeout=60)
    assert len(good) == 120 and [g for g in good if g is not True] == []
    assert bad and errors == [] and set(bad) <= {400}, sorted(set(bad))
    assert health and set(health) == {200}
    assert "Traceback" not in server.output()


# ---- folders that are not a servable model: one line, exit 2 ---------------------------------------------


def serve_cli(model_dir, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.pipelines.cli", "serve", "--model", str(model_dir), "--name", NAME,
                           "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def broken_copy(exported_model, tmp_path, name, damage):
    folder = tmp_path / name
    shutil.copytree(exported_model, folder)
    damage(folder)
    return folder


@pytest.mark.slow  # four `kubetune serve` processes
@pytest.mark.parametrize("case,words", [
    ("junk", "ONNX Runtime cannot load it"),
    ("truncated", "ONNX Runtime cannot load it"),
    ("no-info", "no kubetune.json"),
    ("unsealed", "unsealed .tmp- folder"),
])
def test_serve_refuses_a_broken_model_folder_in_one_line(exported_model, tmp_path, case, words):
    def damage(folder):
        for onnx in folder.glob("*.onnx"):  # every variant: the server may pick model.int8.onnx on a CPU
            if case == "junk":
                onnx.write_bytes(b"this is not an onnx file\n" * 100)
            elif case == "truncated":
                onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 3])
        if case == "no-info":
            (folder / "kubetune.json").unlink()

    name = ".v1.tmp-1234abcd" if case == "unsealed" else case
    proc = serve_cli(broken_copy(exported_model, tmp_path, name, damage))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_locate_model_refuses_an_unsealed_folder(exported_model, tmp_path):
    from kubetune.serving.serve import locate_model
    from kubetune.storage.store import S3Settings

    folder = broken_copy(exported_model, tmp_path, ".v1.tmp-00ff00ff", lambda f: None)
    with pytest.raises(InputError, match="unsealed"):
        locate_model(str(folder), "", S3Settings(), lambda: tmp_path)


def test_kserve_rejections_are_logged_as_one_line():
    """KServe's own 400s (e.g. a lone surrogate orjson refuses) logged a traceback each."""
    import io

    from kubetune.serving.serve import kserve_argv

    with kserve_argv():
        from kserve.errors import InvalidInput

        from kubetune.serving.server import OneLineRejections
    from kubetune.serving.server import ErrorLog

    out = io.StringIO()
    logger = logging.getLogger("kt-test-rejections")
    logger.addHandler(logging.StreamHandler(out))
    limit = ErrorLog(burst=3, window_s=3600)
    logger.addFilter(OneLineRejections(limit))

    def reject(n: int) -> None:
        for _ in range(n):
            try:
                raise InvalidInput("Unrecognized request format: str is not valid UTF-8: surrogates not allowed")
            except InvalidInput as e:
                logger.error("Exception:", exc_info=e)

    reject(100)  # a flood of bad requests: the first 3 in the window are logged, the rest counted
    line = "rejected a request (400): Unrecognized request format: str is not valid UTF-8: surrogates not allowed"
    assert out.getvalue() == f"{line}\n" * 3
    limit._window_start -= 3600  # the next window: its first line says how many were held back
    reject(1)
    assert out.getvalue().splitlines()[3] == f"{line} (97 similar errors not logged in the last 3600s)"
