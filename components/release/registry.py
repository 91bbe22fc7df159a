"""The model registry, kept in the store:

  models/<name>/<version>/            a published model (sealed by _MANIFEST.json, written last):
                                      model.onnx, tokenizer files, labels.json, kubetune.json,
                                      metrics.json, MODEL_CARD.md, inferenceservice.yaml, and the
                                      accepted ONNX variants (model.<variant>.onnx, listed with their
                                      held-out check in kubetune.json "variants"; kubetune.onnx.model)
  models/<name>/aliases/<alias>.json  {"version", "uri", "updated_at", "run_id", "previous",
                                       "history", "data_fingerprint", "target", ...}

Versions are `v<UTC yyyymmdd-HHMMSS>-<run id>`: unique per run, sortable by time. An alias moves
with one atomic write, so a reader sees the old or the new version, never a mix; the version it
points to is always complete because it is published before the alias moves.

Aliases move by compare-and-swap (`Store.write_if`: S3 conditional writes, a lock file locally):
read the alias and its token, write the new document only if the token is unchanged, else re-read
and retry. Two pipelines deploying at once therefore both land, one after the other: production
ends on one version and `previous` on the other - never a lost update. `previous` is not a second
object (two objects cannot move together atomically) but the production document's `previous`
field; `history` keeps the earlier production versions, newest first, for repeated rollbacks.

A model reference (`parse_ref`, the one parser of them; REF_FORMS) is `<name>` (its production
alias), `<name>@<alias or version>`, `<name>/<alias or version>` or `models/<name>/<alias or version>`;
`kubetune serve --model` also takes `<store>/models/<name>/<alias or version>` (the store written in).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kubetune.errors import InputError
from kubetune.storage.store import Conflict, NotFound, Store, StoreError, join

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
VERSION_RE = re.compile(r"^v\d{8}-\d{6}-[a-z0-9]{1,12}$")  # what new_version makes, nothing else
ALIAS_RE = re.compile(r"^[a-z][-a-z0-9]{0,39}$")
PRODUCTION = "production"
PREVIOUS = "previous"  # derived: production's `previous` field
HISTORY = 20  # earlier production versions kept in the alias document
CAS_ATTEMPTS = 20
REF_FORMS = "NAME, NAME@<alias|version> or models/NAME/<alias|version>"  # for --model helps and errors
_PATH_REF = re.compile(r"^(?:(?P<store>.*)/)?models/(?P<ref>[^/]+(?:/[^/]+)?)/?$")  # [<store>/]models/<name>[/<which>]


def check_name(name: str) -> str:
    """Registry names double as KServe InferenceService names: DNS-1035 labels, short enough
    for the suffixes KServe appends."""
    if not NAME_RE.match(name or ""):
        raise InputError(
            f"model name {name!r}: use 1-40 lowercase letters, digits and '-', starting with a letter "
            "(it becomes the InferenceService name)"
        )
    return name


def check_version(version: str, what: str = "version") -> str:
    """A version names a folder in the store: only what new_version makes gets there (no '..', no '/')."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InputError(f"{what} {version!r}: not a registry version (v<yyyymmdd>-<HHMMSS>-<run>, "
                         "as listed by kubetune models NAME)")
    return version


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
    if alias == PREVIOUS:
        prod = read_alias(store, name, PRODUCTION)
        if not prod or not prod.get("previous"):
            return None
        return {"version": prod["previous"], "uri": store.url(version_prefix(name, prod["previous"])), "derived_from": PRODUCTION}
    try:
        return store.read_json(alias_key(name, alias))
    except NotFound:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def update_alias(store: Store, name: str, alias: str, change: Callable[[dict | None], dict]) -> dict:
    """Compare-and-swap loop: `change(current document or None)` returns the new document, which
    is written only if the alias did not move meanwhile; on a lost race re-read and re-apply."""
    if not ALIAS_RE.match(alias or ""):
        raise InputError(f"alias {alias!r}: use lowercase letters, digits and '-', starting with a letter")
    if alias == PREVIOUS:
        raise InputError(f"{name}/{PREVIOUS} is derived from {PRODUCTION}; move {PRODUCTION} instead (e.g. kubetune rollback)")
    key = alias_key(name, alias)
    for attempt in range(CAS_ATTEMPTS):
        data, token = store.read_versioned(key)
        entry = change(json.loads(data) if data is not None else None)
        try:
            store.write_if(key, (json.dumps(entry, indent=2) + "\n").encode(), token)
            return entry
        except Conflict:
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # another deploy won this round
    raise StoreError(f"could not move {name}/{alias}: it kept changing under {CAS_ATTEMPTS} attempts (too many concurrent deploys?)")


def set_alias(store: Store, name: str, alias: str, version: str, run_id: str, extra: dict | None = None) -> dict:
    """Point `alias` at a published `version`; the version it pointed at becomes `previous`."""
    check_version(version)
    if not store.is_published(version_prefix(name, version)):
        raise InputError(f"cannot point {name}/{alias} at {version}: that version is not published")

    def change(current: dict | None) -> dict:
        history = ([current["version"], *current.get("history", [])] if current else [])
        history = [v for v in history if v != version][:HISTORY]
        return {"version": version, "uri": store.url(version_prefix(name, version)), "updated_at": _now(), "run_id": run_id,
                "previous": history[0] if history else None, "history": history, **(extra or {})}

    return update_alias(store, name, alias, change)


