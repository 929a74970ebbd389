"""The layout's one-way dependencies: kt <- kt.teacher_cache <- kt.student (through the reader only), kt <-
kt.retrieval; kt.recipe above them all (it runs their commands) and imported by none; nothing installed imports
tools/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"kt": "kt", "teacher_cache": "kt.teacher_cache", "student": "kt.student", "retrieval": "kt.retrieval",
           "recipe": "kt.recipe"}
# what each installed package must not import
FORBIDDEN = {
    "kt": ("kt.teacher_cache", "kt.student", "kt.retrieval", "kt.recipe", "tools"),
    "kt.teacher_cache": ("kt.student", "kt.retrieval", "kt.recipe", "tools"),
    "kt.student": ("kt.retrieval", "kt.recipe", "tools"),
    "kt.retrieval": ("kt.teacher_cache", "kt.student", "kt.recipe", "tools"),
    "kt.recipe": ("tools",),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_dependencies_point_one_way(folder):
    package = FOLDERS[folder]
    for path in sorted((ROOT / folder).glob("*.py")):
        for module in imported_modules(path):
            bad = [f for f in FORBIDDEN[package] if module == f or module.startswith(f + ".")]
            assert not bad, f"{path.relative_to(ROOT)} imports {module}: {package} must not depend on it"
            if package == "kt.student" and module.startswith("kt.teacher_cache"):
                assert module == "kt.teacher_cache.reader", \
                    f"{path.relative_to(ROOT)} imports {module}: the student reads the cache through the reader only"
