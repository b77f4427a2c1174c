"""What imports what: imports go down only (LAYERS), the process harness (ringwise.testing) is
imported by measuring code alone, the planner and the CLI's parser run without torch, a bench
suite imports no other suite, and no module of ringwise/ is part of an import cycle.

The import graph is read from the source with `ast`, not by importing: every `import` and
`from ... import` statement of a module counts, at module level or inside a function (a
lazy import still closes a cycle the moment it runs), with relative imports resolved.
`from pkg import name` is an edge to the submodule pkg.name where one exists, else to pkg
itself (its __init__). Importing pkg.mod also runs pkg/__init__, but that implied parent
import is not an edge: the parent's __init__ runs first and complete whatever the child
needs, so it cannot close a cycle through the child. Imports by string at run time
(ringwise.__init__'s lazy _PUBLIC table, ringwise.bench.suite(), the CLI's COMMANDS
table) are not statements and are not edges either: they load on demand, by design.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ringwise"


# ---------------------------------------------------------------- the graph, from the source


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root (a package's is its __init__.py)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> dict[str, bool]:
    """The package's modules that `source` imports -> True where only lazily (inside a function)."""
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, bool] = {}

    def add(target: str, lazy: bool):
        while target and target not in known:  # `import a.b.c` where c is a name: a.b
            target = target.rpartition(".")[0]
        if target and target != module:
            found[target] = found.get(target, True) and lazy

    def walk(node, lazy: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, lazy)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    base = ".".join(base + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in known else base, lazy)
            walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(source), False)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, bool]]:
    """Module -> {imported module of the package: lazy?}."""
    files = module_files(root)
    return {
        name: imports_of(name, path.read_text(), path.name == "__init__.py", set(files)) for name, path in files.items()
    }


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle_path(graph: dict[str, dict], component: list[str]) -> list[str]:
    """One concrete loop a -> b -> ... -> a inside `component`, for the failure message."""
    members, start = set(component), component[0]
    paths, seen = [[start]], {start}
    while paths:  # breadth first: the shortest loop back to start
        path = paths.pop(0)
        for w in sorted(graph[path[-1]]):
            if w == start:
                return path + [start]
            if w in members and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"{component} is not a cycle")


