"""Does bad traffic hurt good traffic? One `kubetune serve` process, two phases in the same run:
N clients of good one-to-three-text v1 requests of real SMS alone (the baseline), then the same
clients while M more clients send only malformed requests (lone surrogates, 100,000-deep JSON,
bad v2 binary length prefixes, wrong types). Prints requests/s, p50/p95/p99 latency and error
counts of the good requests in both phases, the answers the malformed ones got, and the ratio of
good throughput with/without the bad clients. Exit 1 if any good request failed.

    python benchmarks/serve_load.py --model ./kubetune-store/models/sms-spam/production
    python benchmarks/serve_load.py --model ... --clients 16 --bad-clients 4 --requests 40

Loopback only; bounded by --requests per good client (the bad clients stop with them).

    python benchmarks/serve_load.py --model ./onnx-folder --saturation

`--saturation` (a local model folder) also asks whether serving keeps up with batch inference: the
batch path (OnnxClassifier.score over the texts, the same variant and thread count the server
picks) against the server at saturation (--clients clients, each sending requests of
--saturation-texts texts back to back, micro-batched by the server) on the same texts; target:
server rows/s >= 80% of the batch path's. The clients run on the same cores as the server.
"""

from __future__ import annotations

import argparse
import collections
import json
import struct
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers (kubetune itself is installed)
from benchmarks.serve_batching import sms_texts  # noqa: E402
from tests.helpers.serve import running_server  # noqa: E402


def malformed(name: str) -> list[tuple[str, bytes, dict]]:
    v1, v2 = f"/v1/models/{name}:predict", f"/v2/models/{name}/infer"
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 7}}]}).encode()
    return [
        (v1, '{"instances": ["fine", "\\ud800"]}'.encode(), {}),
        (v1, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
        (v2, json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]}).encode(), {}),
        (v2, header + struct.pack("<I", 1000) + b"abc", {"inference-header-content-length": str(len(header)),
                                                        "content-type": "application/octet-stream"}),
        (v1, b'{"instances": ["ok", 7]}', {}),
    ]


def percentile(values: list[float], q: float) -> float:
    return values[min(int(q * len(values)), len(values) - 1)] * 1000 if values else float("nan")


def run_phase(url: str, name: str, texts: list[str], clients: int, per_client: int, bad_clients: int) -> dict:
    latencies: list[float] = []
    good_errors: collections.Counter = collections.Counter()
    bad_answers: collections.Counter = collections.Counter()
    lock = threading.Lock()
    done = threading.Event()
    bad = malformed(name)

    def good(c: int) -> None:
        session = requests.Session()
        for i in range(per_client):
            batch = texts[(c * per_client + i) % len(texts):][: 1 + i % 3]
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/models/{name}:predict", json={"instances": batch}, timeout=120)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == len(batch)
                outcome = None if ok else r.status_code
            except requests.RequestException as e:
                outcome = type(e).__name__
            with lock:
                latencies.append(time.perf_counter() - t0) if outcome is None else good_errors.update([outcome])

    def attacker(c: int) -> None:
        session, i = requests.Session(), c
        while not done.is_set():
            path, body, headers = bad[i % len(bad)]
            try:
                status = session.post(url + path, data=body, headers={"content-type": "application/json", **headers},
                                      timeout=120).status_code
            except requests.RequestException as e:
                status = type(e).__name__
            with lock:
                bad_answers.update([status])
            i += 1

    goods = [threading.Thread(target=good, args=(c,)) for c in range(clients)]
    bads = [threading.Thread(target=attacker, args=(c,)) for c in range(bad_clients)]
    t0 = time.perf_counter()
    for t in bads + goods:
        t.start()
    for t in goods:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    for t in bads:
        t.join()
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99), "ok": len(latencies), "failed": sum(good_errors.values()),
            "good_errors": dict(good_errors), "bad_answers": dict(bad_answers), "wall": wall}


