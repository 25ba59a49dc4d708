"""The package's layout: no import cycle between its modules (function-level imports included), each room
imports only the rooms below it, and the CLI's help loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_colab"
SHARED = {"errors", "dtypes", "closeable", "memory", "progress"}  # the root modules every room may use
# room -> the rooms it may import (besides itself and SHARED); the root's cli, configs, __init__, __main__
# sit on top and may import anything
BELOW = {
    "io": set(),
    "arch": {"io"},
    "lora": {"io", "arch"},
    "lowrank": {"io"},
    "extraction": {"io", "arch", "lora", "lowrank"},
    "resizing": {"io", "arch", "lora", "lowrank"},
    "notebook": {"io", "arch", "lora", "lowrank", "extraction", "resizing", "configs"},
}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """Modules of the package that `path` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lora_colab":
                continue
            for alias in node.names:  # `from . import x`: x may be a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lora_colab")
    return {m for m in found if m != name and _exists(m)}


def _exists(module):
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph():
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycle_between_modules():
    edges = graph()
    # a package's __init__ re-exporting its own modules is not a cycle of their code
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and t in edges)} for m, ts in edges.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))
    sys.setrecursionlimit(10000)
    for node in edges:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_each_room_imports_only_the_rooms_below_it():
    wrong = []
    for module, targets in graph().items():
        here = room(module)
        if here not in BELOW and here not in SHARED:
            continue  # the root's cli, configs, __init__, __main__
        allowed = SHARED | ({here} if here in BELOW else set()) | BELOW.get(here, set())
        if here in SHARED:
            allowed = SHARED
        wrong += [f"{module} -> {t}" for t in targets if room(t) not in allowed and t != "lora_colab"]  # __version__
    assert not wrong, wrong


def test_the_root_holds_only_what_every_room_shares():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == SHARED | {"__init__", "__main__", "cli", "configs"}, root


def test_the_cli_help_loads_no_torch():
    code = "import sys, lora_colab.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_every_room_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) >= 2 and "import" in doc.lower(), init


MAX_LINES, MAX_PARAMS, WRAPPER_BODY = 80, 12, 20


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node


def _params(node):
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return [n for n in names if n not in ("self", "cls")]


def _body_lines(node):
    """Lines of the function's body after its docstring."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_functions_are_short_and_take_few_parameters():
    """No function over 80 lines; none with more than 12 parameters except thin public wrappers (a public name,
    at most 20 lines after the docstring, handing the options on)."""
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > MAX_LINES]
    wide = [f"{path}:{node.lineno} {node.name} ({len(_params(node))} parameters)" for path, node in _functions()
            if len(_params(node)) > MAX_PARAMS and (node.name.startswith("_") or _body_lines(node) > WRAPPER_BODY)]
    assert not long and not wide, long + wide
