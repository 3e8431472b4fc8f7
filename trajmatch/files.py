"""Atomic writes and output folders: a crash or a full disk never leaves half a file."""
import io
import json
import math
import os
import re

import torch

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


def _atomic(path: str, data: bytes) -> None:
    """Write through a temp file in the same folder, then rename: a crash or a full disk never leaves
    half a file, and the previous file of that name stays as it was. Failures raise WriteError."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _new_temp(folder, os.path.basename(path))
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or e}); free disk space or fix the folder's "
                         f"permissions and run again (the previous {os.path.basename(path)} is intact)") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


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


def remove_stray_temps(folder: str) -> list[str]:
    """Delete temp files an interrupted atomic write (or write probe) left in `folder`; returns them."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if _TEMP.match(name) and os.path.isfile(path):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass  # another process's, or not ours to remove: harmless
    return removed


def check_writable(folder: str, what: str) -> None:
    """Before any work: create and remove a probe file in `folder` (or, if it does not exist yet, in its
    nearest existing parent, creating nothing), so a read-only or permission-denied output folder is a
    one-line UsageError instead of a traceback after the work."""
    probe_in = os.path.abspath(folder)
    while not os.path.exists(probe_in):
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise UsageError(f"{what} {folder}: {probe_in} is a file, not a folder; choose another path")
    try:
        fd, probe = _new_temp(probe_in, 'write-probe')
        os.close(fd)
        try:
            os.remove(probe)
        except FileNotFoundError:
            pass  # another process's remove_stray_temps took it: it was written, which is what we test
    except OSError as e:
        raise UsageError(f"{what} {folder} is not writable ({e.strerror or e} in {probe_in}); choose another "
                         f"folder or fix its permissions") from None
