"""Bad input, malicious files, unwritable outputs, divergence and resume: every failure is one line.

The table runs buffer.py, distill.py and eval.py's entry points (main(argv), in-process) over bad inputs
and asserts for each: the exit status, exactly one stderr line that starts with `error:` and names the
culprit, no traceback, and nothing written (the whole workspace and the shared fixtures unchanged: no
run folder, no expert, no output file). A few rows also run as real processes.
"""
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import buffer
import compress_buffers
from trajmatch import cli
import distill
import eval as eval_script
from studies import cells as study_cells
from studies import experiments as studies_main
from trajmatch import matching
from trajmatch import files
from trajmatch.data import DataError, load_dataset
from networks import get_network
from trajmatch.synthetic import SyntheticSet
from trajmatch.trajectory_io import buffer_dir, expert_path, load_trajectories, meta_path, save_expert

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'ConvNetW32'
EPOCHS = 3
TINY = ['--model', MODEL, '--ipc', '2', '--syn_steps', '3', '--expert_epochs', '1', '--max_start_epoch', '2',
        '--num_eval', '1', '--epoch_eval_train', '2', '--lr_img', '10', '--seed', '0', '--wandb', 'disabled']
RUN = '000-Digits-ipc2-ConvNetW32'


# ---------------------------------------------------------------- fixtures

class RunsCode:
    """Unpickling this runs a shell command that creates `marker`: what a crafted data file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def write_cifar10(root, meta=None, protocol=4):
    d = Path(root) / 'cifar-10-batches-py'
    d.mkdir(parents=True)
    for name, n in [(f'data_batch_{b}', 4) for b in range(1, 6)] + [('test_batch', 3)]:
        with open(d / name, 'wb') as f:
            pickle.dump({b'data': np.full((n, 3072), 7, dtype=np.uint8), b'labels': list(range(n))}, f,
                        protocol=protocol)
    with open(d / 'batches.meta', 'wb') as f:
        pickle.dump(meta if meta is not None else {b'label_names': [f'c{i}'.encode() for i in range(10)]}, f,
                    protocol=protocol)
    return d


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Shared, never modified by a row: good buffers (2 experts x 3 epochs) and a finished tiny run."""
    root = tmp_path_factory.mktemp('env')
    buffer.main(['--num_experts', '2', '--train_epochs', str(EPOCHS), '--model', MODEL,
                 '--buffer_path', str(root / 'buffers')])
    run = distill.main(TINY + ['--buffer_path', str(root / 'buffers'), '--run_dir', str(root / 'runs'),
                               '--Iteration', '2', '--eval_it', '2', '--save_every', '1'])
    assert os.path.exists(os.path.join(run, 'final.json'))
    return {'root': root, 'buffers': str(root / 'buffers'), 'run': run,
            'experts': buffer_dir(str(root / 'buffers'), 'Digits', MODEL, zca=False)}


def snapshot(*roots) -> dict:
    """Every file under the roots (hidden ones too) with a hash of its bytes."""
    out = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                out[path] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    return out


def one_error_line(err: str) -> str:
    """The only stderr line of a run that stopped before any work."""
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith('error: ')
    return lines[0]


def last_error_line(err: str) -> str:
    """The error line of a run that stopped mid-way (progress bars came before it): one, the last, alone."""
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum('error:' in line for line in lines) == 1, err
    assert lines[-1].startswith('error: ')
    return lines[-1]


# ---------------------------------------------------------------- workspace builders for the rows

def buffers_copy(env, ws) -> tuple[str, str]:
    """A private copy of the good buffers: (buffer_path, expert folder)."""
    shutil.copytree(env['buffers'], ws / 'b')
    return str(ws / 'b'), buffer_dir(str(ws / 'b'), 'Digits', MODEL, zca=False)


def distill_with(env, ws, *flags, buffers=None):
    return TINY + ['--buffer_path', buffers or env['buffers'], '--run_dir', str(ws / 'runs'), *flags]


def bad_expert(env, ws, edit):
    """distill.py over a copy of the buffers whose second expert file (or its sidecar) `edit` spoils."""
    path, folder = buffers_copy(env, ws)
    edit(folder, ws)
    return distill_with(env, ws, buffers=path)


def truncate(path):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])


def other_model_expert(folder, ws):
    shapes = [p.shape for p in get_network('ConvNetW64', 1, 10, (8, 8)).parameters()]
    torch.save([[[torch.zeros(s) for s in shapes]] * (EPOCHS + 1)], expert_path(folder, 1))
    open(meta_path(folder, 1), 'wb').write(b'\x00 not json {')


def short_expert_list_sidecar(folder, ws):
    traj = load_trajectories(expert_path(folder, 1))[0][:2]  # 1 epoch
    torch.save([traj], expert_path(folder, 1))
    json.dump([1, 2, 3], open(meta_path(folder, 1), 'w'))


def short_expert_good_sidecar(folder, ws):
    meta = json.load(open(meta_path(folder, 1)))
    save_expert(folder, 1, load_trajectories(expert_path(folder, 1))[0][:2], meta)  # sidecar agrees: 1 epoch


def sidecar_says(**fields):
    def edit(folder, ws):
        meta = json.load(open(meta_path(folder, 1)))
        json.dump({**meta, **fields}, open(meta_path(folder, 1), 'w'))
    return edit


def run_copy(env, ws, finished=False) -> str:
    path = ws / 'runs' / RUN
    shutil.copytree(env['run'], path)
    if not finished:
        os.remove(path / 'final.json')
    return str(path)


def resume_with(env, ws, edit=None, *flags):
    run = run_copy(env, ws)
    if edit:
        edit(Path(run), ws)
    return ['--resume', run, *flags]


def edit_args(**fields):
    def edit(run, ws):
        args = json.load(open(run / 'args.json'))
        json.dump({**args, **fields}, open(run / 'args.json', 'w'))
    return edit


def write_bytes(name, data):
    return lambda run, ws: open(run / name, 'wb').write(data)


def malicious(name):
    return lambda run, ws: torch.save(RunsCode(ws / 'pwned'), run / name)


def eval_run(env, ws, edit=None, *flags):
    run = run_copy(env, ws, finished=True)
    if edit:
        edit(Path(run), ws)
    return ['--run', run, '--num_eval', '1', '--epoch_eval_train', '1', '--out', str(ws / 'out.json'), *flags]


def eval_images(env, ws, images, labels, *flags):
    torch.save(images, ws / 'imgs.pt')
    torch.save(labels, ws / 'labs.pt')
    return ['--images', str(ws / 'imgs.pt'), '--labels', str(ws / 'labs.pt'), '--num_eval', '1',
            '--epoch_eval_train', '1', '--out', str(ws / 'out.json'), *flags]


def eval_flags(env, ws, *flags):
    return ['--baseline', 'random', '--num_eval', '1', '--epoch_eval_train', '1', '--out', str(ws / 'out.json'),
            *flags]


def buffer_flags(env, ws, *flags):
    return ['--num_experts', '1', '--train_epochs', '1', '--model', MODEL, '--buffer_path', str(ws / 'b'), *flags]


def buffer_cifar(env, ws, edit, dataset='CIFAR10'):
    write_cifar10(ws / 'data')
    edit(ws / 'data' / 'cifar-10-batches-py', ws)
    return ['--dataset', dataset, '--data_path', str(ws / 'data'), '--num_experts', '1', '--train_epochs', '1',
            '--buffer_path', str(ws / 'b')]


def buffer_existing(env, ws, edit, *flags):
    path, folder = buffers_copy(env, ws)
    edit(folder, ws)
    return ['--num_experts', '2', '--train_epochs', str(EPOCHS), '--model', MODEL, '--buffer_path', path, *flags]


def unlink_meta_and(edit):
    def both(folder, ws):
        os.remove(meta_path(folder, 0))
        edit(folder, ws)
    return both


def overwrite_in_place(path, fraction=0.5):
    """Random bytes over the middle `fraction` of the file: its size (and so the sidecar's pt_bytes) unchanged."""
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.seek(int(size * (1 - fraction) / 2))
        f.write(np.random.default_rng(0).bytes(int(size * fraction)))


