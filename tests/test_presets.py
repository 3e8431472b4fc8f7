"""Every preset parses into valid flags of buffer.py and distill.py, and the shell scripts pass them on."""
import subprocess
import sys

import pytest

import buffer
import distill
import presets

ROOT = __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__)))


@pytest.mark.parametrize('name', list(presets.DISTILL))
def test_preset_parses_into_valid_flags(name):
    row = presets.DISTILL[name]
    d = distill.build_parser().parse_args(presets.distill_flags(name))
    for key, value in row.items():
        assert getattr(d, key) == value, key
    b = buffer.build_parser().parse_args(presets.buffer_flags(name))
    assert (b.dataset, b.zca, b.buffer_path) == (d.dataset, d.zca, d.buffer_path)  # distill finds the experts
    if d.dataset == 'ImageNet':
        assert (b.subset, b.res) == (d.subset, d.res)
    assert b.train_epochs >= d.max_start_epoch + d.expert_epochs  # the experts are long enough for the row


def test_ast_presets_train_smooth_experts_and_switch_every_component_on():
    for name in ('cifar100_ipc1_ast', 'cifar100_ipc10_ast', 'cifar10_ipc10_ast', 'digits_ipc1_ast'):
        b = buffer.build_parser().parse_args(presets.buffer_flags(name))
        assert (b.optim, b.loss_decay, b.gp) == ('sgdmom', 'paper', 'paper')
        d = distill.build_parser().parse_args(presets.distill_flags(name))
        assert d.pix_init == 'kmeans' and d.weight_perturb and d.agg_middle_loss and d.balance_loss
        assert d.syn_mom == 0.9
    d = distill.build_parser().parse_args(presets.distill_flags('cifar100_ipc1_ast'))
    assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.zca, d.lr_img) == (20, 3, 20, True, 1000)
    assert distill.build_parser().parse_args(presets.distill_flags('cifar100_ipc10_ast')).batch_syn == 128


def test_every_mtt_row_of_the_spec_is_a_preset():
    expected = {f'{d}_ipc{i}' for d in ('cifar10', 'cifar100', 'tiny') for i in (1, 10, 50)}
    expected |= {f'{s}_ipc{i}' for s in ('imagenette', 'imagewoof', 'imagefruit', 'imagemeow', 'imagesquawk',
                                          'imageyellow') for i in (1, 10)}
    assert expected <= set(presets.DISTILL)
    assert presets.DISTILL['cifar100_ipc50']['batch_syn'] == 125 and presets.DISTILL['cifar10_ipc1']['zca'] is True


@pytest.mark.parametrize('script', ['buffer.sh', 'distill.sh'])
def test_shell_scripts_run_the_preset(script):
    out = subprocess.run(['bash', script, 'cifar100_ipc50', '--help'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '--dataset CIFAR100' in out.stderr and 'usage:' in out.stdout  # set -x echoes the flags
    bad = subprocess.run(['bash', script, 'nope'], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown preset 'nope'" in bad.stderr
