"""docs/render.py: the docs' figures are what their artifacts give, and drift is caught by name."""

import ast
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_render", ROOT / "docs" / "render.py")
render = sys.modules["docs_render"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)


def declared_artifacts() -> dict[str, list[str]]:
    """artifact path -> the docs that bind it."""
    out: dict[str, list[str]] = {}
    for doc in render.docs(ROOT):
        for block in render.ARTIFACTS_RE.finditer(doc.read_text()):
            for line in block.group(1).strip().splitlines():
                if render.LET_RE.match(line):
                    continue
                out.setdefault(line.partition(":")[2].strip(), []).append(doc.name)
    return out


def copy_tree(tmp_path: Path) -> Path:
    """README.md, docs/*.md and every declared artifact, at the same relative paths."""
    for doc in render.docs(ROOT):
        (tmp_path / doc.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(doc, tmp_path / doc.relative_to(ROOT))
    for path in declared_artifacts():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    return tmp_path


def perturb(x):
    """Every number of a JSON value moved (ints stay ints), the structure unchanged."""
    if isinstance(x, dict):
        return {k: perturb(v) for k, v in x.items()}
    if isinstance(x, list):
        return [perturb(v) for v in x]
    if isinstance(x, bool) or not isinstance(x, int | float):
        return x
    return 3 * x + 1 if isinstance(x, int) else x * 1.37 + 0.11


def test_committed_docs_match_their_artifacts(capsys):
    assert render.main(["--check"]) == 0, capsys.readouterr().err


def test_perturbing_any_declared_artifact_fails_the_check_naming_it(tmp_path, capsys):
    root = copy_tree(tmp_path)
    artifacts = declared_artifacts()
    assert artifacts, "no doc binds an artifact"
    for path in artifacts:
        original = (root / path).read_text()
        (root / path).write_text(json.dumps(perturb(json.loads(original))))
        assert render.main(["--check", "--root", str(root)]) == 1, path
        err = capsys.readouterr().err
        assert path in err and "figure" in err, (path, err)
        (root / path).write_text(original)
    assert render.main(["--check", "--root", str(root)]) == 0


def test_missing_artifact_is_named(tmp_path, capsys):
    root = copy_tree(tmp_path)
    path = next(iter(declared_artifacts()))
    (root / path).unlink()
    assert render.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and path in err


DOC = """# t
<!-- artifacts
a: r.json
both = match(a.runs, "if3_s?")
-->
FD <!-- fig .2f a.rows[1].fd.mean -->?<!-- /fig --> and mean ± sd over seeds
<!-- fig .2f mean(a.rows[0].fd.mean, a.rows[1].fd.mean) -->?<!-- /fig --> ±
<!-- fig .2f sd(a.rows[0].fd.mean, a.rows[1].fd.mean) -->?<!-- /fig -->, ratio
<!-- fig .1f a.extra["x y"] / 2 -->?<!-- /fig -->, seeds <!-- fig .3f mean(both, "fd") -->?<!-- /fig -->.

<!-- table
rows: a.rows
label: method = name
col: FD-judge = {.2f fd.mean} ± {.2f fd.ci95} ({d len(fd.seeds)} seeds)
col: nfe = {d get(row, "nfe")}
-->
<!-- /table -->
"""
ARTIFACT = {
    "rows": [
        {"name": "IF 3", "fd": {"mean": 2.0, "ci95": 0.125, "seeds": [1.9, 2.1]}, "nfe": 3},
        {"name": "LCM 3", "fd": {"mean": 2.5, "ci95": 0.5, "seeds": [2.0, 3.0]}},
    ],
    "extra": {"x y": 3.0},
    "runs": {"if3_s0": {"fd": 2.0}, "if3_s1": {"fd": 2.5}, "if3_s10": {"fd": 9.0}},
}
RENDERED = """FD <!-- fig .2f a.rows[1].fd.mean -->2.50<!-- /fig --> and mean ± sd over seeds
<!-- fig .2f mean(a.rows[0].fd.mean, a.rows[1].fd.mean) -->2.25<!-- /fig --> ±
<!-- fig .2f sd(a.rows[0].fd.mean, a.rows[1].fd.mean) -->0.35<!-- /fig -->, ratio
<!-- fig .1f a.extra["x y"] / 2 -->1.5<!-- /fig -->, seeds <!-- fig .3f mean(both, "fd") -->2.250<!-- /fig -->.

<!-- table
rows: a.rows
label: method = name
col: FD-judge = {.2f fd.mean} ± {.2f fd.ci95} ({d len(fd.seeds)} seeds)
col: nfe = {d get(row, "nfe")}
-->
| method | FD-judge | nfe |
|---|---|---|
| IF 3 | 2.00 ± 0.12 (2 seeds) | 3 |
| LCM 3 | 2.50 ± 0.50 (2 seeds) |  |
<!-- /table -->
"""


def test_renders_figures_and_a_table_from_a_list_of_rows(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(ARTIFACT))
    text, drifts = render.render(DOC, tmp_path, "t.md")
    assert text.split("-->\n", 1)[1] == RENDERED  # sd of (2.0, 2.5) with n - 1: 0.3536
    assert len(drifts) == 5 + 4  # five figures, four table lines (header, rule, two rows)
    again, drifts = render.render(text, tmp_path, "t.md")
    assert again == text and drifts == []


def test_table_of_dict_rows_with_chosen_keys(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"b": {"v": 2}, "a": {"v": 1}}))
    doc = "<!-- artifacts\nr: r.json\n-->\n<!-- table\nrows: r\nkeys: a => **A**; b\nlabel: k\ncol: v = {d v}\n-->\n<!-- /table -->\n"
    text, _ = render.render(doc, tmp_path, "t.md")
    assert "| k | v |\n|---|---|\n| **A** | 1 |\n| b | 2 |\n" in text


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("<!-- fig .2f a.nope -->1<!-- /fig -->", "no key 'nope'"),
        ("<!-- fig .2f open('x') -->1<!-- /fig -->", "unknown function 'open'"),
        ("<!-- fig .2f a.__class__ -->1<!-- /fig -->", "no key '__class__'"),
        ("<!-- fig .2f b -->1<!-- /fig -->", "unknown name 'b'"),
        ("<!-- fig .2f a.x + b -->1<!-- /fig -->", "unknown name 'b'"),
    ],
)
def test_bad_figures_are_errors_naming_doc_and_figure(tmp_path, doc, message):
    (tmp_path / "r.json").write_text(json.dumps({"x": 1.0}))
    with pytest.raises(render.RenderError, match=r"t\.md:4") as e:
        render.render("<!-- artifacts\na: r.json\n-->\n" + doc, tmp_path, "t.md")
    assert message in str(e.value)


