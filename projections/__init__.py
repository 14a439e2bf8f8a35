"""leadledger projections.

``projections.fold`` and ``projections.log_fold`` may be compiled (Cython, ``setup.py``): a compiled module is
imported only when it was built from the current source (the hash the build recorded in ``<module>.sha256``) and
``LEADLEDGER_PURE_PYTHON`` is not ``1``; otherwise the source itself is loaded, with a warning for a stale build, so
old compiled code never runs (``events._build``). ``fold_source(name)`` loads the fold's source as plain Python
beside the compiled module (tests and benchmarks compare them).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from events._build import is_compiled, source_module, use_fresh_builds

_HERE = Path(__file__).resolve().parent

__all__ = ["is_compiled", "fold_source", "source_module"]


def fold_source(name: str, register: bool = False) -> ModuleType:
    """``projections/fold.py`` executed as plain Python as module ``name`` (in ``sys.modules`` when ``register``)."""
    return source_module(_HERE / "fold.py", name, register)


use_fresh_builds(__name__, _HERE, ["fold", "log_fold"])  # the fold first: log_fold imports it