def crafted_with_edited_size(folder, ws):
    """Expert 1 replaced by a valid MTT file of other numbers (its weights x 100), the sidecar's size edited to
    match: only the digest tells."""
    traj = [[t * 100 for t in snap] for snap in load_trajectories(expert_path(folder, 1))[0]]
    torch.save([traj], expert_path(folder, 1))
    sidecar_says(pt_bytes=os.path.getsize(expert_path(folder, 1)))(folder, ws)


def old_sidecar_nan_expert(folder, ws):
    """A sidecar from before digests (no pt_sha256) over a file whose numbers are NaN: read in full, refused."""
    traj = [[torch.full_like(t, float('nan')) for t in snap] for snap in load_trajectories(expert_path(folder, 1))[0]]
    torch.save([traj], expert_path(folder, 1))
    meta = json.load(open(meta_path(folder, 1)))
    meta.pop('pt_sha256')
    json.dump({**meta, 'pt_bytes': os.path.getsize(expert_path(folder, 1))}, open(meta_path(folder, 1), 'w'))


def ckpt_edit(**parts):
    """checkpoint.pt with some parts replaced, each a function of the loaded checkpoint."""
    def edit(run, ws):
        ckpt = torch.load(run / 'checkpoint.pt', weights_only=True)
        torch.save({**ckpt, **{k: f(ckpt) for k, f in parts.items()}}, run / 'checkpoint.pt')
    return edit


def nan_momentum(ckpt):
    opt = ckpt['opt_img']
    state = {k: {**v, 'momentum_buffer': torch.full_like(v['momentum_buffer'], float('nan'))}
             for k, v in opt['state'].items()}
    return {**opt, 'state': state or {0: {'momentum_buffer': torch.tensor(float('nan'))}}}


def compress_with(env, ws, edit=None, *flags):
    path, folder = buffers_copy(env, ws)
    if edit:
        edit(folder, ws)
    return ['--folder', folder, *flags]


def study_with_cell(env, ws, data: bytes, *flags):
    """`python -m studies smoothness --report` over a root whose first distillation cell holds `data`."""
    study = study_cells.Study(str(ws / 'r'), 3, 5, {1: 200})
    key = study.run_key('SGD (MTT)', [], 1, 0)
    os.makedirs(ws / 'r' / 'cells')
    open(study.cell_path(key), 'wb').write(data)
    return ['smoothness', '--report', '--root', str(ws / 'r'), *flags]


def study_with_set(env, ws, data: bytes):
    """... whose fmnist-style final set file is `data` (a run cell says it finished)."""
    study = study_cells.Study(str(ws / 'r'), 3, 5, {1: 200})
    key = study.run_key('SGD (MTT)', [], 1, 0)
    os.makedirs(ws / 'r' / 'sets')
    study.put(key, {'accs': [0.5]})
    open(study.set_path(key), 'wb').write(data)
    return study, key


A_FILE = lambda ws: open(ws / 'a_file', 'w').write('x') and str(ws / 'a_file' / 'sub')  # noqa: E731

