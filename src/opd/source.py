"""The package's own source, read as text: which `opd` modules a module imports, and every
file a piece of code runs. The zoo keys its cached stages on these files; the layout test
checks the import graph with them."""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path


def module_file(name: str) -> Path | None:
    """The source file of an `opd` module (None for names that are not modules)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def imported_modules(name: str) -> set[str]:
    """The `opd` modules that module `name` imports, at the top or inside functions."""
    path = module_file(name)
    found: set[str] = set()
    if path is None:
        return found
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "opd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "opd":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub) else node.module)
    return found - {name}


def code_files(entries: Sequence[str]) -> list[Path]:
    """Source files of the `entries` modules and of every `opd` module they reach."""
    seen: set[str] = set()
    pending = list(entries)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending += imported_modules(name)
    return sorted({f for f in map(module_file, seen) if f is not None})
