"""Atomic writes and output folders: a crash or a full disk never leaves half a file."""
import hashlib
import io
import json
import math
import os
import re
import time

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock on temp files; stray temps then go only from folders that are ours alone
    fcntl = None

from trajmatch.cli import UsageError, WriteError


# ---------------------------------------------------------------- atomic writes and output folders

# temp names: '.' + final name + '.' + 8 hex + '.tmp' (what stray_temps recognises)
_TEMP = re.compile(r'^\..+\.[0-9a-f]{8}\.tmp$')


def _new_temp(folder: str, name: str) -> tuple[int, str]:
    """Create a temp file next to `name` with the user's normal permissions (0666 minus the umask;
    mkstemp would make it 0600). os.urandom: no draw from the seeded RNGs."""
    while True:
        tmp = os.path.join(folder, f'.{name}.{os.urandom(4).hex()}.tmp')
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _lock(fd: int) -> None:
    """Hold an exclusive lock on a temp file while it is written and renamed: a cleaner in another process
    (stale_temps) then knows it is in flight. The kernel drops the lock when the writer dies, even by SIGKILL."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a file system without locks: the age rule of remove_stray_temps still protects it


def _atomic(path: str, data: bytes) -> None:
    """Write through a temp file in the same folder, then rename: a crash or a full disk never leaves
    half a file, and the previous file of that name stays as it was. Failures raise WriteError."""
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    tmp = fd = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _new_temp(folder, os.path.basename(path))
        _lock(fd)
        _write_all(fd, data)
        os.fsync(fd)
        os.replace(tmp, path)  # still locked: renamed, not removed by a cleaner
    except OSError as e:
        kept = (f"the previous {os.path.basename(path)} is intact" if existed
                else f"no {os.path.basename(path)} was written")
        raise WriteError(f"cannot write {path} ({e.strerror or e}); free disk space or fix the folder's "
                         f"permissions and run again ({kept})") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            _remove_quietly(tmp)


def torch_bytes(obj) -> bytes:
    """torch.save into memory: a failing disk then shows as an OSError of our own write (torch.save
    straight to a file reports a full disk as a bare RuntimeError)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(obj, path: str) -> None:
    _atomic(path, torch_bytes(obj))


def json_text(obj) -> str:
    """Strict JSON (RFC 8259): non-finite floats become null, never a bare NaN/Infinity."""
    return json.dumps(finite_or_none(obj), indent=2, sort_keys=True, default=str, allow_nan=False)


def finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(obj, path: str) -> None:
    _atomic(path, (json_text(obj) + '\n').encode())


def atomic_write_bytes(data: bytes, path: str) -> None:
    _atomic(path, data)


# a temp file younger than this is left alone by a cleaner of a shared folder: it may be a write that
# opened its file but has not locked it yet (microseconds); a killed process's is older by the time the next
# one has started (Python and torch take longer than this to import)
FRESH_TEMP_S = 2.0


def _in_flight(path: str) -> bool:
    """Whether a live writer holds the temp file's lock (_lock)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone or unreadable: not ours to remove
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:  # a live writer's
        return True
    except OSError:  # a file system without locks: the age rule (shared) is all there is
        return False
    finally:
        os.close(fd)  # closing drops our lock too


def remove_stray_temps(folder: str, shared: bool = False) -> list[str]:
    """Delete temp files an interrupted atomic write (or write probe) left in `folder`; returns them.
    A temp a live writer holds locked is never removed. shared: other processes may write into the folder
    now (a study's cells, the run folders under --run_dir), so a temp younger than FRESH_TEMP_S is kept too."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not (_TEMP.match(name) and os.path.isfile(path)):
            continue
        try:
            if shared and time.time() - os.path.getmtime(path) < FRESH_TEMP_S:
                continue
            if _in_flight(path):
                continue
            os.remove(path)
            removed.append(path)
        except OSError:
            pass  # another process's, or not ours to remove: harmless
    return removed


def remove_stray_temps_under(root: str) -> list[str]:
    """remove_stray_temps(shared=True) in every folder directly under `root` (the run folders of --run_dir,
    where other runs may be writing now); returns the files removed."""
    if not os.path.isdir(root):
        return []
    return [path for name in sorted(os.listdir(root)) for path in remove_stray_temps(os.path.join(root, name), shared=True)]


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (memory stays one chunk)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable(folder: str, what: str, need_bytes: int = 0) -> None:
    """Before any work: create and remove a probe file in `folder` (or, if it does not exist yet, in its
    nearest existing parent, creating nothing), so a read-only or permission-denied output folder is a
    one-line UsageError instead of a traceback after the work. need_bytes: the probe also writes (and
    fsyncs) that many bytes, so a disk too full for the output fails here, not at the end (creating an
    empty file needs no free blocks)."""
    probe_in = os.path.abspath(folder)
    while not os.path.exists(probe_in):
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise UsageError(f"{what} {folder}: {probe_in} is a file, not a folder; choose another path")
    try:
        fd, probe = _new_temp(probe_in, 'write-probe')
        try:
            _fill(fd, need_bytes)
        finally:
            os.close(fd)
            _remove_quietly(probe)  # gone already: another process's remove_stray_temps took it (it was written)
    except OSError as e:
        raise UsageError(f"{what} {folder} is not writable ({e.strerror or e} in {probe_in}); choose another "
                         f"folder, free disk space or fix its permissions") from None


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (one call may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fill(fd: int, n: int) -> None:
    """Write n bytes and fsync them: the blocks are then really allocated (or ENOSPC). Random bytes: a
    compressing file system would store zeros in next to no space."""
    block = os.urandom(min(n, 1 << 16))  # one 64 KiB block, written again: memory stays small for any n
    for start in range(0, n, len(block) or 1):
        _write_all(fd, block[:n - start])
    if n > 0:
        os.fsync(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
