"""Studies, written as Markdown tables into results/ (and shown in the README): Digits, and Fashion-MNIST
(`fmnist`, fmnist_study.py).

    python experiments.py smoothness   # AST Table VII analogue: expert recipes -> Avg_Var, expert acc, ipc-1 distilled acc
    python experiments.py ablation     # AST Table VIII analogue at ipc 1: smooth experts -> +kmeans -> ... -> +perturb
    python experiments.py methods      # MTT vs AST vs ATT vs MCT at ipc 1 and 10, plus MCT storage
    python experiments.py all
    python experiments.py perturb      # ||δ|| / ||θ|| of both weight-perturbation variants on fresh ConvNets
    python experiments.py fmnist       # Fashion-MNIST: baselines, smoothness, methods, AST ablation, cross-arch
Every distilled set is scored on its FINAL images (not the best-on-test) by --num_eval fresh networks;
cells are mean ± std over all (distillation seed x network) accuracies. Finished runs are cached in
results/cache.json, so an interrupted study resumes where it stopped.
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

import buffer
import compress_buffers
import distill
from trajmatch.data import load_dataset
from trajmatch.evaluation import evaluate_set
from trajmatch.runlog import CHECKPOINT_FILE, METRICS_FILE, run_file
from trajmatch.trajectory_io import buffer_dir, expert_files, read_meta
from trajmatch.files import atomic_torch_save, atomic_write_json

# ---------------------------------------------------------------- settings (Digits, CPU)

EXPERTS = ['--num_experts', '10', '--train_epochs', '20']          # per expert recipe
RECIPES = {                                                          # buffer.py flags (docs/method.md, section 1)
    'SGD (MTT)': [],
    'SGD + momentum': ['--optim', 'sgdmom'],
    'SGD + momentum + gp + loss decay (AST paper)': ['--optim', 'sgdmom', '--gp', '--loss_decay'],
    'AST code recipe (sgdmom_code + gp + loss decay, code variants: the AST presets)':
        ['--optim', 'sgdmom_code', '--gp', 'code', '--loss_decay', 'code'],
}
AST_RECIPE = 'AST code recipe (sgdmom_code + gp + loss decay, code variants: the AST presets)'
MISSING = {'missing': True}  # Study(from_cache=True)'s answer for a key the cache does not hold
EVAL_PROTOCOL = 'mtt-exact'  # part of every cache key: cells scored under an older protocol are recomputed
BASE = ['--syn_steps', '20', '--expert_epochs', '2', '--max_start_epoch', '10', '--lr_img', '30',
        '--lr_lr', '1e-6', '--lr_teacher', '0.01']  # digits_ipc1's flags but lr_lr 1e-6: at 1e-5 every AST-expert run diverged
AST_STUDENT = ['--syn_mom', '0.9', '--perturb_variant', 'code']    # the AST authors' student (as the AST presets)
ABLATION = [                                                         # cumulative, as the paper's Table VIII
    ('smooth experts', []),
    ('+ K-Means init', ['--pix_init', 'kmeans']),
    ('+ balanced inner loss', ['--pix_init', 'kmeans', '--balance_loss']),
    ('+ intermediate matching', ['--pix_init', 'kmeans', '--balance_loss', '--agg_middle_loss']),
    ('+ weight perturbation', ['--pix_init', 'kmeans', '--balance_loss', '--agg_middle_loss', '--weight_perturb']),
]
AST_ALL = ABLATION[-1][1]
METHODS = {  # name -> (expert recipe, distill flags)
    'MTT': ('SGD (MTT)', []),
    'AST': (AST_RECIPE, AST_STUDENT + AST_ALL),
    'ATT': ('SGD (MTT)', ['--auto_steps']),
    'MCT': ('SGD (MTT)', ['--mct']),
}


# ---------------------------------------------------------------- runs

@dataclass(frozen=True)
class Setting:
    """What every expert and distillation of one study shares."""
    dataset: str
    model: str
    data: tuple[str, ...] = ()           # more data flags of buffer.py and distill.py (--data_path, --valid)
    experts: tuple[str, ...] = tuple(EXPERTS)
    recipes: dict = field(default_factory=lambda: RECIPES)
    eval_epochs: int = 1000              # E of the evaluation networks (MTT's schedule: E+1 epochs)
    valid: int = 0                       # held-out validation images (must match --valid in `data`)
    data_path: str = 'data'
    curve_points: int = 0                # in-loop evaluations (1 network) per run besides it 0: the curves
    # distillation seed s is scored by networks seeded first + stride * s + i (i < num_eval). Digits' cached
    # tables used stride 1 (seeds s and s + 1 share networks); kept so results/cache.json stays valid
    eval_seed_stride: int = 1

    def recipe_path(self, root: str, recipe: str) -> str:
        return os.path.join(root, 'buffers', recipe.split(' (')[0].replace(' + ', '+').replace(' ', '_'))


DIGITS = Setting('Digits', 'ConvNetD2')


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (claims name processes of the machine the cache is on)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class Study:
    def __init__(self, root: str, seeds: int, num_eval: int, iterations: dict[int, int],
                 setting: Setting = DIGITS, base: dict[int, list[str]] | None = None, from_cache: bool = False):
        self.root, self.seeds, self.num_eval, self.iterations = root, seeds, num_eval, iterations
        self.from_cache = from_cache  # compute nothing: a key not in the cache reads as MISSING
        self.setting = setting
        self.base = base or {ipc: BASE for ipc in iterations}  # distill flags every run of that ipc starts from
        self.cache_path = os.path.join(root, 'cache.json')
        self.cache: dict = {}
        self._merge_file()
        self._trained: set[str] = set()
        self._data = None
        self.claim_poll_s = 30.0  # how often a process waiting on another's claim rereads the cache

    def buffers(self, recipe: str) -> str:
        """The recipe's buffer path; buffer.py runs once per recipe (it skips experts on disk anyway)."""
        s = self.setting
        path = s.recipe_path(self.root, recipe)
        if recipe not in self._trained and not self.from_cache:
            buffer.main(['--dataset', s.dataset, '--model', s.model, *s.data, *s.recipes[recipe], *s.experts,
                         '--buffer_path', path])
            self._trained.add(recipe)
        return path

    def expert_folder(self, recipe: str) -> str:
        return buffer_dir(self.buffers(recipe), self.setting.dataset, self.setting.model, zca=False)

    def data(self):
        if self._data is None:
            self._data = load_dataset(self.setting.dataset, self.setting.data_path, valid=self.setting.valid)
        return self._data

    def expert_stats(self, recipe: str) -> dict:
        folder = self.expert_folder(recipe)
        metas = [read_meta(folder, i) for i in range(len(expert_files(folder)))]
        return {'avg_var': [m['avg_var'] for m in metas], 'test_acc': [m['test_acc'] for m in metas]}

    def cached(self, key: list, compute, wait: bool = True) -> dict:
        """compute() once per key, kept in cache.json (an interrupted study resumes where it stopped).

        Several study processes may share one cache (one per core or GPU, each given its own runs): a miss
        first rereads the file, and a result is merged into the file's current contents under a lock, so no
        process overwrites what another one wrote meanwhile. While a process computes a key it holds a claim
        on it (cache.json.claims: key -> pid); another process that needs that key waits for the result
        instead of computing it twice (wait=False: returns MISSING at once, to go and compute something else). A
        claim whose process is gone (killed worker) is taken over."""
        k = json.dumps(key)
        if k not in self.cache:
            self._merge_file()
        if k not in self.cache and self.from_cache:
            return MISSING
        waited = False
        while k not in self.cache:
            with self._locked():
                self._merge_file()
                if k in self.cache:
                    break
                claims = self._claims()
                holder = claims.get(k)
                if holder is None or holder == os.getpid() or not _alive(holder):
                    claims[k] = os.getpid()
                    atomic_write_json(claims, self.cache_path + '.claims')
                    holder = None
            if holder is None:
                try:
                    value = compute()
                except BaseException:
                    self._unclaim(k)
                    raise
                with self._locked():
                    self._merge_file()
                    self.cache[k] = value
                    atomic_write_json(self.cache, self.cache_path)
                self._unclaim(k)
                break
            if not wait:
                return MISSING
            if not waited:
                print(f'waiting for process {holder}, which is computing {k}', flush=True)
                waited = True
            time.sleep(self.claim_poll_s)
        return self.cache[k]

    def _locked(self):
        """An exclusive lock on the cache (released when the returned file closes)."""
        lock = open(self.cache_path + '.lock', 'a')
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    def _unclaim(self, k: str) -> None:
        with self._locked():
            claims = self._claims()
            claims.pop(k, None)
            atomic_write_json(claims, self.cache_path + '.claims')

    def _claims(self) -> dict:
        path = self.cache_path + '.claims'
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def _merge_file(self) -> None:
        if os.path.exists(self.cache_path):
            with open(self.cache_path) as f:
                self.cache.update(json.load(f))

    def key(self, *parts) -> list:
        s = self.setting
        extra = [] if s == DIGITS else [s.dataset, s.model, list(s.data), list(s.experts), s.eval_epochs,
                                        f'eval seeds: first + {s.eval_seed_stride} x seed']
        return [*parts, self.num_eval, EVAL_PROTOCOL, *extra]

    def eval_seed(self, seed: int, first: int = 10_000) -> int:
        """The seed of the first network scoring distillation seed `seed` (see Setting.eval_seed_stride)."""
        return first + self.setting.eval_seed_stride * seed

    def run_key(self, recipe: str, flags: list[str], ipc: int, seed: int) -> list:
        # Digits' keys (results/cache.json) hold only the flags on top of BASE, as they always have
        key_flags = flags if self.setting == DIGITS else self.base[ipc] + flags
        return self.key(recipe, key_flags, ipc, seed, self.iterations[ipc])

    def run(self, recipe: str, flags: list[str], ipc: int, seed: int, wait: bool = True) -> dict:
        """One distillation (cached): the final images' scores, and the in-loop curve. wait=False: MISSING
        while another process is computing it."""
        key = self.run_key(recipe, flags, ipc, seed)
        return self.cached(key, lambda: self._one(recipe, self.base[ipc] + flags, ipc, seed, key), wait)

    def runs(self, recipe: str, flags: list[str], ipc: int, seeds: int | None = None) -> list[dict]:
        return [self.run(recipe, flags, ipc, seed) for seed in range(seeds or self.seeds)]

    def score(self, recipe: str, flags: list[str], ipc: int, on: str = 'accs',
              seeds: int | None = None) -> tuple[list[float], int]:
        """(accuracies of every seed's networks, number of runs that diverged); on='val_accs': validation."""
        runs = self.runs(recipe, flags, ipc, seeds)
        return [a for r in runs for a in r.get(on, [])], sum(bool(r.get('diverged')) for r in runs)

    def missing(self, recipe: str, flags: list[str], ipc: int, seeds: int | None = None) -> int:
        """How many of the cell's runs are not in the cache (from_cache only; otherwise they are computed)."""
        return sum(r is MISSING for r in self.runs(recipe, flags, ipc, seeds))

    def _distill(self, recipe: str, flags: list[str], ipc: int, seed: int) -> str | None:
        """distill.py with the study's flags; its run folder, or None if it diverged."""
        s = self.setting
        buffers = self.buffers(recipe)
        if '--mct' in flags:
            compress_buffers.main(['--buffer_path', buffers, '--dataset', s.dataset, '--model', s.model])
        iters = self.iterations[ipc]
        every = max(1, iters // s.curve_points) if s.curve_points else iters
        try:
            return distill.main(['--dataset', s.dataset, '--model', s.model, *s.data, *flags, '--ipc', str(ipc),
                                 '--seed', str(seed), '--Iteration', str(iters), '--eval_it', str(every),
                                 '--num_eval', '1', '--epoch_eval_train', str(s.eval_epochs),
                                 '--buffer_path', buffers, '--run_dir', os.path.join(self.root, 'runs'),
                                 '--wandb', 'disabled'])
        except SystemExit:  # distill stops after --max_skips non-finite losses in a row: report it, go on
            return None

    def _one(self, recipe: str, flags: list[str], ipc: int, seed: int, key: list) -> dict:
        start = time.time()
        run_dir = self._distill(recipe, flags, ipc, seed)
        seconds = time.time() - start
        if run_dir is None:
            return {'accs': [], 'diverged': True, 'distill_seconds': seconds}
        ckpt = self._save_set(key, run_dir)
        out = self.evaluate(ckpt['images'], ckpt['labels'], float(ckpt['syn_lr']), seed=self.eval_seed(seed))
        return {**out, 'run_dir': run_dir, 'distill_seconds': seconds, 'curve': curve(run_dir, self.setting.model)}

    # ------------------------------------------------ final sets, kept beside the cache

    def set_path(self, key: list) -> str:
        """root/sets/<digest of the run's cache key>.pt: the run's final set. Small (ipc 10 on 28x28: 0.3 MB),
        so it is kept with cache.json in git, unlike the run folder, which a fresh machine does not have."""
        return os.path.join(self.root, 'sets', hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16] + '.pt')

    def _save_set(self, key: list, run_dir: str) -> dict:
        ckpt = torch.load(run_file(run_dir, CHECKPOINT_FILE), weights_only=True)
        final = {'images': ckpt['images'], 'labels': ckpt['labels'], 'syn_lr': ckpt['syn_lr'],
                 'key': json.dumps(key), 'run_dir': run_dir}
        atomic_torch_save(final, self.set_path(key))
        return final

    def final_set(self, recipe: str, flags: list[str], ipc: int, seed: int, wait: bool = True) -> dict | None:
        """The run's final {'images', 'labels', 'syn_lr'}; None if it diverged, or if it is not at hand and
        this study computes nothing (from_cache) or another process is recovering it (wait=False). A run
        cached before sets were kept is recovered from its run folder or, where that is gone, distilled
        again with the same flags and seed; whether that reproduced the cached in-loop curve exactly is
        kept in the cache under ['set', *key] (recovered_sets() reports it)."""
        run = self.run(recipe, flags, ipc, seed, wait=wait)
        if run is MISSING or run.get('diverged'):
            return None
        key = self.run_key(recipe, flags, ipc, seed)
        if not os.path.exists(self.set_path(key)):
            if self.from_cache:
                return None
            got = self.cached(['set', *key], lambda: self._recover_set(recipe, flags, ipc, seed, key, run), wait)
            if got is MISSING:
                return None
        return torch.load(self.set_path(key), weights_only=True)

    def _recover_set(self, recipe: str, flags: list[str], ipc: int, seed: int, key: list, run: dict) -> dict:
        old = run.get('run_dir')
        if old and os.path.exists(run_file(old, CHECKPOINT_FILE)):
            self._save_set(key, old)
            return {'from': old, 'distilled_again': False}
        start = time.time()
        run_dir = self._distill(recipe, self.base[ipc] + flags, ipc, seed)
        if run_dir is None:
            raise RuntimeError(f'{key}: the cached run finished, but distilling it again diverged; the cached '
                               f'scores belong to images that cannot be recovered (see {self.cache_path})')
        self._save_set(key, run_dir)
        same = curve(run_dir, self.setting.model) == run.get('curve')
        if not same:
            print(f'warning: {run_dir} did not reproduce the cached in-loop curve of {old}: its final set is '
                  f'not bit for bit the one the cache scored', flush=True)
        return {'from': run_dir, 'distilled_again': True, 'same_curve': same, 'distill_seconds': time.time() - start}

    def recovered_sets(self, keys: list[list]) -> dict[str, int]:
        """Of these runs' sets: how many were distilled again, and how many of those reproduced their curve."""
        got = [self.cache.get(json.dumps(['set', *k]), {}) for k in keys]
        again = [g for g in got if g.get('distilled_again')]
        return {'distilled_again': len(again), 'same_curve': sum(bool(g.get('same_curve')) for g in again)}

    def evaluate(self, images, labels, lr: float, seed: int, models: list[str] | None = None,
                 epochs: int | None = None, num_eval: int | None = None) -> dict:
        """num_eval fresh networks trained on the set (network i seeded seed + i): test (and, with a split,
        validation) accuracies."""
        data = self.data()
        val = (data.images_val, data.labels_val) if data.images_val is not None else None
        results = evaluate_set(models or [self.setting.model], (data.channel, data.num_classes, data.im_size),
                               images, labels, data.images_test, data.labels_test, lr=lr,
                               epochs=epochs or self.setting.eval_epochs, num_eval=num_eval or self.num_eval,
                               seed=seed, val=val)
        if models:
            return {r.model: {'accs': r.accs, 'val_accs': r.val_accs} for r in results}
        return {'accs': results[0].accs, 'val_accs': results[0].val_accs}


