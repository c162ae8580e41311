"""Render every measured figure of README.md and docs/*.md from the committed artifacts.

    python docs/render.py          # rewrite the figures in place (make docs)
    python docs/render.py --check  # exit 1 naming doc, figure and artifact on drift (make docs-check)

Standard library only (no JAX): it runs anywhere in a second. Prose stays hand-written; what the
renderer owns is marked with HTML comments, invisible in rendered Markdown.

A doc first binds names to artifacts (paths relative to the repository root):

    <!-- artifacts
    demo: docs/results/demo/results.json
    cmp: docs/results/comparison/results.json
    if3 = match(cmp.rows, "if3_s?|3|eval")
    -->

(`name = EXPR` names a value computed from the names above it.) An inline figure is a Python format spec and an expression over those names; the text between the
markers is what the renderer writes:

    <!-- fig .2f demo["student 3"].fd_judge -->2.27<!-- /fig -->

Expressions allow names, constants, `x[key]`, `x.key` (a dict key), + - * / **, unary minus, lists
and the functions in FUNCTIONS: mean, sd (n - 1), median, min, max over arguments, a list, or
`(rows, "key")`; `match(dict, glob)`, the values whose keys match; `pick(rows, "key", "A", ...)`, the
rows of a list whose key is one of those values (`pick(...)[0]`: one row, not a position); `side(lo, hi, bar)`, "below",
"above" or "not resolved" for a measured range against a bar. A table renders one row per
entry of a JSON dict (the key is the row label) or list:

    <!-- table
    rows: ablations.rows
    keys: if3 => **Imagine Flash 3**; lcm3          (dict rows only; default: every key, in order)
    label: method = name                             (header, and for list rows the label expression)
    col: FD-judge = {.2f fd_judge.mean} ± {.2f fd_judge.ci95}
    -->
    | method | FD-judge |
    ...
    <!-- /table -->

Instead of `rows:` and `keys:`, a table may list its rows one per line, `row: EXPR => label`, each
EXPR a dict or list (`pm(rows, "key", ".2f")` formats mean ± sd over a list of runs). A cell
template is text with {FMT EXPR} placeholders; inside a row the row's own fields are names
too (`row` is the row, `key` its label), and `get(x, k)` gives None (an empty cell) for a missing
key.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import fnmatch
import json
import math
import operator
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _values(args: tuple) -> list:
    """f(a, b, c), f([a, b, c]) or f(rows, "key") (the key of every row) -> [a, b, c]."""
    if len(args) == 2 and isinstance(args[0], list) and isinstance(args[1], str):
        return [row[args[1]] for row in args[0]]
    return list(args[0]) if len(args) == 1 and isinstance(args[0], list) else list(args)


def _reducer(f: Callable[[list], Any]) -> Callable[..., Any]:
    return lambda *args: f(_values(args))


def _pick(rows: list, key: str, *values: Any) -> list:
    """The rows (in their order) whose `key` is one of `values`; a value no row has is an error."""
    missing = [v for v in values if v not in {row.get(key) for row in rows}]
    if missing:
        raise RenderError(f"no row with {key} {missing}")
    return [row for row in rows if row.get(key) in values]


def _pm(values: list, spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{statistics.fmean(values):{spec}} ± {statistics.stdev(values):{spec}}"


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "mean": _reducer(statistics.fmean),
    "sd": _reducer(statistics.stdev),  # sample standard deviation (n - 1), as over seeds
    "median": _reducer(statistics.median),
    "min": _reducer(min),
    "max": _reducer(max),
    # the values of a dict whose keys match a glob, in key order: match(rows, "if3_s?|3|eval")
    "match": lambda d, pattern: [v for k, v in d.items() if fnmatch.fnmatchcase(k, pattern)],
    # the rows of a list whose key is one of the values: pick(cmp.compared.eval, "label", "A", "B")
    "pick": _pick,
    "abs": abs,
    "sqrt": math.sqrt,
    "len": len,
    "get": lambda x, k: x.get(k) if isinstance(x, dict) else None,
    # a claim that a measured range [lo, hi] is below / above a bar: "not resolved" when it spans it
    "side": lambda lo, hi, bar: "below" if hi < bar else "above" if lo > bar else "not resolved",
    # "mean ± sd" of the key over rows (training seeds) formatted with spec; the value alone for one
    "pm": lambda rows, key, spec: _pm([row[key] for row in rows], spec),
}
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}

ARTIFACTS_RE = re.compile(r"<!-- artifacts\n(.*?)-->", re.S)
FIG_RE = re.compile(r"<!-- fig (\S+) (.+?) -->(.*?)<!-- /fig -->")
TABLE_RE = re.compile(r"(<!-- table\n(.*?)-->\n)(.*?)(<!-- /table -->)", re.S)
PLACEHOLDER_RE = re.compile(r"\{(\S+) ([^{}]+)\}")


class RenderError(Exception):
    """A figure that cannot be rendered: bad marker, missing artifact or key."""


@dataclasses.dataclass
class Drift:
    """One rendered figure whose text in the doc differs from what its artifacts give."""

    doc: str
    line: int
    figure: str
    artifacts: list[str]
    found: str
    expected: str

    def __str__(self) -> str:
        return (
            f"{self.doc}:{self.line}: figure `{self.figure}` reads {self.found!r}, but "
            f"{', '.join(self.artifacts) or 'its artifact'} gives {self.expected!r}"
        )


def evaluate(expr: str, names: dict[str, Any]) -> Any:
    """Evaluates a restricted Python expression (see the module docstring) over `names`."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in names:
                return names[node.id]
            if node.id in FUNCTIONS:
                return FUNCTIONS[node.id]
            raise RenderError(f"unknown name {node.id!r}")
        if isinstance(node, ast.Subscript | ast.Attribute):
            obj = ev(node.value)
            key = ev(node.slice) if isinstance(node, ast.Subscript) else node.attr
            try:
                return obj[key]
            except (KeyError, IndexError, TypeError):
                raise RenderError(f"no key {key!r} in {ast.unparse(node.value)}") from None
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Tuple | ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in FUNCTIONS:
                raise RenderError(f"unknown function {node.func.id!r}")
            return FUNCTIONS[node.func.id](*[ev(a) for a in node.args])
        raise RenderError(f"unsupported expression {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise RenderError(f"cannot parse {expr!r}: {e.msg}") from None
    return ev(tree)


def names_in(expr: str) -> set[str]:
    """The names an expression reads (to say which artifacts a figure comes from)."""
    try:
        return {
            n.id for n in ast.walk(ast.parse(expr.strip(), mode="eval")) if isinstance(n, ast.Name)
        }
    except SyntaxError:
        return set()


def fmt(value: Any, spec: str) -> str:
    """format(value, spec); None is an empty cell, spec 's' any value as text."""
    if value is None:
        return ""
    if spec == "s":
        return str(value)
    try:
        return format(value, spec)
    except (ValueError, TypeError) as e:
        raise RenderError(f"cannot format {value!r} with {spec!r}: {e}") from None


def fill(template: str, names: dict[str, Any]) -> str:
    """Replaces each {FMT EXPR} placeholder of a cell template."""
    return PLACEHOLDER_RE.sub(lambda m: fmt(evaluate(m.group(2), names), m.group(1)), template)


LET_RE = re.compile(r"^\s*(\w+)\s*=\s*(.+)$")


def load_artifacts(text: str, root: Path, doc: str) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Reads the doc's `<!-- artifacts -->` blocks: name -> value, and name -> the artifact paths
    it comes from. A line `name: path` loads a JSON file; `name = EXPR` names an expression over
    the names above it."""
    data: dict[str, Any] = {}
    paths: dict[str, set[str]] = {}
    for block in ARTIFACTS_RE.finditer(text):
        for line in block.group(1).strip().splitlines():
            if let := LET_RE.match(line):
                name, expr = let.groups()
                try:
                    data[name] = evaluate(expr, data)
                except RenderError as e:
                    raise RenderError(f"{doc}: artifacts line {line!r}: {e}") from None
                paths[name] = {p for n in names_in(expr) for p in paths.get(n, ())}
                continue
            name, sep, path = line.partition(":")
            name, path = name.strip(), path.strip()
            if not sep or not name.isidentifier() or not path:
                raise RenderError(f"{doc}: artifacts line {line!r} is not `name: path`")
            file = root / path
            if not file.is_file():
                raise RenderError(f"{doc}: artifact {name!r} is missing: {path}")
            try:
                data[name] = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise RenderError(f"{doc}: artifact {path} is not JSON: {e}") from None
            paths[name] = {path}
    return data, paths


def _split_spec(spec: str, doc: str, line: int) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for raw in spec.strip().splitlines():
        key, sep, value = raw.partition(":")
        if not sep or key.strip() not in ("rows", "row", "keys", "label", "col"):
            raise RenderError(
                f"{doc}:{line}: table spec line {raw!r}: expected rows/row/keys/label/col"
            )
        fields.setdefault(key.strip(), []).append(value.strip())
    if ("rows" in fields) == ("row" in fields) or "col" not in fields:
        raise RenderError(f"{doc}:{line}: a table needs `rows:` or `row:` lines, and `col:` lines")
    return fields


def render_table(spec: str, artifacts: dict[str, Any], doc: str, line: int) -> str:
    """The Markdown table of a `<!-- table -->` spec (one line per row, trailing newline)."""
    fields = _split_spec(spec, doc, line)
    header, _, label_expr = fields.get("label", [""])[0].partition("=")
    cols = [c.partition("=") for c in fields["col"]]
    rows = evaluate(fields["rows"][0], artifacts) if "rows" in fields else None
    if rows is None:  # one `row: EXPR => label` line per row; `label:` is only the header
        header = fields.get("label", [""])[0]
        items = []
        for r in fields["row"]:
            expr, _, shown = r.partition("=>")
            items.append((shown.strip(), shown.strip(), evaluate(expr, artifacts)))
    elif isinstance(rows, dict):
        keys = (
            [k.partition("=>") for k in fields["keys"][0].split(";")] if "keys" in fields else None
        )
        chosen = [(k.strip(), s.strip() or k.strip()) for k, _, s in keys] if keys else None
        items = [(k, shown, rows.get(k)) for k, shown in chosen or [(k, k) for k in rows]]
        for k, _, row in items:
            if row is None:
                raise RenderError(f"{doc}:{line}: table rows have no key {k!r}")
    elif isinstance(rows, list):
        if not label_expr.strip():
            raise RenderError(f"{doc}:{line}: list rows need `label: Header = EXPR`")
        items = [(i, None, row) for i, row in enumerate(rows)]
    else:
        raise RenderError(f"{doc}:{line}: `rows:` must give a dict or a list")
    out = ["| " + " | ".join([header.strip()] + [c[0].strip() for c in cols]) + " |"]
    out.append("|" + "---|" * (len(cols) + 1))
    for key, shown, row in items:
        names = {**artifacts, **(row if isinstance(row, dict) else {}), "row": row, "key": key}
        label = shown if shown is not None else fill("{s " + label_expr.strip() + "}", names)
        cells = [fill(c[2].strip(), names) for c in cols]
        out.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(out) + "\n"


def render(text: str, root: Path, doc: str) -> tuple[str, list[Drift]]:
    """The doc with every figure and table rendered, and the figures that changed."""
    if "<!-- fig " not in text and "<!-- table" not in text:
        return text, []
    artifacts, paths = load_artifacts(text, root, doc)
    drifts: list[Drift] = []

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def sources(expr: str) -> list[str]:
        return sorted({p for n in names_in(expr) for p in paths.get(n, ())})

    def table(m: re.Match) -> str:
        spec = m.group(2)
        try:
            body = render_table(spec, artifacts, doc, line_of(m.start()))
        except RenderError as e:
            raise RenderError(f"{doc}:{line_of(m.start())}: {e}") from None
        if body != m.group(3):
            old, new = m.group(3).splitlines(), body.splitlines()
            for i in range(max(len(old), len(new))):
                a, b = (old[i] if i < len(old) else ""), (new[i] if i < len(new) else "")
                if a != b:
                    used = sorted({p for n in re.findall(r"\w+", spec) for p in paths.get(n, ())})
                    drifts.append(Drift(doc, line_of(m.start(3)) + i, "table row", used, a, b))
        return m.group(1) + body + m.group(4)

    def fig(m: re.Match) -> str:
        spec, expr, found = m.group(1), m.group(2), m.group(3)
        try:
            expected = fmt(evaluate(expr, artifacts), spec)
        except RenderError as e:
            raise RenderError(f"{doc}:{line_of(m.start())}: figure `{expr}`: {e}") from None
        if expected != found:
            drifts.append(
                Drift(doc, line_of(m.start()), f"{spec} {expr}", sources(expr), found, expected)
            )
        return f"<!-- fig {spec} {expr} -->{expected}<!-- /fig -->"

    text = TABLE_RE.sub(table, text)
    return FIG_RE.sub(fig, text), drifts


def docs(root: Path) -> list[Path]:
    """README.md and docs/*.md: every doc the renderer owns figures in."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; fail on drift")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    problems: list[str] = []
    for path in docs(args.root):
        doc = str(path.relative_to(args.root))
        text = path.read_text()
        try:
            new, drifts = render(text, args.root, doc)
        except RenderError as e:
            problems.append(str(e))
            continue
        if args.check:
            problems += [str(d) for d in drifts]
        elif new != text:
            path.write_text(new)
            print(f"{doc}: {len(drifts)} figure(s) rendered")
    for p in problems:
        print(p, file=sys.stderr)
    if problems and args.check:
        print(
            "docs differ from their artifacts: run `make docs` (python docs/render.py)",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
