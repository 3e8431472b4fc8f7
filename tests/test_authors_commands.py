"""The AST authors' commands, pasted: their README's buffer.py and distill.py commands and every distill.sh line
(their repository at HEAD 8030869) run with the meaning their final code gives each flag (issue 26)."""
import json
import os
import shlex

import pytest
import torch

import buffer
import distill
import studies.cells as cells
from trajmatch.ast_components import _features, intermediate_steps
from networks import get_network

README_BUFFER = ("python buffer.py --dataset=CIFAR100 --model=ConvNet --optim SGDMOM --loss_decay --gp True "
                 "--train_epochs=50 --num_experts=100 --zca --buffer_path={path_to_buffer_storage} "
                 "--data_path={path_to_dataset}")
README_DISTILL = ("python distill.py --dataset=CIFAR100 --ipc=1 --pix_init avg --weight_perturb --agg_middle_loss "
                  "--balance_loss --syn_steps=20 --expert_epochs=3 --max_start_epoch=20 --zca --lr_img=1000 "
                  "--lr_lr=1e-05 --lr_teacher=0.01 --buffer_path={path_to_buffer_storage} --data_path={path_to_dataset}")
# their distill.sh, line -> command (all but :14 are commented out there)
DISTILL_SH = {
    11: "# CUDA_VISIBLE_DEVICES=1 python distill.py --Iteration 5000 --epoch_eval_train 300 --num_eval 1 --pix_init avg "
        "--weight_perturb --agg_middle_loss --lr_img=100 --lr_teacher 0.01 --lr_lr=1e-05 --dataset=CIFAR100 --ipc=1 "
        "--syn_steps=40 --expert_epochs=3 --max_start_epoch=15 --buffer_path='buffer_flat2' --data_path='data'",
    14: "CUDA_VISIBLE_DEVICES=1 python distill.py --Iteration 5000 --epoch_eval_train 300 --num_eval 1 --pix_init avg "
        "--weight_perturb --agg_middle_loss --lr_img=1000 --lr_teacher 0.01 --lr_lr=1e-05 --dataset=CIFAR100 --ipc=10 "
        "--batch_syn 128 --syn_steps=20 --expert_epochs=2 --max_start_epoch=30 --buffer_path='buffer_flat2' "
        "--data_path='data'",
    16: "# python distill.py --Iteration 5000 --epoch_eval_train 1000 --num_eval 1 --weight_perturb --zca --balance_loss "
        "--agg_middle_loss --lr_img=100 --lr_teacher 0.01 --lr_lr=1e-06 --dataset=CIFAR10 --ipc=10 --syn_steps=30 "
        "--expert_epochs=2 --max_start_epoch=20 --buffer_path='buffer_cifa10_flat' --data_path='data'",
    18: "# python distill.py --Iteration 5000 --epoch_eval_train 1000 --num_eval 1 --weight_perturb --zca --balance_loss "
        "--agg_middle_loss --lr_img=1000 --lr_teacher 0.01 --lr_lr=1e-05 --dataset=CIFAR10 --ipc=10 --syn_steps=30 "
        "--expert_epochs=2 --max_start_epoch=20 --buffer_path='buffer' --data_path='data'",
    21: "# CUDA_VISIBLE_DEVICES=1,7 python distill.py --Iteration 5000 --epoch_eval_train 1000 --num_eval 1 --pix_init avg "
        "--lr_img=1000 --lr_teacher 0.01 --lr_lr=1e-05 --dataset=CIFAR100 --ipc=50 --batch_syn 700  --syn_steps=80 "
        "--expert_epochs=2 --max_start_epoch=40 --buffer_path='buffer_flat1' --data_path='data'",
    24: "# CUDA_VISIBLE_DEVICES=1 python distill.py --Iteration 5000 --epoch_eval_train 1000 --num_eval 1 --weight_perturb "
        "--agg_middle_loss --lr_img=10000 --lr_teacher 0.01 --lr_lr=1e-04 --dataset=Tiny --ipc=1 --model ConvNetD4 "
        "--syn_steps=10 --expert_epochs=2 --max_start_epoch=10 --buffer_path='buffer' --data_path='data'",
}