def curve(run_dir: str, model: str) -> list[list]:
    """[[it, test mean, validation mean or None], ...] of the run's in-loop evaluations (1 network each)."""
    with open(run_file(run_dir, METRICS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    return [[r['it'], r[f'eval/{model}_mean'], r.get(f'eval/{model}_val_mean')] for r in rows
            if f'eval/{model}_mean' in r]


def fmt(values: list[float], scale: float = 100.0, digits: int = 2, diverged: int = 0,
        missing: int = 0, runs: int = 0, unit: str = 'seeds') -> str:
    """mean ± std (population) of values; with missing of runs not in the cache, says how many are."""
    note = f' ({diverged} run(s) diverged)' if diverged else ''
    if missing:
        note += f' ({runs - missing} of {runs} {unit} so far)'
    if not values:
        return 'not run yet' if missing == runs and missing else 'diverged' + note
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
    return f'{scale * m:.{digits}f} ± {scale * s:.{digits}f}' + note


# ---------------------------------------------------------------- tables

def smoothness(study: Study) -> str:
    rows = ['| expert recipe | Avg_Var (mean ± std over experts) | expert test acc % | ipc-1 distilled acc % |',
            '| --- | --- | --- | --- |']
    for recipe in RECIPES:
        stats = study.expert_stats(recipe)
        flags = AST_STUDENT if recipe != 'SGD (MTT)' else []
        accs, diverged = study.score(recipe, flags, 1)
        rows.append(f"| {recipe} | {fmt(stats['avg_var'], 1, 5)} | {fmt(stats['test_acc'])} | "
                    f"{fmt(accs, diverged=diverged)} |")
    return '\n'.join(rows)


def ablation(study: Study) -> str:
    recipe = AST_RECIPE
    rows = ['| distillation (smooth experts, student momentum 0.9) | ipc-1 acc % |', '| --- | --- |']
    accs, diverged = study.score('SGD (MTT)', [], 1)
    rows.append(f'| MTT (plain experts, no AST component), reference | {fmt(accs, diverged=diverged)} |')
    for name, flags in ABLATION:
        accs, diverged = study.score(recipe, AST_STUDENT + flags, 1)
        rows.append(f'| {name} | {fmt(accs, diverged=diverged)} |')
    return '\n'.join(rows)


def methods(study: Study) -> str:
    ipcs = sorted(study.iterations)
    rows = ['| method | ' + ' | '.join(f'ipc {i} acc % ({study.iterations[i]} it)' for i in ipcs) + ' |',
            '| --- |' + ' --- |' * len(ipcs)]
    for name, (recipe, flags) in METHODS.items():
        cells = []
        for i in ipcs:
            accs, diverged = study.score(recipe, flags, i)
            cells.append(fmt(accs, diverged=diverged))
        rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def storage(study: Study) -> str:
    """On-disk size of full vs MCT-compressed buffers for 50-epoch experts."""
    path = os.path.join(study.root, 'buffers', 'SGD_50ep')
    buffer.main(['--num_experts', '2', '--train_epochs', '50', '--buffer_path', path])
    stats = compress_buffers.main(['--buffer_path', path, '--dataset', 'Digits', '--k', '4'])
    return ('| buffer (2 experts x 50 epochs, ConvNetD2) | bytes on disk |\n| --- | --- |\n'
            f"| MTT, 51 snapshots each | {stats['bytes_full']:,} |\n"
            f"| MCT, 4 waypoints + per-layer path fractions | {stats['bytes_compressed']:,} |\n"
            f"| ratio compressed / full | {stats['ratio']:.4f} (4/51 = {4 / 51:.4f}) |")


def perturbation_ratios(draws: int = 5) -> str:
    """||δ|| / ||θ|| over all parameters of a fresh network, for each weight-perturbation variant
    (docs/method.md): the paper's ρ-scaled per-filter d, and the authors' d/||d||_F ⊙ θ on conv weights."""
    from trajmatch.ast_components import perturb_start
    from networks import get_network
    from reparam_module import ReparamModule
    rows = ['| network (input) | paper: mean (min-max) | code: mean (min-max) |', '| --- | --- | --- |']
    for model, shape in (('ConvNet', (3, 10, (32, 32))), ('ConvNetD2', (1, 10, (8, 8)))):
        torch.manual_seed(0)
        rep = ReparamModule(get_network(model, *shape))
        flat = rep.flat_param().detach()
        cells = []
        for variant in ('paper', 'code'):
            r = [float((perturb_start(flat, rep.param_shapes, rho=0.1, variant=variant,
                                      generator=torch.Generator().manual_seed(s)) - flat).norm() / flat.norm())
                 for s in range(draws)]
            cells.append(f'{sum(r) / len(r):.4f} ({min(r):.4f}-{max(r):.4f})')
        rows.append(f'| {model} ({shape[0]}x{shape[2][0]}x{shape[2][1]}) | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows) + f'\n\n{draws} draws each, ρ = 0.1 for the paper variant.'


def worker_share(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split('/'))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N, e.g. 0/2 and 1/2 for two processes") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text!r}: K counts from 0 to N-1, e.g. 0/2 and 1/2")
    return k, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('study', choices=['smoothness', 'ablation', 'methods', 'all', 'perturb', 'fmnist'])
    p.add_argument('--root', default=None, help='default: results (Digits), results/fmnist (fmnist)')
    p.add_argument('--data_path', default='/usr/share/datasets/fashion-mnist',
                   help="fmnist: the idx files (Debian's dataset-fashion-mnist puts them here)")
    p.add_argument('--smoke', action='store_true',
                   help='fmnist: a seconds-long pass of the whole study (2 tiny experts, a few iterations), for CI')
    p.add_argument('--ipcs', type=int, nargs='+', default=[1, 10], help='fmnist: the ipcs of the tables')
    p.add_argument('--worker', type=worker_share, default=None, metavar='K/N',
                   help='fmnist: run the K-th of N shares of the distillations, then any run no other process '
                        'has started (N processes, one per core or GPU, sharing the cache; K counts from 0), '
                        'no tables; then run without --worker')
    p.add_argument('--from_cache', action='store_true',
                   help='fmnist: compute nothing; write the tables from what the cache holds so far (a progress '
                        'report: cells short of runs say how many seeds they have)')
    p.add_argument('--seeds', type=int, default=3, help='distillation seeds per cell')
    p.add_argument('--num_eval', type=int, default=5, help='evaluation networks per distilled set')
    p.add_argument('--iterations', type=int, default=200, help='distillation iterations at ipc 1')
    p.add_argument('--iterations_ipc10', type=int, default=100, help='distillation iterations at ipc 10')
    p.add_argument('--seeds_ipc10', type=int, default=1, help='distillation seeds at ipc 10 (CPU time)')
    args = p.parse_args(argv)
    if args.study == 'fmnist':
        from studies import fmnist as fmnist_study
        if not set(args.ipcs) <= set(fmnist_study.ITERATIONS):
            p.error(f"--ipcs {' '.join(map(str, args.ipcs))}: the study has iteration budgets for ipc "
                    f"{' and '.join(map(str, fmnist_study.ITERATIONS))} only (fmnist_study.ITERATIONS)")
        if args.worker and args.from_cache:
            p.error('--worker computes its share and --from_cache computes nothing: give one of them')
        root = args.root or os.path.join('results', 'fmnist')
        kw = dict(fmnist_study.SMOKE) if args.smoke else dict(seeds=args.seeds, num_eval=args.num_eval,
                                                               ipcs=tuple(args.ipcs))
        kw.update(worker=args.worker, from_cache=args.from_cache)
        for name, table in fmnist_study.run(root, args.data_path, **kw).items():
            print(f'## {name}\n\n{table}\n')
        return
    args.root = args.root or 'results'
    if args.study == 'perturb':
        print(perturbation_ratios())
        return
    os.makedirs(args.root, exist_ok=True)
    study = Study(args.root, args.seeds, args.num_eval, {1: args.iterations})
    todo = ['smoothness', 'ablation', 'methods'] if args.study == 'all' else [args.study]
    header = (f'Digits, ConvNetD2, 10 experts x 20 epochs per recipe; final images scored by {args.num_eval} '
              f'networks (MTT evaluation, E = 1000: 1001 epochs); mean ± std over {args.seeds} distillation '
              f'seeds x {args.num_eval} networks.')
    for name in todo:
        if name == 'methods':
            table = methods(study)
            study10 = Study(args.root, args.seeds_ipc10, args.num_eval, {10: args.iterations_ipc10})
            table += '\n\n' + methods(study10).replace('| method |', '| method (ipc 10) |')
            table += f'\n\nipc 10: {args.seeds_ipc10} seed(s) x {args.num_eval} networks.\n\n' + storage(study)
        else:
            table = {'smoothness': smoothness, 'ablation': ablation}[name](study)
        text = f'<!-- written by: python experiments.py {name} -->\n{header}\n\n{table}\n'
        with open(os.path.join(args.root, f'{name}.md'), 'w') as f:
            f.write(text)
        print(text)


if __name__ == '__main__':
    main()