def test_the_import_reader_sees_relative_lazy_and_package_imports(tmp_path):
    """The reader itself on a made-up package: else a blind reader would pass everything."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("HELPER = 1\n")
    (pkg / "a.py").write_text("from . import b, HELPER\nimport pkg.sub.c\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n    return c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom ..b import f\nimport os\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b": False, "pkg": False, "pkg.sub.c": False}
    assert graph["pkg.b"] == {"pkg.sub.c": True}
    assert graph["pkg.sub.c"] == {"pkg.a": False, "pkg.b": False}
    assert graph["pkg"] == {} and graph["pkg.sub"] == {}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert a_cycle_path(graph, ["pkg.a", "pkg.b", "pkg.sub.c"]) == ["pkg.a", "pkg.sub.c", "pkg.a"]  # shortest
    del graph["pkg.b"]["pkg.sub.c"]
    assert cycles(graph) == [["pkg.a", "pkg.sub.c"]]


def test_the_reader_finds_ringwise_imports_lazy_ones_included():
    graph = import_graph()
    assert len(graph) > 40 and "ringwise.bench.common" in graph
    assert graph["ringwise.bench.compute"]["ringwise.bench.common"] is False
    assert graph["ringwise.commands.train"]["ringwise.train.summary"] is True  # inside run()
    assert graph["ringwise.bench.attention"]["ringwise"] is False  # `import ringwise`


def test_no_import_cycle_in_ringwise():
    graph = import_graph()
    found = list(cycles(graph))
    assert not found, "import cycles: " + "; ".join(" -> ".join(a_cycle_path(graph, c)) for c in found)


# ---------------------------------------------------------------- the layers: imports go down only

# Lowest first. A module may import modules of its own layer and of the layers below, never one
# above; a module belongs to the entry naming it or its nearest package ("ringwise" itself, the
# package's front door, only by that exact name). Every module of ringwise/ must have a layer: a
# new top-level module or package is placed here on purpose.
LAYERS = (
    ("ringwise.presets",),  # model shapes, torch-free: the model and the planner share them
    ("ringwise.plan",),  # the paper's memory/overlap model, torch-free
    ("ringwise", "ringwise.attention"),  # the op; the front door loads attention's names lazily
    ("ringwise.checkpointing",),  # what a checkpointed layer keeps (the model's and finetune's)
    ("ringwise.model",),
    ("ringwise.data",),
    ("ringwise.generate",),  # generation over the sharded KV cache (the library function)
    ("ringwise.integrations",),  # transformers; the finetune job imports it
    ("ringwise.train",),  # the training job, its plots (train.plots) included
    ("ringwise.testing",),  # the process harness of the tests and benchmarks (cluster, comms, memory)
    ("ringwise.bench",),  # the benchmark suites
    ("ringwise.commands",),  # one module per `ringwise` command
    ("ringwise.cli", "ringwise.train.__main__"),  # the entry points: `ringwise`, `python -m ringwise.train`
)

# The harness is test and benchmark code: inside ringwise/ only what measures imports it (module
# or package -> why). Anything else importing it fails test_only_measuring_code_imports_the_harness.
HARNESS_USERS = {
    "ringwise.bench": "the benchmark suites run on its process rings and memory probes",
    "ringwise.commands.demo": "a measurement: ring attention on LocalCluster ranks, PeakMemory, against SDPA",
    "ringwise.commands.generate": "its report counts the collectives per decoded token (count_comms)",
}


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index in `layers` of the entry that names `module` or its nearest package; None if none."""
    best = None  # (length of the matching name, layer)
    for i, names in enumerate(layers):
        for name in names:
            inside = module == name or ("." in name and module.startswith(name + "."))
            if inside and (best is None or len(name) > best[0]):
                best = (len(name), i)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, dict], layers=LAYERS) -> list[str]:
    """Every import of a module in a higher layer than the importer's, lazy ones included."""
    return [
        f"{a} (layer {layer_of(a, layers)}) imports {b} (layer {layer_of(b, layers)})" + (" lazily" if lazy else "")
        for a, targets in sorted(graph.items())
        for b, lazy in sorted(targets.items())
        if layer_of(b, layers) > layer_of(a, layers)
    ]


def test_the_layer_check_catches_an_upward_import():
    """The check itself, on made-up graphs: else a check that sees nothing would pass everything."""
    assert layer_of("ringwise.train.plots") == layer_of("ringwise.train") < layer_of("ringwise.train.__main__")
    assert layer_of("ringwise") == layer_of("ringwise.attention.ring") < layer_of("ringwise.model")
    assert layer_of("ringwise.nowhere") is None
    graph = {
        "ringwise.train.loop": {"ringwise.train.plots": True, "ringwise.model": False},
        "ringwise.train.plots": {},
        "ringwise.model": {},
    }
    assert upward_imports(graph) == []
    graph["ringwise.train.loop"]["ringwise.commands.demo"] = True
    graph["ringwise.model"]["ringwise.data.text"] = False
    graph["ringwise.commands.demo"], graph["ringwise.data.text"] = {}, {}
    assert upward_imports(graph) == [
        f"ringwise.model (layer {layer_of('ringwise.model')}) imports ringwise.data.text "
        f"(layer {layer_of('ringwise.data')})",
        f"ringwise.train.loop (layer {layer_of('ringwise.train')}) imports ringwise.commands.demo "
        f"(layer {layer_of('ringwise.commands')}) lazily",
    ]


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if layer_of(m) is None]
    assert not unplaced, f"modules in no layer of LAYERS (place them): {unplaced}"


def test_imports_go_down_only():
    """attention < model < data < generate < integrations < train < testing < bench < commands < cli:
    no module imports one above its layer, not even inside a function."""
    found = upward_imports(import_graph())
    assert not found, "imports that run up the layers:\n  " + "\n  ".join(found)