def batch_rows_per_s(model_dir: Path, texts: list[str], threads: int) -> tuple[float, str]:
    """The batch path on `texts`: rows/s and the variant it ran (auto, as the server picks)."""
    from kubetune.core.system import usable_cpus
    from kubetune.onnx.model import OnnxClassifier

    clf = OnnxClassifier(model_dir, threads=threads or usable_cpus())
    clf.score(texts[:64], 32)  # warm-up
    t0 = time.perf_counter()
    clf.score(texts, 32)
    return len(texts) / (time.perf_counter() - t0), f"{clf.variant}, {clf.kernels}"


def saturate(url: str, name: str, texts: list[str], clients: int, per_request: int) -> float:
    """Rows/s the server answers when `clients` send `per_request`-text requests back to back over `texts`."""
    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    nxt, lock, failed = iter(range(len(chunks))), threading.Lock(), []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            r = session.post(f"{url}/v1/models/{name}:predict", json={"instances": chunks[i]}, timeout=120)
            if r.status_code != 200:
                failed.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise SystemExit(f"saturation: {len(failed)} requests failed: {collections.Counter(failed)}")
    return len(texts) / (time.perf_counter() - t0)


def saturation(a, texts: list[str]) -> None:
    model_dir = Path(a.model)
    if not (model_dir / "model.onnx").is_file():
        raise SystemExit(f"--saturation needs a local model folder (with model.onnx), not {a.model}")
    batch, path = batch_rows_per_s(model_dir, texts, a.threads)
    args = ["--model", a.model, "--name", a.name, "--threads", str(a.threads), "--max-queue-texts", "100000"]
    with running_server(args) as server:
        saturate(server.url, a.name, texts[:256], a.clients, a.saturation_texts)  # warm-up
        served = saturate(server.url, a.name, texts, a.clients, a.saturation_texts)
    ratio = served / batch
    print(f"\nserving vs batch inference ({len(texts)} SMS texts, {path}):")
    print(f"  batch path (OnnxClassifier.score)            {batch:>8.1f} rows/s")
    print(f"  server at saturation ({a.clients} clients x {a.saturation_texts}-text requests) {served:>8.1f} rows/s")
    print(f"  server / batch: {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'MISSED'})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", required=True, help="what `kubetune serve --model` takes")
    p.add_argument("--name", default="bench")
    p.add_argument("--clients", type=int, default=8, help="clients sending good requests")
    p.add_argument("--bad-clients", type=int, default=2, help="clients sending only malformed requests (second phase)")
    p.add_argument("--requests", type=int, default=25, help="requests per good client and phase")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    p.add_argument("--saturation", action="store_true", help="also compare the server at saturation with the batch path")
    p.add_argument("--saturation-texts", type=int, default=16, help="texts per request in the saturation phase")
    a = p.parse_args()
    texts = sms_texts(1000)
    if a.saturation:
        saturation(a, sms_texts(5574))
    args = ["--model", a.model, "--name", a.name, "--threads", str(a.threads), "--max-queue-texts", "100000"]
    with running_server(args) as server:
        run_phase(server.url, a.name, texts, a.clients, 2, 0)  # warm-up
        rows = {"good only": run_phase(server.url, a.name, texts, a.clients, a.requests, 0),
                f"+{a.bad_clients} bad clients": run_phase(server.url, a.name, texts, a.clients, a.requests, a.bad_clients)}
        tracebacks = server.output().count("Traceback")
    print(f"{a.clients} good clients x {a.requests} v1 requests (1-3 texts) per phase\n")
    print(f"{'':<18}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'ok':>6}{'failed':>8}")
    for label, r in rows.items():
        print(f"{label:<18}{r['rps']:>8.1f}{r['p50']:>9.1f}{r['p95']:>9.1f}{r['p99']:>9.1f}{r['ok']:>6}{r['failed']:>8}")
    mixed = rows[f"+{a.bad_clients} bad clients"]
    print(f"\nmalformed requests sent: {sum(mixed['bad_answers'].values())}, answered {mixed['bad_answers']}")
    print(f"good throughput with / without the bad clients: {mixed['rps'] / rows['good only']['rps']:.2f}x; "
          f"tracebacks in the server log: {tracebacks}")
    failed = sum(r["failed"] for r in rows.values())
    if failed:
        print(f"FAILED good requests: {[r['good_errors'] for r in rows.values()]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
