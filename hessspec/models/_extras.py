"""The optional extra ``hessspec[hf]``: transformers and timm, imported only when a spec needs them."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

INSTALL_HINT = "pip install 'hessspec[hf]'"


def import_extra(module: str, what: str, error: type[Exception]) -> ModuleType:
    """Import an optional dependency, or raise ``error`` with one line saying what to install.

    Hugging Face libraries are put offline first (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, unless the user set
    them): hessspec never downloads.

    Args:
        module: e.g. ``"transformers"``, ``"timm"``.
        what: the spec that needs it, for the message (e.g. ``"--model hf:DIR"``).
        error: the exception type to raise (``ModelError``, ``DatasetError``).

    Returns:
        The module.

    Raises:
        error: the module cannot be imported.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return importlib.import_module(module)
    except ImportError as cause:
        msg = f"{what} needs the optional package {module!r}, which is not installed: {INSTALL_HINT}"
        raise error(msg) from cause
