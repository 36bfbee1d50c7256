"""Containers that stay in the collector's frozen generation (the server freezes four times a second).

CPython stops tracking a plain dict whose keys and values are all atomic (ints, strs, tuples of
those), and starts tracking it again, as a young object, as soon as a new tuple is stored in it.
The next collection then walks the whole dict: an index of 70,000 RRNs cost 5-10 ms of event loop
every second in the soak (docs/benchmarks.md, section 6). The collector never untracks a dict
subclass, so once frozen it stays frozen, whatever it holds.
"""

from __future__ import annotations


class TrackedDict(dict):
    """A dict the collector tracks for life: frozen once, never walked again by `gc.collect()`."""

    __slots__ = ()