def flags_of(command: str) -> list[str]:
    """The flags of a pasted shell line: comment mark, environment assignments and `python script.py` dropped."""
    words = shlex.split(command.lstrip('# '))
    return words[[w.endswith('.py') for w in words].index(True) + 1:]


def swap(flags: list[str], **values) -> list[str]:
    """The same command on tiny data: `--key=value` / `--key value` replaced, bare `--key` dropped if None."""
    out, skip = [], False
    for i, w in enumerate(flags):
        if skip:
            skip = False
            continue
        key = w[2:].split('=')[0]
        if key in values:
            if '=' not in w and i + 1 < len(flags) and not flags[i + 1].startswith('--'):
                skip = True
            if values[key] is not None:
                out += [f'--{key}', str(values[key])]
            continue
        out.append(w)
    return out


def test_readme_buffer_command_is_the_authors_code_recipe():
    b = buffer.build_parser().parse_args(flags_of(README_BUFFER))
    assert (b.optim, b.loss_decay, b.gp) == ('sgdmom_code', 'code', 'code')  # before issue 26: sgdmom, paper, paper
    assert buffer.expert_lr(b.optim, b.lr_teacher) == 0.003  # "the default learning rate"
    # the paper's versions keep explicit names; today's explicit names keep working
    p = buffer.build_parser().parse_args(['--optim', 'sgdmom_paper', '--loss_decay', 'paper', '--gp', 'paper'])
    assert (p.optim, p.loss_decay, p.gp) == ('sgdmom_paper', 'paper', 'paper')
    c = buffer.build_parser().parse_args(['--optim', 'sgdmom_code', '--loss_decay', 'code', '--gp', 'code'])
    assert (c.optim, c.loss_decay, c.gp) == (b.optim, b.loss_decay, b.gp)
    assert buffer.build_parser().parse_args(['--optim', 'ADAM']).optim == 'adam'


def test_readme_buffer_command_runs_on_tiny_data(tmp_path):
    """Pasted, on Digits for 2 epochs: the experts' sidecar records the authors' code recipe."""
    flags = swap(flags_of(README_BUFFER), dataset='Digits', model='ConvNetW32', train_epochs=2, num_experts=1,
                 zca=None, buffer_path=tmp_path, data_path='data')
    buffer.main(flags)
    meta = json.load(open(tmp_path / 'Digits_NO_ZCA' / 'ConvNetW32' / 'replay_buffer_0.json'))
    assert {k: meta['args'][k] for k in ('optim', 'loss_decay', 'gp', 'lr_teacher')} == \
        {'optim': 'sgdmom_code', 'loss_decay': 'code', 'gp': 'code', 'lr_teacher': 0.003}
    assert meta['avg_var'] > 0


