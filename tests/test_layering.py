"""The package's layering, read from its source: every import (module level and inside functions, relative and
absolute) resolved to a module of the package, and checked against the tiers below.

A unit is a top-level package or module of ``timm_ensembles`` (``models``, ``train``, ``metrics``, ...; the package's
own ``__init__`` is the unit ``__init__``). A unit imports only units of a lower tier (and itself), so that there is
no cycle and nothing imports upwards; it never imports a name starting with ``_`` from another unit, nor a module
whose file name starts with ``_``. No file of the package is longer than ``MAX_LINES``, and none longer than
``TARGET_LINES`` beyond the known ones (``KNOWN_LONG``).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_ensembles'
NAME = PACKAGE.name

# written once: a unit may import the units of lower tiers, none of its own tier and none above
TIERS = [
    {'version', 'utils'},                       # 0: no import of the package beyond these
    {'files', 'losses', 'task', 'data'},        # 1: the file formats, losses, the task base, datasets and loaders
    {'metrics'},                                # 2: metrics, a package (on top of the losses' feature checks)
    {'models'},                                 # 3: the ensemble container, builder, registry, strategies, loading
    {'methods'},                                # 4: one module per method
    {'train'},                                  # 5: the trainer, its engine, checkpoints, snapshots, calibration
    {'hub', 'analysis'},                        # 6: publishing; the analysis of runs
    {'inference'},                              # 7: what the commands share (load a model, read a dataset)
    {'export', 'predict', 'validate'},          # 8: the commands
    {'__init__'},                               # 9: the public API
]
TIER = {unit: i for i, units in enumerate(TIERS) for unit in units}

MAX_LINES = 600
TARGET_LINES = 550
# files still longer than the target, with their size when this list was written (they may shrink, not grow): the
# target is none
KNOWN_LONG: dict[str, int] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        found['.'.join(parts)] = path
    return found


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else '__init__'


def _imports(module: str, path: Path):
    """(line, target module, imported name or None) for every import of the package in ``module``."""
    package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == NAME or alias.name.startswith(f'{NAME}.'):
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                source = '.'.join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ''
            if source != NAME and not source.startswith(f'{NAME}.'):
                continue
            for alias in node.names:
                sub = f'{source}.{alias.name}'
                # `from pkg import module` imports the module; `from module import name` imports from the module
                yield (node.lineno, sub, None) if sub in MODULES else (node.lineno, source, alias.name)


def _edges():
    for module, path in MODULES.items():
        for line, target, name in _imports(module, path):
            assert target in MODULES, f'{path.relative_to(PACKAGE.parent)}:{line}: imports {target}, no such module'
            yield module, path, line, target, name


def _where(path: Path, line: int) -> str:
    return f'{path.relative_to(PACKAGE.parent)}:{line}'


def test_every_unit_has_a_tier():
    units = {_unit(m) for m in MODULES}
    assert units <= set(TIER), f'units without a tier in TIERS: {sorted(units - set(TIER))}'


def test_no_import_goes_upwards_or_sideways():
    wrong = []
    for module, path, line, target, _ in _edges():
        source, dest = _unit(module), _unit(target)
        if source != dest and TIER[dest] >= TIER[source]:
            wrong.append(f'{_where(path, line)}: {source} (tier {TIER[source]}) imports {target} ({dest}, tier'
                         f' {TIER[dest]})')
    assert not wrong, 'imports of a unit of the same or a higher tier:\n' + '\n'.join(wrong)


def test_no_cycle_between_units():
    graph = {}
    for module, _, _, target, _ in _edges():
        if _unit(module) != _unit(target):
            graph.setdefault(_unit(module), set()).add(_unit(target))

    def visit(unit, stack):
        if unit in stack:
            return stack[stack.index(unit):] + [unit]
        for dest in sorted(graph.get(unit, ())):
            cycle = visit(dest, stack + [unit])
            if cycle:
                return cycle
        return None

    for unit in sorted(graph):
        cycle = visit(unit, [])
        assert cycle is None, f'import cycle between units: {" -> ".join(cycle)}'


def test_no_private_name_or_module_is_imported_from_another_unit():
    wrong = []
    for module, path, line, target, name in _edges():
        if _unit(module) == _unit(target):
            continue  # inside one unit, private helpers may stay private
        private_module = [p for p in target.split('.')[1:] if p.startswith('_') and not p.startswith('__')]
        if name and name.startswith('_') and not (name.startswith('__') and name.endswith('__')):
            wrong.append(f'{_where(path, line)}: {module} imports {name} from {target}')
        elif private_module:
            wrong.append(f'{_where(path, line)}: {module} imports the private module {target}')
    assert not wrong, 'private names imported across units (make them public or move them):\n' + '\n'.join(wrong)


def test_the_layering_walk_sees_imports():
    # the walk itself: function-level, relative and `from pkg import module` imports are all found
    edges = {(m, t, n) for m, _, _, t, n in _edges()}
    assert (f'{NAME}.train.inputs', f'{NAME}.data', None) in edges  # from .. import data as te_data
    assert (f'{NAME}.export', f'{NAME}.train.cli', 'ArgumentParser') in edges  # inside a function
    assert (f'{NAME}', f'{NAME}.export', 'export') in edges


def test_no_file_is_longer_than_the_limit():
    sizes = {p.relative_to(PACKAGE.parent).as_posix(): len(p.read_text(encoding='utf-8').splitlines())
             for p in MODULES.values()}
    longest = max(sizes, key=sizes.get)
    over = {f: n for f, n in sizes.items() if n > MAX_LINES}
    assert not over, f'files over {MAX_LINES} lines (the longest: {longest}, {sizes[longest]}): {over}'
    unlisted = {f: n for f, n in sizes.items() if n > TARGET_LINES and f not in KNOWN_LONG}
    assert not unlisted, f'files over {TARGET_LINES} lines, not in KNOWN_LONG: {unlisted}'
    grown = {f: (sizes.get(f), n) for f, n in KNOWN_LONG.items() if sizes.get(f, 0) > n}
    assert not grown, f'known long files that grew (now, listed): {grown}'