# (id, script, argv builder (env, workspace), exit status, text the one line must contain)
ROWS = [
    # distill.py: every numeric flag family
    ('d-ipc0', 'distill', lambda e, w: distill_with(e, w, '--ipc', '0'), 2, '--ipc 0'),
    ('d-syn_steps0', 'distill', lambda e, w: distill_with(e, w, '--syn_steps', '0'), 2, '--syn_steps'),
    ('d-expert_epochs0', 'distill', lambda e, w: distill_with(e, w, '--expert_epochs', '0'), 2, '--expert_epochs'),
    ('d-max_start0', 'distill', lambda e, w: distill_with(e, w, '--max_start_epoch', '0'), 2, '--max_start_epoch'),
    ('d-iteration0', 'distill', lambda e, w: distill_with(e, w, '--Iteration', '0'), 2, '--Iteration'),
    ('d-lr_img-neg', 'distill', lambda e, w: distill_with(e, w, '--lr_img', '-1'), 2, '--lr_img'),
    ('d-lr_img-nan', 'distill', lambda e, w: distill_with(e, w, '--lr_img', 'nan'), 2, '--lr_img'),
    ('d-lr_lr-neg', 'distill', lambda e, w: distill_with(e, w, '--lr_lr', '-1e-5'), 2, '--lr_lr'),
    ('d-lr_teacher-inf', 'distill', lambda e, w: distill_with(e, w, '--lr_teacher', 'inf'), 2, '--lr_teacher'),
    ('d-batch_syn0', 'distill', lambda e, w: distill_with(e, w, '--batch_syn', '0'), 2, '--batch_syn'),
    ('d-valid-other-than-experts', 'distill', lambda e, w: distill_with(e, w, '--valid', '100'), 2, '--valid 0'),
    ('d-valid-neg', 'distill', lambda e, w: distill_with(e, w, '--valid', '-1'), 2, '--valid'),
    ('b-valid-all', 'buffer', lambda e, w: buffer_flags(e, w, '--valid', '1437'), 2, '--valid 1437'),
    ('d-batch_syn-big', 'distill', lambda e, w: distill_with(e, w, '--batch_syn', '21'), 2, '--batch_syn'),
    ('d-syn_mom1', 'distill', lambda e, w: distill_with(e, w, '--syn_mom', '1'), 2, '--syn_mom'),
    ('d-num_eval0', 'distill', lambda e, w: distill_with(e, w, '--num_eval', '0'), 2, '--num_eval'),
    ('d-epoch_eval0', 'distill', lambda e, w: distill_with(e, w, '--epoch_eval_train', '0'), 2, '--epoch_eval_train'),
    ('d-eval_it0', 'distill', lambda e, w: distill_with(e, w, '--eval_it', '0'), 2, '--eval_it'),
    ('d-save_every0', 'distill', lambda e, w: distill_with(e, w, '--save_every', '0'), 2, '--save_every'),
    ('d-max_skips0', 'distill', lambda e, w: distill_with(e, w, '--max_skips', '0'), 2, '--max_skips'),
    ('d-max_loss0', 'distill', lambda e, w: distill_with(e, w, '--max_loss', '0'), 2, '--max_loss'),
    ('d-balance_base1', 'distill', lambda e, w: distill_with(e, w, '--balance_base', '1'), 2, '--balance_base'),
    ('d-mct_k1', 'distill', lambda e, w: distill_with(e, w, '--mct_k', '1'), 2, '--mct_k'),
    ('d-max_experts0', 'distill', lambda e, w: distill_with(e, w, '--max_experts', '0'), 2, '--max_experts'),
    ('d-seed-neg', 'distill', lambda e, w: distill_with(e, w, '--seed', '-1'), 2, '--seed'),
    ('d-device-tpu', 'distill', lambda e, w: distill_with(e, w, '--device', 'tpu'), 2, '--device'),
    ('d-ipc-text', 'distill', lambda e, w: distill_with(e, w, '--ipc', 'ten'), 2, '--ipc'),
    ('d-dataset-unknown', 'distill', lambda e, w: distill_with(e, w, '--dataset', 'Nope'), 2, '--dataset'),
    ('d-ipc-past-class', 'distill', lambda e, w: distill_with(e, w, '--ipc', '500'), 2, '--ipc 500'),
    ('d-past-trajectory', 'distill', lambda e, w: distill_with(e, w, '--max_start_epoch', '3'), 2, 'past the end'),
    ('d-no-buffers', 'distill', lambda e, w: distill_with(e, w, '--model', 'ConvNetW64'), 2, 'no expert buffers'),
    ('d-no-mct-buffers', 'distill', lambda e, w: distill_with(e, w, '--mct'), 2, 'compress_buffers.py'),
    ('d-run_dir-under-file', 'distill', lambda e, w: distill_with(e, w, '--run_dir', A_FILE(w)), 2, 'a_file'),
    # distill.py: every expert file it reads, the second one spoiled
    ('d-expert-truncated', 'distill', lambda e, w: bad_expert(e, w, lambda f, _: truncate(expert_path(f, 1))),
     2, 'replay_buffer_1.pt'),
    ('d-expert-malicious', 'distill', lambda e, w: bad_expert(
        e, w, lambda f, ws: torch.save(RunsCode(ws / 'pwned'), expert_path(f, 1))), 2, 'replay_buffer_1.pt'),
    ('d-expert-garbage', 'distill', lambda e, w: bad_expert(
        e, w, lambda f, _: open(expert_path(f, 1), 'wb').write(os.urandom(999))), 2, 'replay_buffer_1.pt'),
    ('d-expert-not-mtt', 'distill', lambda e, w: bad_expert(
        e, w, lambda f, _: torch.save({'a': torch.zeros(2)}, expert_path(f, 1))), 2, 'replay_buffer_1.pt'),
    ('d-expert-other-model-garbage-sidecar', 'distill', lambda e, w: bad_expert(e, w, other_model_expert),
     2, 'replay_buffer_1.pt'),
    ('d-expert-short-list-sidecar', 'distill', lambda e, w: bad_expert(e, w, short_expert_list_sidecar),
     2, 'replay_buffer_1.pt'),
    ('d-expert-short-good-sidecar', 'distill', lambda e, w: bad_expert(e, w, short_expert_good_sidecar),
     2, 'replay_buffer_1.pt'),
    ('d-sidecar-other-dataset', 'distill', lambda e, w: bad_expert(e, w, sidecar_says(dataset='MNIST')),
     2, 'replay_buffer_1.pt'),
    ('d-sidecar-zca', 'distill', lambda e, w: bad_expert(e, w, sidecar_says(zca=True)), 2, 'replay_buffer_1.pt'),
    # distill.py --resume: args.json, checkpoint.pt, flags given with it
    ('d-resume-missing', 'distill', lambda e, w: ['--resume', str(w / 'nope')], 2, 'checkpoint.pt'),
    ('d-resume-latest-empty', 'distill', lambda e, w: ['--resume', 'latest', '--run_dir', str(w)], 2,
     'checkpoint.pt'),
    ('d-args-garbage', 'distill', lambda e, w: resume_with(e, w, write_bytes('args.json', b'{"ipc": 2,')), 2,
     'args.json'),
    ('d-args-list', 'distill', lambda e, w: resume_with(e, w, write_bytes('args.json', b'[1, 2]')), 2, 'args.json'),
    ('d-args-wrong-type', 'distill', lambda e, w: resume_with(e, w, edit_args(ipc='two')), 2, 'ipc'),
    ('d-args-bad-domain', 'distill', lambda e, w: resume_with(e, w, edit_args(syn_steps=0)), 2, '--syn_steps'),
    ('d-args-bad-choice', 'distill', lambda e, w: resume_with(e, w, edit_args(model='ResNet99')), 2, 'model'),
    ('d-ckpt-truncated', 'distill', lambda e, w: resume_with(
        e, w, lambda r, _: truncate(r / 'checkpoint.pt')), 2, 'checkpoint.pt'),
    ('d-ckpt-malicious', 'distill', lambda e, w: resume_with(e, w, malicious('checkpoint.pt')), 2, 'checkpoint.pt'),
    ('d-ckpt-not-ours', 'distill', lambda e, w: resume_with(
        e, w, lambda r, _: torch.save({'images': torch.zeros(3)}, r / 'checkpoint.pt')), 2, 'checkpoint.pt'),
    ('d-ckpt-other-shape', 'distill', lambda e, w: resume_with(
        e, w, lambda r, _: torch.save({**torch.load(r / 'checkpoint.pt', weights_only=True),
                                        'images': torch.zeros(3, 1, 8, 8)}, r / 'checkpoint.pt')), 2, 'checkpoint.pt'),
    ('d-resume-refused-flag', 'distill', lambda e, w: resume_with(e, w, None, '--syn_steps', '5'), 2,
     '--syn_steps'),
    ('d-resume-bad-override', 'distill', lambda e, w: resume_with(e, w, None, '--lr_img', '-3'), 2, '--lr_img'),
    # numbers checked in the precision they are used in (float32), integers with an upper bound
    ('d-lr_img-1e39', 'distill', lambda e, w: distill_with(e, w, '--lr_img', '1e39'), 2, '--lr_img 1e+39'),
    ('d-lr_lr-1e308', 'distill', lambda e, w: distill_with(e, w, '--lr_lr', '1e308'), 2, '--lr_lr 1e+308'),
    ('d-lr_teacher-1e39', 'distill', lambda e, w: distill_with(e, w, '--lr_teacher', '1e39'), 2, '--lr_teacher'),
    ('d-lr_teacher-1e308', 'distill', lambda e, w: distill_with(e, w, '--lr_teacher', '1e308'), 2, '--lr_teacher'),
    ('d-lr_img-rounds-to-0', 'distill', lambda e, w: distill_with(e, w, '--lr_img', '1e-50'), 2, '--lr_img'),
    ('d-syn_mom-rounds-to-1', 'distill', lambda e, w: distill_with(e, w, '--syn_mom', '0.99999999999'), 2,
     '--syn_mom'),
    ('d-perturb_rho-1e39', 'distill', lambda e, w: distill_with(e, w, '--perturb_rho', '1e39'), 2, '--perturb_rho'),
    ('d-syn_steps-1e20', 'distill', lambda e, w: distill_with(e, w, '--syn_steps', str(10**20)), 2, '--syn_steps'),
    ('d-iteration-1e20', 'distill', lambda e, w: distill_with(e, w, '--Iteration', str(10**20)), 2, '--Iteration'),
    ('d-epoch_eval-1e12', 'distill', lambda e, w: distill_with(e, w, '--epoch_eval_train', str(10**12)), 2,
     '--epoch_eval_train'),
    ('d-num_eval-1e9', 'distill', lambda e, w: distill_with(e, w, '--num_eval', str(10**9)), 2, '--num_eval'),
    ('d-eval_it-2e31', 'distill', lambda e, w: distill_with(e, w, '--eval_it', str(2**31)), 2, '--eval_it'),
    ('d-res-huge', 'distill', lambda e, w: distill_with(e, w, '--res', str(10**6)), 2, '--res'),
    ('d-resume-override-1e39', 'distill', lambda e, w: resume_with(e, w, None, '--lr_lr', '1e39'), 2, '--lr_lr'),
    ('d-args-iteration-huge', 'distill', lambda e, w: resume_with(e, w, edit_args(Iteration=10**20)), 2,
     '--Iteration'),
    # every expert file verified by content before work
    ('d-expert-overwritten-in-place', 'distill', lambda e, w: bad_expert(
        e, w, lambda f, _: overwrite_in_place(expert_path(f, 1))), 2, 'replay_buffer_1.pt does not match the sha256'),
    ('d-expert-crafted-size-edited', 'distill', lambda e, w: bad_expert(e, w, crafted_with_edited_size), 2,
     'replay_buffer_1.pt does not match the sha256'),
    ('d-expert-old-sidecar-nan', 'distill', lambda e, w: bad_expert(e, w, old_sidecar_nan_expert), 2,
     'replay_buffer_1.pt holds NaN'),
    ('d-expert-digest-garbled', 'distill', lambda e, w: bad_expert(
        e, w, sidecar_says(pt_sha256='0' * 64)), 2, 'replay_buffer_1.pt does not match the sha256'),
    # a checkpoint that loads but holds garbage
    ('d-ckpt-images-nan', 'distill', lambda e, w: resume_with(e, w, ckpt_edit(
        images=lambda c: torch.full_like(c['images'], float('nan')))), 2, 'images holds NaN'),
    ('d-ckpt-syn_lr-inf', 'distill', lambda e, w: resume_with(e, w, ckpt_edit(
        syn_lr=lambda c: torch.tensor(float('inf')))), 2, 'syn_lr holds NaN'),
    ('d-ckpt-syn_lr-negative', 'distill', lambda e, w: resume_with(e, w, ckpt_edit(
        syn_lr=lambda c: torch.tensor(-0.01))), 2, 'syn_lr'),
    ('d-ckpt-momentum-nan', 'distill', lambda e, w: resume_with(e, w, ckpt_edit(opt_img=nan_momentum)), 2,
     'opt_img.state'),
    ('d-ckpt-opt_lr-lr-nan', 'distill', lambda e, w: resume_with(e, w, ckpt_edit(
        opt_lr=lambda c: {**c['opt_lr'], 'param_groups': [{**c['opt_lr']['param_groups'][0], 'lr': float('nan')}]})),
     2, 'opt_lr.param_groups.0.lr'),
    ('d-ckpt-labels-other', 'distill', lambda e, w: resume_with(e, w, ckpt_edit(
        labels=lambda c: c['labels'].flip(0))), 2, 'labels are not'),
    # buffer.py
    ('b-num_experts0', 'buffer', lambda e, w: buffer_flags(e, w, '--num_experts', '0'), 2, '--num_experts'),
    ('b-train_epochs0', 'buffer', lambda e, w: buffer_flags(e, w, '--train_epochs', '0'), 2, '--train_epochs'),
    ('b-batch_train0', 'buffer', lambda e, w: buffer_flags(e, w, '--batch_train', '0'), 2, '--batch_train'),
    ('b-lr-neg', 'buffer', lambda e, w: buffer_flags(e, w, '--lr_teacher', '-0.01'), 2, '--lr_teacher'),
    ('b-mom', 'buffer', lambda e, w: buffer_flags(e, w, '--mom', '1.5'), 2, '--mom'),
    ('b-l2-neg', 'buffer', lambda e, w: buffer_flags(e, w, '--l2', '-1'), 2, '--l2'),
    ('b-gp_mu-neg', 'buffer', lambda e, w: buffer_flags(e, w, '--gp', '--gp_mu', '-1'), 2, '--gp_mu'),
    ('b-parallel0', 'buffer', lambda e, w: buffer_flags(e, w, '--parallel_experts', '0'), 2, '--parallel_experts'),
    ('b-device', 'buffer', lambda e, w: buffer_flags(e, w, '--device', 'cuda:7'), 2, '--device'),
    ('b-buffer_path-under-file', 'buffer', lambda e, w: buffer_flags(e, w, '--buffer_path', A_FILE(w)), 2,
     'a_file'),
    ('b-cifar-meta-malicious', 'buffer', lambda e, w: buffer_cifar(e, w, lambda d, ws: pickle.dump(
        {b'label_names': RunsCode(ws / 'pwned')}, open(d / 'batches.meta', 'wb'), protocol=2)), 2, 'batches.meta'),
    ('b-cifar-batch-malicious', 'buffer', lambda e, w: buffer_cifar(e, w, lambda d, ws: pickle.dump(
        RunsCode(ws / 'pwned'), open(d / 'data_batch_2', 'wb'))), 2, 'data_batch_2'),
    ('b-cifar-truncated', 'buffer', lambda e, w: buffer_cifar(e, w, lambda d, _: truncate(d / 'data_batch_1')), 2,
     'data_batch_1'),
    ('b-cifar-missing', 'buffer', lambda e, w: buffer_cifar(e, w, lambda d, _: os.remove(d / 'test_batch')), 2,
     'test_batch'),
    ('b-expert-corrupt', 'buffer', lambda e, w: buffer_existing(
        e, w, unlink_meta_and(lambda f, _: truncate(expert_path(f, 0)))), 2, 'replay_buffer_0.pt'),
    ('b-expert-other-length', 'buffer', lambda e, w: buffer_existing(
        e, w, lambda f, _: os.remove(meta_path(f, 0)), '--num_experts', '1', '--train_epochs', '5'), 2,
     'replay_buffer_0.pt'),
    ('b-expert-other-recipe', 'buffer', lambda e, w: buffer_existing(e, w, lambda f, _: None, '--mom', '0.5'), 2,
     'mom'),
    ('b-expert-overwritten-in-place', 'buffer', lambda e, w: buffer_existing(
        e, w, lambda f, _: overwrite_in_place(expert_path(f, 0))), 2, 'replay_buffer_0.pt does not match the sha256'),
    ('b-lr_teacher-1e39', 'buffer', lambda e, w: buffer_flags(e, w, '--lr_teacher', '1e39'), 2, '--lr_teacher'),
    ('b-l2-1e39', 'buffer', lambda e, w: buffer_flags(e, w, '--l2', '1e39'), 2, '--l2'),
    ('b-gp_k-1e39', 'buffer', lambda e, w: buffer_flags(e, w, '--gp', '--gp_k', '1e39'), 2, '--gp_k'),
    ('b-num_experts-1e20', 'buffer', lambda e, w: buffer_flags(e, w, '--num_experts', str(10**20)), 2,
     '--num_experts'),
    ('b-train_epochs-1e9', 'buffer', lambda e, w: buffer_flags(e, w, '--train_epochs', str(10**9)), 2,
     '--train_epochs'),
    ('b-batch_train-2e31', 'buffer', lambda e, w: buffer_flags(e, w, '--batch_train', str(2**31)), 2,
     '--batch_train'),
    # compress_buffers.py: every input checked before anything is written
    ('c-second-truncated', 'compress', lambda e, w: compress_with(e, w, lambda f, _: truncate(expert_path(f, 1))), 2,
     'replay_buffer_1.pt'),
    ('c-second-overwritten', 'compress', lambda e, w: compress_with(
        e, w, lambda f, _: overwrite_in_place(expert_path(f, 1))), 2, 'replay_buffer_1.pt does not match the sha256'),
    ('c-out_folder-under-file', 'compress', lambda e, w: compress_with(e, w, None, '--out_folder', A_FILE(w)), 2,
     'a_file'),
    ('c-k-1e20', 'compress', lambda e, w: compress_with(e, w, None, '--k', str(10**20)), 2, '--k'),
    ('c-no-experts', 'compress', lambda e, w: ['--folder', str(w)], 2, 'no expert buffers'),
    # python -m studies: a damaged cell or set is one line
    ('s-cell-truncated', 'studies', lambda e, w: study_with_cell(e, w, b'{"key": ["SGD (MTT)", [], 1'), 2,
     '.json cannot be read as JSON'),
    ('s-cell-empty', 'studies', lambda e, w: study_with_cell(e, w, b''), 2, '.json cannot be read as JSON'),
    ('s-cell-not-a-cell', 'studies', lambda e, w: study_with_cell(e, w, b'[1, 2]'), 2, 'is not a cell file'),
    ('s-cell-other-key', 'studies', lambda e, w: study_with_cell(e, w, b'{"key": ["x"], "value": {}}'), 2,
     'holds the cell ["x"]'),
    ('s-seeds-1e20', 'studies', lambda e, w: ['smoothness', '--report', '--root', str(w / 'r'), '--seeds',
                                               str(10**20)], 2, '--seeds'),
    ('s-bad-study', 'studies', lambda e, w: ['nope'], 2, 'nope'),
    # eval.py
    ('e-run-missing', 'eval', lambda e, w: ['--run', str(w / 'nope')], 2, 'nope'),
    ('e-run-latest-empty', 'eval', lambda e, w: ['--run', 'latest', '--run_dir', str(w)], 2, 'latest'),
    ('e-args-garbage', 'eval', lambda e, w: eval_run(e, w, write_bytes('args.json', b'\xff\xfe')), 2, 'args.json'),
    ('e-args-no-dataset', 'eval', lambda e, w: eval_run(e, w, write_bytes('args.json', b'{"model": "ConvNet"}')),
     2, 'args.json'),
    ('e-images-truncated', 'eval', lambda e, w: eval_run(e, w, lambda r, _: truncate(r / 'images_final.pt')), 2,
     'images_final.pt'),
    ('e-images-malicious', 'eval', lambda e, w: eval_run(e, w, malicious('images_final.pt')), 2, 'images_final.pt'),
    ('e-labels-dict', 'eval', lambda e, w: eval_run(
        e, w, lambda r, _: torch.save({'x': 1}, r / 'labels_final.pt')), 2, 'labels_final.pt'),
    ('e-lr-negative', 'eval', lambda e, w: eval_run(e, w, lambda r, _: torch.save(torch.tensor(-1.), r / 'lr_final.pt')),
     2, 'lr_final.pt'),
    ('e-best-images-truncated', 'eval', lambda e, w: eval_run(e, w, lambda r, _: truncate(r / 'images_best.pt'),
                                                              '--which', 'best'), 2, 'images_best.pt'),
    ('e-final-missing', 'eval', lambda e, w: eval_run(e, w, lambda r, _: os.remove(r / 'images_final.pt')), 2,
     '--which best'),
    ('e-images-nan', 'eval', lambda e, w: eval_images(e, w, torch.full((10, 1, 8, 8), float('nan')),
                                                      torch.arange(10)), 2, 'imgs.pt'),
    ('e-images-shape', 'eval', lambda e, w: eval_images(e, w, torch.zeros(10, 3, 32, 32), torch.arange(10)), 2,
     'imgs.pt'),
    ('e-labels-range', 'eval', lambda e, w: eval_images(e, w, torch.zeros(10, 1, 8, 8), torch.arange(10) + 1), 2,
     'labs.pt'),
    ('e-images-no-labels', 'eval', lambda e, w: eval_images(e, w, torch.zeros(1), torch.zeros(1))[:2], 2,
     '--labels'),
    ('e-num_eval0', 'eval', lambda e, w: eval_flags(e, w, '--num_eval', '0'), 2, '--num_eval'),
    ('e-epochs0', 'eval', lambda e, w: eval_flags(e, w, '--epoch_eval_train', '0'), 2, '--epoch_eval_train'),
    ('e-ipc0', 'eval', lambda e, w: eval_flags(e, w, '--ipc', '0'), 2, '--ipc'),
    ('e-ipc-past-class', 'eval', lambda e, w: eval_flags(e, w, '--ipc', '1000'), 2, '--ipc 1000'),
    ('e-lr0', 'eval', lambda e, w: eval_flags(e, w, '--lr', '0'), 2, '--lr'),
    ('e-device', 'eval', lambda e, w: eval_flags(e, w, '--device', 'tpu'), 2, '--device'),
    ('e-out-under-file', 'eval', lambda e, w: eval_flags(e, w, '--out', A_FILE(w) + '/x.json'), 2, 'a_file'),
    ('e-lr-1e39', 'eval', lambda e, w: eval_flags(e, w, '--lr', '1e39'), 2, '--lr 1e+39'),
    ('e-lr-rounds-to-0', 'eval', lambda e, w: eval_flags(e, w, '--lr', '1e-46'), 2, '--lr'),
    ('e-num_eval-1e20', 'eval', lambda e, w: eval_flags(e, w, '--num_eval', str(10**20)), 2, '--num_eval'),
    ('e-epochs-1e9', 'eval', lambda e, w: eval_flags(e, w, '--epoch_eval_train', str(10**9)), 2, '--epoch_eval_train'),
    ('e-lr_final-inf', 'eval', lambda e, w: eval_run(  # --run scores the final set by default
        e, w, lambda r, _: torch.save(torch.tensor(float('inf')), r / 'lr_final.pt')), 2, 'lr_final.pt'),
    ('e-lr_best-inf', 'eval', lambda e, w: eval_run(
        e, w, lambda r, _: torch.save(torch.tensor(float('inf')), r / 'lr_best.pt'), '--which', 'best'), 2,
     'lr_best.pt'),
]
SCRIPTS = {'distill': distill.main, 'buffer': buffer.main, 'eval': eval_script.main, 'compress': compress_buffers.main,
           'studies': studies_main.main}


