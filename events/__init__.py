"""leadledger events.

``events.wire`` may be compiled (setup.py): the build is used only when it is the current source's
(``events._build``).
"""

from pathlib import Path

from events._build import use_fresh_builds

use_fresh_builds(__name__, Path(__file__).resolve().parent, ["wire"])
