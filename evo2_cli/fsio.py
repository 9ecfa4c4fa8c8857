"""Filesystem helpers: atomic outputs, checksums, what --overwrite may replace, the lock of a run directory.
Nothing half-written ever carries a final name, and nothing evo2 did not write is ever deleted."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from evo2_cli.errors import Evo2Error, InputError

HOST = socket.gethostname()


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: done once, at import, before any thread runs
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """`.NAME.tmp-PID@HOST` next to `path`: hidden, on the same filesystem (so renaming it over `path` is
    atomic), and never shared by two processes. The pid and host say whether a leftover's writer is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}@{HOST}")


# `.NAME.TAG-PID@HOST`; versions before the host was added wrote `.NAME.TAG-PID`
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<tag>[a-z]+)-(?P<pid>\d+)(?:@(?P<host>.+))?")


def is_temporary(name: str) -> bool:
    """Whether `name` is one of temporary_sibling's names."""
    return _TEMPORARY.fullmatch(name) is not None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(
    directory: Path,
    name: str | None = None,
    complete: Callable[[Path], bool] = Path.exists,
    say: Callable[[str], None] = _say,
) -> None:
    """Remove the temporaries in `directory` (of output `name` only, when given) that a process of this host
    left when it was killed (kill -9, a node's out-of-memory killer): a half-written `.NAME.tmp-PID@HOST` is
    deleted; an old output moved aside for --overwrite (`.NAME.old-PID@HOST`) is put back when NAME is not
    `complete` (the replacement never finished), else deleted. A temporary of a live process, or of another
    host (whose processes this one cannot see), is left alone."""
    directory = Path(directory)
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return
    for path in entries:
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if match["host"] not in (None, HOST) or pid == os.getpid() or process_alive(pid):
            continue
        final = path.with_name(match["name"])
        if match["tag"] == "old" and not complete(final):
            if final.exists() or final.is_symlink():
                remove_path(final)
            os.replace(path, final)
            say(f"restored {final}: process {pid} was killed while replacing it")
            continue
        remove_path(path)
        say(f"removed {path}, left by process {pid} (no longer running)")


def remove_path(path: Path) -> None:  # a symlink itself, not what it points to
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- what --overwrite may replace


@dataclass(frozen=True)
class OutputKind:
    """An output evo2 writes, and how to recognize one it wrote: the one test every --overwrite passes.

    `recognize(path)` returns None for an output of this kind, else why `path` is not one (a short phrase)."""

    noun: str  # "a dataset directory"
    recognize: Callable[[Path], str | None]
    is_directory: bool  # an empty directory (or, for a file kind, an empty file) holds nothing to lose


def directory_kind(noun: str, marker: str, names: Callable[[Path], Collection[str] | None]) -> OutputKind:
    """A directory evo2 wrote: it holds `marker`, `names(directory)` (read from the marker; None when the
    marker is not evo2's) lists what evo2 writes there, and nothing else is in it but evo2's temporaries."""

    def recognize(path: Path) -> str | None:
        if not path.is_dir():
            return "not a directory"
        if not (path / marker).is_file():
            return f"no {marker}"
        known = names(path)
        if known is None:
            return f"{marker} was not written by evo2"
        strangers = sorted(p.name for p in path.iterdir() if p.name not in known and not is_temporary(p.name))
        if strangers:
            return f"it also holds {', '.join(strangers[:3])}" + (", ..." if len(strangers) > 3 else "")
        return None

    return OutputKind(noun, recognize, is_directory=True)


