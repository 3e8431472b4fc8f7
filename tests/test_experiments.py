"""The studies (python -m studies ...) on a small fixture in Fashion-MNIST's own idx format (the Debian layout: the
four .gz files in --data_path itself): `fmnist --smoke` makes every table and picture; every result is a cell,
one file each, written atomically by one idempotent command; `--list` prints exactly the cells still missing
whose inputs exist; the one-off conversion of the former cache.json keeps every result."""
import ast
import gzip
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from studies import cells, experiments, fmnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = ('smoothness', 'selection', 'baselines', 'methods', 'ablation', 'cross_architecture')


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


def argv(root, data) -> list[str]:
    return ['fmnist', '--smoke', '--data_path', str(data), '--root', str(root)]


def cell_files(root) -> dict[str, bytes]:
    return {p.name[:-len('.json')]: p.read_bytes() for p in (root / 'cells').glob('*.json')}


def cell_keys(root) -> dict[str, list]:
    return {d: json.loads(b)['key'] for d, b in cell_files(root).items()}


def tables(root) -> dict[str, bytes]:
    names = [f'{t}.md' for t in TABLES] + ['chosen.json']
    return {n: (root / n).read_bytes() for n in names}


def listed(capsys, args) -> list[str]:
    capsys.readouterr()
    experiments.main(args + ['--list'])
    return capsys.readouterr().out.splitlines()


def digest_of(line: str) -> str:
    words = shlex.split(line)
    assert words[:3] == ['python', '-m', 'studies'] and words[-2] == '--cell'
    return words[-1]


def computes_nothing(monkeypatch):
    import buffer
    import compress_buffers
    import distill
    monkeypatch.setattr(distill, 'main', lambda a: pytest.fail(f'distilled: {a}'))
    monkeypatch.setattr(buffer, 'main', lambda a: pytest.fail(f'trained experts: {a}'))
    monkeypatch.setattr(compress_buffers, 'main', lambda a: pytest.fail(f'compressed: {a}'))
    monkeypatch.setattr(cells.Study, 'evaluate', lambda *a, **k: pytest.fail('trained an evaluation network'))


def copy_study(root, dest, *ignore):
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns('runs', *ignore))
    return dest


def study_of(root, data) -> fmnist.FashionStudy:
    return fmnist.FashionStudy(str(root), str(data), **fmnist.SMOKE)


