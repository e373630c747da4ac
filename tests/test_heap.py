"""serving.heap.freeze_startup_heap: what start-up made is left out of later garbage collections,
and garbage made afterwards is still collected."""
import gc
import weakref

from serving.heap import freeze_startup_heap


class Node:
    pass


def test_start_up_objects_are_frozen_and_later_garbage_is_still_collected():
    survivor = Node()
    try:
        frozen = freeze_startup_heap()
        # Frozen objects still die by reference count, and threads that earlier tests left running
        # (servers, thread pools) may free a few between the two calls: the count can only fall.
        assert frozen > 1000
        assert 0.99 * frozen <= gc.get_freeze_count() <= frozen
        assert not any(obj is survivor for obj in gc.get_objects())  # frozen objects are not tracked for collection
        cycle = Node()
        cycle.self = cycle  # only a garbage collection frees a cycle
        reference = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert reference() is None
    finally:
        gc.unfreeze()
