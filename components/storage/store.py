"""The one artifact-store abstraction: a local folder, or `s3://bucket/prefix` on any S3-compatible server.

Keys are '/'-separated paths relative to the store root ("runs/<id>/summary.json"). Every write is
all-or-nothing for the reader:
  * a single object (`write_bytes`, `write_json`) is written to a temp name and renamed (local) or
    sent as one PUT (S3, where an object only appears once its upload completed);
  * a folder (`publish_dir`) is copied under a temp name and renamed (local), or uploaded and then
    sealed with `_MANIFEST.json`, written last (S3). Readers treat a prefix without the manifest as
    absent, and a failed upload deletes what it wrote.

S3 settings are read from the environment in exactly one place, `S3Settings.from_env`, called by the
entry points (the CLI and the step context, kubetune.core.context); the same variables come from the
`kubetune-s3` Secret and ConfigMap on a cluster (see k8s/base):

  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL   endpoint of MinIO / Ceph RGW / SeaweedFS (unset on AWS)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN
  AWS_REGION or AWS_DEFAULT_REGION          default us-east-1
  KUBETUNE_S3_ADDRESSING_STYLE              path | virtual | auto (default: path when an endpoint is set)
  AWS_CA_BUNDLE                             CA bundle for a private TLS endpoint (read by botocore)
  KUBETUNE_S3_VERIFY_SSL                    "false" to skip TLS verification (test servers only)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from kubetune.errors import InputError, KubetuneError

MANIFEST = "_MANIFEST.json"
BODY_ATTEMPTS = 4  # reads of an object whose body was cut off mid-transfer
# where each S3 setting comes from on a cluster: the kubetune-s3 Secret and the kubetune-s3-config ConfigMap
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_CONFIG_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION", "KUBETUNE_S3_ADDRESSING_STYLE")


class StoreError(KubetuneError):
    """The store could not be read or written (unreachable endpoint, denied, missing bucket)."""


class NotFound(StoreError):
    """A key or published prefix does not exist."""


class Conflict(StoreError):
    """A compare-and-swap write lost: the object changed (or appeared) since it was read."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    addressing_style: str = "auto"
    verify_ssl: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "S3Settings":
        env = os.environ if environ is None else environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        style = env.get("KUBETUNE_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
        if style not in ("path", "virtual", "auto"):
            raise InputError(f"KUBETUNE_S3_ADDRESSING_STYLE={style!r}: use path, virtual or auto")
        return cls(
            endpoint_url=endpoint,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            addressing_style=style,
            verify_ssl=env.get("KUBETUNE_S3_VERIFY_SSL", "true").lower() not in ("0", "false", "no"),
        )

    def client(self):
        import boto3
        from botocore.config import Config

        # Credentials left None fall through to boto3's own chain (IRSA, instance profile, ...).
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            verify=self.verify_ssl,
            config=Config(
                s3={"addressing_style": self.addressing_style},
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10,
                read_timeout=120,
            ),
        )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://my-bucket/kubetune")
    return bucket, key.strip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_relative(rel: str, source: str) -> str:
    """A file name from a manifest or a key listing, checked before it is joined to a local folder:
    relative, no '..', no empty or '.' parts, no backslashes (a Windows-style escape)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
        raise StoreError(f"{source}: file name {rel!r} would land outside the download folder; refusing to download it")
    return rel


def _manifest_for(local_dir: Path) -> dict[str, Any]:
    files = {}
    for p in sorted(local_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(local_dir).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {"files": files, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class Store:
    """Common helpers; `LocalStore` and `S3Store` implement the primitive operations."""

    uri: str

    # primitives: read_bytes, write_bytes, exists, list, download, upload, publish_dir, delete_prefix,
    # read_versioned and write_if (compare-and-swap, for registry aliases)
    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(content, token) of an object, (None, None) when it does not exist. The token is what
        `write_if` compares against: an ETag on S3, a content hash locally."""
        raise NotImplementedError

    def write_if(self, key: str, data: bytes, token: str | None) -> None:
        """Write `data` only if the object still has `token` (None: only if it still does not
        exist); raise Conflict otherwise. Two writers that read the same token cannot both win."""
        raise NotImplementedError

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    @property
    def where(self) -> str:
        """Where the store lives, for messages: its folder, or the S3 endpoint."""
        return self.uri

    def url(self, key: str) -> str:
        """Absolute URI of a key, for records and manifests."""
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def is_published(self, prefix: str) -> bool:
        return self.exists(join(prefix, MANIFEST))

    def manifest(self, prefix: str) -> dict[str, Any]:
        try:
            return self.read_json(join(prefix, MANIFEST))
        except NotFound:
            raise NotFound(f"{self.url(prefix)} is not a published folder (no {MANIFEST})") from None

    def download_dir(self, prefix: str, dest: Path) -> Path:
        """Copy a published folder to `dest` (created), checking each file's size and sha256
        against its manifest (the seal); a file name that would land outside `dest` is refused."""
        files = self.manifest(prefix)["files"]
        dest.mkdir(parents=True, exist_ok=True)
        for rel, info in files.items():
            target = dest / safe_relative(rel, self.url(join(prefix, MANIFEST)))
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download(join(prefix, rel), target)
            if target.stat().st_size != info["size"]:
                raise StoreError(f"{self.url(join(prefix, rel))}: size {target.stat().st_size} != manifest {info['size']}")
            if "sha256" in info and sha256_file(target) != info["sha256"]:
                raise StoreError(f"{self.url(join(prefix, rel))}: its sha256 differs from the one in {MANIFEST} "
                                 "(the object changed after publishing, or the download was corrupted); republish the version")
        return dest


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        if key and (key.startswith("/") or ".." in key.split("/")):
            raise StoreError(f"key {key!r}: not a key inside {self.uri} (absolute or with '..')")
        return self.root / key if key else self.root

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.url(key)} does not exist") from None

    def _replace(self, key: str, fill) -> None:
        """Write through `fill(tmp_path)` beside the target, then rename over it: atomic on POSIX,
        so readers see the old or the new file, never half of one."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            fill(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._replace(key, lambda tmp: tmp.write_bytes(data))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, key: str, data: bytes, token: str | None) -> None:
        """Compare-and-swap under an exclusive lock on `<key>.lock` (flock: released by the kernel
        if the writer dies, so a crash never leaves the alias locked); the write itself is the
        usual atomic rename, so lock-free readers still see the old or the new content."""
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _, current = self.read_versioned(key)
            if current != token:
                raise Conflict(f"{self.url(key)} changed since it was read (compare-and-swap lost)")
            self.write_bytes(key, data)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")
            and not any(".tmp-" in part for part in p.relative_to(self.root).parts)
        )

    def delete_prefix(self, prefix: str) -> int:
        """Remove a key or everything under a prefix; how many files went."""
        path = self._path(prefix)
        if path.is_file():
            path.unlink()
            return 1
        if not path.is_dir() or not prefix:
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        for parent in path.parents:  # folders left empty by it, as on S3 (where folders do not exist)
            if parent == self.root or not parent.is_relative_to(self.root) or any(parent.iterdir()):
                break
            parent.rmdir()
        return count

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise NotFound(f"{self.url(key)} does not exist") from None

    def upload(self, src: Path, key: str) -> None:
        self._replace(key, lambda tmp: shutil.copyfile(src, tmp))

    def publish_dir(self, local_dir: Path, prefix: str) -> bool:
        """Copy `local_dir` to `prefix` atomically. Returns False (and changes nothing) if the
        prefix was already published, e.g. by a concurrent run writing the same cache entry."""
        final = self._path(prefix)
        if self.is_published(prefix):
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(local_dir, tmp)
            (tmp / MANIFEST).write_text(json.dumps(_manifest_for(tmp), indent=2))
            if final.exists():  # an unsealed leftover from a crashed writer: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.is_published(prefix):
                return False  # lost a race to an identical writer
            raise StoreError(f"could not publish {local_dir} to {self.url(prefix)}: {e}") from e
        return True


def _transfer_errors() -> tuple[type[Exception], ...]:
    """What boto3's transfer manager raises besides botocore's own errors: its wrappers of the last
    failure (boto3.exceptions) and s3transfer's (an ETag that changed mid-download, retries run out)."""
    from boto3.exceptions import Boto3Error
    from s3transfer import exceptions as s3t

    return Boto3Error, s3t.RetriesExceededError, s3t.S3UploadFailedError, s3t.S3DownloadFailedError


