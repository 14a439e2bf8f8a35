"""Build of the compiled fold: ``projections/fold.py`` compiled by Cython, typed by ``projections/fold.pxd``.

The same source runs as plain Python when no build is there (``LEADLEDGER_PURE_PYTHON=1`` skips the build); the
compiled module is that source with the state classes and the hot loop's locals given C types (1.3-1.6x on the
offline fold, docs/design.md). The build also writes ``projections/fold.sha256``, the hash of the source it
compiled: a compiled module refuses to import when ``fold.py`` no longer matches it (a stale build would silently
run old code). ``bash deploy/setup.sh`` rebuilds it when the source changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

SOURCE = Path("projections") / "fold.py"


class BuildWithSourceHash(build_ext):
    """build_ext that records the hash of the compiled source next to each built copy of the module."""

    def run(self) -> None:
        super().run()
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest() + "\n"
        dirs = {Path(self.build_lib) / "projections"}
        if self.inplace:
            dirs = {Path("projections")}
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / "fold.sha256").write_text(digest)


def extensions() -> list:
    if os.environ.get("LEADLEDGER_PURE_PYTHON") == "1":
        return []
    from Cython.Build import cythonize
    return cythonize([str(SOURCE)], language_level=3, quiet=True,
                     compiler_directives={"annotation_typing": False})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildWithSourceHash})
