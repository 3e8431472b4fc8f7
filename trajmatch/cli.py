"""The command line: typed user errors, the entry wrapper that turns them into one line and an exit
status, the parser that does the same for a malformed command line, flags read back from a run's
args.json, and the domains every numeric flag is checked against before any work.

Library code raises these errors; only a script's entry point (cli_entry) prints them.
"""
import argparse
import functools
import math
import sys


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
