"""Compiled modules (setup.py, Cython) are used only when they were built from the current source.

setup.py compiles a few pure-Python modules (``setup.COMPILED``: the fold, the back-test's log fold, the wire
format) and records beside each the SHA-256 of the source it compiled (``<module>.sha256``). ``use_fresh_builds``,
run by the package's ``__init__`` before anything imports those modules, loads the source itself (with a
``RuntimeWarning``) in place of a build that is not the current source's, and in place of every build when
``LEADLEDGER_PURE_PYTHON=1``: old compiled code never runs after an edit, a checkout or a merge.
``source_module`` loads a source as plain Python beside its compiled module (tests and benchmarks compare them).
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
from typing import Iterable


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` is an extension module (a compiled build) rather than Python source."""
    return str(module.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def source_module(path: Path, name: str, register: bool = False) -> ModuleType:
    """The Python source at ``path`` executed as plain Python as module ``name`` (in ``sys.modules`` when
    ``register``)."""
    spec = importlib.util.spec_from_file_location(name, path)
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


def use_fresh_builds(package: str, here: Path, stems: Iterable[str]) -> None:
    """For each module ``<package>.<stem>`` that has a compiled build in ``here``: keep the build when it is the
    current source's (and ``LEADLEDGER_PURE_PYTHON`` is not ``1``), else load the source as the module."""
    for stem in stems:
        src = here / f"{stem}.py"
        built = [here / f"{stem}{s}" for s in importlib.machinery.EXTENSION_SUFFIXES if (here / f"{stem}{s}").exists()]
        if not built or not src.exists():
            continue  # nothing compiled (or no source to compare with): the usual import
        if os.environ.get("LEADLEDGER_PURE_PYTHON") != "1":
            stamp = here / f"{stem}.sha256"
            recorded = stamp.read_text().strip() if stamp.exists() else None
            if recorded == hashlib.sha256(src.read_bytes()).hexdigest():
                continue  # the compiled module is this source's build
            warnings.warn(f"{built[0].name} was not built from the current {stem}.py: loading the source instead "
                          "(slower); rebuild with `bash deploy/setup.sh`", RuntimeWarning, stacklevel=3)
        setattr(sys.modules[package], stem, source_module(src, f"{package}.{stem}", register=True))
