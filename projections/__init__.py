"""leadledger projections.

``projections.fold`` may be compiled (Cython, ``setup.py``): the compiled module is imported only when it was built
from the current ``fold.py`` (the hash the build recorded in ``fold.sha256``) and ``LEADLEDGER_PURE_PYTHON`` is not
``1``; otherwise the source itself is loaded, with a warning for a stale build, so old compiled code never runs.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path


def _fold_source_if_needed() -> None:
    here = Path(__file__).resolve().parent
    src = here / "fold.py"
    built = [here / f"fold{s}" for s in importlib.machinery.EXTENSION_SUFFIXES if (here / f"fold{s}").exists()]
    if not built or not src.exists():
        return  # nothing compiled (or no source to compare with): the usual import
    if os.environ.get("LEADLEDGER_PURE_PYTHON") != "1":
        stamp = here / "fold.sha256"
        recorded = stamp.read_text().strip() if stamp.exists() else None
        if recorded == hashlib.sha256(src.read_bytes()).hexdigest():
            return  # the compiled module is this source's build
        warnings.warn(f"{built[0].name} was not built from the current fold.py: loading the source instead (slower); "
                      "rebuild with `bash deploy/setup.sh`", RuntimeWarning, stacklevel=2)
    spec = importlib.util.spec_from_file_location(f"{__name__}.fold", src)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    globals()["fold"] = module


_fold_source_if_needed()
