"""Step between validate and tokenize - freshness: skip retraining when the data did not change.

    python -m kubetune.steps.freshness --store ./kubetune-store --run-id dev --dataset /tmp/kt/dataset \
        --name sms-spam [--force true]

A scheduled run (kubetune schedule, or the CronJob in k8s/) retrains on whatever the data URIs hold
at that time. When the validated splits are exactly those the current `production` model was
trained on (same data fingerprint, recorded in the registry at deploy), training again would only
burn GPU time for the same model: the run ends here with outcome `skipped` (exit 0) and the
summary says why. `force` (kubetune run --force, pipeline parameter `force`) trains anyway, e.g.
after changing hyperparameters or the base model, which the data fingerprint does not cover.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kubetune.core.config import parse_bool
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import log
from kubetune.release import registry
from kubetune.storage.contracts import DatasetMeta, data_fingerprint

STEP = "freshness"


def decide(store, name: str, fingerprints: dict[str, str], force: bool) -> dict:
    """Train or not: `fingerprints` (the dataset's, per split) against production's recorded one."""
    fingerprint = data_fingerprint(fingerprints)
    production = registry.read_alias(store, name)
    recorded = (production or {}).get("data_fingerprint")
    decision = {"train": True, "fingerprint": fingerprint, "production_version": (production or {}).get("version"),
                "production_fingerprint": recorded, "forced": force}
    if production is None:
        decision["reason"] = f"{name} has no production model yet"
    elif recorded != fingerprint:
        decision["reason"] = "the data changed since the production model" if recorded else \
            f"production {production['version']} has no recorded data fingerprint"
    elif force:
        decision["reason"] = f"the data equals production {production['version']}'s, but training was forced"
    else:
        decision.update(train=False, reason=f"the data is unchanged since production {production['version']} (fingerprint "
                                              f"{fingerprint[:12]}); nothing to retrain (force to train anyway)")
    return decision


def run_step(*, store_uri: str, run_id: str, model_name: str, dataset_dir: Path, force: bool) -> bool:
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config={"model_name": model_name, "force": force}) as ctx:
        decision = decide(ctx.store, registry.check_name(model_name), DatasetMeta.read(dataset_dir).fingerprints(), force)
        log(STEP, ("training: " if decision["train"] else "SKIPPING training: ") + decision["reason"])
        ctx.outputs.update(decision)
    return decision["train"]


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.freshness", __doc__)
    p.add_argument("--dataset", required=True, type=Path, help="validated dataset folder (validate's output)")
    p.add_argument("--name", required=True)
    p.add_argument("--force", type=parse_bool, default=False, metavar="BOOL")
    a = p.parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, model_name=a.name, dataset_dir=a.dataset, force=a.force))


if __name__ == "__main__":
    sys.exit(main())
