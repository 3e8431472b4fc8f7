"""tools/bench.py's comparison with MTT's own iteration (--only versus): the baseline computes what our
bptt computes (so the timing compares two ways to the same gradient), and the part runs end to end on a
small cell through its fresh-process children."""
import math

import torch

from networks import get_network
from reparam_module import ReparamModule
from tools import bench
from trajmatch.matching import Targets, Unroll, match_and_backward


def test_mtt_iteration_gives_bptts_gradients():
    """Every image in every step and no DSA: the step order cannot differ, so MTT's loop and ours must
    agree to float64 rounding on dL/dS and dL/dα (measured 1e-16 relative)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    shape = (1, 10, (8, 8))
    images = torch.randn(20, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.arange(10).repeat_interleave(2)
    student = ReparamModule(get_network('ConvNetD2', *shape).double())
    w0 = student.flat_param()
    target = w0 + 0.05 * torch.randn(w0.shape, generator=gen, dtype=torch.float64)
    grads = []
    for impl in ('mtt', 'bptt'):
        s = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        if impl == 'mtt':
            torch.set_default_dtype(torch.float64)  # the fresh student is built inside; its weights are replaced anyway
            try:
                loss = bench.mtt_iteration('ConvNetD2', shape, s, labels, lr, w0, target, syn_steps=4, batch_syn=20,
                                           generator=torch.Generator().manual_seed(1), use_dsa=False)
            finally:
                torch.set_default_dtype(torch.float32)
        else:
            loss, _ = match_and_backward(student, s, labels, lr, w0, Targets(w0, target),
                                         Unroll(syn_steps=4, batch_syn=20, use_dsa=False),
                                         generator=torch.Generator().manual_seed(2))
        grads.append((loss, s.grad, lr.grad))
    (l1, s1, a1), (l2, s2, a2) = grads
    assert s1.norm() > 0 and a1 != 0
    assert abs(l1 - l2) / abs(l2) < 1e-12
    assert (s1 - s2).norm() / s2.norm() < 1e-10
    assert abs(a1 - a2) / abs(a2) < 1e-10


def test_versus_runs_end_to_end(monkeypatch):
    """One round on the Digits cell at ipc 10: every implementation's row, ratios against MTT and bptt,
    system time and faults, and the FLOP-rate child's figures."""
    monkeypatch.setattr(bench, 'VERSUS_ROUNDS', 1)
    monkeypatch.setattr(bench, 'VERSUS_ITERS', 1)
    rows = bench.bench_versus('cpu', cells=[('Digits', 10)], impls=('mtt', 'bptt', 'recompute', 'recompute_sqrt', 'bptt_stock'))
    by = {r['impl']: r for r in rows}
    assert set(by) == {'mtt', 'bptt', 'recompute', 'recompute_sqrt', 'bptt_stock'}
    assert by['mtt']['malloc'] == 'default' and by['bptt']['malloc'] == 'tuned'
    for r in rows:
        assert r['sec_per_iter'] > 0 and len(r['times']) == 1 and r['minor_faults_per_iter'] >= 0
        assert math.isclose(r['vs_mtt_time'], r['sec_per_iter'] / by['mtt']['sec_per_iter'])
    assert math.isclose(by['recompute']['vs_bptt_time'], by['recompute']['sec_per_iter'] / by['bptt']['sec_per_iter'])
    b = by['bptt']
    # each unroll step does a first-order step's forward and backward, and the backward of that backward
    assert b['rate']['unroll_flops'] > 2 * bench.VERSUS_STEPS * b['rate']['first_order_flops']
    assert b['rate']['first_order_flops'] > 0 and b['of_first_order_rate'] > 0
    assert b['rate']['threads'] == 1
    # recompute's phases: N steps recorded (the last one taped), N - 1 re-taped, N products; the segments
    # regenerated only where the states do not all fit the budget (recompute_sqrt: checkpoints every 5 of 20)
    for impl, every, regenerated in (('recompute', 1, 0), ('recompute_sqrt', 5, 16)):
        ph = by[impl]['phases']
        assert ph['every'] == every
        assert ph['steps'] == {'record': 20, 'regenerate': regenerated, 'retape': 19, 'products': 20}
        assert all(v > 0 for k, v in ph['phase_sec'].items() if ph['steps'][k])
        assert math.isclose(ph['predicted_sec'], sum(ph['phase_sec'].values()))


def test_layers_part_times_both_kinds(monkeypatch):
    """--only layers: one row per layer and batch, the stock and our layer's first and second derivative."""
    monkeypatch.setattr(bench, 'LAYER_BATCHES', (2,))
    rows = bench.bench_layers('cpu', repeats=1)
    assert [r['layer'] for r in rows] == [c[0] for c in bench.layer_cells()]
    for r in rows:
        assert r['input'][0] == 2
        assert all(r[f'{k}_{d}_ms'] > 0 for k in ('stock', 'ours') for d in ('first', 'second'))
