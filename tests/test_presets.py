"""Every preset parses into valid flags of buffer.py and distill.py, and the shell scripts pass them on."""
import os
import subprocess
import sys

import pytest

import buffer
import distill
import presets
from trajmatch.training import SGDSettings

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


def test_ast_presets_are_the_authors_runs():
    """Experts: the authors' buffer.py recipe with their loss decay and gradient penalty. Distillation: each
    row's flags as the authors' README / distill.sh line it cites, student momentum 0.9 (their --mom
    default), their weight perturbation, their intermediate steps, their evaluation."""
    ast = [n for n in presets.DISTILL if n.endswith('_ast')]
    assert set(ast) == {'cifar100_ipc1_ast', 'cifar100_ipc10_ast', 'cifar100_ipc50_ast', 'cifar10_ipc10_ast',
                        'tiny_ipc1_ast', 'digits_ipc1_ast'}
    for name in ast:
        b = buffer.build_parser().parse_args(presets.buffer_flags(name))
        assert (b.optim, b.loss_decay, b.gp, b.lr_teacher) == ('sgdmom_code', 'code', 'code', None)
        schedule = buffer.expert_schedule(b.optim, b.lr_teacher, b.mom, b.l2, b.decay, 50)
        assert schedule[0] == SGDSettings(0.003, 0.9, 1e-3)  # x0.6 and a fresh optimiser after epoch 26
        assert schedule[27] == SGDSettings(0.003 * 0.6, 0.9, 1e-3) and schedule.count(None) == 48
        d = distill.finalize_args(distill.build_parser().parse_args(presets.distill_flags(name)))
        assert (d.syn_mom, d.perturb_variant, d.middle_steps, d.lr_decay) == (0.9, 'code', 'code', 'ast')
        assert d.pix_init == 'real' or (d.pix_init, d.kmeans_features) == ('avg', 'logits')
        assert 'source' not in presets.DISTILL[name] and presets.SOURCES[name]
    row = lambda name: distill.build_parser().parse_args(presets.distill_flags(name))
    d = row('cifar100_ipc1_ast')  # AST README
    assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.zca, d.lr_img, d.lr_lr, d.lr_teacher) == \
        (20, 3, 20, True, 1000, 1e-5, 0.01)
    assert d.pix_init == 'avg' and d.balance_loss and d.weight_perturb and d.agg_middle_loss
    assert distill.run_shape(d).middle_steps == (6, 12)  # (N // M) * i, their distill.py:493; the paper's: 6, 13
    d = row('cifar100_ipc10_ast')  # authors' distill.sh:14, CIFAR-100 ipc 10
    assert (d.batch_syn, d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.zca) == \
        (128, 20, 2, 30, 1000, 1e-5, False)
    assert d.pix_init == 'avg' and not d.balance_loss and d.epoch_eval_train == 300
    assert 'distill.sh:14' in presets.SOURCES['cifar100_ipc10_ast']
    d = row('cifar100_ipc50_ast')  # authors' distill.sh:21, CIFAR-100 ipc 50
    assert (d.ipc, d.batch_syn, d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.lr_teacher,
            d.zca, d.epoch_eval_train) == (50, 700, 80, 2, 40, 1000, 1e-5, 0.01, False, 1000)
    assert d.pix_init == 'avg' and not (d.weight_perturb or d.agg_middle_loss or d.balance_loss)
    assert 'distill.sh:21' in presets.SOURCES['cifar100_ipc50_ast']
    d = row('tiny_ipc1_ast')  # authors' distill.sh:24, Tiny ImageNet ipc 1
    assert (d.dataset, d.model, d.ipc, d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr,
            d.lr_teacher, d.zca) == ('Tiny', 'ConvNetD4', 1, 10, 2, 10, 1e4, 1e-4, 0.01, False)
    assert d.pix_init == 'real' and d.weight_perturb and d.agg_middle_loss and not d.balance_loss
    assert 'distill.sh:24' in presets.SOURCES['tiny_ipc1_ast']
    d = row('cifar10_ipc10_ast')  # authors' distill.sh:16, CIFAR-10 ipc 10 on smooth experts
    assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.lr_teacher, d.zca) == \
        (30, 2, 20, 100, 1e-6, 0.01, True)
    assert d.pix_init == 'real' and d.balance_loss
    for name in ('cifar100_ipc10_ast', 'cifar100_ipc50_ast', 'cifar10_ipc10_ast', 'tiny_ipc1_ast'):
        assert 'no script in their repository makes' in presets.SOURCES[name]  # which experts, and why


def test_presets_md_gives_the_published_number_and_its_statistic():
    """Every AST and MTT preset: the published number, what statistic it is, and our key for it, beside our
    headline (the final set)."""
    doc = presets.markdown_doc()
    published = [n for n in presets.DISTILL if not n.startswith('digits')]
    assert set(presets.PUBLISHED) == set(published)
    for name in published:
        line = next(l for l in doc.splitlines() if l.startswith(f'| `{name}` | {presets.PUBLISHED[name]} |'))
        assert ('AST Table III' in line) == name.endswith('_ast') and ('MTT paper' in line) != name.endswith('_ast')
    assert presets.PUBLISHED['cifar100_ipc1_ast'] == '26.6 ± 0.4' and presets.PUBLISHED['cifar10_ipc50'] == '71.6 ± 0.2'
    assert '`eval/best_mean_selected_on_test`' in doc and '`eval/<model>_max_selected_on_test`' in doc
    assert 'every 20 epochs' in doc and 'images_final.pt' in doc and 'final_mean' in doc


def test_every_row_names_its_source_and_imagenet_uses_the_authors_lr_img():
    assert set(presets.SOURCES) == set(presets.DISTILL)
    for name, row in presets.DISTILL.items():
        if row['dataset'] == 'ImageNet':  # mtt-distillation issue #1: --lr_img=100000 --lr_lr=1e-06
            assert (row['lr_img'], row['lr_lr'], row['syn_steps'], row['max_start_epoch']) == (1e5, 1e-6, 20, 10)
            assert row.get('batch_syn') == (20 if row['ipc'] == 10 else None)
            assert 'issue #1' in presets.SOURCES[name]
    table = presets.markdown_table()
    assert all(f'`{name}`' in table for name in presets.DISTILL)


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


def test_docs_presets_md_is_the_generators_output():
    """docs/presets.md is generated (`python presets.py markdown > docs/presets.md`); it cannot go stale."""
    with open(os.path.join(ROOT, 'docs', 'presets.md'), encoding='utf-8') as f:
        committed = f.read()
    assert committed == presets.markdown_doc(), \
        'docs/presets.md is stale: run `python presets.py markdown > docs/presets.md`'
    out = subprocess.run([sys.executable, 'presets.py', 'markdown'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == committed, out.stderr
    rows = committed.split('## Distillation rows')[1].split('## Experts')[0]
    for name in presets.DISTILL:  # every row, each distinct source written once
        assert rows.count(f'| `{name}` |') == 1
    for source in set(presets.SOURCES.values()):
        assert committed.count(source) == 1
