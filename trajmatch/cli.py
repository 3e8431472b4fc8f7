"""The command line: typed user errors, the entry wrapper that turns them into one line and an exit
status, the parser that does the same for a malformed command line, flags read back from a run's
args.json, and the domains every numeric flag is checked against before any work.

Library code raises these errors; only a script's entry point (cli_entry) prints them.
"""
import argparse
import functools
import math
import struct
import sys

from trajmatch.allocator import tune_malloc


# ---------------------------------------------------------------- errors (one design for every script)

class CliError(Exception):
    """A failure the user can act on. Library code raises it (or a subclass); only a script's entry point
    (cli_entry) turns it into one `error: ...` line on stderr and the exit status `exit_code`."""
    exit_code = 2


class UsageError(CliError):
    """Bad input (a flag, a file, a folder), found before long work starts where possible: exit 2.
    The message is one line: the culprit, what is wrong, and the fix."""


class WriteError(UsageError):
    """An output could not be written (permissions, disk full); the previous file of that name, if any, is intact."""


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
        tune_malloc()  # before the first large allocation (allocator.py: speed only, values unchanged)
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

FLOAT32_MAX = 3.4028234663852886e38   # torch.finfo(torch.float32).max, without importing torch here
INT_MAX = 2**31 - 1                    # no integer flag means more; torch and the OS take int32 in places


def as_float32(value: float) -> float:
    """`value` rounded to the nearest float32 (inf past its range), as torch stores a learning rate or a
    coefficient that meets a float32 tensor."""
    try:
        return struct.unpack('f', struct.pack('f', value))[0]  # round to nearest, as torch's conversion
    except OverflowError:  # rounds past the largest float32
        return math.copysign(math.inf, value)


class Domain:
    """What a numeric flag may hold: `ok(value)` and the words for it. float32: the value is used in float32
    (an SGD lr, a coefficient of a tensor), so the domain is checked on the value as float32 holds it: 1e39
    is infinite there and 1e-50 is 0."""

    def __init__(self, ok, allowed: str, optional: bool = False, float32: bool = False):
        self.ok, self.allowed, self.optional, self.float32 = ok, allowed, optional, float32

    def admits(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not (math.isfinite(value) and self.ok(value)):
            return False
        if self.float32:
            v32 = as_float32(float(value))
            return math.isfinite(v32) and bool(self.ok(v32))
        return True

    def or_none(self, meaning: str = 'unset') -> 'Domain':
        return Domain(self.ok, f"{self.allowed} (or {meaning})", optional=True, float32=self.float32)


def integer(lo: int, hi: int = INT_MAX) -> Domain:
    """lo..hi; every integer flag has an upper bound (INT_MAX unless a lower one says where a larger value
    can only be a typo: a --syn_steps of 10**20 would run for ever)."""
    return Domain(lambda v: isinstance(v, int) and lo <= v <= hi, f"an integer in {lo}..{hi}")


def real(lo: float = 0.0, *, strict: bool = True, below: float | None = None, float32: bool = True) -> Domain:
    """A finite number > lo (>= lo unless strict), < below if given; float32 (the default): checked as
    float32 holds it, the precision torch uses it in; float32=False for values only Python uses (float64)."""
    words = f"a finite number {'>' if strict else '>='} {lo:g}" + (f" and < {below:g}" if below is not None else '')
    if float32:
        words += f" that float32 holds (<= {FLOAT32_MAX:.4g}{', not rounding to 0' if strict and lo == 0 else ''})"
    return Domain(lambda v: (v > lo if strict else v >= lo) and (below is None or v < below), words, float32=float32)


POSITIVE_INT = integer(1)
POSITIVE, NON_NEGATIVE = real(0.0), real(0.0, strict=False)
MOMENTUM = real(0.0, strict=False, below=1.0)
SEED = integer(0, INT_MAX)
# upper bounds of integer flags past which a value can only be a typo (each far above any paper's setting)
EPOCHS_MAX = 100_000
STEPS = integer(1, 100_000)         # --syn_steps: student steps per iteration (papers: <= 80)
EPOCHS = integer(1, EPOCHS_MAX)     # of an expert, of an evaluation network, matched or skipped (papers: <= 1000)
ITERATIONS = integer(1, 10_000_000)  # --Iteration (papers: <= 10,000)
NETWORKS = integer(1, 100_000)      # --num_eval, --num_experts: networks trained one after another


def check_flags(args, domains: dict[str, Domain]) -> None:
    """Every flag in `domains` holds a value of its domain, else a UsageError naming flag, value and domain."""
    for flag, domain in domains.items():
        value = getattr(args, flag, None)
        if not domain.admits(value):
            raise UsageError(f"--{flag} {value!r}: must be {domain.allowed}")
