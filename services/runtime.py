"""Process-level tuning shared by the long-running services: the cyclic garbage collector."""

from __future__ import annotations

import gc

# CPython's default (700, 10, 10) runs a collection every few hundred allocations and a full one, which walks every
# live object, every hundred of those. A service allocates thousands of objects per request or batch (envelopes,
# pydantic models, futures), almost none of them in cycles: reference counting frees them.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc(freeze: bool = True) -> None:
    """Collect the cyclic GC less often (GC_THRESHOLDS). ``freeze``: first collect, then move every object alive
    now (the app, its models and routes, the imported modules: never garbage) out of the GC's reach, so later
    collections walk only what the service allocated since. Call once, after the app is built."""
    if freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