class S3Store(Store):
    def __init__(self, uri: str, settings: S3Settings):
        self.bucket, self.prefix = split_s3(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.settings = settings
        self._client = settings.client()

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            raise self._client_error(what, key, e) from None
        except BotoCoreError as e:
            raise StoreError(f"S3 {what} {self.url(key)} failed at {self.where}: {e}") from None
        except _transfer_errors() as e:
            raise self._transfer_error(what, key, e) from e

    def _client_error(self, what: str, key: str, e) -> StoreError:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFound(f"{self.url(key)} does not exist")
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist at {self.where} (create it, or fix the store URI)")
        return StoreError(f"S3 {what} {self.url(key)} failed at {self.where}: {code} {e}")

    def _transfer_error(self, what: str, key: str, e: Exception) -> StoreError:
        """boto3's transfer manager (download_file, upload_file) wraps the error that ended it: a
        ClientError in S3UploadFailedError, the last cut-off or timed-out body read in
        RetriesExceededError ("Max Retries Exceeded", no key named)."""
        from botocore.exceptions import ClientError

        last = getattr(e, "last_exception", None) or e.__cause__ or e.__context__
        if isinstance(last, ClientError):
            return self._client_error(what, key, last)
        if hasattr(e, "last_exception"):
            return StoreError(f"S3 {what} {self.url(key)} failed at {self.where}: the response body was cut off or timed out on "
                              f"every try ({last}); check the network to the S3 server and retry")
        return StoreError(f"S3 {what} {self.url(key)} failed at {self.where}: {e}; retry")

    @property
    def where(self) -> str:
        return self.settings.endpoint_url or "AWS S3"

    def _get(self, key: str) -> tuple[bytes, str]:
        """(body, ETag). botocore's retries end with the response headers: a body cut off mid-read
        would escape as a raw urllib3/botocore error. Such a read is fetched again a few times,
        then fails as a StoreError naming the key."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        error: Exception | None = None
        for attempt in range(BODY_ATTEMPTS):
            resp = self._call("read", key, self._client.get_object, Bucket=self.bucket, Key=self._key(key))
            try:
                return resp["Body"].read(), resp["ETag"]
            except (BotoCoreError, HTTPError, OSError) as e:
                error = e
                time.sleep(0.2 * 2 ** attempt)
        raise StoreError(f"S3 read {self.url(key)} failed at {self.where}: the response body was cut off {BODY_ATTEMPTS} times "
                         f"({error}); check the network to the S3 server and retry")

    def read_bytes(self, key: str) -> bytes:
        return self._get(key)[0]

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            return self._get(key)
        except NotFound:
            return None, None

    def write_if(self, key: str, data: bytes, token: str | None) -> None:
        """S3 conditional writes (AWS since 2024-08, MinIO, moto 5): If-Match on the ETag read, or
        If-None-Match: * to create. A server that ignores the headers would make this a plain
        write, so check that yours supports them (MinIO and AWS do)."""
        from botocore.exceptions import BotoCoreError, ClientError

        cond = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **cond)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the ETag moved / the key exists; 409: a concurrent conditional write; 404: If-Match on a deleted key
            if status in (404, 409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise Conflict(f"{self.url(key)} changed since it was read (compare-and-swap lost: {code or status})") from None
            raise StoreError(f"S3 conditional write {self.url(key)} failed at {self.where}: {code} {e}") from None
        except BotoCoreError as e:
            raise StoreError(f"S3 conditional write {self.url(key)} failed at {self.where}: {e}") from None

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        return int(self._call("head", key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix)
        full = full + "/" if full else ""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]

    def list(self, prefix: str) -> list[str]:
        return sorted(self._iter_keys(prefix))

    def objects(self, prefix: str) -> list[tuple[str, float]]:
        """(key, last modified as a Unix time) of every object under `prefix`."""
        full = self._key(prefix)
        full = full + "/" if full else ""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted((o["Key"][strip:], o["LastModified"].timestamp()) for page in pages for o in page.get("Contents", []))

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            return 0
        keys = [prefix] if self.exists(prefix) else self.list(prefix)
        for key in keys:
            self._call("delete", key, self._client.delete_object, Bucket=self.bucket, Key=self._key(key))
        return len(keys)

    def multipart_uploads(self) -> list[tuple[str, str, float]]:
        """(key, upload id, initiated as a Unix time) of the unfinished multipart uploads under this store."""
        full = self.prefix + "/" if self.prefix else ""
        resp = self._call("list uploads", "", self._client.list_multipart_uploads, Bucket=self.bucket, Prefix=full)
        strip = len(self.prefix) + 1 if self.prefix else 0
        return [(u["Key"][strip:], u["UploadId"], u["Initiated"].timestamp()) for u in resp.get("Uploads", [])]

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._call("abort upload", key, self._client.abort_multipart_upload, Bucket=self.bucket, Key=self._key(key),
                   UploadId=upload_id)

    def download(self, key: str, dest: Path) -> None:
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self._call("download", key, self._client.download_file, self.bucket, self._key(key), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def upload(self, src: Path, key: str) -> None:
        # upload_file switches to multipart for big files; the object appears only when complete
        self._call("upload", key, self._client.upload_file, str(src), self.bucket, self._key(key))

    def publish_dir(self, local_dir: Path, prefix: str) -> bool:
        if self.is_published(prefix):
            return False
        manifest = _manifest_for(local_dir)
        written: list[str] = []
        try:
            for rel in manifest["files"]:
                key = join(prefix, rel)
                self.upload(local_dir / rel, key)
                written.append(key)
            self.write_json(join(prefix, MANIFEST), manifest)  # the seal: written last
        except BaseException:
            for key in written:  # leave nothing half-published behind
                try:
                    self._call("delete", key, self._client.delete_object, Bucket=self.bucket, Key=self._key(key))
                except StoreError:
                    pass
            raise
        return True


def open_store(uri: str, settings: S3Settings | None = None, *, create: bool = True) -> Store:
    """A store for a local folder (created if missing, unless `create=False`: commands that only
    read or move aliases must not leave an empty store behind) or an s3:// prefix."""
    if not uri:
        raise InputError("no store given: pass --store DIR or --store s3://bucket/prefix")
    if is_s3(uri):
        return S3Store(uri, settings or S3Settings())
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"store {uri!r}: only local folders and s3:// URIs are supported")
    path = local_path(uri)
    if path.exists() and not path.is_dir():
        raise InputError(f"store {uri!r} is a file, not a folder: pass the store folder (e.g. ./kubetune-store) or an s3:// URI")
    if not path.exists() and not create:
        raise InputError(f"store {uri!r} does not exist (run kubetune run first, or pass --store)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, a read-only disk
        raise InputError(f"store {uri!r}: cannot create the folder ({e.strerror}); pass a writable folder or an s3:// URI") from None
    return LocalStore(path)


def listing(uri: str, settings: S3Settings | None = None, *, hidden: bool = True) -> list[str]:
    """Every file under `uri`, as URIs, sorted: the file itself, or the files of a local folder or an
    s3:// prefix. `hidden=False` leaves out paths with a part starting with '.' or '_' (temp files,
    _MANIFEST.json, _SUCCESS markers). Empty when nothing is there. The one listing of kubetune."""
    def keep(rel: str) -> bool:
        return hidden or not any(part.startswith((".", "_")) for part in rel.split("/") if part)

    if is_s3(uri):
        bucket, key = split_s3(uri)
        store = S3Store(f"s3://{bucket}", settings or S3Settings())
        if key and store.exists(key):
            return [uri]
        return [f"s3://{bucket}/{k}" for k in store.list(key) if keep(k[len(key):])]
    path = local_path(uri)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        return []
    return sorted(str(p) for p in path.rglob("*") if p.is_file() and keep(p.relative_to(path).as_posix()))


def file_size(uri: str, settings: S3Settings | None = None) -> int:
    """The size in bytes of a file or an s3:// object."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return S3Store(f"s3://{bucket}", settings or S3Settings()).size(key)
    return local_path(uri).stat().st_size


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()


def fetch(uri: str, settings: S3Settings | None, workdir: Path) -> Path:
    """A local path for a file or folder URI: local paths as they are, s3:// objects or published
    prefixes downloaded under `workdir`."""
    if not is_s3(uri):
        path = local_path(uri)
        if not path.exists():
            raise InputError(f"{uri}: no such file or folder")
        return path
    bucket, key = split_s3(uri)
    store = S3Store(f"s3://{bucket}", settings or S3Settings())
    name = Path(key).name or bucket
    dest = Path(tempfile.mkdtemp(prefix="fetch-", dir=workdir)) / name
    if store.exists(key):
        store.download(key, dest)
        return dest
    if store.is_published(key):
        return store.download_dir(key, dest)
    keys = listing(uri, settings)
    if not keys:
        raise InputError(f"{uri}: no such object or prefix at {store.where}")
    dest.mkdir(parents=True)
    base = f"s3://{bucket}/{key}".rstrip("/")
    for k in keys:  # a plain prefix (e.g. a model folder uploaded with `aws s3 cp --recursive`)
        target = dest / safe_relative(k[len(base):].lstrip("/"), k)
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download(split_s3(k)[1], target)
    return dest
