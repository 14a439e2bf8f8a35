"""The services' GC tuning (services/runtime.py)."""

from __future__ import annotations

import gc

from services import runtime


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        runtime.tune_gc(freeze=False)
        assert gc.get_threshold() == runtime.GC_THRESHOLDS and gc.get_freeze_count() == 0
        gc.set_threshold(*before)
        runtime.tune_gc()
        assert gc.get_threshold() == runtime.GC_THRESHOLDS and gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
