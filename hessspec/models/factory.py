"""Import user factories given as ``"module:function"`` (used for both models and datasets)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any


class FactoryError(ValueError):
    """A ``module:function`` spec could not be resolved to a callable."""


@contextmanager
def _on_sys_path(directories: list[str]) -> Iterator[None]:
    added = [d for d in dict.fromkeys(directories) if d not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for directory in added:
            if directory in sys.path:
                sys.path.remove(directory)


def _cwd_on_sys_path():
    # Users run `hessspec analyze --model mymodels:make` from their project directory, where the installed
    # console script would not otherwise find `mymodels`.
    return _on_sys_path([os.getcwd()])


def factory_directory(spec: str | None) -> str | None:
    """The directory of a ``FILE.py:FUNCTION`` spec's file (absolute), or None for other specs."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return None
    module_part = spec.split(":")[0].strip()
    return str(Path(module_part).expanduser().resolve().parent) if module_part.endswith(".py") else None


def user_import_paths(*specs: str | None):
    """A context manager that puts the current directory and the directories of ``FILE.py:FUNCTION`` factory
    files among ``specs`` at the front of ``sys.path``, as ``python FILE.py`` would: a factory file can import its
    sibling modules (also lazily, when the factory is called), and a pickled whole model whose class lives in such
    a module can be unpickled (``--unsafe-load``). ``sys.path`` is restored on exit.
    """
    files = [d for d in (factory_directory(spec) for spec in specs) if d is not None]
    return _on_sys_path([*files, os.getcwd()])


def _import_from_file(file: Path, spec: str) -> ModuleType:
    module_name = f"_hessspec_user_{file.stem}_{abs(hash(str(file.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    import_spec = importlib.util.spec_from_file_location(module_name, file)
    if import_spec is None or import_spec.loader is None:
        msg = f"cannot import {str(file)!r} (from {spec!r}) as a Python module"
        raise FactoryError(msg)
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module
    try:
        with _on_sys_path([str(file.resolve().parent)]):  # its sibling modules, as `python FILE.py` finds them
            import_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        msg = f"importing {str(file)!r} (from {spec!r}) failed: {type(error).__name__}: {error}"
        raise FactoryError(msg) from error
    return module


def _import_module(module_part: str, spec: str) -> ModuleType:
    if module_part.endswith(".py"):
        file = Path(module_part).expanduser()
        if not file.is_file():
            msg = f"factory file {module_part!r} (from {spec!r}) does not exist"
            raise FactoryError(msg)
        return _import_from_file(file, spec)
    with _cwd_on_sys_path():
        try:
            return importlib.import_module(module_part)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if module_part == missing or module_part.startswith(missing + "."):
                msg = (
                    f"no module named {module_part!r} (from {spec!r}); it must be importable from the "
                    f"current directory ({os.getcwd()}) or sys.path"
                )
                raise FactoryError(msg) from error
            msg = f"importing module {module_part!r} (from {spec!r}) failed: {error}"
            raise FactoryError(msg) from error
        except Exception as error:
            msg = f"importing module {module_part!r} (from {spec!r}) failed: {type(error).__name__}: {error}"
            raise FactoryError(msg) from error


def load_factory(spec: str) -> Callable[..., Any]:
    """Resolve ``"module:function"`` to the callable it names.

    The module part is a dotted module name importable from the current working directory (added to
    ``sys.path`` while importing) or from ``sys.path``, or a path to a ``.py`` file. The function part may be
    a dotted attribute path (``"pkg.models:Factory.create"``).

    Args:
        spec: ``"module:function"``.

    Returns:
        The callable.

    Raises:
        FactoryError: if the spec is malformed, the module cannot be imported, the attribute does not exist or
            is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        msg = f"expected a factory spec 'module:function' with exactly one ':', got {spec!r}"
        raise FactoryError(msg)
    module_part, attribute_part = (part.strip() for part in spec.split(":"))
    if not module_part or not attribute_part:
        msg = f"expected a factory spec 'module:function' with both parts non-empty, got {spec!r}"
        raise FactoryError(msg)
    target: Any = _import_module(module_part, spec)
    for name in attribute_part.split("."):
        if not hasattr(target, name):
            public = sorted(n for n in dir(target) if not n.startswith("_"))
            shown = ", ".join(public[:12]) + (", ..." if len(public) > 12 else "")
            msg = f"{module_part!r} has no attribute {attribute_part!r} (from {spec!r}); it has: {shown}"
            raise FactoryError(msg)
        target = getattr(target, name)
    if not callable(target):
        msg = f"{spec!r} must name a callable, got a {type(target).__name__}"
        raise FactoryError(msg)
    return target
