import asyncio
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
        self.started = threading.Event()

    def __call__(self, inputs):
        self.batches.append(len(inputs))
        self.started.set()
        self.release.wait(timeout=10)
        return inputs * 2


async def until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def rows(*counts):
    return [np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 100 * i for i, n in enumerate(counts)]


def test_each_caller_gets_its_own_rows_and_waiting_callers_share_one_batch():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder, max_batch=64)
    inputs = rows(1, 2, 3, 1)

    async def scenario():
        first = asyncio.ensure_future(batcher.encode_async(np.full((1, 3), -1.0)))
        await until(encoder.started.is_set, "the first batch")
        waiting = [asyncio.ensure_future(batcher.encode_async(x)) for x in inputs]
        await until(lambda: len(batcher._pending) == len(inputs), "the callers to queue")
        encoder.release.set()
        return await first, await asyncio.gather(*waiting)

    first, results = asyncio.run(scenario())
    np.testing.assert_array_equal(first, np.full((1, 3), -2.0))
    for given, got in zip(inputs, results):
        np.testing.assert_array_equal(got, given * 2)
    assert encoder.batches == [1, 7]


def _queued_behind_a_running_batch(max_batch: int, sizes: list[int]):
    """Jobs of ``sizes`` rows queued while a batch of 1 runs: (each job's answer, the batch sizes)."""
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder, max_batch=max_batch)

    async def scenario():
        blocker = asyncio.ensure_future(batcher.encode_async(np.zeros((1, 2))))
        await until(encoder.started.is_set, "the first batch")
        waiting = [asyncio.ensure_future(batcher.encode_async(np.full((n, 2), float(n)))) for n in sizes]
        await until(lambda: len(batcher._pending) == len(sizes), "the callers to queue")
        encoder.release.set()
        await blocker
        return await asyncio.gather(*waiting)

    return asyncio.run(scenario()), encoder.batches


@pytest.mark.parametrize("sizes, batches", [
    ([3, 3, 3], [1, 3, 3, 3]),  # 3+3 would pass 4 rows: each job of 3 runs in a batch of its own
    ([2, 2, 5, 1, 1], [1, 4, 5, 2]),  # 2+2 fill 4; 5 is over max_batch and runs alone; then 1+1
])
def test_jobs_fill_a_batch_up_to_max_batch_rows_never_split_and_a_larger_job_runs_alone(sizes, batches):
    results, ran = _queued_behind_a_running_batch(4, sizes)
    assert [len(r) for r in results] == sizes and all(np.all(r == 2 * n) for r, n in zip(results, sizes))
    assert ran == batches


def test_a_caller_that_went_away_is_left_out_of_the_next_batch():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder)

    async def scenario():
        blocker = asyncio.ensure_future(batcher.encode_async(np.zeros((1, 2))))
        await until(encoder.started.is_set, "the first batch")
        gone = asyncio.ensure_future(batcher.encode_async(np.zeros((5, 2))))
        kept = asyncio.ensure_future(batcher.encode_async(np.ones((2, 2))))
        await until(lambda: len(batcher._pending) == 2, "the callers to queue")
        gone.cancel()  # what the server does to a request whose client disconnected
        encoder.release.set()
        await blocker
        return await kept

    np.testing.assert_array_equal(asyncio.run(scenario()), np.full((2, 2), 2.0))
    assert encoder.batches == [1, 2]


def test_sync_callers_on_other_threads_join_the_event_loops_batches():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder)
    results = {}

    def sync_call(name, value):
        results[name] = batcher(np.full((1, 3), value))

    async def scenario():
        blocker = asyncio.ensure_future(batcher.encode_async(np.zeros((1, 3))))
        await until(encoder.started.is_set, "the first batch")
        threads = [threading.Thread(target=sync_call, args=(f"thread {i}", i)) for i in (1, 2)]
        for thread in threads:
            thread.start()
        awaited = asyncio.ensure_future(batcher.encode_async(np.full((1, 3), 3.0)))
        await until(lambda: len(batcher._pending) == 3, "all three callers to queue")
        encoder.release.set()
        await blocker
        result = await awaited
        await asyncio.get_running_loop().run_in_executor(None, lambda: [t.join(10) for t in threads])
        return result

    awaited = asyncio.run(scenario())
    assert encoder.batches == [1, 3]
    np.testing.assert_array_equal(awaited, np.full((1, 3), 6.0))
    np.testing.assert_array_equal(results["thread 1"], np.full((1, 3), 2.0))
    np.testing.assert_array_equal(results["thread 2"], np.full((1, 3), 4.0))


def test_without_a_running_event_loop_a_sync_call_runs_the_encoder_itself():
    sizes = []
    batcher = MicroBatcher(lambda inputs: inputs + 1, on_batch=sizes.append)
    np.testing.assert_array_equal(batcher(np.zeros((2, 2))), np.ones((2, 2)))
    asyncio.run(batcher.encode_async(np.zeros((1, 2))))  # a loop that has ended since
    np.testing.assert_array_equal(batcher(np.zeros((3, 2))), np.ones((3, 2)))
    assert sizes == [1]  # only the batch formed on the loop is reported


def test_a_sync_call_on_the_event_loop_itself_is_refused_not_a_deadlock():
    batcher = MicroBatcher(lambda inputs: inputs)

    async def scenario():
        await batcher.encode_async(np.zeros((1, 1)))
        batcher(np.zeros((1, 1)))

    with pytest.raises(RuntimeError, match="await encode_async"):
        asyncio.run(scenario())


