"""The stage processes' cyclic garbage collector settings (consumer.runner.tune_gc)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from consumer.runner import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


@pytest.mark.usefixtures("restored_gc")
def test_tuning_freezes_start_up_objects_and_collects_the_young_generation_less_often() -> None:
    _, older, oldest = gc.get_threshold()
    built_at_start_up = [[i] for i in range(100)]
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, older, oldest)
    assert GC_YOUNG_THRESHOLD > 700  # CPython's own
    assert gc.get_freeze_count() >= len(built_at_start_up)
    # Frozen objects are not walked by any collection (gc.get_objects lists tracked ones).
    tracked = {id(o) for o in gc.get_objects()}
    assert id(built_at_start_up[0]) not in tracked


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_after_tuning_are_still_collected() -> None:
    tune_gc()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # only the cyclic collector can free a cycle
    gc.collect()
    assert gone() is None
