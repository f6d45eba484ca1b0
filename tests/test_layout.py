"""README's Layout section names every module of the tree, so a newcomer's map stays true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_names_every_module_and_benchmark():
    text = _layout()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    missing = []
    for path in sorted((ROOT / "edgeai").rglob("*.py")) + sorted(
        (ROOT / "benchmarks").glob("*.py")
    ):
        if path.stem not in ("__init__", "__main__") and path.stem not in words:
            missing.append(str(path.relative_to(ROOT)))
    packages = {p.parent.name for p in (ROOT / "edgeai").rglob("__init__.py")} - {"edgeai"}
    missing += [f"edgeai/{p}/" for p in sorted(packages) if f"{p}/" not in text]
    assert not missing, f"README's Layout does not mention: {', '.join(missing)}"
