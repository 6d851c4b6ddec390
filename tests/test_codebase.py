"""The codebase's own rules, checked on its source: short functions with few parameters, and
imports that point one way (models/ and algorithms/ import no accelerate, torch.distributed,
wandb or webdataset; config.py imports nothing of metadist but its errors)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metadist"
MAX_LINES, MAX_PARAMS = 50, 7


def functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node


def params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)


def test_no_function_is_longer_than_50_lines_or_takes_more_than_7_parameters():
    long = [
        f"{p}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for p, fn in functions()
        if fn.end_lineno - fn.lineno + 1 > MAX_LINES
    ]
    wide = [
        f"{p}:{fn.lineno} {fn.name} ({params(fn)} parameters)"
        for p, fn in functions()
        if params(fn) > MAX_PARAMS
    ]
    assert not long and not wide, "\n".join(long + wide)


def test_the_checks_see_a_long_function():
    src = "def f(a, b, c, d, e, f, g, h):\n" + "    x = 1\n" * 60
    fn = ast.parse(src).body[0]
    assert params(fn) == 8 and fn.end_lineno - fn.lineno + 1 == 61


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package", ["models", "algorithms"])
def test_models_and_algorithms_import_no_distribution_tracking_or_shards(package):
    banned = ("accelerate", "torch.distributed", "wandb", "webdataset")
    for path in (PACKAGE / package).rglob("*.py"):
        bad = [m for m in imports(path) if m.startswith(banned)]
        assert not bad, (path, bad)


def test_config_imports_nothing_of_metadist_but_errors():
    assert {m for m in imports(PACKAGE / "config.py") if m.startswith("metadist")} == {
        "metadist.errors"
    }


def calls(path: Path, name: str) -> list[int]:
    """Lines of `path` that call an attribute `name` (x.name(...))."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
    ]


def test_losses_become_gradients_in_one_place():
    """The step's single seam: the meta-gradient is taken in metadist/step/compute.py's
    `gradients` alone (every compute, eager or compiled, goes through it), and the only other
    gradient in the package is the inner loop's own (adapt); nothing calls .backward()."""
    where = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := calls(path, "grad") + calls(path, "backward"))
    }
    assert set(where) == {"metadist/algorithms/core.py", "metadist/step/compute.py"}, where
    assert all(len(lines) == 1 for lines in where.values()), where


def test_the_step_is_one_package_that_the_algorithms_do_not_reach():
    """Plan, compute, reduce and the step live in metadist/step/; algorithms/ and models/ never
    import it (they hold losses and what they need, not the reduction)."""
    assert {p.name for p in (PACKAGE / "step").glob("*.py")} == {
        "__init__.py",
        "plan.py",
        "compute.py",
        "reduce.py",
        "meta_step.py",
    }
    for package in ("algorithms", "models"):
        for path in (PACKAGE / package).rglob("*.py"):
            assert not [m for m in imports(path) if m.startswith("metadist.step")], path
    for gone in ("strategy.py", "exact.py", "compiled.py", "cuda_graph.py", "step.py"):
        assert not (PACKAGE / gone).exists(), gone


def test_the_trainer_is_at_most_300_lines():
    """The Trainer builds components and runs the loop; what a component does lives in it
    (metadist/loop.py, metadist/step/, data/, evaluate.py), so the Trainer stays one read."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= 300


def test_one_node_lock():
    """Every flock of the package is metadist/locks.py's."""
    users = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if calls(p, "flock")}
    assert users == {"metadist/locks.py"}, users


def test_the_trainer_declares_at_most_20_attributes_and_sets_no_other():
    """The Trainer's parts are declared on the class, grouped, at most 20; every attribute it
    sets is one of them (no copies made on the way)."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    declared = {n.target.id for n in trainer.body if isinstance(n, ast.AnnAssign)}
    assigned = {
        n.attr
        for n in ast.walk(trainer)
        if isinstance(n, ast.Attribute)
        and isinstance(n.ctx, ast.Store)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
    }
    assert len(declared) <= 20 and assigned <= declared, (len(declared), assigned - declared)


def test_one_class_per_name_in_the_package():
    seen: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                seen.setdefault(node.name, []).append(str(path.relative_to(PACKAGE.parent)))
    assert not {k: v for k, v in seen.items() if len(v) > 1}


ROOT = PACKAGE.parent
SOURCES = [p for d in ("metadist", "tests", "bench", "launch") for p in (ROOT / d).rglob("*.py")]


def test_no_formatter_switched_off():
    """The formatter formats every line: no line or block is exempted from it."""
    marks = ("# fmt: " + "skip", "# fmt: " + "off")  # written apart, so this file has none
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in SOURCES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if any(m in line for m in marks)
    ]
    assert not found, found


def test_the_documented_layout_names_every_module():
    """docs/development.md's layout block names each module of the package (a package's
    __init__.py by its folder)."""
    text = (ROOT / "docs" / "development.md").read_text()
    layout = text.split("## Layout", 1)[1].split("```")[1]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.parent.name + "/" if path.name == "__init__.py" else path.name
        if (path.parent != PACKAGE or path.name != "__init__.py") and name not in layout:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, missing


def module_graph(folder: str) -> dict[str, set[str]]:
    """Each module of `folder` (bench, tests) -> the modules of the repository it imports."""
    graph = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        graph[f"{folder}.{path.stem}"] = {m for m in found if m.startswith(("bench", "tests"))}
    return graph


def test_bench_takes_no_helper_from_tests_and_has_no_import_circle():
    """bench/ and tests/ share their helpers through the package (a one-process Dist, the batch
    factory, ports and launchers): bench imports nothing of tests, and no two bench modules
    import each other, however indirectly. (tests may import the bench tool they test.)"""
    bench = module_graph("bench")
    assert not {m: i for m, i in bench.items() if any(x.startswith("tests") for x in i)}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(bench.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += bench.get(m, ())
        return seen

    assert not [m for m in bench if m in reach(m)]
