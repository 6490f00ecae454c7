"""The garbage collector's settings of a serving process (``fastraft.gcpolicy``)."""
import gc

from fastraft.gcpolicy import YOUNG_COLLECTION_THRESHOLD, settle_gc


def test_settle_gc_freezes_what_exists_and_raises_only_the_young_threshold():
    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0  # start-up's objects left out of full collections
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, before[1], before[2])
        # a young collection is never started by a burst of in-flight objects that
        # reference counting frees: 10,000 live futures' worth of tracked objects
        gc.collect(0)  # a young generation empty and its count at 0, whatever came before
        collected = []
        gc.callbacks.append(lambda phase, info: collected.append(info["generation"])
                            if phase == "start" else None)
        try:
            held = [[] for _ in range(10_000)]
            del held
        finally:
            gc.callbacks.pop()
        assert collected == []
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
