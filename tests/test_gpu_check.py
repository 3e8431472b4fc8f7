"""tools/gpu_check.py on the CPU at small sizes: the cheap checks' numbers, the test finder, a failing or
overrunning check, and the report's two files. The whole script is not run here (python -m
tools.gpu_check OUT --device cpu takes minutes; docs/gpu.md)."""
import json
import math

import pytest
import torch

from tools import gpu_check
from tools.gpu_check import CheckFailed, Ctx, run_check


@pytest.fixture
def ctx(tmp_path):
    return Ctx('cpu', True, str(tmp_path / 'work'), str(tmp_path / 'logs'))


def test_env_check_reports_this_machine(ctx):
    r = run_check('env', ctx)
    assert r['ok'] is True and r['name'] == 'env' and r['seconds'] >= 0
    d = r['details']
    assert d['torch'] == torch.__version__ and d['device'] == 'cpu'
    assert d['cpus_usable'] >= 1 and d['memory_total_gib'] > d['memory_free_gib'] > 0
    assert f"torch {torch.__version__}" in r['line']


def test_bptt_and_recompute_agree(ctx):
    r = run_check('bptt_vs_recompute', ctx)
    d = r['details']
    assert r['ok'] is True, r
    assert d['float64_images_grad_norm'] > 0 and d['float64_syn_lr_grad'] != 0  # gradients really flowed
    for part in ('loss', 'images_grad', 'syn_lr_grad'):
        assert d[f'float64_{part}_rel_diff'] < 1e-10  # measured 6e-16
        assert d[f'float32_{part}_rel_diff'] < 1e-5   # measured 3e-7


def test_stacked_networks_follow_each_network_alone(ctx):
    r = run_check('stacked_vs_one', ctx)
    d = r['details']
    assert r['ok'] is True, r
    assert d['float64_weights_rel_diff'] < 1e-12  # measured 8.5e-16
    assert d['float32_weights_rel_diff'] < 1e-4   # measured 4.1e-7
    assert d['float64_accs_loop'] == d['float64_accs_stack'] and len(set(d['float64_accs_loop'])) > 1


def test_the_tests_that_need_cuda_are_found(tmp_path):
    assert 'tests/test_augment.py::test_cpu_and_cuda_agree' in gpu_check.cuda_only_tests()
    tests = tmp_path / 'tests'
    tests.mkdir()
    (tests / 'test_a.py').write_text('import pytest, torch\n'
                                     '@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU")\n'
                                     'def test_one():\n    pass\n\n'
                                     '@pytest.mark.slow\ndef test_two():\n    pass\n')
    (tests / 'test_b.py').write_text('import pytest, torch\n'
                                     'pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="x")\n'
                                     'def test_three():\n    pass\n')
    assert gpu_check.cuda_only_tests(tests) == ['tests/test_a.py::test_one', 'tests/test_b.py']


def test_a_failing_check_is_recorded_with_its_error(ctx, monkeypatch):
    def broken(_):
        raise ValueError('boom\nsecond line')

    def cannot(_):
        raise CheckFailed('buffer.sh exited 2: error: no experts')

    monkeypatch.setitem(gpu_check.CHECKS, 'env', broken)
    monkeypatch.setitem(gpu_check.CHECKS, 'memplan', cannot)
    r = run_check('env', ctx)
    assert r['ok'] is False and r['error'].startswith('ValueError: boom') and '\n' not in r['error']
    assert any('boom' in line for line in r['traceback'])
    r = run_check('memplan', ctx)
    assert r == {'name': 'memplan', 'ok': False, 'error': 'buffer.sh exited 2: error: no experts',
                 'seconds': r['seconds']}


def test_a_check_past_its_budget_is_ended_and_none_starts_past_the_total(tmp_path):
    r = gpu_check.run_in_child('env', str(tmp_path), 'cpu', True, timeout=0.3)  # ended while importing torch
    assert r['ok'] is False and 'timed out after 0 s' in r['error'] and r['seconds'] < 5
    report = gpu_check.new_report('cpu', True, ['env'], 1.0, ['OUT'])
    checks = gpu_check.run_checks(str(tmp_path), 'cpu', True, ['env'], 1.0, report)
    assert checks[0]['ok'] is False and checks[0]['error'].startswith('not run')


def fake_report():
    report = gpu_check.new_report('cuda', False, ['env', 'a', 'b', 'c'], 480.0, ['OUT', '--device', 'cuda'])
    report['environment'] = {'device_name': 'NVIDIA H200', 'torch': '2.14.1', 'cuda_build': '13.0', 'cudnn': '9.24.0'}
    report['checks'] = [
        {'name': 'env', 'ok': True, 'seconds': 1.5, 'line': 'torch 2.14.1', 'details': {}},
        {'name': 'a', 'ok': False, 'seconds': 2.0, 'line': 'diff 0.5 (bound 0.001)', 'details': {'x': math.nan}},
        {'name': 'b', 'ok': False, 'seconds': 3.0, 'error': 'RuntimeError: CUDA out of memory'},
        {'name': 'c', 'ok': None, 'seconds': 0.5, 'line': 'skipped (no CUDA)', 'details': {}},
    ]
    report['total_seconds'] = 7.0
    return report


def test_the_report_is_a_json_file_and_a_summary(tmp_path):
    report = fake_report()
    gpu_check.write_outputs(str(tmp_path), report)
    saved = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert saved['checks'][1]['details']['x'] is None  # strict JSON: NaN becomes null
    assert saved['command'][-3:] == ['OUT', '--device', 'cuda'] and 'commit' in saved['git']
    summary = (tmp_path / 'summary.md').read_text()
    assert summary.startswith('# GPU check: cuda (NVIDIA H200), 7 s (budget 480 s)')
    assert '1 PASS, 2 FAIL, 1 SKIP' in summary
    lines = [ln for ln in summary.splitlines() if ln[:4] in ('PASS', 'FAIL', 'SKIP')]
    assert [ln.split()[:2] for ln in lines] == [['PASS', 'env'], ['FAIL', 'a'], ['FAIL', 'b'], ['SKIP', 'c']]
    assert 'out of bounds: diff 0.5' in lines[1] and 'error: RuntimeError: CUDA out of memory' in lines[2]
    assert gpu_check.exit_status(report['checks']) == 1
    assert gpu_check.exit_status([report['checks'][0], report['checks'][3]]) == 0  # skips allowed
