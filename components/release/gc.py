"""`kubetune gc --store URI`: remove what crashed writers left in a store, and list old versions.

    kubetune gc --store ./kubetune-store                  # remove stale leftovers, list old versions
    kubetune gc --store s3://bucket/kubetune --dry-run    # only say what would go

Removed, once older than the grace period (--grace-hours, default 24: a publish still running is
never touched):
  - local stores: `.tmp-` folders and files (a publish or an atomic write killed midway)
  - S3 stores: the objects of a registry version without its seal (_MANIFEST.json, written last),
    `.tmp-` objects, and unfinished multipart uploads (aborted: S3 bills their parts)

Listed, never deleted: published versions beyond the newest --keep-versions of each model, except
the ones an alias points at (production, its previous version, canary) - those are never candidates.

Only the store is looked at. Nothing outside it is touched, $TMPDIR included: a temp folder there
may be another process's live data, and gc cannot prove otherwise.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.errors import ConfigError
from kubetune.release import registry
from kubetune.storage.store import MANIFEST, LocalStore, S3Store, Store

TMP_MARK = ".tmp-"


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)  # keys or folders removed (or, dry run, that would be)
    aborted: list[str] = field(default_factory=list)  # multipart uploads aborted: "key (upload id)"
    too_recent: list[str] = field(default_factory=list)  # leftovers inside the grace period, kept
    old_versions: dict[str, list[str]] = field(default_factory=dict)  # model -> versions the retention rule allows deleting


def _newest_mtime(path: Path) -> float:
    """A folder being written changes inside it: its age is that of its newest entry."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            newest = max(newest, p.lstat().st_mtime)
    return newest


def _local_leftovers(store: LocalStore, cutoff: float, dry_run: bool, report: GcReport) -> None:
    found = sorted(p for p in store.root.rglob(f"*{TMP_MARK}*") if TMP_MARK in p.name)
    outer = [p for p in found if not any(q in p.parents for q in found)]  # a tmp folder's own contents go with it
    for path in outer:
        rel = path.relative_to(store.root).as_posix()
        if _newest_mtime(path) > cutoff:
            report.too_recent.append(rel)
            continue
        if not dry_run:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        report.removed.append(rel)


def _s3_leftovers(store: S3Store, cutoff: float, dry_run: bool, report: GcReport) -> None:
    objects = store.objects("")
    sealed = {k[: -len(MANIFEST) - 1] for k, _ in objects if k.endswith("/" + MANIFEST)}
    unsealed: dict[str, list[tuple[str, float]]] = {}
    for key, modified in objects:
        parts = key.split("/")
        if len(parts) > 3 and parts[0] == "models" and registry.VERSION_RE.match(parts[2]) and "/".join(parts[:3]) not in sealed:
            unsealed.setdefault("/".join(parts[:3]), []).append((key, modified))
        elif any(TMP_MARK in part for part in parts):
            unsealed.setdefault(key, []).append((key, modified))
    for group, members in sorted(unsealed.items()):
        if max(m for _, m in members) > cutoff:
            report.too_recent.append(group)
            continue
        for key, _ in members:
            if not dry_run:
                store.delete_prefix(key)
            report.removed.append(key)
    for key, upload_id, initiated in store.multipart_uploads():
        if initiated > cutoff:
            report.too_recent.append(f"{key} (multipart upload {upload_id})")
            continue
        if not dry_run:
            store.abort_upload(key, upload_id)
        report.aborted.append(f"{key} ({upload_id})")


def _model_names(store: Store) -> list[str]:
    return sorted({k.split("/")[1] for k in store.list("models") if k.count("/") >= 2 and registry.NAME_RE.match(k.split("/")[1])})


def old_versions(store: Store, name: str, keep: int) -> list[str]:
    """Published versions beyond the newest `keep`, minus every version an alias points at."""
    production = registry.read_alias(store, name) or {}
    canary = registry.read_alias(store, name, "canary") or {}
    protected = {production.get("version"), production.get("previous"), canary.get("version")}
    published = registry.versions(store, name)  # oldest first
    return [v for v in published[: max(len(published) - keep, 0)] if v not in protected]


def collect(store: Store, *, grace_s: float, keep_versions: int, dry_run: bool = False, now: float | None = None) -> GcReport:
    if grace_s < 0 or keep_versions < 0:
        raise ConfigError(f"grace {grace_s}s / keep-versions {keep_versions}: use values >= 0")
    cutoff = (time.time() if now is None else now) - grace_s
    report = GcReport()
    if isinstance(store, LocalStore):
        _local_leftovers(store, cutoff, dry_run, report)
    elif isinstance(store, S3Store):
        _s3_leftovers(store, cutoff, dry_run, report)
    for name in _model_names(store):
        candidates = old_versions(store, name, keep_versions)
        if candidates:
            report.old_versions[name] = candidates
    return report


def print_report(report: GcReport, store: Store, dry_run: bool, write=print) -> None:
    verb = "would remove" if dry_run else "removed"
    for item in report.removed:
        write(f"{verb} {store.url(item)}")
    for item in report.aborted:
        write(f"{'would abort' if dry_run else 'aborted'} multipart upload {item}")
    for item in report.too_recent:
        write(f"kept (inside the grace period, may still be written): {item}")
    for name, versions in report.old_versions.items():
        write(f"{name}: {len(versions)} old version(s) the retention rule allows deleting (not deleted): {' '.join(versions)}")
    write(f"gc {store.uri}: {len(report.removed)} leftover(s) {'to remove' if dry_run else 'removed'}, {len(report.aborted)} upload(s) "
          f"{'to abort' if dry_run else 'aborted'}, {len(report.too_recent)} too recent")

