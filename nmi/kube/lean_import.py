"""kubernetes-asyncio without importing its ~800 generated classes up front.

nmi uses kubernetes-asyncio for what makes a client real — kubeconfig and
in-cluster loading (exec plugins, OIDC, client certificates, the projected
service-account token re-read as it rotates) and its ``ApiClient`` for
authenticated raw requests — and none of its generated API and model classes
(the informers read JSON).  Its ``__init__`` modules import every one of those
classes eagerly: about 37 MB of a node daemon's memory and a quarter of a
second of its start, on every node.

``load()`` imports the package with the three eager ``__init__`` modules
(``kubernetes_asyncio``, ``.client``, ``.client.models``) replaced by lazy
ones: each name they would have bound is imported on first use, from the
module the real ``__init__`` names (read from its source, so it follows the
installed version).  Everything else is the library's own code, unchanged.
If the package is already imported, or anything about its layout is not as
expected, the normal eager import is used instead.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import itertools
import re
import sys
import types
from pathlib import Path
from typing import Any

ROOT = "kubernetes_asyncio"
LAZY_PACKAGES = (ROOT, f"{ROOT}.client", f"{ROOT}.client.models")
_FROM_IMPORT = re.compile(r"^from\s+([\w.]+)\s+import\s+(\w+)\s*$", re.MULTILINE)
_IMPORT_AS = re.compile(r"^import\s+([\w.]+)\s+as\s+(\w+)\s*$", re.MULTILINE)


class _LazyPackage(types.ModuleType):
    """A package whose ``__init__`` bindings are imported on first attribute access."""

    def __init__(self, name: str, path: Path, names: dict[str, tuple[str, str | None]]) -> None:
        super().__init__(name)
        self.__path__ = [str(path)]
        self.__package__ = name
        self.__file__ = str(path / "__init__.py")
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(path)]
        self.__spec__ = spec
        self._lazy_names = names

    def __getattr__(self, attr: str) -> Any:
        found = self._lazy_names.get(attr)
        if found is None:
            try:  # a submodule not named by __init__ (``from package import submodule``)
                return importlib.import_module(f"{self.__name__}.{attr}")
            except ImportError:
                raise AttributeError(
                    f"module {self.__name__!r} has no attribute {attr!r}"
                ) from None
        module_name, member = found
        module = importlib.import_module(module_name)
        value = module if member is None else getattr(module, member)
        setattr(self, attr, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._lazy_names))


def _bindings(text: str) -> dict[str, tuple[str, str | None]]:
    names: dict[str, tuple[str, str | None]] = {}
    for module, member in _FROM_IMPORT.findall(text):
        if module != "__future__":
            names[member] = (module, member)
    for module, alias in _IMPORT_AS.findall(text):
        names[alias] = (module, None)
    return names


def load() -> tuple[Any, Any]:
    """``(kubernetes_asyncio.client, kubernetes_asyncio.config)``, lazily where possible."""
    if ROOT in sys.modules:
        return _eager()
    try:
        return _lean()
    except Exception:  # layout not as expected: fall back to the library's own import
        for name in [n for n in sys.modules if n == ROOT or n.startswith(ROOT + ".")]:
            del sys.modules[name]
        return _eager()


def _eager() -> tuple[Any, Any]:
    client = importlib.import_module(f"{ROOT}.client")
    config = importlib.import_module(f"{ROOT}.config")
    return client, config


def _lean() -> tuple[Any, Any]:
    spec = importlib.util.find_spec(ROOT)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(ROOT)
    base = Path(next(iter(spec.submodule_search_locations)))
    packages: list[_LazyPackage] = []
    for name in LAZY_PACKAGES:
        path = base.joinpath(*name.split(".")[1:])
        text = (path / "__init__.py").read_text(encoding="utf-8")
        package = _LazyPackage(name, path, _bindings(text))
        version = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.MULTILINE)
        if version is not None:
            package.__version__ = version.group(1)  # type: ignore[attr-defined]
        packages.append(package)
    for package in packages:
        sys.modules[package.__name__] = package
    for parent, child in itertools.pairwise(packages):
        setattr(parent, child.__name__.rsplit(".", 1)[1], child)
    client = packages[1]
    # What nmi uses, imported now (AttributeError otherwise) so that a broken layout
    # falls back at once.
    _ = client.ApiClient, client.Configuration
    config = importlib.import_module(f"{ROOT}.config")
    packages[0].config = config  # type: ignore[attr-defined]
    return client, config
