"""The modules' import graph runs one way: a module imports only from its own level of the list
in docs/internals.md or from levels below it (issue 15). The test reads the levels from that list,
so the documentation and the code cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lxmert_bench"


def _levels() -> dict[str, int]:
    """'io', 'data', 'train', ... -> level, from the numbered list of docs/internals.md (names in
    parentheses are a level's parts, not levels of their own)."""
    text = (REPO / "docs" / "internals.md").read_text(encoding="utf-8")
    items = re.findall(r"^(\d)\. (.*?)(?=^\d\. |^\s*$)", text, flags=re.M | re.S)
    levels: dict[str, int] = {}
    for number, body in items:
        while re.search(r"\([^()]*\)", body):
            body = re.sub(r"\([^()]*\)", "", body)
        for name in re.findall(r"`([a-z_]+)(?:\.py|/)`", body):
            levels[name] = int(number)
    return levels


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m.split(".")[0] == "lxmert_bench"]


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_levels_name_every_module():
    levels = _levels()
    assert levels["io"] == 1 and levels["data"] == 2 and levels["cli"] == 7, levels
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.glob("*")
            if (p.suffix == ".py" or p.is_dir() and (p / "__init__.py").exists())}
    missing = sorted(tops - set(levels) - {"__init__", "__main__"})
    assert not missing, f"docs/internals.md does not place {missing} in a level"


def test_no_module_imports_from_a_level_above_its_own():
    levels = _levels()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        me = levels.get(rel.parts[0].removesuffix(".py"))
        if me is None:
            continue
        for line, module in _imports(path):
            other = levels.get(_top(module))
            if other is not None and other > me:
                upward.append(f"lxmert_bench/{rel}:{line} (level {me}) imports {module} "
                              f"(level {other})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker finds a function-level import too (the layering test could not fail otherwise)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from lxmert_bench.report.render import write_report\n")
    assert _imports(probe) == [(2, "lxmert_bench.report.render")]
    assert _levels()[_top("lxmert_bench.report.render")] > _levels()["io"]