@pytest.mark.parametrize('module', [buffer, distill, eval_script, compress_buffers, studies_main])
def test_every_numeric_flag_has_a_domain(module):
    """A numeric flag added later without a domain would go unchecked: this names it. (--ipcs of the studies
    is a list, checked against the study's iteration budgets.)"""
    numeric = {a.dest for a in module.build_parser()._actions if a.type in (int, float)} - {'ipcs'}
    assert numeric - set(module.FLAG_DOMAINS) == set()
    assert set(module.FLAG_DOMAINS) <= numeric


def test_every_preset_lies_in_the_domains():
    import presets
    for name in presets.DISTILL:
        cli.check_flags(distill.build_parser().parse_args(presets.distill_flags(name)), distill.FLAG_DOMAINS)
        cli.check_flags(buffer.build_parser().parse_args(presets.buffer_flags(name)), buffer.FLAG_DOMAINS)


def test_every_integer_flag_has_an_upper_bound_and_every_float_one_a_precision():
    """A --syn_steps of 10**20 would run for ever, an lr of 1e39 overflows torch's float32."""
    for module in (buffer, distill, eval_script, compress_buffers, studies_main):
        types = {a.dest: a.type for a in module.build_parser()._actions}
        for flag, domain in module.FLAG_DOMAINS.items():
            if types[flag] is int:
                assert not domain.admits(10**20) and not domain.admits(2**31), (module.__name__, flag)
            else:
                assert domain.float32 != domain.admits(1e39), (module.__name__, flag)
    float32_flags = {'lr_img', 'lr_lr', 'lr_teacher', 'syn_mom', 'perturb_rho'}
    assert all(distill.FLAG_DOMAINS[f].float32 for f in float32_flags)
    assert all(buffer.FLAG_DOMAINS[f].float32 for f in ('lr_teacher', 'mom', 'l2', 'gp_mu', 'gp_k'))
    assert eval_script.FLAG_DOMAINS['lr'].float32


