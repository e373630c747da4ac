import threading

import numpy as np
import pytest

from serving.batching import MicroBatcher


class SlowDouble:
    """An encoder that records batch sizes and holds the first call until released, so that the
    callers arriving meanwhile queue up behind it."""

    def __init__(self):
        self.batches = []
        self.release = threading.Event()

    def __call__(self, inputs):
        self.batches.append(len(inputs))
        self.release.wait(timeout=10)
        return inputs * 2


def call_concurrently(batcher, inputs_list):
    results, errors = [None] * len(inputs_list), [None] * len(inputs_list)

    def call(i):
        try:
            results[i] = batcher(inputs_list[i])
        except Exception as err:  # noqa: BLE001 - checked by the test
            errors[i] = err
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs_list))]
    for thread in threads:
        thread.start()
    return threads, results, errors


def wait_for_queue(batcher, jobs):
    for _ in range(1000):
        if batcher._jobs.qsize() >= jobs:
            return
        threading.Event().wait(0.005)
    raise AssertionError("callers never queued")


def test_each_caller_gets_its_own_rows_and_waiting_callers_share_one_batch():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder, max_batch=64)
    first = call_concurrently(batcher, [np.full((1, 3), -1.0)])
    while not encoder.batches:
        threading.Event().wait(0.005)
    inputs = [np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 100 * i for i, rows in enumerate([1, 2, 3, 1])]
    threads, results, errors = call_concurrently(batcher, inputs)
    wait_for_queue(batcher, len(inputs))
    encoder.release.set()
    for thread in first[0] + threads:
        thread.join(timeout=10)
    assert errors == [None] * 4
    for given, got in zip(inputs, results):
        np.testing.assert_array_equal(got, given * 2)
    np.testing.assert_array_equal(first[1][0], np.full((1, 3), -2.0))
    assert encoder.batches == [1, 7]


def test_a_batch_stops_at_max_batch_rows_without_splitting_a_job():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder, max_batch=4)
    blocker = call_concurrently(batcher, [np.zeros((1, 2))])
    while not encoder.batches:
        threading.Event().wait(0.005)
    threads, results, errors = call_concurrently(batcher, [np.ones((3, 2))] * 3)
    wait_for_queue(batcher, 3)
    encoder.release.set()
    for thread in blocker[0] + threads:
        thread.join(timeout=10)
    assert errors == [None] * 3
    assert encoder.batches == [1, 6, 3]  # 3+3 passes 4 rows: the batch closes; the third job runs next


def test_an_encoder_error_reaches_every_caller_of_that_batch_and_the_batcher_goes_on():
    calls = []

    def flaky(inputs):
        calls.append(len(inputs))
        if len(calls) == 1:
            raise ValueError("bad batch")
        return inputs + 1

    batcher = MicroBatcher(flaky)
    with pytest.raises(ValueError, match="bad batch"):
        batcher(np.zeros((2, 2)))
    np.testing.assert_array_equal(batcher(np.zeros((1, 2))), np.ones((1, 2)))


def test_an_encoder_that_drops_rows_is_an_error_not_a_misaligned_answer():
    batcher = MicroBatcher(lambda inputs: inputs[:-1])
    with pytest.raises(RuntimeError, match="returned 1 rows for 2 inputs"):
        batcher(np.zeros((2, 2)))


def test_on_batch_is_told_each_batch_size():
    sizes = []
    batcher = MicroBatcher(lambda inputs: inputs, on_batch=sizes.append)
    batcher(np.zeros((5, 1)))
    batcher(np.zeros((2, 1)))
    assert sizes == [5, 2]
