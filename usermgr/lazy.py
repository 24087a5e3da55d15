"""Modules loaded on first use, with the standard library's own LazyLoader.

Start-up time matters (`usermgr verify` in a loop, `--help`), so the CLI names its heavy
modules once at the top and pays for each only when a command first touches it; and a
package's re-exports (usermgr.service) load the submodule of each name on its first read,
so that a command loads only the modules it calls.

Both load with the garbage collector paused (`collector_paused`): an import makes long-lived
objects (classes, functions, SQLAlchemy's tables and mappers) and next to no garbage, yet
each collection during it rescans every object made so far, a tenth of `usermgr show`'s CPU.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.abc import Loader
else:  # the same duck type: importlib.abc would load importlib.resources and tempfile into `--help`
    Loader = object


@contextmanager
def collector_paused() -> Iterator[None]:
    """The garbage collector off for the block; then what the block made is frozen (moved
    where collections never look: module-level objects live as long as the process) and the
    collector is back on, as it was, for the command's own work."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.enable()


class _CollectorPausedLoader(Loader):
    """A module's own loader, executing it with the collector paused."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with collector_paused():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # the rest (get_data, resource readers...) as the loader has it
        return getattr(self._loader, name)


def lazy_module(name: str) -> ModuleType:
    """`name`, imported when one of its attributes is first read (an already imported
    module is returned as it is)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(_CollectorPausedLoader(spec.loader))
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def import_once(name: str) -> ModuleType:
    """`name` imported, with the collector paused (and what the import made frozen) only when
    it was not loaded yet: a freeze once a module, never of a caller's objects. A module that
    another thread is still importing is waited for (import_module takes its module lock),
    never handed out half made."""
    if name in sys.modules:
        return importlib.import_module(name)
    with collector_paused():
        return importlib.import_module(name)


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) for `package`, which re-exports the names of
    `exports` (submodule: names): a name's submodule is imported when the name is first read."""
    home = {name: submodule for submodule, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_once(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)  # read once: the next read is a plain attribute
        return value

    return __getattr__
