"""Build of the compiled modules: pure-Python sources compiled by Cython, each typed by the ``.pxd`` beside it.

``COMPILED``: the fold (``projections/fold.py``), the back-test's fold of the lead-keyed log and its sorting of
touchpoints (``projections/log_fold.py``) and the wire format's envelope check (``events/wire.py``). The same
sources run as plain Python when no build is there (``LEADLEDGER_PURE_PYTHON=1`` skips the build); compiled, the
state classes and the hot loops' locals get C types (1.3-1.6x on the offline fold, docs/design.md). The build also
writes ``<module>.sha256`` beside each, the hash of the source it compiled: a compiled module is not imported when
its source no longer matches it (``events._build``: a stale build would silently run old code).
``bash deploy/setup.sh`` rebuilds what changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = [Path("projections") / "fold.py", Path("projections") / "log_fold.py", Path("events") / "wire.py"]


class BuildWithSourceHash(build_ext):
    """build_ext that records the hash of each compiled source next to each built copy of its module."""

    def run(self) -> None:
        super().run()
        for source in COMPILED:
            digest = hashlib.sha256(source.read_bytes()).hexdigest() + "\n"
            d = source.parent if self.inplace else Path(self.build_lib) / source.parent
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{source.stem}.sha256").write_text(digest)


def extensions() -> list:
    if os.environ.get("LEADLEDGER_PURE_PYTHON") == "1":
        return []
    from Cython.Build import cythonize
    return cythonize([str(s) for s in COMPILED], language_level=3, quiet=True,
                     compiler_directives={"annotation_typing": False})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildWithSourceHash})
