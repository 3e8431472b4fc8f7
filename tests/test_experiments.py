"""`python experiments.py fmnist --smoke` on a small fixture in Fashion-MNIST's own idx format (the Debian
layout: the four .gz files in --data_path itself): every table and picture is made, and a second call
reads everything from the cache."""
import gzip
import json
import os
import struct

import numpy as np
import pytest

from studies import experiments


def write_fashion_idx(root, n_train=100, n_test=20, seed=0):
    """Random 28x28 images whose class shows as a brighter band (learnable), labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 120, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(y):
            x[i, 2 * c + 4:2 * c + 7, :] = 250
        for name, array, magic in ((f'{prefix}-images-idx3-ubyte', x, 2051), (f'{prefix}-labels-idx1-ubyte', y, 2049)):
            header = struct.pack('>i', magic) + b''.join(struct.pack('>i', d) for d in array.shape)
            with gzip.open(os.path.join(root, name + '.gz'), 'wb') as f:
                f.write(header + array.tobytes())


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    data = tmp_path_factory.mktemp('fashion')
    write_fashion_idx(str(data))
    root = tmp_path_factory.mktemp('study')
    experiments.main(['fmnist', '--smoke', '--data_path', str(data), '--root', str(root)])
    return root, data


def test_fmnist_smoke_writes_every_table_and_picture(smoke):
    root, _ = smoke
    for name in ('smoothness', 'selection', 'baselines', 'methods', 'ablation', 'cross_architecture'):
        text = (root / f'{name}.md').read_text()
        assert text.startswith('<!-- written by: python experiments.py fmnist -->') and '|' in text
    for png in ('curves.png', 'images_ipc1.png', 'images_ipc2.png'):
        assert (root / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    methods = (root / 'methods.md').read_text()
    assert all(f'| {m} |' in methods for m in ('MTT', 'AST', 'ATT', 'MCT'))
    # each cell is the cached runs' accuracy: the learnable fixture never gives 0 % for every run
    cells = [c.strip() for line in methods.splitlines() if line.startswith('| M') or line.startswith('| A')
             for c in line.split('|')[2:-1]]
    assert len(cells) == 8 and all(0 < float(c.split(' ± ')[0]) <= 100 for c in cells)
    ablation = (root / 'ablation.md').read_text()
    assert '+ weight perturbation' in ablation and '- K-Means init' in ablation and '- smooth experts' in ablation
    cross = (root / 'cross_architecture.md').read_text()  # one cached entry per (seed, model)
    cells = [c.strip() for line in cross.splitlines() if line.startswith(('| MTT', '| AST'))
             for c in line.split('|')[2:-1]]
    assert len(cells) == 4 and all(0 < float(c.split(' ± ')[0]) <= 100 for c in cells)
    chosen = json.loads((root / 'chosen.json').read_text())
    assert set(chosen) == {'1', '2'} and all('--max_start_epoch' in v for v in chosen.values())


def test_fmnist_smoke_choices_are_made_on_validation_and_runs_are_cached(smoke):
    root, data = smoke
    cache = json.loads((root / 'cache.json').read_text())
    runs = [v for v in cache.values() if 'curve' in v]
    assert runs and all(len(r['val_accs']) == 1 and len(r['accs']) == 1 for r in runs)
    # every run's experts and images held out the same 20 validation images
    args = json.loads(open(os.path.join(runs[0]['run_dir'], 'args.json')).read())
    assert args['valid'] == 20 and args['dataset'] == 'FashionMNIST' and args['model'] == 'ConvNetW32'
    before = len(cache)
    experiments.main(['fmnist', '--smoke', '--data_path', str(data), '--root', str(root)])
    assert len(json.loads((root / 'cache.json').read_text())) == before  # nothing new was computed


RECORD_DISTILL_CALLS = """
import json, sys
import distill
from studies import experiments
real = distill.main
def record(argv):
    with open(sys.argv[1], 'a') as f:
        f.write(json.dumps(argv) + '\\n')
    return real(argv)
