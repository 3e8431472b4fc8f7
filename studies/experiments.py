"""Studies, written as Markdown tables into results/: Digits (this module) and Fashion-MNIST (`fmnist`,
studies/fmnist.py). Run from the repository root:

    python -m studies smoothness   # AST Table VII analogue: expert recipes -> Avg_Var, expert acc, ipc-1 distilled acc
    python -m studies ablation     # AST Table VIII analogue at ipc 1: smooth experts -> +kmeans -> ... -> +perturb
    python -m studies methods      # MTT vs AST vs ATT vs MCT at ipc 1 and 10, plus MCT storage
    python -m studies all
    python -m studies perturb      # ||δ|| / ||θ|| of both weight-perturbation variants on fresh ConvNets
    python -m studies fmnist       # Fashion-MNIST: baselines, smoothness, methods, AST ablation, cross-arch

A plain run computes whatever is missing, in this process, then writes the tables. Every result is a cell
(studies/cells.py): one file per cell in results/cells/ (results/fmnist/cells/ for fmnist), computed by one
idempotent command that writes it atomically and does nothing when it exists. On a job runner:

    python -m studies all --list          # the cell commands that can run now, one a line, e.g.
                                          #   python -m studies all --cell e3f69ab91b8a9381
    python -m studies all --list | xargs -P 4 -I{} sh -c {}      # or GNU parallel, or a SLURM array
    python -m studies all --report        # compute nothing: the tables from the cells there (progress)

`--list` prints only the cells whose inputs exist (a distillation once its experts are on disk; on
Fashion-MNIST also once the hyper-parameter grid is complete, and a cross-architecture network once its set
is), so repeat it until it prints nothing, then run the plain command for the tables (see studies/fmnist.py):

    while python -m studies all --list > todo && [ -s todo ]; do xargs -P 4 -I{} sh -c {} < todo || break; done
    python -m studies all

The commands carry the study's flags (--root, --seeds, ...): pass the same ones to --list as to the plain run.
Every distilled set is scored on its FINAL images (not the best-on-test) by --num_eval fresh networks;
table cells are mean ± std over all (distillation seed x network) accuracies.
"""
import argparse
import os
import shlex

import torch

import buffer
import compress_buffers
from studies import fmnist
from studies.cells import (AST_ALL, AST_STUDENT, MISSING, RECIPES, Cell, Study, compute_missing, fmt,
                           missing_cells, remove_study_temps, run_one)
from trajmatch.cli import ITERATIONS, NETWORKS, CliParser, check_flags, cli_entry

# ---------------------------------------------------------------- settings (Digits, CPU)

AST_RECIPE = 'AST code recipe (sgdmom_code + gp + loss decay, code variants: the AST presets)'
ABLATION = [                                                         # cumulative, as the paper's Table VIII
    ('smooth experts', []),
    ('+ K-Means init', ['--pix_init', 'kmeans']),
    ('+ balanced inner loss', ['--pix_init', 'kmeans', '--balance_loss']),
    ('+ intermediate matching', ['--pix_init', 'kmeans', '--balance_loss', '--agg_middle_loss']),
    ('+ weight perturbation', AST_ALL),
]
METHODS = {  # name -> (expert recipe, distill flags)
    'MTT': ('SGD (MTT)', []),
    'AST': (AST_RECIPE, AST_STUDENT + AST_ALL),
    'ATT': ('SGD (MTT)', ['--auto_steps']),
    'MCT': ('SGD (MTT)', ['--mct']),
}
TABLES = ['smoothness', 'ablation', 'methods']


def smoothness_flags(recipe: str) -> list[str]:
    """Student momentum follows the experts' optimiser (0 for SGD, 0.9 with momentum)."""
    return AST_STUDENT if recipe != 'SGD (MTT)' else []


def table_runs(name: str, study: Study, study10: Study) -> list[tuple[Study, str, list[str], int]]:
    """(study, recipe, flags, ipc) of every distillation table `name` scores (each over its study's seeds)."""
    if name == 'smoothness':
        return [(study, recipe, smoothness_flags(recipe), 1) for recipe in RECIPES]
    if name == 'ablation':
        return [(study, 'SGD (MTT)', [], 1)] + [(study, AST_RECIPE, AST_STUDENT + flags, 1) for _, flags in ABLATION]
    return [(st, recipe, flags, ipc) for st, ipc in ((study, 1), (study10, 10)) for recipe, flags in METHODS.values()]


def digits_cells(names: list[str], study: Study, study10: Study):
    """Every cell of the tables `names` whose inputs exist (lazy: experts first, then the runs on them)."""
    needs = [need for name in names for need in table_runs(name, study, study10)]
    for recipe in dict.fromkeys(recipe for _, recipe, _, _ in needs):
        yield study.experts_cell(recipe)
    for st, recipe, flags, ipc in needs:
        if st.experts_ready(recipe):
            for seed in range(st.seeds):
                yield st.run_cell(recipe, flags, ipc, seed)
    if 'methods' in names:
        yield storage_cell(study)