@pytest.mark.parametrize('line', [0, *DISTILL_SH])
def test_each_distill_command_resolves_to_the_authors_meaning(line):
    """README (line 0) and every distill.sh line: --pix_init avg clusters the expert's logits, --weight_perturb
    is their perturbation, --agg_middle_loss matches at (N // M) * i; every flag they give is taken as given."""
    flags = flags_of(README_DISTILL if line == 0 else DISTILL_SH[line])
    d = distill.finalize_args(distill.build_parser().parse_args(flags))
    if d.pix_init == 'avg':
        assert d.kmeans_features == 'logits'  # before issue 26: the penultimate features
    assert d.perturb_variant == 'code' and d.middle_steps == 'code'  # before: paper, floor(i N / M)
    if d.agg_middle_loss:
        n, m = d.syn_steps, d.expert_epochs
        assert distill.run_shape(d).middle_steps == tuple((n // m) * i for i in range(1, m))
    # what their distill.py takes by default and ours does not (student momentum, evaluation) is the presets'
    assert (d.syn_mom, d.lr_decay) == (0.0, 'mtt')


def test_readme_distill_command_runs_on_tiny_data(tmp_path_factory, tmp_path):
    """Pasted, on Digits experts for 2 iterations: args.json records the authors' meaning of every AST flag."""
    from conftest import tiny_buffers
    path = tiny_buffers(tmp_path_factory, 1, 'ConvNetW32')
    flags = swap(flags_of(README_DISTILL), dataset='Digits', zca=None, syn_steps=4, max_start_epoch=1,
                 expert_epochs=2, buffer_path=path, data_path='data', lr_img=10)
    run_dir = distill.main(flags + ['--model', 'ConvNetW32', '--Iteration', '2', '--eval_it', '5', '--num_eval', '1',
                                    '--epoch_eval_train', '2', '--run_dir', str(tmp_path), '--wandb', 'disabled'])
    saved = json.load(open(os.path.join(run_dir, 'args.json')))
    assert {k: saved[k] for k in ('pix_init', 'kmeans_features', 'perturb_variant', 'middle_steps')} == \
        {'pix_init': 'avg', 'kmeans_features': 'logits', 'perturb_variant': 'code', 'middle_steps': 'code'}


def test_intermediate_steps_both_rules():
    assert intermediate_steps(20, 3, 'code') == [6, 12] and intermediate_steps(20, 3, 'paper') == [6, 13]
    assert intermediate_steps(20, 3) == [6, 13]  # the library's default stays the paper's
    assert intermediate_steps(20, 2, 'code') == intermediate_steps(20, 2, 'paper') == [10]  # M | N: the same
    assert intermediate_steps(80, 3, 'code') == [26, 52] and intermediate_steps(80, 3, 'paper') == [26, 53]


def test_kmeans_feature_spaces():
    """penultimate: the input of the last linear layer (the paper's); logits: the network's output (the
    authors' distill.py:155)."""
    torch.manual_seed(0)
    net = get_network('ConvNetW32', 1, 10, (8, 8)).double().eval()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(_features(net, x, 4, 'logits')), net(x))
        assert torch.equal(torch.from_numpy(_features(net, x, 4, 'penultimate')), net.embed(x).flatten(1))
    with pytest.raises(ValueError, match='feature space'):
        _features(net, x, 4, 'pixels')


def test_old_runs_resume_with_the_meaning_they_were_made_with(tmp_path):
    """A run whose args.json predates --middle_steps / --kmeans_features resumes with what it ran with then."""
    parser = distill.build_parser()
    saved = vars(distill.finalize_args(parser.parse_args(['--agg_middle_loss', '--pix_init', 'avg'])))
    for key in ('middle_steps', 'kmeans_features', 'perturb_variant'):
        del saved[key]
    (tmp_path / 'args.json').write_text(json.dumps(saved))
    (tmp_path / 'checkpoint.pt').write_bytes(b'')
    _, args, changes, _ = distill.resume_args(parser, ['--resume', str(tmp_path)], str(tmp_path), 'runs')
    assert (args.middle_steps, args.kmeans_features, args.perturb_variant) == ('paper', 'penultimate', 'paper')
    assert changes == {}


def test_sidecars_and_study_caches_keep_their_meaning(monkeypatch):
    """An expert trained as `--optim sgdmom` before issue 26 (the paper's recipe) is the paper's recipe now;
    the studies' cell keys keep the old spelling and run today's."""
    args = vars(buffer.build_parser().parse_args(['--optim', 'sgdmom_paper']))
    monkeypatch.setattr(buffer, 'sidecar_of', lambda folder, i: {'args': {**args, 'optim': 'sgdmom'}})
    assert buffer.recipe_clash('f', [0], args) is None
    assert 'optim' in buffer.recipe_clash('f', [0], {**args, 'optim': 'sgdmom_code'})
    assert cells.buffer_command(['--optim', 'sgdmom', '--gp', '--loss_decay']) == \
        ['--optim', 'sgdmom_paper', '--gp', 'paper', '--loss_decay', 'paper']
    assert cells.buffer_command(['--optim', 'sgdmom_code', '--gp', 'code', '--loss_decay', 'code']) == \
        ['--optim', 'sgdmom_code', '--gp', 'code', '--loss_decay', 'code']
    for recipe, flags in cells.RECIPES.items():  # what each study recipe trains is what its name says
        b = buffer.build_parser().parse_args(cells.buffer_command(flags))
        want = {'SGD (MTT)': ('sgd', None, None), 'SGD + momentum': ('sgdmom_paper', None, None)}.get(
            recipe, ('sgdmom_paper', 'paper', 'paper') if 'paper' in recipe else ('sgdmom_code', 'code', 'code'))
        assert (b.optim, b.loss_decay, b.gp) == want, recipe
