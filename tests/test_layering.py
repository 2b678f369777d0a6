"""The package layers of docs/design.md, checked on the source: no import reaches up a layer.

    app.py  >  minigpt/serve/  >  lora/  >  minigpt/ (the core)
"""
import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# Layer of each first-party module prefix, lowest first; a module may import only its own layer or lower ones.
LAYERS = {"minigpt": 0, "lora": 1, "minigpt.serve": 2, "app": 3}


def layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def imports(path: Path, module: str) -> set[str]:
    """First-party modules that a file imports, relative imports resolved."""
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return {name for name in found if layer(name) is not None}


def sources() -> list[tuple[Path, str]]:
    files = [REPO / "app.py", *sorted((REPO / "minigpt").rglob("*.py")), *sorted((REPO / "lora").rglob("*.py"))]
    return [(p, ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")) for p in files]


@pytest.mark.parametrize("path, module", sources(), ids=lambda v: str(v) if isinstance(v, str) else None)
def test_no_import_reaches_a_higher_layer(path, module):
    upward = {name for name in imports(path, module) if layer(name) > layer(module)}
    assert not upward, f"{module} (layer {layer(module)}) imports {sorted(upward)} from a higher layer"


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lora import inject_lora\nfrom .serve import engine\n")
    assert imports(bad, "minigpt.bad") == {"lora", "minigpt.serve"}
