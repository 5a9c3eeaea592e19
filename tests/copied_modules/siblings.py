"""Loading one example's copy of a module that imports other modules of its folder (textstream.py
imports structured_output.py; response_shapes.py imports textstream.py): the folder's own copies,
never another example's left in sys.modules."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from tests.shared.harness import load_copy


def load_copy_beside(path: Path) -> ModuleType:
    """`load_copy`, with `path`'s folder first on sys.path while it imports, and its sibling
    modules forgotten before and after (the next example's copy gets its own)."""
    siblings = {module.stem for module in path.parent.glob("*.py")}
    for name in siblings:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(path.parent))
    try:
        return load_copy(path)
    finally:
        sys.path.remove(str(path.parent))
        for name in siblings:
            sys.modules.pop(name, None)
