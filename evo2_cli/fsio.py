"""Filesystem helpers: atomic outputs, checksums. Nothing half-written ever carries a final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from evo2_cli.errors import Evo2Error, InputError


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread runs
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """`.NAME.tmp-PID` next to `path`: hidden, on the same filesystem (so renaming it over `path` is atomic),
    and never shared by two processes."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def full_disk_errno(exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `exc` comes from a full filesystem or quota: an OSError, an error raised while
    handling one (torch's writer wraps the OSError of the file it writes to), or a library error that quotes
    the OS error (safetensors: '... (os error 28)'). None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc.errno
        quoted = re.search(r"\(os error (\d+)\)", str(exc)) if not isinstance(exc, OSError) else None
        if quoted and int(quoted.group(1)) in _FULL:
            return int(quoted.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def full_disk_reason(code: int, path: Path) -> str:
    """'no space left on device (N bytes free on that filesystem)', for the filesystem of `path` (or of its
    nearest existing parent)."""
    for directory in (path, *path.parents):
        with contextlib.suppress(OSError):
            return f"{_FULL[code]} ({shutil.disk_usage(directory).free:,} bytes free on that filesystem)"
    return _FULL[code]


class DiskFullError(Evo2Error):
    """A write to `target` stopped by a full filesystem or quota. The text is made when it is shown, after
    the writer removed its temporary output: the free bytes and what is intact are those the user finds."""

    def __init__(self, target: Path, code: int):
        self.target, self.code = Path(target), code
        super().__init__(target, code)  # the arguments, so that it pickles back

    @property
    def reason(self) -> str:
        return full_disk_reason(self.code, self.target)

    def __str__(self) -> str:
        exists = self.target.exists()
        intact = f"the existing {self.target} is untouched" if exists else "nothing was left behind"
        return f"cannot write {self.target}: {self.reason}; {intact}"


@contextlib.contextmanager
def reporting_full_disk(target: Path) -> Iterator[None]:
    """Turn a full disk met while `target` is written into a DiskFullError naming `target`. Nested writers (a
    file inside an output directory) report the outermost: the output the user asked for."""
    try:
        yield
    except Exception as exc:
        code = full_disk_errno(exc)
        if code is None:
            raise
        raise DiskFullError(target, code) from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` for the caller to write by name (a library's `save_file`, which
    streams to disk instead of building the whole file in memory); on success it is fsynced and renamed
    over `path`, on any error removed."""
    tmp = temporary_sibling(path)
    try:
        with reporting_full_disk(path):
            yield tmp
            # The umask's permissions, as for any other file: safetensors creates its files 0600, and a
            # checkpoint the rest of the group cannot read is a surprise on a shared cluster.
            os.chmod(tmp, 0o666 & ~_UMASK)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success it replaces `final`, on any error (or
    KeyboardInterrupt/SystemExit from a signal, also one during the swap) it is removed and `final` is left
    as it was."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise InputError(
            f"{final}: output already exists; pass --overwrite to replace it or choose another path"
        )
    if final.exists() and not final.is_dir():
        raise InputError(f"{final}: exists and is not a directory")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{final.parent}: cannot create output directory: {exc.strerror}") from None
    tmp = temporary_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # mkdir inside the try: a signal landing just after it (SIGTERM -> KeyboardInterrupt) still cleans up.
        try:
            tmp.mkdir()
        except OSError as exc:
            raise InputError(f"{final.parent}: cannot write here: {exc.strerror}") from None
        with reporting_full_disk(final):
            yield tmp
        old = temporary_sibling(final, "old")
        shutil.rmtree(old, ignore_errors=True)  # left by a crashed run with the same pid: not ours to restore
        try:
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException:
            # A signal between the two renames: put the old output back under its name.
            if old.exists() and not final.exists():
                os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)  # only once the new output is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes of a file descriptor at `offset` (os.pread may return fewer; a file that ends first is an
    error)."""
    data = os.pread(fd, size, offset)
    if len(data) == size:  # the common case: one call
        return data
    parts = [data]
    offset, size = offset + len(data), size - len(data)
    while size:
        part = os.pread(fd, min(size, 1 << 30), offset)
        if not part:
            raise ValueError(f"file descriptor {fd} ends before byte {offset + size}")
        parts.append(part)
        offset, size = offset + len(part), size - len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