def _defines(tree: ast.AST, names: list[str]) -> bool:
    """Whether `names` (e.g. ["make", "generator_loss"]) is a chain of nested definitions."""
    if not names:
        return True
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == names[0]:
            return _defines(node, names[1:])
    return False


def test_every_function_method_md_cites_exists():
    """docs/method.md puts each equation next to `module.function`: each must be defined there."""
    packages = {p.stem for p in (ROOT / "flash_jax").iterdir() if p.suffix == ".py" or p.is_dir()}
    refs = re.findall(r"`([a-z_]+(?:\.\w+)+)`", (ROOT / "docs" / "method.md").read_text())
    refs = [r for r in refs if r.split(".")[0] in packages]
    assert len(refs) > 30
    missing = []
    for ref in refs:
        parts = ref.split(".")
        for n in range(len(parts), 0, -1):
            file = ROOT.joinpath("flash_jax", *parts[:n]).with_suffix(".py")
            if file.is_file():
                if not _defines(ast.parse(file.read_text()), parts[n:]):
                    missing.append(ref)
                break
        else:
            missing.append(ref)
    assert not missing, f"docs/method.md cites undefined functions: {missing}"


def test_table_of_row_lines_with_mean_sd_over_runs(tmp_path):
    (tmp_path / "r.json").write_text(
        json.dumps({"a|0": {"v": 1.0}, "a|1": {"v": 2.0}, "t": {"v": 5.0}})
    )
    doc = (
        "<!-- artifacts\nr: r.json\n-->\n<!-- table\nlabel: run\n"
        'row: match(r, "a|?") => A (2 seeds)\nrow: [r.t] => teacher\n'
        'col: v = {s pm(row, "v", ".2f")}\n-->\n<!-- /table -->\n'
    )
    text, _ = render.render(doc, tmp_path, "t.md")
    assert "| run | v |\n|---|---|\n| A (2 seeds) | 1.50 ± 0.71 |\n| teacher | 5.00 |\n" in text


@pytest.mark.parametrize(
    ("lo", "hi", "verdict"),
    [(0.9, 0.99, "below"), (1.01, 1.2, "above"), (0.95, 1.04, "not resolved")],
)
def test_a_claim_against_a_bar_holds_only_when_the_whole_range_is_on_one_side(lo, hi, verdict):
    assert render.evaluate(f"side({lo}, {hi}, 1.0)", {}) == verdict


def test_table_of_picked_rows_keeps_their_order_and_names_a_missing_value(tmp_path):
    rows = [{"label": "T", "v": 0}, {"label": "A", "v": 1}, {"label": "B", "v": 2}]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))

    def doc(*labels: str) -> str:
        chosen = ", ".join(f'"{label}"' for label in labels)
        spec = f'rows: pick(r.rows, "label", {chosen})\nlabel: m = label\ncol: v = {{d v}}\n'
        return f"<!-- artifacts\nr: r.json\n-->\n<!-- table\n{spec}-->\n<!-- /table -->\n"

    text, _ = render.render(doc("B", "T"), tmp_path, "t.md")
    assert "| m | v |\n|---|---|\n| T | 0 |\n| B | 2 |\n" in text
    with pytest.raises(render.RenderError, match=r"no row with label \['C'\]"):
        render.render(doc("B", "C"), tmp_path, "t.md")