def test_float32_domains_round_as_torch_does():
    for value in (3.4e38, 1e-45, 1e-38, 0.1, 1e39, 1e-46, 3.4028235e38, 3.40282357e38):
        assert cli.as_float32(value) == torch.tensor(value, dtype=torch.float64).float().item()


def test_the_table_is_wide_enough():
    assert len(ROWS) >= 135 and len({r[0] for r in ROWS}) == len(ROWS)
    assert {r[1] for r in ROWS} == set(SCRIPTS)


@pytest.mark.parametrize('name, script, build, code, culprit', ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_writes_nothing(env, tmp_path, capsys, name, script, build, code, culprit):
    ws = tmp_path / 'ws'
    ws.mkdir()
    argv = build(env, ws)
    before = snapshot(ws, env['root'])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # any other exception (a traceback) fails the test
        SCRIPTS[script](argv)
    line = one_error_line(capsys.readouterr().err)
    assert stop.value.code == code
    assert culprit in line, line
    assert snapshot(ws, env['root']) == before  # no run folder, expert, sidecar or output file written
    assert not (ws / 'pwned').exists()  # no code ran from a data file


@pytest.mark.parametrize('script, argv_of, culprit', [
    ('distill.py', lambda ws: TINY + ['--syn_steps', '0', '--run_dir', str(ws)], '--syn_steps'),
    ('eval.py', lambda ws: ['--run', str(ws / 'missing')], 'missing'),
    ('buffer.py', lambda ws: ['--dataset', 'CIFAR10', '--data_path', str(ws / 'data'), '--buffer_path', str(ws)],
     'batches.meta'),
])
def test_as_a_real_process(tmp_path, script, argv_of, culprit):
    write_cifar10(tmp_path / 'data', meta={b'label_names': RunsCode(tmp_path / 'pwned')}, protocol=2)
    p = subprocess.run([sys.executable, str(ROOT / script), *argv_of(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, 'WANDB_MODE': 'disabled'})
    assert p.returncode == 2
    assert culprit in one_error_line(p.stderr)
    assert not (tmp_path / 'pwned').exists()


# ---------------------------------------------------------------- expert files: cheap where the sidecar agrees

def test_expert_files_are_read_only_where_the_sidecar_does_not_describe_them(env, tmp_path, monkeypatch):
    from trajmatch import trajectory_io
    path, folder = buffers_copy(env, tmp_path)
    shapes = [p.shape for p in get_network(MODEL, 1, 10, (8, 8)).parameters()]
    reads, real = [], trajectory_io.torch.load

    def counting(f, *a, **k):
        reads.append(os.path.basename(str(f)))
        return real(f, *a, **k)

    monkeypatch.setattr(trajectory_io.torch, 'load', counting)

    def check():
        reads.clear()
        return trajectory_io.validate_buffers(folder, dataset='Digits', model=MODEL, param_shapes=shapes,
                                              needed_epochs=EPOCHS, zca=False)
    assert len(check()) == 2 and reads == []                          # both sidecars agree: nothing read
    open(meta_path(folder, 1), 'w').write('[1, 2]')                  # garbage sidecar, good file: read, accepted
    assert len(check()) == 2 and reads == ['replay_buffer_1.pt']
    os.remove(meta_path(folder, 1))                                   # missing sidecar (an MTT file): read
    assert len(check()) == 2 and reads == ['replay_buffer_1.pt']
    meta = json.load(open(meta_path(folder, 0)))
    json.dump({**meta, 'pt_bytes': meta['pt_bytes'] + 1}, open(meta_path(folder, 0), 'w'))  # describes another file
    assert len(check()) == 2 and reads == ['replay_buffer_0.pt', 'replay_buffer_1.pt']


# ---------------------------------------------------------------- no code from data files

def test_cifar_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / 'pwned'
    write_cifar10(tmp_path, meta={b'label_names': RunsCode(marker)}, protocol=2)
    with pytest.raises(DataError, match='batches.meta') as e:
        load_dataset('CIFAR10', str(tmp_path))
    assert 'posix.system' in str(e.value) or 'os.system' in str(e.value)
    assert len(str(e.value).splitlines()) == 1 and not marker.exists()
    # the same check on a plain pickle.load would have run the command: the fixture is a real exploit
    pickle.load(open(tmp_path / 'cifar-10-batches-py' / 'batches.meta', 'rb'))
    assert marker.exists()


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_cifar_reader_still_reads_real_cifar_pickles(tmp_path, protocol):
    """Python-2-era files are protocol 2 (numpy arrays via _reconstruct/_codecs); later ones 4 or 5."""
    write_cifar10(tmp_path, protocol=protocol)
    d = load_dataset('CIFAR10', str(tmp_path))
    assert d.images_train.shape == (20, 3, 32, 32) and d.class_names[3] == 'c3'
    assert d.labels_test.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- outputs: writable first, failures one line

def refuse_writes_under(monkeypatch, folder):
    """As a read-only or permission-denied folder would (the tests may run as root, which chmod cannot stop)."""
    real = os.open

    def fake(path, *a, **k):
        if str(path).startswith(str(folder)):
            raise PermissionError(errno.EACCES, 'Permission denied', path)
        return real(path, *a, **k)
    monkeypatch.setattr(files.os, 'open', fake)


def test_unwritable_outputs_stop_before_any_work(env, tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError('work started before the output folder was checked')
    monkeypatch.setattr(buffer, 'train_experts', no_work)
    monkeypatch.setattr(buffer, 'load_dataset', no_work)
    monkeypatch.setattr(eval_script, 'load_dataset', no_work)
    monkeypatch.setattr(distill, 'prepare', no_work)
    (tmp_path / 'ro').mkdir()
    refuse_writes_under(monkeypatch, tmp_path / 'ro')
    for main, argv in [
            (buffer.main, buffer_flags(env, tmp_path, '--buffer_path', str(tmp_path / 'ro'))),
            (eval_script.main, eval_flags(env, tmp_path, '--out', str(tmp_path / 'ro' / 'x.json'))),
            (distill.main, distill_with(env, tmp_path, '--run_dir', str(tmp_path / 'ro' / 'runs')))]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert 'not writable' in line and 'Permission denied' in line
    assert os.listdir(tmp_path / 'ro') == []


def test_a_probe_taken_by_another_process_still_counts_as_writable(tmp_path, monkeypatch):
    """Under torchrun every rank probes the run folder while rank 0 clears stray temps from it."""
    real = files._new_temp

    def taken(folder, name):
        fd, path = real(folder, name)
        assert files.remove_stray_temps(folder) == [path]  # the probe matches the stray-temp pattern
        return fd, path

    monkeypatch.setattr(files, '_new_temp', taken)
    files.check_writable(str(tmp_path), 'run folder')
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_folder_for_real(env, tmp_path, capsys):
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(SystemExit):
        eval_script.main(eval_flags(env, tmp_path, '--out', str(ro / 'x.json')))
    assert 'not writable' in one_error_line(capsys.readouterr().err)


def test_disk_full_mid_run_is_one_line_and_the_last_checkpoint_survives(env, tmp_path, monkeypatch, capsys):
    """The third checkpoint write fails as a full disk does; the second one is still on disk, and the run
    resumes from it to the end."""
    real, calls = os.fsync, {'n': 0}

    def full_disk(fd):
        if os.readlink(f'/proc/self/fd/{fd}').split('/')[-1].startswith('.checkpoint.pt.'):
            calls['n'] += 1
            if calls['n'] == 3:
                raise OSError(errno.ENOSPC, 'No space left on device')
        return real(fd)

    monkeypatch.setattr(files.os, 'fsync', full_disk)
    argv = distill_with(env, tmp_path, '--Iteration', '4', '--eval_it', '10', '--save_every', '1')
    with pytest.raises(SystemExit) as stop:
        distill.main(argv)
    line = last_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and 'checkpoint.pt' in line and 'No space left' in line and '--resume' in line
    run = tmp_path / 'runs' / RUN
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['state']['it'] == 2
    assert not [f for f in os.listdir(run) if f.endswith('.tmp')]
    monkeypatch.setattr(files.os, 'fsync', real)
    command = line.split('continue with ')[1].split()
    assert command[:2] == ['python', 'distill.py']
    distill.main(command[2:])
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['state']['it'] == 4
    assert (run / 'final.json').exists()


def test_stray_temps_go_and_files_get_normal_permissions(env, tmp_path, capsys):
    old = os.umask(0o027)  # mkstemp's 0600 would show as 0600, the copies of the run as 0644
    try:
        run = Path(run_copy(env, tmp_path))
        stray, kept = run / '.checkpoint.pt.0123abcd.tmp', run / 'notes.tmp'
        stray.write_bytes(b'half a checkpoint')
        kept.write_text('not ours')
        distill.main(['--resume', str(run)])
        assert not stray.exists() and kept.exists()
        for name in ('checkpoint.pt', 'metrics.jsonl', 'final.json'):  # written by the resume
            assert (run / name).stat().st_mode & 0o777 == 0o640, name
    finally:
        os.umask(old)


def test_an_interrupted_sidecar_write_is_redone(env, tmp_path, capsys):
    path, folder = buffers_copy(env, tmp_path)
    originals = [json.load(open(meta_path(folder, i))) for i in range(2)]
    pt_bytes = [open(expert_path(folder, i), 'rb').read() for i in range(2)]
    os.remove(meta_path(folder, 0))                       # crashed between the .pt and the .json
    open(meta_path(folder, 1), 'w').write('{"dataset": ')  # torn by hand
    stray = Path(folder) / '.replay_buffer_1.json.89abcdef.tmp'
    stray.write_text('{')
    buffer.main(['--num_experts', '2', '--train_epochs', str(EPOCHS), '--model', MODEL, '--buffer_path', path])
    assert 'experts on disk, training 0' in capsys.readouterr().out
    assert not stray.exists()
    for i, orig in enumerate(originals):
        meta = json.load(open(meta_path(folder, i)))
        assert meta['sidecar_rebuilt'] and open(expert_path(folder, i), 'rb').read() == pt_bytes[i]
        for key in ('dataset', 'model', 'zca', 'index', 'seed', 'num_snapshots', 'pt_bytes', 'param_shapes'):
            assert meta[key] == orig[key], key
        assert meta['avg_var'] == pytest.approx(orig['avg_var'], rel=1e-6)
        # recomputed from the snapshots: the same networks on the same test set (360 images)
        assert meta['test_acc_per_epoch'] == pytest.approx(orig['test_acc_per_epoch'], abs=1.5 / 360)


# ---------------------------------------------------------------- syn_lr stays a learning rate

def synthetic_set(lr_value, lr_grad):
    syn = SyntheticSet(torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), lr_value, lr_img=1.0, lr_lr=1.0)
    syn.images.grad, syn.lr.grad = torch.full_like(syn.images, 0.25), torch.tensor(lr_grad)
    return syn


def test_the_set_refuses_a_step_that_leaves_syn_lr_non_positive():
    syn = synthetic_set(0.01, 0.004)
    assert syn.step()                                            # 0.01 - 0.004 > 0: both step
    assert syn.lr.item() == pytest.approx(0.006) and torch.allclose(syn.images, torch.full_like(syn.images, 0.75))
    buf = syn.opt_lr.state[syn.lr]['momentum_buffer'].clone()
    for grad in (0.05, float('inf')):                            # would give 0.006 - (0.5*0.004 + 0.05) < 0; inf
        images_before = syn.images.detach().clone()
        syn.lr.grad = torch.tensor(grad)
        assert not syn.step()
        assert syn.lr.item() == pytest.approx(0.006) and torch.equal(syn.images.detach(), images_before)
        assert torch.equal(syn.opt_lr.state[syn.lr]['momentum_buffer'], buf)   # its momentum is put back too


def test_the_set_state_dict_round_trips_and_refuses_another_runs_shape():
    syn = synthetic_set(0.01, 0.004)
    syn.step()
    other = SyntheticSet(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 0.5, lr_img=1.0, lr_lr=1.0)
    other.load_state_dict(syn.state_dict())
    assert torch.equal(other.images.detach(), syn.images.detach()) and other.lr.item() == syn.lr.item()
    assert torch.equal(other.opt_lr.state[other.lr]['momentum_buffer'], syn.opt_lr.state[syn.lr]['momentum_buffer'])
    bigger = SyntheticSet(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), 0.5, lr_img=1.0, lr_lr=1.0)
    with pytest.raises(ValueError, match='shape'):
        bigger.load_state_dict(syn.state_dict())


def pushing_syn_lr_down(monkeypatch, grad):
    """Every syn_lr gradient is `grad`: a step of lr_lr x momentum-buffer that can take syn_lr below 0."""
    real = matching.match_and_backward

    def pushes_lr_down(*a, **k):
        loss, info = real(*a, **k)
        a[3].grad = torch.tensor(grad)
        return loss, info
    monkeypatch.setattr(distill, 'match_and_backward', pushes_lr_down)


def test_the_advice_is_what_a_trial_from_the_checkpoint_shows_to_recover(env, tmp_path, monkeypatch, capsys):
    """syn_lr 0.01 under a constant gradient of 5000 (momentum 0.5): --lr_lr 1e-5 refuses every step, a tenth
    of it (1e-6) takes one and then refuses for ever (what the old advice said), a hundredth (1e-7) keeps
    syn_lr > 0 for the rest of the run. The advice is the hundredth, and following it finishes the run."""
    pushing_syn_lr_down(monkeypatch, 5e3)
    with pytest.raises(SystemExit) as stop:
        distill.main(distill_with(env, tmp_path, '--Iteration', '8', '--eval_it', '100', '--max_skips', '3'))
    line = last_error_line(capsys.readouterr().err)
    assert stop.value.code == 3 and 'syn_lr' in line and 'recovered' in line and 'guess' not in line
    run = tmp_path / 'runs' / RUN
    steps = [r for r in map(json.loads, open(run / 'metrics.jsonl')) if 'loss' in r]
    assert [r['skip_reason'] for r in steps] == ['syn_lr'] * 3  # the trials logged nothing
    ckpt = torch.load(run / 'checkpoint.pt', weights_only=True)
    assert ckpt['state']['it'] == 3
    assert torch.equal(ckpt['images'], torch.load(run / 'images_best.pt', weights_only=True))  # never stepped
    command = line.split('continue it with ')[1].split()
    assert command[:4] == ['python', 'distill.py', '--resume', str(run)]
    assert command[4:] == ['--lr_img', '0.1', '--lr_lr', '1e-07']
    distill.main(command[2:])  # the same gradients: the run now finishes
    assert (run / 'final.json').exists()
    args = json.load(open(run / 'args.json'))
    assert args['resume_overrides'] == [{'it': 3, 'lr_img': {'was': 10.0, 'now': pytest.approx(0.1)},
                                         'lr_lr': {'was': 1e-5, 'now': pytest.approx(1e-7)}}]
    steps = [r for r in map(json.loads, open(run / 'metrics.jsonl')) if 'loss' in r]
    assert [r.get('skip_reason') for r in steps[3:]] == [None] * 5 and all(r['syn_lr'] > 0 for r in steps)


def test_advice_no_trial_supports_says_it_is_a_guess(env, tmp_path, monkeypatch, capsys):
    """A gradient of 1e9 refuses every step at every tried size: the line says so, names the flags a resume
    cannot change, and claims nothing was shown to work."""
    pushing_syn_lr_down(monkeypatch, 1e9)
    with pytest.raises(SystemExit) as stop:
        distill.main(distill_with(env, tmp_path, '--Iteration', '6', '--eval_it', '100', '--max_skips', '3'))
    line = last_error_line(capsys.readouterr().err)
    assert stop.value.code == 3 and 'a guess' in line and '--lr_teacher' in line and 'recovered' not in line
    assert 'divided by 10, 100, 1000 diverged too' in line
    run = tmp_path / 'runs' / RUN
    assert not (run / 'final.json').exists()
    assert len([r for r in map(json.loads, open(run / 'metrics.jsonl')) if 'loss' in r]) == 3


def test_a_step_that_overflows_the_images_never_reaches_a_checkpoint_or_final_json(env, tmp_path, monkeypatch,
                                                                                    capsys):
    """The second iteration's image gradient is finite (1e38) but lr_img x 1e38 is not: the images would be
    infinite. The run stops at once, checkpoint.pt stays the first iteration's, no final.json; the advice
    (tried from that checkpoint) finishes the run with finite images."""
    real, calls = matching.match_and_backward, {'n': 0}

    def overflows_once(*a, **k):
        loss, info = real(*a, **k)
        calls['n'] += 1
        if calls['n'] == 2:
            a[1].grad = torch.full_like(a[1], 1e38)
        return loss, info

    monkeypatch.setattr(distill, 'match_and_backward', overflows_once)
    with pytest.raises(SystemExit) as stop:
        distill.main(distill_with(env, tmp_path, '--Iteration', '4', '--eval_it', '100', '--save_every', '1'))
    line = last_error_line(capsys.readouterr().err)
    assert stop.value.code == 3 and 'NaN or infinite images' in line and 'recovered' in line
    run = tmp_path / 'runs' / RUN
    ckpt = torch.load(run / 'checkpoint.pt', weights_only=True)
    assert ckpt['state']['it'] == 1 and torch.isfinite(ckpt['images']).all()
    assert not (run / 'final.json').exists()
    distill.main(line.split('continue it with ')[1].split()[2:])
    assert (run / 'final.json').exists()
    assert torch.isfinite(torch.load(run / 'checkpoint.pt', weights_only=True)['images']).all()


def test_an_exploding_loss_is_skipped_and_metrics_stay_strict_json(env, tmp_path, monkeypatch, capsys):
    real, calls = matching.match_and_backward, {'n': 0}

    def nan_then_finite(*a, **k):
        calls['n'] += 1
        loss, info = real(*a, **k)
        return (loss * float('nan') if calls['n'] == 1 else loss), info

    monkeypatch.setattr(distill, 'match_and_backward', nan_then_finite)
    with pytest.raises(SystemExit) as stop:
        distill.main(distill_with(env, tmp_path, '--Iteration', '5', '--eval_it', '100', '--max_skips', '3',
                                  '--max_loss', '1e-9'))
    line = last_error_line(capsys.readouterr().err)
    assert stop.value.code == 3 and '--max_loss' in line
    run = tmp_path / 'runs' / RUN

    def no_bare_constants(name):
        raise AssertionError(f'bare {name} in metrics.jsonl')
    rows = [json.loads(x, parse_constant=no_bare_constants) for x in open(run / 'metrics.jsonl')]
    steps = [r for r in rows if 'skip_reason' in r]
    assert [r['skip_reason'] for r in steps] == ['nonfinite', 'max_loss', 'max_loss']
    assert steps[0]['loss'] is None and steps[1]['loss'] > 1e-9
    ckpt = torch.load(run / 'checkpoint.pt', weights_only=True)
    assert torch.equal(ckpt['images'], torch.load(run / 'images_best.pt', weights_only=True))


# ---------------------------------------------------------------- resume never loses a line

def test_resuming_a_finished_run_changes_nothing(env, tmp_path, capsys):
    run = run_copy(env, tmp_path, finished=True)
    before = snapshot(run)
    evals = [r for r in map(json.loads, open(os.path.join(run, 'metrics.jsonl'))) if 'eval/ConvNetW32_mean' in r]
    assert [r['it'] for r in evals] == [0, 2]  # the final evaluation's line is there ...
    for argv in (['--resume', run], ['--resume', 'latest', '--run_dir', str(tmp_path / 'runs'), '--lr_img', '5']):
        assert distill.main(argv) == run
        assert snapshot(run) == before  # ... and stays: byte-identical folder
    assert 'nothing to resume' in capsys.readouterr().out


def test_resume_latest_passes_over_a_run_that_crashed_before_its_first_checkpoint(env, tmp_path, capsys):
    run = run_copy(env, tmp_path)
    crashed = tmp_path / 'runs' / '001-Digits-ipc2-ConvNetW32'
    crashed.mkdir()
    shutil.copy(os.path.join(run, 'args.json'), crashed / 'args.json')
    assert distill.main(['--resume', 'latest', '--run_dir', str(tmp_path / 'runs')]) == run
    assert os.listdir(crashed) == ['args.json']
    evals = [r['it'] for r in map(json.loads, open(os.path.join(run, 'metrics.jsonl'))) if 'eval/ConvNetW32_mean' in r]
    assert evals == [0, 2]


# ---------------------------------------------------------------- content digests of expert files

def test_every_sidecar_records_the_sha256_of_its_file(env):
    for i in range(2):
        meta = json.load(open(meta_path(env['experts'], i)))
        assert meta['pt_sha256'] == hashlib.sha256(open(expert_path(env['experts'], i), 'rb').read()).hexdigest()


def test_a_sidecar_from_before_digests_stays_valid_and_its_file_is_read_in_full(env, tmp_path, monkeypatch):
    from trajmatch import trajectory_io
    path, folder = buffers_copy(env, tmp_path)
    for i in range(2):
        meta = json.load(open(meta_path(folder, i)))
        del meta['pt_sha256']
        json.dump(meta, open(meta_path(folder, i), 'w'))
    reads, real = [], trajectory_io.torch.load
    monkeypatch.setattr(trajectory_io.torch, 'load', lambda f, *a, **k: reads.append(os.path.basename(str(f)))
                        or real(f, *a, **k))
    shapes = [p.shape for p in get_network(MODEL, 1, 10, (8, 8)).parameters()]
    assert len(trajectory_io.validate_buffers(folder, dataset='Digits', model=MODEL, param_shapes=shapes,
                                              needed_epochs=EPOCHS, zca=False)) == 2
    assert reads == ['replay_buffer_0.pt', 'replay_buffer_1.pt']


def test_the_expert_cache_verifies_each_file_as_it_reads_it(env, tmp_path):
    """A file changed after the check before work is refused where the cursor reads it, not used."""
    from trajmatch.trajectory_io import ExpertCursor, expert_loader, expert_files
    path, folder = buffers_copy(env, tmp_path)
    cursor = ExpertCursor(expert_files(folder), seed=0, loader=expert_loader(False), cache_mib=0)
    cursor.next()
    overwrite_in_place(expert_path(folder, 0), 0.1)
    overwrite_in_place(expert_path(folder, 1), 0.1)
    with pytest.raises(cli.UsageError, match='does not match the sha256'):
        for _ in range(3):
            cursor.next()


def test_compressed_files_carry_their_own_digest(env, tmp_path, capsys):
    path, folder = buffers_copy(env, tmp_path)
    stats = compress_buffers.main(['--folder', folder, '--k', '3'])
    out = stats['out_folder']
    meta = json.load(open(meta_path(out, 1)))
    assert meta['pt_sha256'] == hashlib.sha256(open(expert_path(out, 1), 'rb').read()).hexdigest()
    assert meta['compressed']['source_sha256'] == json.load(open(meta_path(folder, 1)))['pt_sha256']
    overwrite_in_place(expert_path(out, 1), 0.3)
    with pytest.raises(SystemExit) as stop:
        distill.main(distill_with(env, tmp_path, '--mct', '--mct_k', '3', buffers=path))
    assert stop.value.code == 2 and 'replay_buffer_1.pt does not match the sha256' in one_error_line(
        capsys.readouterr().err)
    assert not (tmp_path / 'runs').exists()


# ---------------------------------------------------------------- leftovers

def test_a_new_run_removes_what_a_run_killed_in_its_first_write_left(env, tmp_path, capsys):
    """A folder holding only `.args.json.<hex>.tmp` is never resumed: the next new run clears it (not a temp
    another run is writing now: locked, or fresh)."""
    killed = tmp_path / 'runs' / '000-Digits-ipc2-ConvNetW32'
    killed.mkdir(parents=True)
    stray = killed / '.args.json.0123abcd.tmp'
    stray.write_text('{"ipc": ')
    os.utime(stray, (0, 0))
    fresh = killed / '.args.json.89abcdef.tmp'
    fresh.write_text('{')
    run = distill.main(distill_with(env, tmp_path, '--Iteration', '1', '--eval_it', '100'))
    assert not stray.exists() and fresh.exists()
    assert os.path.basename(run) == '001-Digits-ipc2-ConvNetW32'


def test_a_temp_a_live_writer_holds_is_never_removed(tmp_path):
    import fcntl
    held, left = tmp_path / '.cells.json.00000000.tmp', tmp_path / '.cells.json.11111111.tmp'
    for p in (held, left):
        p.write_text('x')
        os.utime(p, (0, 0))
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert files.remove_stray_temps(str(tmp_path)) == [str(left)]
        assert held.exists()
    finally:
        os.close(fd)
    assert files.remove_stray_temps(str(tmp_path)) == [str(held)]


def test_a_study_removes_the_temps_a_killed_study_left(tmp_path, capsys):
    root = tmp_path / 'r'
    (root / 'cells').mkdir(parents=True)
    old = [root / '.cache.json.0123abcd.tmp', root / 'cells' / '.0011223344556677.json.89abcdef.tmp']
    for p in old:
        p.write_text('{')
        os.utime(p, (0, 0))
    new = root / 'cells' / '.8899aabbccddeeff.json.01234567.tmp'  # another cell command's, being written now
    new.write_text('{')
    studies_main.main(['smoothness', '--report', '--root', str(root)])
    assert not any(p.exists() for p in old) and new.exists()


def test_a_study_cell_whose_distillation_got_bad_input_is_not_a_divergence(monkeypatch, tmp_path):
    study = study_cells.Study(str(tmp_path), 1, 1, {1: 1})
    monkeypatch.setattr(study, 'experts_ready', lambda recipe: True)

    def refuses(argv):
        raise SystemExit(2)
    monkeypatch.setattr(study_cells.distill, 'main', refuses)
    with pytest.raises(SystemExit) as stop:
        study._distill('SGD (MTT)', [], 1, 0)
    assert stop.value.code == 2


def test_a_full_disk_says_no_file_was_written_when_there_was_none(env, tmp_path, monkeypatch, capsys):
    real = os.fsync

    def full_disk(fd):
        if os.readlink(f'/proc/self/fd/{fd}').split('/')[-1].startswith('.replay_buffer_0.pt.'):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(fd)
    monkeypatch.setattr(files.os, 'fsync', full_disk)
    with pytest.raises(SystemExit) as stop:
        buffer.main(buffer_flags(env, tmp_path))
    line = last_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and 'No space left' in line and 'replay_buffer_0.pt' in line
    assert 'intact' not in line and 'no replay_buffer_0.pt was written' in line


def test_eval_refuses_a_disk_too_full_for_its_result_before_evaluating(env, tmp_path, monkeypatch, capsys):
    """Room for an empty file but not for the result: the old probe (create, remove) passed, and the
    evaluation's work was lost at the final write."""
    def no_work(*a, **k):
        raise AssertionError('evaluated before the output folder was known to hold the result')
    monkeypatch.setattr(eval_script, 'evaluate_set', no_work)
    real, room = os.write, {'left': 1000}

    def nearly_full(fd, data):
        if room['left'] < len(data):
            raise OSError(errno.ENOSPC, 'No space left on device')
        room['left'] -= len(data)
        return real(fd, data)
    monkeypatch.setattr(files.os, 'write', nearly_full)
    with pytest.raises(SystemExit) as stop:
        eval_script.main(eval_flags(env, tmp_path))
    line = one_error_line(capsys.readouterr().err)
    assert stop.value.code == 2 and 'No space left' in line and str(tmp_path) in line
    assert not (tmp_path / 'out.json').exists() and os.listdir(tmp_path) == []


def test_studies_as_a_real_process_print_one_line_on_a_truncated_cell(env, tmp_path):
    argv = study_with_cell(env, tmp_path, b'{"key": [')
    p = subprocess.run([sys.executable, '-m', 'studies', *argv], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, 'WANDB_MODE': 'disabled'})
    assert p.returncode == 2 and 'cannot be read as JSON' in one_error_line(p.stderr)
