"""Disk full, said so: one line naming the folder, what was being written and its size.

    with writing(path, "the training checkpoint state.pt", size_hint=nbytes):
        torch.save(state, path)

Before the body: when the folder (or its nearest existing parent) has less free space than
`size_hint` bytes, a DiskFullError is raised at once, before anything is written. In the body: an
OSError with errno ENOSPC (or EDQUOT), anything whose message says "No space left on device" (e.g.
safetensors), and torch's stream-writer errors ("unexpected pos", "PytorchStreamWriter failed",
"file write failed", which is how torch.save reports a full disk) when the folder is then (nearly)
full, become the same DiskFullError. Other errors pass through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from kubetune.errors import DiskFullError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded")
# torch.save's messages when a write of its zip stream comes up short
TORCH_WRITE_TEXT = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
NEARLY_FULL = 2**20  # bytes: a folder with less free space than this is full for any real write


def size_text(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_folder(path: Path) -> Path:
    """The folder a write to `path` lands in (`path` itself when it is a folder), or its nearest existing parent."""
    folder = Path(path).absolute()
    folder = folder if folder.is_dir() else folder.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_error(path: Path, what: str, size: int = 0, free: int | None = None) -> DiskFullError:
    """The one-line error: which folder, what was being written, how big, what is free."""
    path = Path(path).absolute()
    folder = path if path.is_dir() else path.parent
    free = free_bytes(existing_folder(folder)) if free is None else free
    facts = ", ".join(f for f in (f"about {size_text(size)}" if size else "", f"{size_text(free)} free there" if free is not None else "") if f)
    hint = "free space there"
    if folder.is_relative_to(Path(tempfile.gettempdir()).absolute()):
        hint += f" or point TMPDIR (now {tempfile.gettempdir()}) at a larger disk"
    return DiskFullError(f"no space left on device in {folder} while writing {what}" + (f" ({facts})" if facts else "") + f": {hint}")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException, path: Path, size_hint: int = 0) -> bool:
    """Whether `error`, raised while writing under `path`, means the disk is full."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS or any(t in str(e) for t in NO_SPACE_TEXT):
            return True
    if any(t in str(error) for t in TORCH_WRITE_TEXT):
        free = free_bytes(existing_folder(path))
        return free is not None and free < max(size_hint, NEARLY_FULL)
    return False


def _error_path(error: BaseException, path: Path) -> Path:
    """The file the OS named in the error (e.g. a work file elsewhere), else `path`."""
    name = getattr(error, "filename", None)
    return Path(name) if isinstance(name, (str, Path)) and name else path


@contextlib.contextmanager
def writing(path: Path, what: str, size_hint: int = 0) -> Iterator[None]:
    """Check free space for `size_hint` bytes before the body, and turn a disk-full failure in it
    into one DiskFullError (see the module docstring)."""
    free = free_bytes(existing_folder(path))
    if size_hint and free is not None and free < size_hint:
        raise disk_full_error(path, what, size_hint, free)
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unchanged unless it is a full disk
        if not is_disk_full(e, path, size_hint):
            raise
        raise disk_full_error(_error_path(e, path), what, size_hint) from e


def tensor_bytes(obj) -> int:
    """Bytes of every tensor / array in a nested dict / list / tuple (what a torch.save of it holds, near enough)."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    nbytes = getattr(obj, "nbytes", None)
    return nbytes if isinstance(nbytes, int) else 0


def parameter_bytes(model) -> int:
    """A model's parameter bytes: about the size of its saved weights or fp32 ONNX graph."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
