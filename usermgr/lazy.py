"""Modules loaded on first use, with the standard library's own LazyLoader.

Start-up time matters (`usermgr verify` in a loop, `--help`), so the CLI names its heavy
modules once at the top and pays for each only when a command first touches it; and a
package's re-exports (usermgr.service) load the submodule of each name on its first read,
so that a command loads only the modules it calls.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any


def lazy_module(name: str) -> ModuleType:
    """`name`, imported when one of its attributes is first read (an already imported
    module is returned as it is)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) for `package`, which re-exports the names of
    `exports` (submodule: names): a name's submodule is imported when the name is first read."""
    home = {name: submodule for submodule, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)  # read once: the next read is a plain attribute
        return value

    return __getattr__
