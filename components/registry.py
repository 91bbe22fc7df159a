"""The model registry, kept in the store:

  models/<name>/<version>/            a published model (sealed by _MANIFEST.json, written last):
                                      model.onnx, tokenizer files, labels.json, kubetune.json,
                                      metrics.json, MODEL_CARD.md, inferenceservice.yaml
  models/<name>/aliases/<alias>.json  {"version", "uri", "updated_at", "run_id", "previous"}

Versions are `v<UTC yyyymmdd-HHMMSS>-<run id>`: unique per run, sortable by time. An alias moves
with one atomic write, so a reader sees the old or the new version, never a mix; the version it
points to is always complete because it is published before the alias moves.

A model reference is `models/<name>/<alias or version>`, or `<name>` for its production alias.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from components.errors import InputError
from components.store import NotFound, Store, join

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
PRODUCTION = "production"


def check_name(name: str) -> str:
    """Registry names double as KServe InferenceService names: DNS-1035 labels, short enough
    for the suffixes KServe appends."""
    if not NAME_RE.match(name or ""):
        raise InputError(
            f"model name {name!r}: use 1-40 lowercase letters, digits and '-', starting with a letter "
            "(it becomes the InferenceService name)"
        )
    return name


def name_from_uri(uri: str) -> str:
    """A default registry name from a data URI: builtin:sms-spam -> sms-spam, s3://b/x/Reviews_2024.csv -> reviews-2024."""
    stem = uri.split(":", 1)[1] if uri.startswith("builtin:") else Path(uri.rstrip("/")).name.split(".")[0]
    name = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40].rstrip("-")
    if not name or not name[0].isalpha():
        name = ("m-" + name)[:40].rstrip("-")
    return check_name(name)


def version_prefix(name: str, version: str) -> str:
    return join("models", name, version)


def alias_key(name: str, alias: str) -> str:
    return join("models", name, "aliases", f"{alias}.json")


def new_version(run_id: str) -> str:
    run = re.sub(r"[^a-z0-9]+", "", run_id.lower().rsplit("-", 1)[-1])[:12] or "run"  # random tail of the id
    return f"v{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{run}"


def read_alias(store: Store, name: str, alias: str = PRODUCTION) -> dict | None:
    try:
        return store.read_json(alias_key(name, alias))
    except NotFound:
        return None


def set_alias(store: Store, name: str, alias: str, version: str, run_id: str) -> dict:
    if not store.is_published(version_prefix(name, version)):
        raise InputError(f"cannot point {name}/{alias} at {version}: that version is not published")
    previous = read_alias(store, name, alias)
    entry = {
        "version": version,
        "uri": store.url(version_prefix(name, version)),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": run_id,
        "previous": previous["version"] if previous else None,
    }
    store.write_json(alias_key(name, alias), entry)
    return entry


def versions(store: Store, name: str) -> list[str]:
    """Published versions of `name`, oldest first."""
    found = {k.split("/")[2] for k in store.list(join("models", name)) if k.endswith("/_MANIFEST.json")}
    return sorted(found)


def resolve(store: Store, ref: str) -> tuple[str, str]:
    """(name, version) for `models/<name>/<alias|version>` or `<name>` (its production alias)."""
    parts = ref.strip("/").split("/")
    if parts[0] == "models":
        parts = parts[1:]
    if len(parts) == 1:
        parts.append(PRODUCTION)
    if len(parts) != 2:
        raise InputError(f"model reference {ref!r}: use models/<name>/<alias or version>")
    name, which = parts
    if store.is_published(version_prefix(name, which)):
        return name, which
    alias = read_alias(store, name, which)
    if alias is None:
        raise InputError(f"model reference {ref!r}: {name} has no version or alias {which!r} in {store.uri}")
    return name, alias["version"]


def download(store: Store, name: str, version: str, dest: Path) -> Path:
    return store.download_dir(version_prefix(name, version), dest)
