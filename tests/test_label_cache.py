"""The label-set cache under concurrent requests (serving/model.py ``LabelCache``), and the service
counting each lookup by its own outcome."""
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.errors import RequestError
from serving.model import LabelCache

THREADS = 16
WAIT = 60  # seconds: a safety net against a hang if the code is broken, never reached when it works


class ColdStart:
    """``THREADS`` callers started together behind a barrier; each compute blocks until every caller
    has called in, so all of them arrive while the first compute of their key is still running."""

    def __init__(self, cache: LabelCache):
        self.cache, self.start = cache, threading.Barrier(THREADS)
        self.arrived, self.condition = 0, threading.Condition()
        self.computed = Counter()

    def compute(self, key, fail: bool = False):
        with self.condition:
            assert self.condition.wait_for(lambda: self.arrived == THREADS, timeout=WAIT)
            self.computed[key] += 1
        if fail:
            raise RequestError(f"label {key!r} is too long")
        return np.full(4, float(key))

    def call(self, key, fail: bool = False):
        self.start.wait(timeout=WAIT)
        with self.condition:
            self.arrived += 1
            self.condition.notify_all()
        try:
            return self.cache.get_or_compute(key, lambda: self.compute(key, fail))
        except RequestError as err:
            return err

    def run(self, keys, fail: bool = False) -> list:
        with ThreadPoolExecutor(THREADS) as pool:
            return list(pool.map(lambda key: self.call(key, fail), keys))


def test_concurrent_cold_requests_compute_each_key_once():
    cache = LabelCache(8)
    cold = ColdStart(cache)
    keys = [i % 3 for i in range(THREADS)]
    answers = cold.run(keys)
    for key, (value, _) in zip(keys, answers):
        assert np.array_equal(value, np.full(4, float(key)))
    assert cold.computed == {0: 1, 1: 1, 2: 1}
    assert cache.hits + cache.misses == THREADS and cache.misses == 3
    flags = [hit for _, hit in answers]
    assert sum(flags) == cache.hits and flags.count(False) == cache.misses
    assert Counter(key for key, hit in zip(keys, flags) if not hit) == {0: 1, 1: 1, 2: 1}  # one miss per key
    assert cache.get_or_compute(0, lambda: pytest.fail("cached: not computed again"))[1] is True


def test_a_failed_compute_reaches_every_waiter_and_is_not_cached():
    cache = LabelCache(8)
    cold = ColdStart(cache)
    answers = cold.run([7] * THREADS, fail=True)
    assert cold.computed == {7: 1}
    assert all(isinstance(a, RequestError) and "too long" in str(a) for a in answers)
    # Paid for once (a miss); no waiter was served a value (no hits).
    assert (cache.misses, cache.hits) == (1, 0)
    value, hit = cache.get_or_compute(7, lambda: np.zeros(4))  # a later call tries again
    assert not hit and np.array_equal(value, np.zeros(4)) and cache.misses == 2


def test_the_least_recently_used_entry_goes_first():
    cache = LabelCache(2)
    for key in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        cache.get_or_compute(key, lambda: np.zeros(1))
    assert [cache.get_or_compute(key, lambda: np.ones(1))[1] for key in ("a", "c", "b")] == [True, True, False]


class _Metric:
    def __init__(self):
        self.value = 0

    def inc(self, amount=1):
        self.value += amount


class _ModelWithAConcurrentHit:
    """This request's lookup is a miss while another request hits the cache during it: the shared
    counters move by one hit and one miss though this request made one lookup, a miss."""

    def __init__(self):
        self.label_cache = LabelCache(4)

    def _lookup(self):
        self.label_cache.misses += 1  # ours
        self.label_cache.hits += 1  # the other request's

    def classify_answer(self, images, labels, templates, top_k, encode=None):
        self._lookup()
        return {"predictions": [[]], "label_cache_hit": False, "templates_applied": False}

    def classify(self, images, labels, templates, top_k, encode=None):  # what the service called before
        self._lookup()
        return [[]]


def test_the_service_counts_a_lookup_by_its_own_outcome():
    from serving.service import Classifier
    service = Classifier.inner.__new__(Classifier.inner)  # no bundle: only what _classify uses
    service.model, service.encode_images = _ModelWithAConcurrentHit(), None
    service.cache_hits, service.cache_misses = _Metric(), _Metric()
    answer = service._classify([], ["a", "b"], None, 5)
    assert answer["label_cache_hit"] is False
    assert (service.cache_hits.value, service.cache_misses.value) == (0, 1)


def test_peek_answers_only_what_is_cached_and_counts_a_hit():
    from serving.model import LabelCache
    cache = LabelCache(2)
    assert cache.peek(("a",)) is None and (cache.hits, cache.misses) == (0, 0)
    value, hit = cache.get_or_compute(("a",), lambda: np.ones(3))
    assert not hit
    np.testing.assert_array_equal(cache.peek(("a",)), np.ones(3))
    assert (cache.hits, cache.misses) == (1, 1)