def test_only_measuring_code_imports_the_harness():
    def user(module):
        return any(module == u or module.startswith(u + ".") for u in HARNESS_USERS)

    graph = import_graph()
    found = [
        f"{a} imports {b}"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if b.startswith("ringwise.testing") and not a.startswith("ringwise.testing") and not user(a)
    ]
    assert not found, "the test/benchmark harness imported by product code: " + "; ".join(found)
    assert all(layer_of(u) > layer_of("ringwise.testing") for u in HARNESS_USERS)


# ---------------------------------------------------------------- bench suites stand alone


def suite_modules() -> dict[str, str]:
    from ringwise.bench import _MODULES, OPTIONAL, SUITES

    return {name: f"ringwise.bench.{_MODULES.get(name, name)}" for name in SUITES + OPTIONAL}


def module_level_closure(graph, start: str) -> set[str]:
    """Every module that importing `start` imports (lazy imports not run)."""
    seen, todo = {start}, [start]
    while todo:
        for w, lazy in graph[todo.pop()].items():
            if not lazy and w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.mark.parametrize("suite", sorted(suite_modules()))
def test_a_bench_suite_imports_no_other_suite(suite):
    modules = suite_modules()
    graph = import_graph()
    others = set(modules.values()) - {modules[suite]}
    assert not module_level_closure(graph, modules[suite]) & others
    lazy = {w for w in graph[modules[suite]] if w in others}
    assert not lazy


def test_every_suite_keeps_its_flags_and_the_shared_names():
    """Suites' `add_arguments` are flags.py's groups; the tables flags.py names by string
    (--gpu-dtype, --gpu-methods) match the suites' torch-side ones."""
    from ringwise.bench import flags, suite
    from ringwise.train.config import DTYPES

    for name in suite_modules():
        assert suite(name).add_arguments is flags.SUITE_FLAGS[name]
    assert tuple(DTYPES) == flags.GPU_DTYPES and set(flags.DECODE_DTYPES) <= set(DTYPES)
    assert tuple(suite("context").METHODS) == flags.CONTEXT_METHODS


# ---------------------------------------------------------------- without torch


def run_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, ringwise from this checkout."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)


NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError


def test_plan_runs_without_torch():
    done = run_python(
        NO_TORCH + "from ringwise.cli import main\n"
        "sys.exit(main(['plan', '--model', 'llama-7b', '--hardware', 'a100-nvlink', '--devices', '8']))"
    )
    assert done.returncode == 0, done.stderr
    assert "llama-7b" in done.stdout and "longest context:" in done.stdout and "reach it:" in done.stdout


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["--help"], "{demo,train,finetune,export,generate,plan,bench}"),
        (["plan", "--help"], "--devices-per-node"),
        (["generate", "--help"], "--retrieval"),
    ],
)
def test_help_runs_without_torch(argv, shown):
    done = run_python(NO_TORCH + f"from ringwise.cli import main\nmain({argv!r})")
    assert done.returncode == 0, done.stderr  # argparse's --help exits 0
    assert done.stdout.startswith("usage: ringwise") and shown in done.stdout


def test_bench_parser_imports_no_suite():
    """`ringwise bench attention --help` lists every suite's flags, yet imports no suite, nor torch;
    a parsed `bench compute` command line neither."""
    code = (
        "import json, sys\nfrom ringwise.cli import build_parser, main\n"
        "try:\n    main(['bench', 'attention', '--help'])\nexcept SystemExit as e:\n    code = e.code\n"
        "args = build_parser(['bench']).parse_args(['bench', 'compute', '--compute-seq-len', '64',\n"
        "                                            '--repeats', '2'])\n"
        "print(json.dumps(dict(code=code, modules=sorted(m for m in sys.modules if m.startswith('ringwise')),"
        " torch='torch' in sys.modules, repeats=args.repeats)))"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["code"] == 0 and report["repeats"] == 2 and not report["torch"]
    assert not set(report["modules"]) & set(suite_modules().values()), report["modules"]
    for flag in ("--seq-len", "--compute-seq-len", "--ulysses-meshes", "--budget-mib", "--peer-seq-len"):
        assert flag in done.stdout  # the help printed before the JSON line
