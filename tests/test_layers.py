"""The package's imports point one way: down the layers of ``channels/__init__.py``.

The table in that module's docstring is the one statement of the layering; this test
reads it, parses every module of ``channels/`` with :mod:`ast` (imports inside functions
count, imports under ``if TYPE_CHECKING:`` do not), and fails on an import cycle, on an
import of a higher layer, and on a module missing from the table. The README's design
notes show the same table; a test keeps the two equal.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import channels

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'channels'
_ROW = re.compile(r'^\s*(\d+)\s+(.+?)\s*$')


def _table_rows(text: str) -> list[tuple[int, list[str]]]:
    """The rows ``N  module, module`` after the first mention of layers, up to the blank
    line after the table, in *text* (a docstring or the README's design notes)."""
    lines = text[text.lower().index('layers'):].splitlines()
    rows = []
    for line in lines[1:]:
        line = line.strip().strip('|').replace('|', ' ').replace('`', '')
        match = _ROW.match(line)
        if match:
            names = [n.strip() for n in match.group(2).split(',') if n.strip()]
            rows.append((int(match.group(1)), names))
        elif rows and line == '':
            break
    return rows


def layers() -> dict[str, int]:
    """Module name -> layer number, from ``channels/__init__.py``'s docstring."""
    table = {}
    for number, names in _table_rows(channels.__doc__):
        for name in names:
            table[name] = number
    return table


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or \
        (isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _imports(tree: ast.AST, own: str, modules: set[str]) -> set[str]:
    """The package modules that the module *own* imports, anywhere in *tree* but under
    ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:         # from . import x
                found.update(a.name for a in node.names if a.name in modules)
            elif node.level == 1:                                 # from .x import y
                found.add(node.module.split('.')[0])
            elif node.module and node.module.split('.')[0] == 'channels':
                parts = node.module.split('.')
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split('.')
                if parts[0] == 'channels' and len(parts) > 1:
                    found.add(parts[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(own)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """Module name -> the package modules it imports."""
    paths = {p.stem: p for p in PACKAGE.glob('*.py')}
    modules = set(paths)
    return {name: _imports(ast.parse(path.read_text()), name, modules)
            for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                strong(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strong(node)
    return found


def test_every_module_has_a_layer():
    missing = sorted(set(import_graph()) - set(layers()))
    assert not missing, f'add these modules to the Layers table in channels/__init__.py: {missing}'


def test_the_layers_table_names_only_modules_that_exist():
    extra = sorted(set(layers()) - set(import_graph()))
    assert not extra, f'the Layers table names modules that do not exist: {extra}'


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_no_module_imports_a_higher_layer():
    table = layers()
    upward = [f'{name} (layer {table[name]}) imports {target} (layer {table[target]})'
              for name, targets in sorted(import_graph().items()) if name in table
              for target in sorted(targets) if target in table and table[target] > table[name]]
    assert upward == []


def test_the_broker_process_does_not_import_the_app_runtime():
    graph = import_graph()
    seen, todo = set(), ['broker']
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert 'runtime' not in seen and 'channel' not in seen


@pytest.mark.parametrize('module', ['workers', 'ordering', 'handlers'])
def test_the_worker_machinery_does_not_know_channel(module):
    assert 'channel' not in import_graph()[module]


def test_settings_imports_nothing_above_errors():
    table = layers()
    assert all(table[target] <= table['errors'] for target in import_graph()['settings'])


def test_nothing_imports_the_command_line():
    importers = sorted(name for name, targets in import_graph().items()
                       if 'cli' in targets and name != '__main__')
    assert importers == []


def test_the_readme_shows_the_same_layers():
    readme = (ROOT / 'README.md').read_text()
    notes = readme[readme.index('Design notes'):]
    shown = {name: number for number, names in _table_rows(notes) for name in names}
    assert shown == layers()


def test_the_check_sees_a_cycle_and_ignores_type_checking_imports():
    source = ('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n'
              'def late():\n    from .c import C\n')
    assert _imports(ast.parse(source), 'a', {'a', 'b', 'c'}) == {'c'}
    assert _cycles({'a': {'c'}, 'c': {'a'}, 'b': set()}) == [['a', 'c']]
