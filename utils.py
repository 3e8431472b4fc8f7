"""Small shared helpers: seeding, device choice, atomic writes, typed errors and the CLI entry wrapper,
flag domains.

Anything bigger than a helper lives in its own module (see README "Layout").
"""
import argparse
import functools
import io
import json
import math
import os
import random
import re
import sys

import numpy as np
import torch


# ---------------------------------------------------------------- seeding / device

def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch from one integer; return a CPU generator seeded alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = 'auto') -> torch.device:
    """auto, cpu, cuda, cuda:N or mps; anything else, or a device this machine lacks, is a UsageError."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    m = re.fullmatch(r'(cpu|cuda|mps)(?::(\d+))?', name)
    if not m or (m.group(1) != 'cuda' and m.group(2) is not None):
        raise UsageError(f"--device {name!r}: give auto, cpu, cuda, cuda:N or mps")
    if m.group(1) == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name} asked for, but CUDA is not available; use --device auto or cpu")
        if m.group(2) is not None and int(m.group(2)) >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if m.group(1) == 'mps' and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name} asked for, but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def rng_state() -> dict:
    """Every RNG state a resumed run needs to continue the same random stream."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as tensors/ints so checkpoints load with torch.load(weights_only=True)
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------- errors (one design for every script)

class CliError(Exception):
    """A failure the user can act on. Library code raises it (or a subclass); only a script's entry point
    (cli_entry) turns it into one `error: ...` line on stderr and the exit status `exit_code`."""
    exit_code = 2


class UsageError(CliError):
    """Bad input (a flag, a file, a folder), found before long work starts where possible: exit 2.
    The message is one line: the culprit, what is wrong, and the fix."""


class WriteError(UsageError):
    """An output could not be written (permissions, disk full); the previous file of that name is intact."""


class Diverged(CliError):
    """Distillation stopped because its steps kept being skipped (non-finite or exploding): exit 3."""
    exit_code = 3


def one_line(text: str) -> str:
    return ' '.join(str(text).split())


def cli_entry(main):
    """Wrap a script's main(argv): a CliError becomes `error: <message>` (one line) and SystemExit(code).
    Anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def entry(argv=None):
        try:
            return main(argv)
        except CliError as e:
            _close_progress_bars()  # a bar left open mid-line would share the error's line
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
    return entry


def _close_progress_bars() -> None:
    from tqdm import tqdm
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()
    sys.stderr.flush()


class CliParser(argparse.ArgumentParser):
    """argparse, but a malformed command line raises UsageError (one line) instead of printing the usage."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """Only the flags the user actually typed, with their parsed values (defaults suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default


def _fits(action: argparse.Action, value) -> bool:
    """Could `action` have produced `value` from a command line?"""
    if value is None:
        return action.default is None
    if isinstance(action, argparse._StoreTrueAction):
        return isinstance(value, bool)
    many = action.nargs in ('+', '*')
    if many and not isinstance(value, list):
        return False
    for v in (value if many else [value]):
        if action.type is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif action.type is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, str)
        if not ok or (action.choices is not None and v not in action.choices):
            return False
    return True


def check_saved_flags(parser: argparse.ArgumentParser, saved: dict, source: str, keys=None) -> None:
    """Flags read back from a file (a run's args.json) must be values the parser could have produced:
    a hand-edited or corrupt file is a one-line UsageError, not a traceback later."""
    for action in parser._actions:
        key = action.dest
        if key == 'help' or key not in saved or (keys is not None and key not in keys):
            continue
        if not _fits(action, saved[key]):
            raise UsageError(f"{source}: {key} = {saved[key]!r} is not a valid --{key}; the file was edited or is "
                             f"corrupt (restore it, or start a new run)")


# ---------------------------------------------------------------- flag domains

class Domain:
    """What a numeric flag may hold: `ok(value)` and the words for it."""

    def __init__(self, ok, allowed: str, optional: bool = False):
        self.ok, self.allowed, self.optional = ok, allowed, optional

    def admits(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return math.isfinite(value) and bool(self.ok(value))

    def or_none(self, meaning: str = 'unset') -> 'Domain':
        return Domain(self.ok, f"{self.allowed} (or {meaning})", optional=True)


def integer(lo: int, hi: int | None = None) -> Domain:
    words = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    return Domain(lambda v: isinstance(v, int) and v >= lo and (hi is None or v <= hi), words)


def real(lo: float = 0.0, *, strict: bool = True, below: float | None = None) -> Domain:
    words = f"a finite number {'>' if strict else '>='} {lo:g}" + (f" and < {below:g}" if below is not None else '')
    return Domain(lambda v: (v > lo if strict else v >= lo) and (below is None or v < below), words)


POSITIVE_INT = integer(1)
POSITIVE, NON_NEGATIVE = real(0.0), real(0.0, strict=False)
MOMENTUM = real(0.0, strict=False, below=1.0)
SEED = integer(0, 2**31 - 1)


def check_flags(args, domains: dict[str, Domain]) -> None:
    """Every flag in `domains` holds a value of its domain, else a UsageError naming flag, value and domain."""
    for flag, domain in domains.items():
        value = getattr(args, flag, None)
        if not domain.admits(value):
            raise UsageError(f"--{flag} {value!r}: must be {domain.allowed}")


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
