"""The entry points' glibc malloc thresholds: the user's environment wins, and only speed changes."""
import os
import subprocess
import sys

import pytest

from trajmatch import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(allocator._libc() is None, reason='not glibc')

# one bptt and one recompute matching steps on 32x32x3 images at ipc 10 (activations above glibc's
# dynamic mmap threshold); prints the gradients' bytes as hex
STEP = r'''
import hashlib, sys, torch
from trajmatch.allocator import tune_malloc
print(sorted(tune_malloc()), file=sys.stderr)
from networks import get_network
from reparam_module import ReparamModule
from trajmatch.matching import Targets, Unroll, match_and_backward
torch.manual_seed(0)
student = ReparamModule(get_network('ConvNet', 3, 10, (32, 32)))
w0 = student.flat_param().detach()
targets = Targets(w0, w0 + 0.01 * torch.randn(w0.shape))
digest = hashlib.sha256()
for mode in ('bptt', 'recompute'):
    images = torch.randn(100, 3, 32, 32, requires_grad=True)
    lr = torch.tensor(0.01, requires_grad=True)
    match_and_backward(student, images, torch.arange(100) % 10, lr, w0, targets,
                       Unroll(syn_steps=2, batch_syn=100, mode=mode), generator=torch.Generator().manual_seed(1))
    digest.update(images.grad.numpy().tobytes()); digest.update(lr.grad.numpy().tobytes())
print(digest.hexdigest())
'''


def test_the_users_variables_win_and_the_opt_out_leaves_glibc_alone():
    assert allocator.tune_malloc({allocator.OPT_OUT: 'default'}) == {}
    mine = {'MALLOC_MMAP_THRESHOLD_': '65536'}  # what the memory benchmark's children set
    applied = allocator.tune_malloc(mine)
    assert 'MALLOC_MMAP_THRESHOLD_' not in applied
    if allocator._libc() is not None:
        assert set(applied) == {'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_'}
        assert all(0 < v < 2**31 for v in applied.values())  # mallopt takes an int


@glibc
def test_tuned_and_default_allocators_give_bit_identical_gradients():
    out = {}
    for name, extra in (('tuned', {}), ('default', {allocator.OPT_OUT: 'default'})):
        env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
        env.update(extra, OMP_NUM_THREADS='1')
        r = subprocess.run([sys.executable, '-c', STEP], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True)
        out[name] = (r.stdout.strip(), r.stderr.strip().splitlines()[0])
    assert out['tuned'][1] == str(sorted(allocator.SETTINGS[p][0] for p in allocator.SETTINGS))
    assert out['default'][1] == '[]'
    assert out['tuned'][0] == out['default'][0]