distill.main = record
experiments.main(sys.argv[2:])
"""


def test_fmnist_workers_at_once_run_each_distillation_once_and_leave_none_to_the_tables(tmp_path, monkeypatch):
    """Two --worker processes at the same time: every distillation runs once in all (a worker that is done
    with its share takes runs nobody started, and waits for those another one holds), no tables are written,
    and the run without --worker then writes every table from the cache alone."""
    import subprocess
    import sys
    import distill
    from studies import fmnist as fmnist_study
    assert fmnist_study.share_first(list('abcde'), (1, 2)) == list('bdace')
    data, root = tmp_path / 'fashion', tmp_path / 'study'
    data.mkdir()
    write_fashion_idx(str(data))
    argv = ['fmnist', '--smoke', '--data_path', str(data), '--root', str(root)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), OMP_NUM_THREADS='1')
    workers = [subprocess.Popen([sys.executable, '-c', RECORD_DISTILL_CALLS, str(tmp_path / f'calls{k}'),
                                 *argv, '--worker', f'{k}/2'], env=env, stdout=subprocess.DEVNULL)
               for k in (0, 1)]
    assert [w.wait(timeout=900) for w in workers] == [0, 0]
    calls = [(tmp_path / f'calls{k}').read_text().splitlines() if (tmp_path / f'calls{k}').exists() else []
             for k in (0, 1)]
    with open(root / 'cache.json') as f:
        runs = [k for k in json.load(f) if json.loads(k)[0] in fmnist_study.RECIPES]
    assert len(calls[0]) + len(calls[1]) == len(runs) > 0
    assert not (root / 'methods.md').exists() and not (root / 'cache.json.claims').read_text().strip('{}\n ')
    def cross_keys():
        with open(root / 'cache.json') as f:
            return {k for k in json.load(f) if json.loads(k)[0] == 'cross'}
    by_workers = cross_keys()
    monkeypatch.setattr(distill, 'main', lambda a: pytest.fail(f'a table needed a run no worker made: {a}'))
    experiments.main(argv)
    assert '+ weight perturbation' in (root / 'ablation.md').read_text()
    assert by_workers and cross_keys() == by_workers  # the workers scored every cross-architecture network


def test_worker_and_ipcs_flags_refuse_what_they_cannot_do(capsys):
    for bad, says in ((['--worker', '2/2'], 'K counts from 0 to N-1'), (['--worker', 'half'], 'expected K/N'),
                      (['--ipcs', '50'], 'iteration budgets for ipc 1 and 10 only')):
        with pytest.raises(SystemExit) as e:
            experiments.main(['fmnist', *bad])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_distillation_seeds_are_scored_by_disjoint_networks(tmp_path):
    """Seed s's num_eval networks are seeded eval_seed(s) + i: on Fashion-MNIST no two seeds share one, so
    3 seeds x 5 networks are 15 networks (Digits keeps its historic stride 1, under which they overlap)."""
    from studies import fmnist as fmnist_study
    study = experiments.Study(str(tmp_path), 3, 5, {1: 1}, setting=fmnist_study.setting(str(tmp_path)))
    networks = [study.eval_seed(s) + i for s in range(3) for i in range(5)]
    assert len(set(networks)) == 15 and study.eval_seed(0) == 10_000
    digits = experiments.Study(str(tmp_path), 3, 5, {1: 1})
    assert len({digits.eval_seed(s) + i for s in range(3) for i in range(5)}) == 7
    assert study.key('x', 0)[-1] != digits.key('x', 0)[-1]  # the seeding is part of Fashion-MNIST's cache keys


def test_study_processes_sharing_a_cache_keep_each_others_results(tmp_path):
    """Two processes' Study objects, both loaded before either wrote: each result lands in cache.json, and a
    key the other process already computed is read from the file, not computed again."""
    a = experiments.Study(str(tmp_path), 1, 1, {1: 1})
    b = experiments.Study(str(tmp_path), 1, 1, {1: 1})
    assert a.cached(['a'], lambda: {'v': 1}) == {'v': 1}
    assert b.cached(['b'], lambda: {'v': 2}) == {'v': 2}
    assert b.cached(['a'], lambda: pytest.fail('computed twice')) == {'v': 1}
    with open(tmp_path / 'cache.json') as f:
        assert json.load(f) == {'["a"]': {'v': 1}, '["b"]': {'v': 2}}
    assert experiments.Study(str(tmp_path), 1, 1, {1: 1}).cache == {'["a"]': {'v': 1}, '["b"]': {'v': 2}}


def test_a_key_claimed_by_a_live_process_is_waited_for_not_computed_twice(tmp_path):
    """While another live process holds the claim on a key, cached() waits and returns that process's
    result; a claim left by a dead process is taken over; a failed compute leaves no claim behind."""
    import subprocess
    import threading
    from trajmatch.files import atomic_write_json
    study = experiments.Study(str(tmp_path), 1, 1, {1: 1})
    study.claim_poll_s = 0.05
    claims = tmp_path / 'cache.json.claims'
    holder = subprocess.Popen(['sleep', '60'])
    try:
        claims.write_text(json.dumps({'["k"]': holder.pid}))
        assert study.cached(['k'], lambda: pytest.fail('computed'), wait=False) is experiments.MISSING
        finish = threading.Timer(0.5, lambda: atomic_write_json({'["k"]': {'v': 'theirs'}}, str(tmp_path / 'cache.json')))
        finish.start()
        assert study.cached(['k'], lambda: pytest.fail('computed a key another process holds')) == {'v': 'theirs'}
        finish.join()
    finally:
        holder.kill()
        holder.wait()
    claims.write_text(json.dumps({'["d"]': holder.pid}))  # that process has exited
    seen = []

    def compute():
        seen.append(json.loads(claims.read_text()))
        return {'v': 'mine'}
    assert study.cached(['d'], compute) == {'v': 'mine'}
    assert seen == [{'["d"]': os.getpid()}] and json.loads(claims.read_text()) == {}

    def boom():
        raise ValueError('broken run')
    with pytest.raises(ValueError):
        study.cached(['e'], boom)
    assert json.loads(claims.read_text()) == {} and '["e"]' not in json.loads((tmp_path / 'cache.json').read_text())


def test_fmnist_from_cache_reports_progress_and_computes_nothing(tmp_path, monkeypatch):
    """Mid-study (a worker's runs in the cache, the AST runs not yet), --from_cache writes every table without
    running anything: cells without runs say 'not run yet', the others hold their accuracies."""
    import buffer
    import distill
    data, root = tmp_path / 'fashion', tmp_path / 'study'
    data.mkdir()
    write_fashion_idx(str(data))
    argv = ['fmnist', '--smoke', '--data_path', str(data), '--root', str(root)]
    experiments.main(argv + ['--worker', '0/2'])
    with open(root / 'cache.json') as f:
        cache = {k: v for k, v in json.load(f).items() if not json.loads(k)[0] == 'AST'}
    (root / 'cache.json').write_text(json.dumps(cache))
    before = (root / 'cache.json').read_text()
    monkeypatch.setattr(distill, 'main', lambda a: pytest.fail(f'--from_cache ran a distillation: {a}'))
    monkeypatch.setattr(buffer, 'main', lambda a: pytest.fail(f'--from_cache trained experts: {a}'))
    experiments.main(argv + ['--from_cache'])
    assert (root / 'cache.json').read_text() == before
    methods = (root / 'methods.md').read_text()
    assert 'progress report' in methods and 'not run yet' in methods
    cells = [c.strip() for line in methods.splitlines() if line.startswith('| M') or line.startswith('| A')
             for c in line.split('|')[2:-1]]
    done = [c for c in cells if c != 'not run yet']
    assert done and all(0 < float(c.split(' ± ')[0]) <= 100 for c in done)
    assert [line.split('|')[2].strip() for line in methods.splitlines() if line.startswith('| AST')] == ['not run yet']
    assert 'not run yet' in (root / 'baselines.md').read_text()  # baselines are not a worker's job
    with pytest.raises(SystemExit):
        experiments.main(argv + ['--from_cache', '--worker', '0/2'])


def test_runs_keep_their_final_sets_and_a_run_whose_folder_is_gone_is_distilled_again_to_the_same_set(
        smoke, tmp_path, monkeypatch):
    """Every run keeps its final set in root/sets (kept in git, unlike the run folders). On a machine with the
    cache but neither sets nor run folders, a worker distills the sets the study shows again (same flags and
    seed): the same tensors bit for bit, and the cache records that each reproduced its in-loop curve."""
    import shutil
    import torch
    import distill
    root, data = smoke
    copy = tmp_path / 'study'
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns('runs', '*.lock', '*.claims'))
    cache = json.loads((copy / 'cache.json').read_text())
    finished = {k for k, v in cache.items() if 'curve' in v}
    sets = {p.name: torch.load(p, weights_only=True) for p in (copy / 'sets').glob('*.pt')}
    assert finished and {s['key'] for s in sets.values()} == finished  # one set per finished run
    for s in sets.values():
        ckpt = torch.load(os.path.join(s['run_dir'], 'checkpoint.pt'), weights_only=True)
        assert all(torch.equal(s[k], ckpt[k]) for k in ('images', 'labels', 'syn_lr'))
    shutil.rmtree(copy / 'sets')
    for v in cache.values():  # a fresh machine: the run folders are gone
        if 'run_dir' in v:
            v['run_dir'] = str(tmp_path / 'gone' / os.path.basename(v['run_dir']))
    (copy / 'cache.json').write_text(json.dumps(cache))
    argv = ['fmnist', '--smoke', '--data_path', str(data), '--root', str(copy)]
    experiments.main(argv + ['--worker', '0/1'])
    recovered = {k: v for k, v in json.loads((copy / 'cache.json').read_text()).items() if json.loads(k)[0] == 'set'}
    again = {p.name: torch.load(p, weights_only=True) for p in (copy / 'sets').glob('*.pt')}
    assert recovered and len(again) == len(recovered) < len(sets)  # the shown sets only, not every run's
    assert all(v['distilled_again'] and v['same_curve'] for v in recovered.values())
    for name, s in again.items():
        assert all(torch.equal(s[k], sets[name][k]) for k in ('images', 'labels', 'syn_lr'))
    monkeypatch.setattr(distill, 'main', lambda a: pytest.fail(f'a table distilled a set again: {a}'))
    experiments.main(argv)
    cross = sum(json.loads(k)[3] == 2 for k in recovered)  # the cross-architecture sets (smoke: ipc 2)
    assert cross and (f'{cross} of these sets were distilled again (same flags and seed; their run folders were '
                      f"gone), and {cross} of those reproduced the cached run's in-loop curve exactly"
                      in (copy / 'cross_architecture.md').read_text())


def test_a_missing_set_whose_run_folder_still_exists_is_copied_from_its_checkpoint_not_distilled_again(
        smoke, tmp_path, monkeypatch):
    """Runs cached before sets were kept, on the machine that still has their run folders: the shown sets
    come from each run's checkpoint (the exact images the cache scored), and nothing is distilled."""
    import shutil
    import torch
    import distill
    root, data = smoke
    copy = tmp_path / 'study'
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns('runs', 'sets', '*.lock', '*.claims'))
    cache = json.loads((copy / 'cache.json').read_text())  # run_dir still names root's run folders
    monkeypatch.setattr(distill, 'main', lambda a: pytest.fail(f'a set was distilled again: {a}'))
    experiments.main(['fmnist', '--smoke', '--data_path', str(data), '--root', str(copy), '--worker', '0/1'])
    recovered = {k: v for k, v in json.loads((copy / 'cache.json').read_text()).items() if json.loads(k)[0] == 'set'}
    assert recovered and all(not v['distilled_again'] for v in recovered.values())
    for k, v in recovered.items():
        key = json.dumps(json.loads(k)[1:])
        assert v['from'] == cache[key]['run_dir']
    again = sorted((copy / 'sets').glob('*.pt'))
    assert len(again) == len(recovered)
    for p in again:  # the same file name (digest of the key) and the same tensors as the run's own set
        s, original = torch.load(p, weights_only=True), torch.load(root / 'sets' / p.name, weights_only=True)
        assert json.dumps(['set', *json.loads(s['key'])]) in recovered
        assert all(torch.equal(s[k], original[k]) for k in ('images', 'labels', 'syn_lr'))