def cell_text(study: Study, recipe: str, flags: list[str], ipc: int) -> str:
    accs, diverged = study.score(recipe, flags, ipc)
    return fmt(accs, diverged=diverged, missing=study.missing(recipe, flags, ipc), runs=study.seeds)


# ---------------------------------------------------------------- tables

def smoothness(study: Study) -> str:
    rows = ['| expert recipe | Avg_Var (mean ± std over experts) | expert test acc % | ipc-1 distilled acc % |',
            '| --- | --- | --- | --- |']
    for recipe in RECIPES:
        stats = study.expert_stats(recipe)
        var, acc = (fmt(stats['avg_var'], 1, 5), fmt(stats['test_acc'])) if stats else ('not run yet',) * 2
        flags = smoothness_flags(recipe)
        accs, diverged = study.score(recipe, flags, 1)
        rows.append(f"| {recipe} | {var} | {acc} | {fmt(accs, diverged=diverged, missing=study.missing(recipe, flags, 1), runs=study.seeds)} |")
    return '\n'.join(rows)


def ablation(study: Study) -> str:
    recipe = AST_RECIPE
    rows = ['| distillation (smooth experts, student momentum 0.9) | ipc-1 acc % |', '| --- | --- |']
    rows.append(f"| MTT (plain experts, no AST component), reference | {cell_text(study, 'SGD (MTT)', [], 1)} |")
    for name, flags in ABLATION:
        rows.append(f'| {name} | {cell_text(study, recipe, AST_STUDENT + flags, 1)} |')
    return '\n'.join(rows)


def methods(study: Study) -> str:
    ipcs = sorted(study.iterations)
    rows = ['| method | ' + ' | '.join(f'ipc {i} acc % ({study.iterations[i]} it)' for i in ipcs) + ' |',
            '| --- |' + ' --- |' * len(ipcs)]
    for name, (recipe, flags) in METHODS.items():
        rows.append(f'| {name} | ' + ' | '.join(cell_text(study, recipe, flags, i) for i in ipcs) + ' |')
    return '\n'.join(rows)


STORAGE_KEY = ['storage', 'SGD_50ep', '--num_experts', '2', '--train_epochs', '50', '--k', '4']


def storage_cell(study: Study) -> Cell:
    """On-disk size of full vs MCT-compressed buffers for 50-epoch experts (trains them: buffers/SGD_50ep)."""
    def compute():
        path = os.path.join(study.root, 'buffers', 'SGD_50ep')
        buffer.main(['--num_experts', '2', '--train_epochs', '50', '--buffer_path', path])
        stats = compress_buffers.main(['--buffer_path', path, '--dataset', 'Digits', '--k', '4'])
        return {k: stats[k] for k in ('bytes_full', 'bytes_compressed', 'ratio')}
    return study.json_cell(STORAGE_KEY, compute)


def storage(study: Study) -> str:
    stats = study.get(STORAGE_KEY)
    if stats is MISSING:
        full = compressed = ratio = 'not run yet'
    else:
        full, compressed = f"{stats['bytes_full']:,}", f"{stats['bytes_compressed']:,}"
        ratio = f"{stats['ratio']:.4f} (4/51 = {4 / 51:.4f})"
    return ('| buffer (2 experts x 50 epochs, ConvNetD2) | bytes on disk |\n| --- | --- |\n'
            f"| MTT, 51 snapshots each | {full} |\n"
            f"| MCT, 4 waypoints + per-layer path fractions | {compressed} |\n"
            f"| ratio compressed / full | {ratio} |")


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


# ---------------------------------------------------------------- command line

# the flags that shape a study (and so its cells), by study: a --list command repeats those given
STUDY_FLAGS = {'fmnist': ['root', 'data_path', 'smoke', 'ipcs', 'seeds', 'num_eval'],
               'digits': ['root', 'seeds', 'num_eval', 'iterations', 'iterations_ipc10', 'seeds_ipc10']}