def test_fmnist_smoke_writes_every_table_and_picture(smoke):
    root, _ = smoke
    for name in TABLES:
        text = (root / f'{name}.md').read_text()
        assert text.startswith('<!-- written by: python -m studies fmnist -->\n') and '|' in text
        assert 'progress report' not in text and 'not run yet' not in text and 'so far' not in text
    for png in ('curves.png', 'images_ipc1.png', 'images_ipc2.png'):
        assert (root / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    methods = (root / 'methods.md').read_text()
    assert all(f'| {m} |' in methods for m in ('MTT', 'AST', 'ATT', 'MCT'))
    # each cell is its runs' accuracy: the learnable fixture never gives 0 % for every run
    values = [c.strip() for line in methods.splitlines() if line.startswith('| M') or line.startswith('| A')
              for c in line.split('|')[2:-1]]
    assert len(values) == 8 and all(0 < float(c.split(' ± ')[0]) <= 100 for c in values)
    ablation = (root / 'ablation.md').read_text()
    assert '+ weight perturbation' in ablation and '- K-Means init' in ablation and '- smooth experts' in ablation
    cross = (root / 'cross_architecture.md').read_text()  # one cell per (seed, model, network)
    values = [c.strip() for line in cross.splitlines() if line.startswith(('| MTT', '| AST'))
              for c in line.split('|')[2:-1]]
    assert len(values) == 4 and all(0 < float(c.split(' ± ')[0]) <= 100 for c in values)
    chosen = json.loads((root / 'chosen.json').read_text())
    assert set(chosen) == {'1', '2'} and all('--max_start_epoch' in v for v in chosen.values())


def test_fmnist_smoke_each_cell_is_one_file_and_a_second_run_computes_nothing(smoke, monkeypatch):
    root, data = smoke
    keys = cell_keys(root)
    assert keys and all(cells.digest(k) == d for d, k in keys.items())  # the file name is the key's digest
    kinds = {k[0] for k in keys.values()}
    assert {'MTT', 'AST', 'baseline', 'cross'} <= kinds and 'set' not in kinds  # every run kept its own set
    runs = {d: json.loads((root / 'cells' / f'{d}.json').read_text())['value'] for d, k in keys.items()
            if k[0] in fmnist.RECIPES}
    finished = {d for d, v in runs.items() if 'curve' in v}
    assert finished and all(len(runs[d]['val_accs']) == 1 and len(runs[d]['accs']) == 1 for d in finished)
    assert {p.name[:-3] for p in (root / 'sets').glob('*.pt')} == finished  # a set per finished run, same digest
    # every run's experts and images held out the same 20 validation images
    args = json.loads(open(os.path.join(runs[min(finished)]['run_dir'], 'args.json')).read())
    assert args['valid'] == 20 and args['dataset'] == 'FashionMNIST' and args['model'] == 'ConvNetW32'
    before, written = cell_files(root), tables(root)
    computes_nothing(monkeypatch)
    experiments.main(argv(root, data))
    assert cell_files(root) == before and tables(root) == written


def test_list_prints_nothing_once_every_cell_exists(smoke, capsys):
    root, data = smoke
    assert listed(capsys, argv(root, data)) == []
    assert cells.missing_cells(study_of(root, data).cells) == []


def test_list_prints_exactly_the_missing_cells_and_its_commands_run_in_parallel_from_the_repo_root(
        smoke, tmp_path, capsys):
    """Three cells removed: --list prints exactly their three commands, which `xargs -P 2` runs from the
    repository root; they write the same results again, and --list then prints nothing."""
    root, data = smoke
    copy = copy_study(root, tmp_path / 'study')
    keys = cell_keys(copy)
    gone = sorted(d for d, k in keys.items() if k[0] == 'cross')[:2]
    gone += [next(d for d, k in keys.items() if k[:2] == ['baseline', 'real'])]
    original = {d: (copy / 'cells' / f'{d}.json').read_bytes() for d in gone}
    for d in gone:
        (copy / 'cells' / f'{d}.json').unlink()
    lines = listed(capsys, argv(copy, data))
    assert sorted(map(digest_of, lines)) == sorted(gone)
    assert all(shlex.split(line)[3:-2] == ['fmnist', '--root', str(copy), '--data_path', str(data), '--smoke']
               for line in lines)  # the study's own flags
    env = dict(os.environ, PYTHONPATH=REPO, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    done = subprocess.run(['xargs', '-P', '2', '-I{}', 'sh', '-c', '{}'], input='\n'.join(lines) + '\n', text=True,
                          cwd=REPO, env=env, capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {d: (copy / 'cells' / f'{d}.json').read_bytes() for d in gone} == original
    assert listed(capsys, argv(copy, data)) == []
    assert not [p for p in (copy / 'cells').iterdir() if not p.name.endswith('.json')]  # no temp file left


def test_a_cell_is_listed_only_once_its_inputs_exist(smoke, tmp_path, capsys):
    """An incomplete grid holds back the distillations of its ipc (their flags are its choice), and a
    cross-architecture network waits for its distilled set; a --cell whose inputs are missing refuses."""
    root, data = smoke
    study = study_of(root, data).study
    chosen = {int(i): v for i, v in json.loads((root / 'chosen.json').read_text()).items()}
    copy = copy_study(root, tmp_path / 'study')
    # the grid of ipc 1 without a point that was not chosen, and an ipc-1 AST run
    other = next(p for p in fmnist.grid_points(fmnist.SMOKE['grid']) if p != chosen[1])
    grid_cell = study.run_cell(fmnist.MTT, other, 1, 0).digest
    ast_flags = chosen[1] + fmnist.METHODS['AST'][1]
    ast_cell = study.run_cell(fmnist.AST, ast_flags, 1, 0).digest
    # the MTT run of the cross-architecture ipc (2), its set, and its networks
    mtt_flags = chosen[2] + fmnist.METHODS['MTT'][1]
    mtt_key = study.run_key(fmnist.MTT, mtt_flags, 2, 0)
    nets = [key for name, *_, key in fmnist.cross_networks(study, 2, chosen[2], fmnist.SMOKE['cross_models'], 1)
            if name == 'MTT']
    assert len(nets) == 2
    for d in [grid_cell, ast_cell, cells.digest(mtt_key), *map(cells.digest, nets)]:
        (copy / 'cells' / f'{d}.json').unlink()
    original_set = torch.load(copy / 'sets' / f'{cells.digest(mtt_key)}.pt', weights_only=True)
    (copy / 'sets' / f'{cells.digest(mtt_key)}.pt').unlink()
    lines = listed(capsys, argv(copy, data))
    assert sorted(map(digest_of, lines)) == sorted([grid_cell, cells.digest(mtt_key)])
    with pytest.raises(SystemExit) as e:
        experiments.main(argv(copy, data) + ['--cell', ast_cell])
    assert e.value.code == 2 and 'inputs exist' in capsys.readouterr().err
    mtt_line = next(line for line in lines if digest_of(line) == cells.digest(mtt_key))
    experiments.main(shlex.split(mtt_line)[3:])  # the run, and with it its set: now its networks can run
    again = torch.load(copy / 'sets' / f'{cells.digest(mtt_key)}.pt', weights_only=True)
    assert all(torch.equal(again[k], original_set[k]) for k in ('images', 'labels', 'syn_lr'))
    assert sorted(map(digest_of, listed(capsys, argv(copy, data)))) == sorted([grid_cell, *map(cells.digest, nets)])


def test_a_cell_command_does_nothing_when_its_result_exists(smoke, monkeypatch, capsys):
    root, data = smoke
    keys = cell_keys(root)
    some = [next(d for d, k in keys.items() if k[0] == kind) for kind in ('MTT', 'AST', 'baseline', 'cross')]
    some.append(study_of(root, data).study.experts_cell(fmnist.AST).digest)  # the buffers are its result
    before = {p: p.stat().st_mtime_ns for p in (root / 'cells').iterdir()}
    computes_nothing(monkeypatch)
    for d in some:
        capsys.readouterr()
        experiments.main(argv(root, data) + ['--cell', d])
        assert capsys.readouterr().out.strip() == f'cell {d}: exists, nothing to do'
    assert {p: p.stat().st_mtime_ns for p in (root / 'cells').iterdir()} == before
    with pytest.raises(SystemExit) as e:
        experiments.main(argv(root, data) + ['--cell', '0123456789abcdef'])
    assert e.value.code == 2


def test_a_cell_is_written_atomically_or_not_at_all(tmp_path, monkeypatch):
    import trajmatch.files
    from trajmatch.cli import WriteError
    study = cells.Study(str(tmp_path), 1, 1, {1: 1})
    key = ['baseline', 'real', 1, 0]
    real_replace = os.replace

    def crash(src, dst):  # the disk fails at the rename: the temp file was written, the cell's file never is
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(trajmatch.files.os, 'replace', crash)
    with pytest.raises(WriteError):
        study.put(key, {'accs': [0.5]})
    assert not os.path.exists(study.cell_path(key)) and os.listdir(tmp_path / 'cells') == []  # no temp left
    assert cells.Study(str(tmp_path), 1, 1, {1: 1}).get(key) is cells.MISSING
    monkeypatch.setattr(trajmatch.files.os, 'replace', real_replace)

    def boom():
        raise ValueError('broken run')
    cell = study.json_cell(key, boom)
    with pytest.raises(ValueError):
        cell.run()
    assert not cell.done() and os.listdir(tmp_path / 'cells') == []
    cell = study.json_cell(key, lambda: {'accs': [0.5, float('nan')]})
    assert cell.run() and cell.done() and not cell.run()  # a second run does nothing
    with open(study.cell_path(key)) as f:
        assert json.load(f) == {'key': key, 'value': {'accs': [0.5, None]}}  # the key is kept inside the file
    assert os.path.basename(study.cell_path(key)) == cells.digest(key) + '.json'
    assert study.get(key) == cells.Study(str(tmp_path), 1, 1, {1: 1}).get(key) == {'accs': [0.5, None]}


def test_the_conversion_of_a_cache_json_keeps_every_result(smoke, tmp_path, monkeypatch):
    """The former layout (one cache.json: json.dumps(key) -> value, with .claims and .lock files beside it)
    becomes the same cells, byte for byte, and the tables made from them are the same; the old files go."""
    root, data = smoke
    copy = copy_study(root, tmp_path / 'study', 'cells')
    originals = cell_files(root)
    cache = {}
    for b in originals.values():
        got = json.loads(b)
        cache[json.dumps(got['key'])] = got['value']
    (copy / 'cache.json').write_text(json.dumps(cache, indent=2, sort_keys=True))
    (copy / 'cache.json.claims').write_text('{}')
    (copy / 'cache.json.lock').write_text('')
    for t in TABLES:
        (copy / f'{t}.md').unlink()
    assert cells.convert_cache(str(copy)) == len(originals)
    assert cell_files(copy) == originals
    assert not [p.name for p in copy.iterdir() if p.name.startswith('cache.json')]
    computes_nothing(monkeypatch)
    experiments.main(argv(copy, data))
    assert tables(copy) == tables(root)
    # a cell already there must agree with the cache
    d, b = next(iter(originals.items()))
    key = json.loads(b)['key']
    (copy / 'cache.json').write_text(json.dumps({json.dumps(key): {'accs': [0.0]}}))
    with pytest.raises(ValueError, match='another value'):
        cells.convert_cache(str(copy))
    assert (copy / 'cells' / f'{d}.json').read_bytes() == b


def test_the_committed_results_are_cells_and_no_fashion_mnist_cell_is_missing():
    """results/ holds the converted cells (no cache.json left), each named by its key's digest; every kept set
    belongs to a run cell; `python -m studies fmnist --list` prints nothing (every table is made from them)."""
    for root in ('results', os.path.join('results', 'fmnist')):
        root = os.path.join(REPO, root)
        assert not os.path.exists(os.path.join(root, 'cache.json'))
        names = os.listdir(os.path.join(root, 'cells'))
        for name in names:
            with open(os.path.join(root, 'cells', name)) as f:
                assert cells.digest(json.load(f)['key']) + '.json' == name
    fm = os.path.join(REPO, 'results', 'fmnist')
    files = {name[:-5] for name in os.listdir(os.path.join(fm, 'cells'))}
    assert {name[:-3] for name in os.listdir(os.path.join(fm, 'sets'))} <= files  # each set has its run's cell
    fashion = fmnist.FashionStudy(fm, fmnist.DEBIAN_PATH)
    assert cells.missing_cells(fashion.cells) == []
    # the study reaches every cell file (+ the two expert recipes, whose result is their buffers)
    assert {c.digest for c in fashion.cells()} == files | {fashion.study.experts_cell(r).digest for r in fmnist.RECIPES}


def test_flags_refuse_what_they_cannot_do(capsys):
    for bad, says in ((['fmnist', '--ipcs', '50'], 'iteration budgets for ipc 1 and 10 only'),
                      (['fmnist', '--list', '--cell', '0123'], 'not allowed with'),
                      (['fmnist', '--list', '--report'], 'not allowed with'),
                      (['perturb', '--list'], 'perturb has no cells')):
        with pytest.raises(SystemExit) as e:
            experiments.main(bad)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_list_command_repeats_the_study_flags_given():
    p = experiments.build_parser()
    args = p.parse_args(['all', '--seeds', '2', '--root', 'my results'])
    assert experiments.cell_command(p, args, 'abc') == "python -m studies all --root 'my results' --seeds 2 --cell abc"
    args = p.parse_args(['fmnist', '--ipcs', '1', '--seeds_ipc10', '4'])  # --seeds_ipc10: not a flag of fmnist
    assert experiments.cell_command(p, args, 'abc') == 'python -m studies fmnist --ipcs 1 --cell abc'


def test_distillation_seeds_are_scored_by_disjoint_networks(tmp_path):
    """Seed s's num_eval networks are seeded eval_seed(s) + i: on Fashion-MNIST no two seeds share one, so
    3 seeds x 5 networks are 15 networks (Digits keeps its historic stride 1, under which they overlap)."""
    study = cells.Study(str(tmp_path), 3, 5, {1: 1}, setting=fmnist.setting(str(tmp_path)))
    networks = [study.eval_seed(s) + i for s in range(3) for i in range(5)]
    assert len(set(networks)) == 15 and study.eval_seed(0) == 10_000
    digits = cells.Study(str(tmp_path), 3, 5, {1: 1})
    assert len({digits.eval_seed(s) + i for s in range(3) for i in range(5)}) == 7
    assert study.key('x', 0)[-1] != digits.key('x', 0)[-1]  # the seeding is part of Fashion-MNIST's cell keys


def test_fmnist_report_shows_progress_and_computes_nothing(smoke, tmp_path, monkeypatch):
    """Mid-study (the AST runs and the baselines not done), --report writes every table without running
    anything: cells without runs say 'not run yet', the others hold their accuracies."""
    root, data = smoke
    copy = copy_study(root, tmp_path / 'study')
    for d, k in cell_keys(copy).items():
        if k[0] in ('AST', 'baseline'):
            (copy / 'cells' / f'{d}.json').unlink()
    before = cell_files(copy)
    computes_nothing(monkeypatch)
    experiments.main(argv(copy, data) + ['--report'])
    assert cell_files(copy) == before
    methods = (copy / 'methods.md').read_text()
    assert 'progress report' in methods and 'not run yet' in methods
    values = [c.strip() for line in methods.splitlines() if line.startswith('| M') or line.startswith('| A')
              for c in line.split('|')[2:-1]]
    done = [c for c in values if c != 'not run yet']
    assert done and all(0 < float(c.split(' ± ')[0]) <= 100 for c in done)
    assert [line.split('|')[2].strip() for line in methods.splitlines() if line.startswith('| AST')] == ['not run yet']
    assert 'not run yet' in (copy / 'baselines.md').read_text()


def test_a_run_whose_set_and_folder_are_gone_is_distilled_again_to_the_same_set(smoke, tmp_path, capsys):
    """On a machine with the cells but neither sets nor run folders, --list offers a set cell for each set the
    study shows, and running them distills those runs again (same flags and seed): the same tensors bit for bit,
    and each set cell records that its run reproduced its in-loop curve."""
    root, data = smoke
    copy = copy_study(root, tmp_path / 'study', 'sets')
    sets = {p.name: torch.load(p, weights_only=True) for p in (root / 'sets').glob('*.pt')}
    for p in (copy / 'cells').glob('*.json'):  # a fresh machine: the run folders are gone
        got = json.loads(p.read_text())
        if 'run_dir' in got['value']:
            got['value']['run_dir'] = str(tmp_path / 'gone' / os.path.basename(got['value']['run_dir']))
            p.write_text(json.dumps(got))
    lines = listed(capsys, argv(copy, data))
    study = study_of(copy, data).study
    chosen = {int(i): v for i, v in json.loads((root / 'chosen.json').read_text()).items()}
    shown = fmnist.shown_sets([1, 2], 2, 1)
    assert sorted(map(digest_of, lines)) == sorted(study.set_cell(recipe, chosen[ipc] + flags, ipc, seed).digest
                                                   for recipe, flags, ipc, seed in shown)
    assert len(shown) < len(sets)  # only the sets the study shows, not every run's
    for line in lines:
        experiments.main(shlex.split(line)[3:])
    records = {d: study.get(k) for d, k in cell_keys(copy).items() if k[0] == 'set'}
    assert sorted(records) == sorted(map(digest_of, lines))
    assert all(v['distilled_again'] and v['same_curve'] for v in records.values())
    again = {p.name: torch.load(p, weights_only=True) for p in (copy / 'sets').glob('*.pt')}
    assert len(again) == len(shown)
    for name, s in again.items():
        assert all(torch.equal(s[k], sets[name][k]) for k in ('images', 'labels', 'syn_lr'))
    assert listed(capsys, argv(copy, data)) == []
    experiments.main(argv(copy, data))
    cross = sum(k[3] == 2 for k in cell_keys(copy).values() if k[0] == 'set')  # the cross-architecture ipc
    assert cross == 2 and (f'{cross} of these sets were distilled again (same flags and seed; their run folders '
                           f"were gone), and {cross} of those reproduced the cached run's in-loop curve exactly"
                           in (copy / 'cross_architecture.md').read_text())


def test_a_missing_set_whose_run_folder_still_exists_is_copied_from_its_checkpoint_not_distilled_again(
        smoke, tmp_path, monkeypatch):
    root, data = smoke
    copy = copy_study(root, tmp_path / 'study', 'sets')  # the run cells still name root's run folders
    import distill
    monkeypatch.setattr(distill, 'main', lambda a: pytest.fail(f'a set was distilled again: {a}'))
    experiments.main(argv(copy, data))
    study = study_of(copy, data).study
    records = {d: (k, study.get(k)) for d, k in cell_keys(copy).items() if k[0] == 'set'}
    assert records and all(not v['distilled_again'] for _, v in records.values())
    for k, v in records.values():
        assert v['from'] == study.get(k[1:])['run_dir']
    again = sorted((copy / 'sets').glob('*.pt'))
    assert len(again) == len(records)
    for p in again:  # the same file name (digest of the run's key) and the same tensors as the run's own set
        s, original = torch.load(p, weights_only=True), torch.load(root / 'sets' / p.name, weights_only=True)
        assert cells.digest(['set', *json.loads(s['key'])]) in records
        assert all(torch.equal(s[k], original[k]) for k in ('images', 'labels', 'syn_lr'))
    assert tables(copy) == tables(root)


def test_the_studies_import_no_cycle():
    """studies/*.py import each other one way: experiments -> fmnist -> cells (the runner); nothing back."""
    folder = os.path.join(REPO, 'studies')
    graph = {}
    for name in os.listdir(folder):
        if name.endswith('.py'):
            tree = ast.parse(open(os.path.join(folder, name)).read())
            found = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    found |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
            graph[name[:-3]] = {m.split('.')[1] for m in found if m.startswith('studies.')} - {name[:-3]}
    assert graph['cells'] == set() and graph['fmnist'] == {'cells'} and 'experiments' not in graph['fmnist']

    def reach(start, seen=()):
        return {n for m in graph.get(start, ()) if m not in seen for n in {m} | reach(m, (*seen, m))}
    assert not [m for m in graph if m in reach(m)]
