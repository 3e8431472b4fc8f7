"""glibc malloc thresholds for the entry points (CPU speed; numbers unchanged).

glibc maps every allocation above its mmap threshold anew and unmaps it on free; the threshold adapts
only up to 32 MiB. A first conv layer's activations at ipc 10 (about 52 MB on 32x32x3) are above it, so
each unroll step faulted them in again: a quarter of an iteration in the kernel. Raising the threshold
and keeping freed memory (trim threshold, top pad) lets the same pages be reused. Only placement
changes, never a value: results are bit-identical (tests/test_allocator.py).

A variable the user sets (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_) wins over
ours; TRAJMATCH_MALLOC=default leaves glibc's own behaviour entirely (the benchmark's "before").
"""
import ctypes
import ctypes.util
import os
import sys

# mallopt parameter -> (glibc's environment variable, our value in bytes)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    M_MMAP_THRESHOLD: ('MALLOC_MMAP_THRESHOLD_', 1 << 30),   # 1 GiB: activations come from the heap
    M_TRIM_THRESHOLD: ('MALLOC_TRIM_THRESHOLD_', 2**31 - 1),  # keep up to 2 GiB freed at the top (mallopt takes an int)
    M_TOP_PAD: ('MALLOC_TOP_PAD_', 256 << 20),               # grow the heap 256 MiB at a time
}
OPT_OUT = 'TRAJMATCH_MALLOC'


def _libc():
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # only glibc has it: musl etc. raise here
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(environ=os.environ) -> dict[str, int]:
    """Set each threshold the environment does not; returns {variable: bytes} for those set (empty when
    not glibc, or opted out)."""
    if environ.get(OPT_OUT) == 'default':
        return {}
    libc = _libc()
    if libc is None:
        return {}
    applied = {}
    for param, (variable, value) in SETTINGS.items():
        if variable in environ:
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[variable] = value
    return applied
