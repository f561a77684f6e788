"""The layering of docs/architecture.md, enforced: retrack/ is the library without Ray and without
pipelines/; pipelines/ is the Ray layer and the CLI; no module in either is over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def modules(package: str) -> list[Path]:
    found = sorted((REPO / package).rglob("*.py"))
    assert found, f"no modules under {package}/"
    return found


def imported(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in `path` names (absolute; top-level and inside functions),
    with its line number."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
    return names


def offending_imports(package: str, forbidden: str) -> list[str]:
    return [f"{p.relative_to(REPO)}:{line} imports {name}"
            for p in modules(package) for line, name in imported(p)
            if name == forbidden or name.startswith(forbidden + ".")]


def test_the_library_does_not_import_ray():
    found = offending_imports("retrack", "ray")
    assert not found, "retrack/ is the library without Ray; move these to pipelines/:\n" + "\n".join(found)


def test_the_library_does_not_import_the_pipelines():
    found = offending_imports("retrack", "pipelines")
    assert not found, "imports point down: retrack/ never imports pipelines/:\n" + "\n".join(found)


def test_no_module_is_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for pkg in ("retrack", "pipelines") for p in modules(pkg)
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"one job per module, none over {MAX_LINES} lines; split these:\n" + "\n".join(long)


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The checks can fail: a function-level `from ray.data import ...` and a plain `import ray.train`
    are both found, a relative import is not mistaken for one."""
    src = tmp_path / "m.py"
    src.write_text("from . import ray\n\ndef f():\n    from ray.data import Dataset\n    import ray.train as t\n    import rayon\n")
    assert [n for _, n in imported(src) if n == "ray" or n.startswith("ray.")] == ["ray.data", "ray.train"]