def clear_alias(store: Store, name: str, alias: str) -> dict | None:
    """Remove `alias` (a canary promoted or rolled back); returns what it pointed at, None if unset."""
    if alias in (PRODUCTION, PREVIOUS):
        raise InputError(f"{name}/{alias} cannot be removed, only moved (kubetune deploy, kubetune rollback)")
    current = read_alias(store, name, alias)
    if current is not None:
        store.delete_prefix(alias_key(name, alias))
    return current


def rollback(store: Store, name: str, run_id: str = "rollback", to: str = "") -> dict:
    """Move production back: to `to`, or to its `previous` version. The version rolled back from
    leaves the history, so a second rollback goes one further back."""

    def change(current: dict | None) -> dict:
        if current is None:
            raise InputError(f"{name} has no {PRODUCTION} alias in {store.uri}: nothing to roll back")
        history = current.get("history") or ([current["previous"]] if current.get("previous") else [])
        target = to or (history[0] if history else "")
        if not target:
            raise InputError(f"{name}/{PRODUCTION} is {current['version']} and has no previous version to roll back to")
        check_version(target, "--to" if to else f"{name}/{PREVIOUS}")
        if not store.is_published(version_prefix(name, target)):
            raise InputError(f"cannot roll {name} back to {target}: that version is not published (see kubetune models {name})")
        rest = [v for v in history if v != target]
        return {"version": target, "uri": store.url(version_prefix(name, target)), "updated_at": _now(), "run_id": run_id,
                "previous": rest[0] if rest else None, "history": rest, "rolled_back_from": current["version"],
                "data_fingerprint": _fingerprint_of(store, name, target)}

    return update_alias(store, name, PRODUCTION, change)


def _fingerprint_of(store: Store, name: str, version: str) -> str | None:
    try:
        return store.read_json(join(version_prefix(name, version), "metrics.json")).get("data_fingerprint")
    except NotFound:
        return None


def names(store: Store) -> list[str]:
    """The model names with at least one published version in `store`, sorted."""
    return sorted({k.split("/")[1] for k in store.list("models") if k.endswith("/_MANIFEST.json") and k.count("/") >= 3})


def versions(store: Store, name: str) -> list[str]:
    """Published versions of `name`, oldest first."""
    found = {k.split("/")[2] for k in store.list(join("models", name)) if k.endswith("/_MANIFEST.json")}
    return sorted(found)


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a registry name and an alias or version (`which`, not yet checked:
    resolve does), and the store it was written with (`<store>/models/...`; "" when none was)."""

    name: str
    which: str = PRODUCTION
    store: str = ""

    def __str__(self) -> str:
        return f"models/{self.name}/{self.which}"


def is_path_ref(text: str) -> bool:
    """Whether `text` is written as a registry path, `[<store>/]models/<name>[/<alias or version>]`."""
    return _PATH_REF.match(text) is not None


def parse_ref(text: str) -> ModelRef:
    """The model reference `text` (module docstring): `NAME`, `NAME@which`, `NAME/which`,
    `models/NAME/which` or `<store>/models/NAME/which`; anything else is an InputError."""
    m = _PATH_REF.match(text)
    rest, store = (m["ref"], m["store"] or "") if m else (text.strip("/"), "")
    name, sep, which = rest.partition("/") if "/" in rest else rest.partition("@")
    if not NAME_RE.match(name) or (sep and not which) or "/" in which:
        raise InputError(f"model reference {text!r}: use {REF_FORMS} (NAME: 1-40 lowercase letters, digits and '-', "
                         "starting with a letter)")
    return ModelRef(name, which or PRODUCTION, store)


def resolve(store: Store, ref: str | ModelRef) -> tuple[str, str]:
    """(name, version) of a model reference in `store`: an alias is read, a version must be published. A
    text is parsed (parse_ref) and must not name a store; a ModelRef's store is the caller's (it opened `store`)."""
    parsed, text = (parse_ref(ref), ref) if isinstance(ref, str) else (ref, str(ref))
    if isinstance(ref, str) and parsed.store:
        raise InputError(f"model reference {text!r} names a store ({parsed.store}): pass the store with --store and the "
                         f"model as {REF_FORMS}")
    name, which = parsed.name, parsed.which
    if VERSION_RE.match(which) and store.is_published(version_prefix(name, which)):
        return name, which
    if not ALIAS_RE.match(which):
        raise InputError(f"model reference {text!r}: {which!r} is neither a registry version (v<yyyymmdd>-<HHMMSS>-<run>) "
                         "nor an alias name (e.g. production)")
    alias = read_alias(store, name, which)
    if alias is None:
        raise InputError(f"model reference {text!r}: {name} has no version or alias {which!r} in {store.uri}")
    return name, check_version(alias.get("version"), f"{name}/{which} points at")


def download(store: Store, name: str, version: str, dest: Path) -> Path:
    return store.download_dir(version_prefix(name, version), dest)
