"""The import graph of flash_jax: no cycle, and no module importing from a layer above its own.

Layers, bottom up: the data sources (`flash_jax.data.*` but the cache writer); the model
(`pipeline`, `models`, `diffusion`, `sampling`, `weights`, and the tokenizer it reads captions
with); the trainer (`train.*`, which knows methods only through `flash_jax.methods.Method`); the
methods and the frozen-model loaders; evaluation; the jobs on top (`main`, `demo`, `export`, the
cache writer `data.cache`). Imports inside functions count like the others.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flash_jax"

MODEL = ("flash_jax.t2i", "flash_jax.models", "flash_jax.diffusion", "flash_jax.sampling")
MODEL += ("flash_jax.weights", "flash_jax.data.tokenizer")
JOBS = ("flash_jax.main", "flash_jax.demo", "flash_jax.export", "flash_jax.data.cache")
METHODS = ("flash_jax.methods.", "flash_jax.frozen")  # the implementations, not the interface
TRAIN = ("flash_jax.train",)
EVAL = ("flash_jax.eval",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """`{module: the flash_jax modules it imports}` (a `from pkg import mod` names `pkg.mod`)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("flash_jax")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flash_jax"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if _is_module(sub) else node.module)
        graph[_module_name(path)] = deps
    return graph


def _in(name: str, groups: tuple[str, ...]) -> bool:
    return any(name == g or name.startswith(g if g.endswith(".") else g + ".") for g in groups)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep, [*stack, dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "flash_jax.data.datasets" in graph["flash_jax.data.sources"]
    assert "flash_jax.t2i" in graph["flash_jax.frozen"]


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_no_module_imports_from_a_layer_above():
    above = {
        "data": MODEL + TRAIN + METHODS + EVAL + JOBS,
        "model": TRAIN + METHODS + EVAL + JOBS + ("flash_jax.data.",),
        "train": METHODS + EVAL + JOBS + ("flash_jax.t2i",),
        "methods": (*JOBS, "flash_jax.eval.evaluate"),
    }
    wrong = []
    for module, deps in import_graph().items():
        if _in(module, JOBS):
            continue
        if module.startswith("flash_jax.data."):
            layer = "data"
        elif _in(module, MODEL):
            layer = "model"
        elif _in(module, TRAIN):
            layer = "train"
        elif _in(module, METHODS):
            layer = "methods"
        else:
            continue
        for dep in deps:
            if _in(dep, above[layer]) and not (layer == "model" and _in(dep, MODEL)):
                wrong.append(f"{module} ({layer}) imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))