def cell_command(p: argparse.ArgumentParser, args: argparse.Namespace, digest: str) -> str:
    """The command that computes one cell: `python -m studies <study>`, the study flags given, --cell."""
    words = ['python', '-m', 'studies', args.study]
    for name in STUDY_FLAGS['fmnist' if args.study == 'fmnist' else 'digits']:
        value = getattr(args, name)
        if value == p.get_default(name):
            continue
        if value is True:
            words.append(f'--{name}')
        else:
            words += [f'--{name}', *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return shlex.join(words + ['--cell', digest])


def cells_mode(p, args, enumerate_cells) -> bool:
    """--list / --cell: True when one of them was given (and done)."""
    if args.list:
        for c in missing_cells(enumerate_cells):
            print(cell_command(p, args, c.digest))
        return True
    if args.cell:
        got = run_one(enumerate_cells, args.cell)
        if got == 'unknown':
            p.error(f'--cell {args.cell}: not a cell of this study whose inputs exist (`--list` prints those that '
                    f'can run now; a cell appears there once the cells it needs are done)')
        print(f'cell {args.cell}: ' + ('computed' if got == 'computed' else 'exists, nothing to do'))
        return True
    return False


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog='python -m studies', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('study', choices=[*TABLES, 'all', 'perturb', 'fmnist'])
    p.add_argument('--root', default=None, help='default: results (Digits), results/fmnist (fmnist)')
    p.add_argument('--data_path', default=fmnist.DEBIAN_PATH,
                   help="fmnist: the idx files (Debian's dataset-fashion-mnist puts them here)")
    p.add_argument('--smoke', action='store_true',
                   help='fmnist: a seconds-long pass of the whole study (2 tiny experts, a few iterations), for CI')
    p.add_argument('--ipcs', type=int, nargs='+', default=[1, 10], help='fmnist: the ipcs of the tables')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--list', action='store_true',
                      help='print the commands of the cells still missing whose inputs exist, one a line (for '
                           'xargs -P, GNU parallel or a SLURM array); compute nothing, write no tables')
    mode.add_argument('--cell', metavar='DIGEST',
                      help='compute this one cell (a --list line) unless its result exists; no tables')
    mode.add_argument('--report', action='store_true',
                      help='compute nothing; write the tables from the cells there so far (a progress report: '
                           'table cells short of runs say how many they have)')
    p.add_argument('--seeds', type=int, default=3, help='distillation seeds per cell')
    p.add_argument('--num_eval', type=int, default=5, help='evaluation networks per distilled set')
    p.add_argument('--iterations', type=int, default=200, help='distillation iterations at ipc 1')
    p.add_argument('--iterations_ipc10', type=int, default=100, help='distillation iterations at ipc 10')
    p.add_argument('--seeds_ipc10', type=int, default=1, help='distillation seeds at ipc 10 (CPU time)')
    return p


# flag -> allowed values (--ipcs: the study's iteration budgets, checked in main)
FLAG_DOMAINS = {'seeds': NETWORKS, 'num_eval': NETWORKS, 'iterations': ITERATIONS, 'iterations_ipc10': ITERATIONS,
                'seeds_ipc10': NETWORKS}


@cli_entry
def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_flags(args, FLAG_DOMAINS)
    remove_study_temps(args.root or os.path.join('results', 'fmnist' if args.study == 'fmnist' else ''))
    if args.study == 'fmnist':
        if not set(args.ipcs) <= set(fmnist.ITERATIONS):
            p.error(f"--ipcs {' '.join(map(str, args.ipcs))}: the study has iteration budgets for ipc "
                    f"{' and '.join(map(str, fmnist.ITERATIONS))} only (studies/fmnist.py, ITERATIONS)")
        root = args.root or os.path.join('results', 'fmnist')
        kw = dict(fmnist.SMOKE) if args.smoke else dict(seeds=args.seeds, num_eval=args.num_eval,
                                                         ipcs=tuple(args.ipcs))
        fashion = fmnist.FashionStudy(root, args.data_path, **kw)
        if cells_mode(p, args, fashion.cells):
            return
        for name, table in fmnist.run(root, args.data_path, report=args.report, **kw).items():
            print(f'## {name}\n\n{table}\n')
        return
    root = args.root or 'results'
    if args.study == 'perturb':
        if args.list or args.cell or args.report:
            p.error('perturb has no cells: it computes in seconds and writes no table')
        print(perturbation_ratios())
        return
    study = Study(root, args.seeds, args.num_eval, {1: args.iterations})
    study10 = Study(root, args.seeds_ipc10, args.num_eval, {10: args.iterations_ipc10})
    todo = TABLES if args.study == 'all' else [args.study]
    if cells_mode(p, args, lambda: digits_cells(todo, study, study10)):
        return
    os.makedirs(root, exist_ok=True)
    if not args.report:
        compute_missing(lambda: digits_cells(todo, study, study10))
    header = (f'Digits, ConvNetD2, 10 experts x 20 epochs per recipe; final images scored by {args.num_eval} '
              f'networks (MTT evaluation, E = 1000: 1001 epochs); mean ± std over {args.seeds} distillation '
              f'seeds x {args.num_eval} networks.'
              + (' **A progress report** (`--report`): cells show the runs done so far.' if args.report else ''))
    for name in todo:
        if name == 'methods':
            table = methods(study)
            table += '\n\n' + methods(study10).replace('| method |', '| method (ipc 10) |')
            table += f'\n\nipc 10: {args.seeds_ipc10} seed(s) x {args.num_eval} networks.\n\n' + storage(study)
        else:
            table = {'smoothness': smoothness, 'ablation': ablation}[name](study)
        text = f'<!-- written by: python -m studies {name} -->\n{header}\n\n{table}\n'
        with open(os.path.join(root, f'{name}.md'), 'w') as f:
            f.write(text)
        print(text)


if __name__ == '__main__':
    main()
