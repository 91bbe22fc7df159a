"""Training progress for Kubeflow Trainer: a TrainJob's status.trainerStatus (progress, ETA, metrics).

When the Trainer's progress plugin is on (Trainer v2.2+, feature gate TrainJobProgress), it puts three
variables into the training pods: KUBEFLOW_TRAINER_STATUS_URL (an https endpoint of the controller),
KUBEFLOW_TRAINER_STATUS_CA_CERT (the CA file to trust it) and KUBEFLOW_TRAINER_STATUS_TOKEN (a
projected ServiceAccount token file). Rank 0 then POSTs

    {"trainerStatus": {"progressPercentage": 42, "estimatedRemainingSeconds": 120,
                       "metrics": [{"name": "loss", "value": "0.123"}], "lastUpdatedTime": "...Z"}}

and the controller copies it into the TrainJob's status, where `kubectl get trainjob`, the SDK and
kubetune's launcher (kubetune.steps.distributed) read it. Anywhere else (no URL: a pod, a laptop, a
PyTorchJob) `from_env` returns None and nothing is sent. Reports are throttled (`interval_s`); a
report that fails is said once in the log and training goes on: progress is for watching, and
losing it must not lose the run.

    python -c "from kubetune.training.trainer_status import TrainerStatus as T; print(T.from_env())"
"""

from __future__ import annotations

import json
import math
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from kubetune.core.progress import log

ENV_URL = "KUBEFLOW_TRAINER_STATUS_URL"
ENV_CA_CERT = "KUBEFLOW_TRAINER_STATUS_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_STATUS_TOKEN"
INTERVAL_S = 30.0  # between reports (the last one of an epoch and of the run are always sent)
MAX_METRICS = 256  # the TrainJob CRD's limit


@dataclass
class TrainerStatus:
    url: str
    ca_cert: str = ""  # a CA file; empty: the system's trust store
    token_file: str = ""
    interval_s: float = INTERVAL_S
    step: str = "finetune"  # the log prefix
    last: float = field(default=-math.inf, repr=False)
    failed: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, rank: int = 0, **kw) -> "TrainerStatus | None":
        """The reporter of this process: only rank 0 of a TrainJob whose Trainer has the progress plugin on."""
        env = os.environ if environ is None else environ
        url = env.get(ENV_URL, "")
        if not url or rank != 0:
            return None
        if not url.startswith("https://"):  # the token is a credential: never sent in the clear
            log(kw.get("step", "finetune"), f"{ENV_URL}={url!r} is not an https URL: TrainJob progress is not reported")
            return None
        return cls(url, env.get(ENV_CA_CERT, ""), env.get(ENV_TOKEN, ""), **kw)

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval_s

    def report(self, percent: float, remaining_s: float | None, metrics: Mapping[str, float], *, force: bool = False) -> bool:
        """Send one update (unless one was sent less than interval_s ago and not `force`); True if sent."""
        if not force and not self.due():
            return False
        self.last = time.monotonic()
        status = {"progressPercentage": int(min(max(percent, 0), 100)),
                  "metrics": [{"name": k, "value": f"{v:.6g}"} for k, v in list(metrics.items())[:MAX_METRICS] if math.isfinite(v)],
                  "lastUpdatedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if remaining_s is not None and math.isfinite(remaining_s):
            status["estimatedRemainingSeconds"] = int(max(remaining_s, 0))
        try:
            token = Path(self.token_file).read_text().strip() if self.token_file else ""
            request = urllib.request.Request(self.url, data=json.dumps({"trainerStatus": status}).encode(), method="POST",
                                             headers={"Content-Type": "application/json",
                                                      **({"Authorization": f"Bearer {token}"} if token else {})})
            context = ssl.create_default_context(cafile=self.ca_cert or None)
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                response.read()
        except (OSError, ValueError, urllib.error.URLError, ssl.SSLError) as e:  # watching failed, training did not: go on
            if not self.failed:
                log(self.step, f"TrainJob progress report to {self.url} failed ({type(e).__name__}: {e}); training goes on, "
                               "later reports are tried without this message")
                self.failed = True
            return False
        return True