def json_listing(marker: str, owned: Callable[[dict], bool], fixed: Collection[str] = ()):
    """`names` for directory_kind: the marker JSON's `files` keys, the marker and `fixed`, when
    `owned(marker's JSON)`."""

    def names(directory: Path) -> Collection[str] | None:
        try:
            data = json.loads((directory / marker).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not owned(data) or not isinstance(data.get("files", {}), dict):
            return None
        return {marker, *fixed, *data.get("files", {})}

    return names


def file_kind(noun: str, starts_with: bytes, offset: int = 0) -> OutputKind:
    """A file evo2 wrote, recognized by its first bytes (from byte `offset`: after a length field)."""

    def recognize(path: Path) -> str | None:
        if not path.is_file():
            return "not a regular file"
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                head = handle.read(len(starts_with))
        except OSError as exc:
            return f"unreadable: {exc.strerror}"
        return None if head == starts_with else "its content is not what evo2 writes there"

    return OutputKind(noun, recognize, is_directory=False)


def _protected(path: Path) -> str | None:
    """Why `path` may never be replaced, or None: the root, the home and the current directory and its
    parents (symlinks resolved), whatever they hold."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "the root directory"
    if resolved == Path.home().resolve():
        return "the home directory"
    if resolved == cwd:
        return "the current directory"
    if resolved in cwd.parents:
        return "a parent of the current directory"
    return None


def check_replaceable(path: Path, kind: OutputKind, overwrite: bool) -> bool:
    """Whether the output `path` exists and may be replaced; InputError when it may not. Only an output of
    `kind` that evo2 wrote is replaced, and only with `overwrite`; anything else is refused with no hint to
    force it (a flag must never make evo2 delete what is not its own)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return False
    protected = _protected(path)
    if protected is not None:
        raise InputError(f"{path}: is {protected}, which evo2 never replaces; choose another output path")
    # Nothing to lose: an empty directory where a directory goes, or an empty file (a table of no rows, a
    # `touch`ed name) where a file goes; an empty file is no directory output, nor the reverse.
    if path.is_symlink():
        empty = False
    elif kind.is_directory:
        empty = path.is_dir() and not any(path.iterdir())
    else:
        empty = path.is_file() and path.stat().st_size == 0
    problem = None if empty else kind.recognize(path)
    if problem is not None:
        raise InputError(
            f"{path}: exists and is not {kind.noun} written by evo2 ({problem}); it is left as it is: "
            "choose another output path"
        )
    if not overwrite:
        raise InputError(
            f"{path}: output already exists; pass --overwrite to replace it or choose another path"
        )
    return True


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HashingWriter:
    """A binary file handle that hashes what goes through it (`.digest`): a file's sha256 without reading
    it back (torch.save writes to any object with `write` and `flush`)."""

    def __init__(self, handle):
        self.handle, self.digest, self.flush = handle, hashlib.sha256(), handle.flush

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)


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


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write to a temporary sibling, fsync, then rename over `path`; returns the sha256 of `data`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: Path, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output_dir(
    final: Path, kind: OutputKind, overwrite: bool = False, say: Callable[[str], None] = _say
) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success it replaces `final`, on any error (or
    KeyboardInterrupt/SystemExit from a signal, also one during the swap) it is removed and `final` is left
    as it was. An existing `final` must be a `kind` evo2 wrote (check_replaceable); the old output is moved
    aside only once the new one is complete, and deleted after the new one is in place. Temporaries of
    `final` that a killed process left are cleaned up first."""
    final = Path(final)
    remove_stale_temporaries(final.parent, final.name, say=say)  # first: it may put an old output back
    check_replaceable(final, kind, overwrite)
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


# ---------------------------------------------------------------- one writer per output


@contextlib.contextmanager
def exclusive(directory: Path, say: Callable[[str], None] = _say) -> Iterator[None]:
    """Hold the lock of output `directory` (a run directory) for the block; InputError at once, naming the
    holder (host, pid, start time), when another process holds it. A holder that died on this host (kill -9)
    released the lock with its process; its record is taken over with a message.

    The lock is `.NAME.lock` beside the directory, not inside it: --overwrite moves the old directory aside
    (with anything in it), and a second run must still find the lock the first one holds. Its holder record
    is a separate `.NAME.lock.json`, written after the lock is taken (a contender's open of the lock file
    must never touch it)."""
    from filelock import FileLock, Timeout

    directory = Path(directory).absolute()
    lock_path = directory.with_name(f".{directory.name}.lock")
    holder_path = directory.with_name(f".{directory.name}.lock.json")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout:
        raise InputError(
            f"{directory}: in use by {_describe_holder(holder_path)}; wait for it to finish (or stop it), or "
            "choose another run directory"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{directory}: cannot write the run directory (its lock {lock_path.name}): {exc.strerror or exc}"
        ) from None
    previous, holder = _read_holder(holder_path), _describe_holder(holder_path)
    pid = int(previous.get("pid") or 0) if previous is not None else 0
    if (
        previous is not None
        and previous.get("host") == HOST
        and pid not in (0, os.getpid())
        and process_alive(pid)
    ):
        # The lock was free, yet its holder runs: a filesystem where locks do not work. Refuse.
        lock.release()
        raise InputError(f"{directory}: in use by {holder}; wait for it to finish or stop it")
    try:
        if previous is not None and previous.get("pid") != os.getpid():
            say(f"took over the lock of {directory}: {holder} is no longer running")
        record = {"host": HOST, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        atomic_write_text(holder_path, json.dumps(record) + "\n")
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()


def _read_holder(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    pid = record.get("pid")
    # a damaged record (a pid that is no positive int a process can have) is no holder to judge
    return record if isinstance(pid, int) and 0 < pid < 2**31 else None


def _describe_holder(path: Path) -> str:
    record = _read_holder(path)
    if record is None:
        return "another process"
    return f"process {record.get('pid')} on {record.get('host')} (started {record.get('started')})"
