"""The house: MTT's names at the root, the library in one package, and no import cycle among the project's
modules (every import counts, at the top of a file or inside a function), read from the source with `ast`."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ('trajmatch', 'studies', 'tools')


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the root's modules and the project's packages (tests are not modules)."""
    mods = {p.stem: p for p in ROOT.glob('*.py')}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).glob('*.py'):
            mods[pkg if p.stem == '__init__' else f'{pkg}.{p.stem}'] = p
    return mods


def imports_of(path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
            names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in mods else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in mods)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS with colours)."""
    state, stack_of = {}, {}
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start], stack_of[start] = 1, 0
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_no_import_cycle_among_the_projects_modules():
    mods = project_modules()
    graph = {name: imports_of(path, mods) - {name} for name, path in mods.items()}
    assert sum(map(len, graph.values())) > 50  # the graph is really read
    assert 'trajmatch.matching' in graph['distill']
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_root_is_mtts_house():
    root_py = sorted(p.name for p in ROOT.glob('*.py'))
    assert len(root_py) <= 10, root_py
    for name in ('buffer.py', 'distill.py', 'eval.py', 'networks.py', 'reparam_module.py', 'utils.py'):
        assert name in root_py
    for name in ('buffer.sh', 'distill.sh', 'requirements.txt', 'README.md', 'LICENSE'):
        assert (ROOT / name).is_file(), name
    assert len(list((ROOT / 'trajmatch').glob('*.py'))) > 10
