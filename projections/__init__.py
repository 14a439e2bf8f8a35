"""leadledger projections.

``projections.fold`` may be compiled (Cython, ``setup.py``): the compiled module is imported only when it was built
from the current ``fold.py`` (the hash the build recorded in ``fold.sha256``) and ``LEADLEDGER_PURE_PYTHON`` is not
``1``; otherwise the source itself is loaded, with a warning for a stale build, so old compiled code never runs.
``fold_source(name)`` loads the source as plain Python beside the compiled module (tests and benchmarks compare them).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` is an extension module (a compiled build) rather than Python source."""
    return str(module.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def fold_source(name: str, register: bool = False) -> ModuleType:
    """``projections/fold.py`` executed as plain Python as module ``name`` (in ``sys.modules`` when ``register``)."""
    spec = importlib.util.spec_from_file_location(name, _HERE / "fold.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if register:
            del sys.modules[name]
        raise
    return module


def _fold_source_if_needed() -> None:
    src = _HERE / "fold.py"
    built = [_HERE / f"fold{s}" for s in importlib.machinery.EXTENSION_SUFFIXES if (_HERE / f"fold{s}").exists()]
    if not built or not src.exists():
        return  # nothing compiled (or no source to compare with): the usual import
    if os.environ.get("LEADLEDGER_PURE_PYTHON") != "1":
        stamp = _HERE / "fold.sha256"
        recorded = stamp.read_text().strip() if stamp.exists() else None
        if recorded == hashlib.sha256(src.read_bytes()).hexdigest():
            return  # the compiled module is this source's build
        warnings.warn(f"{built[0].name} was not built from the current fold.py: loading the source instead (slower); "
                      "rebuild with `bash deploy/setup.sh`", RuntimeWarning, stacklevel=2)
    globals()["fold"] = fold_source(f"{__name__}.fold", register=True)


_fold_source_if_needed()