def test_an_encoder_error_reaches_every_caller_of_that_batch_and_the_batcher_goes_on():
    calls = []
    release = threading.Event()

    def flaky(inputs):
        calls.append(len(inputs))
        release.wait(timeout=10)
        if len(calls) == 2:
            raise ValueError("bad batch")
        return inputs + 1

    batcher = MicroBatcher(flaky)

    async def scenario():
        first = asyncio.ensure_future(batcher.encode_async(np.zeros((1, 2))))
        await until(lambda: calls, "the first batch")
        doomed = [asyncio.ensure_future(batcher.encode_async(np.zeros((n, 2)))) for n in (1, 2)]
        await until(lambda: len(batcher._pending) == 2, "the callers to queue")
        release.set()
        outcomes = await asyncio.gather(first, *doomed, return_exceptions=True)
        after = await batcher.encode_async(np.zeros((1, 2)))
        return outcomes, after

    outcomes, after = asyncio.run(scenario())
    np.testing.assert_array_equal(outcomes[0], np.ones((1, 2)))
    assert [type(o) for o in outcomes[1:]] == [ValueError, ValueError]
    assert calls == [1, 3, 1]
    np.testing.assert_array_equal(after, np.ones((1, 2)))


def test_an_encoder_that_drops_rows_is_an_error_not_a_misaligned_answer():
    batcher = MicroBatcher(lambda inputs: inputs[:-1])
    with pytest.raises(RuntimeError, match="returned 1 rows for 2 inputs"):
        asyncio.run(batcher.encode_async(np.zeros((2, 2))))
    with pytest.raises(RuntimeError, match="returned 1 rows for 2 inputs"):
        batcher(np.zeros((2, 2)))


def test_on_batch_is_told_each_batch_size():
    sizes = []
    batcher = MicroBatcher(lambda inputs: inputs, on_batch=sizes.append)

    async def scenario():
        await batcher.encode_async(np.zeros((5, 1)))
        await batcher.encode_async(np.zeros((2, 1)))

    asyncio.run(scenario())
    assert sizes == [5, 2]


def test_a_batcher_made_on_an_event_loop_serves_it_before_its_first_await():
    sizes = []

    async def scenario():
        batcher = MicroBatcher(lambda inputs: inputs + 1, on_batch=sizes.append)  # as Classifier.__init__ does
        return await asyncio.get_running_loop().run_in_executor(None, batcher, np.zeros((2, 2)))

    np.testing.assert_array_equal(asyncio.run(scenario()), np.ones((2, 2)))
    assert sizes == [2]  # through the loop's batches, not beside them


def test_a_caller_that_goes_away_while_its_batch_runs_does_not_break_the_others():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder)

    async def scenario():
        gone = asyncio.ensure_future(batcher.encode_async(np.ones((1, 2))))
        kept = asyncio.ensure_future(batcher.encode_async(np.ones((2, 2))))  # the next batch, behind it
        await until(encoder.started.is_set, "the batch")
        gone.cancel()
        encoder.release.set()
        after = await batcher.encode_async(np.ones((1, 2)))
        return await kept, after

    kept, after = asyncio.run(scenario())
    assert encoder.batches == [1, 3]  # the cancelled caller's batch ran, answered to no one; the others shared the next
    np.testing.assert_array_equal(kept, np.full((2, 2), 2.0))
    np.testing.assert_array_equal(after, np.full((1, 2), 2.0))


def test_a_failing_metric_does_not_stop_the_batch():
    def broken_metric(rows):
        raise ValueError("metric down")

    batcher = MicroBatcher(lambda inputs: inputs + 1, on_batch=broken_metric)
    np.testing.assert_array_equal(asyncio.run(batcher.encode_async(np.zeros((1, 2)))), np.ones((1, 2)))


def test_a_batch_that_cannot_start_fails_its_callers_instead_of_leaving_them_waiting():
    batcher = MicroBatcher(lambda inputs: inputs)
    batcher._executor.shutdown()

    async def scenario():
        return await asyncio.wait_for(asyncio.gather(batcher.encode_async(np.zeros((1, 2))),
                                                     batcher.encode_async(np.zeros((1, 2))), return_exceptions=True), 5)

    outcomes = asyncio.run(scenario())
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]  # "cannot schedule new futures after shutdown"


def test_one_batcher_serves_one_event_loop_at_a_time():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder)
    refusal = {}

    def other_loop():
        try:
            asyncio.run(batcher.encode_async(np.zeros((1, 2))))
        except RuntimeError as err:
            refusal["error"] = str(err)

    async def scenario():
        busy = asyncio.ensure_future(batcher.encode_async(np.zeros((1, 2))))
        await until(encoder.started.is_set, "the batch")
        thread = threading.Thread(target=other_loop)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        encoder.release.set()
        await busy

    asyncio.run(scenario())
    assert "another event loop" in refusal["error"]


def test_a_batcher_whose_loop_closed_mid_batch_serves_the_next_loop():
    encoder = SlowDouble()
    batcher = MicroBatcher(encoder)

    async def leave_mid_batch():
        asyncio.ensure_future(batcher.encode_async(np.zeros((1, 2))))
        await until(encoder.started.is_set, "the batch")

    asyncio.run(leave_mid_batch())  # closes its loop with the batch still running
    assert batcher._running  # nothing on the closed loop can finish it
    encoder.release.set()
    result = asyncio.run(asyncio.wait_for(batcher.encode_async(np.ones((2, 2))), 10))
    assert result.shape == (2, 2) and np.all(result == 2)
