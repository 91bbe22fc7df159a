"""Does micro-batching pay? The same model served twice, with batching off (one text per model
call) and on (the defaults), under the same load: C concurrent clients, each sending R one-text
v1 requests of real SMS. Prints throughput and latency for both and their ratio (same run, same
machine, so the ratio is what to read, not the absolute numbers).

    python benchmarks/serve_batching.py --model ./kubetune-store/models/sms-spam/production
    python benchmarks/serve_batching.py --model ... --clients 16 --requests 40 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers (kubetune itself is installed)
from kubetune.storage import assets  # noqa: E402
from tests.helpers.serve import running_server  # noqa: E402

SETTINGS = {"batching off": ["--max-batch-texts", "1", "--batch-wait-ms", "0"], "batching on": []}


def sms_texts(n: int) -> list[str]:
    path = assets.resolve("builtin:sms-spam")[0]
    with open(path, encoding="utf-8", newline="") as f:
        return [row[1] for row, _ in zip(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), range(n))]


def load(url: str, texts: list[str], clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        session = requests.Session()
        barrier.wait()
        for i in range(per_client):
            text = texts[(c * per_client + i) % len(texts)]
            t0 = time.perf_counter()
            r = session.post(url, json={"instances": [text]}, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                (latencies.append(dt) if r.status_code == 200 else errors.append(r.status_code))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies) * 1000,
            "p95": latencies[int(0.95 * (len(latencies) - 1))] * 1000, "errors": len(errors)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", required=True, help="what `kubetune serve --model` takes")
    p.add_argument("--name", default="bench")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=30, help="requests per client")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    a = p.parse_args()
    texts = sms_texts(1000)
    rows = {}
    for label, extra in SETTINGS.items():
        args = ["--model", a.model, "--name", a.name, "--threads", str(a.threads), "--max-queue-texts", "100000", *extra]
        with running_server(args) as server:
            url = f"{server.url}/v1/models/{a.name}:predict"
            load(url, texts, a.clients, 3)  # warm-up
            rows[label] = load(url, texts, a.clients, a.requests)
    print(f"{a.clients} clients x {a.requests} one-text requests each\n")
    print(f"{'':<14}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
    for label, r in rows.items():
        print(f"{label:<14}{r['rps']:>8.1f}{r['p50']:>9.1f}{r['p95']:>9.1f}{r['errors']:>8}")
    on, off = rows["batching on"], rows["batching off"]
    print(f"\nthroughput ratio (on / off): {on['rps'] / off['rps']:.2f}x; p50 latency ratio: {on['p50'] / off['p50']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
