"""Batching across concurrent requests, inside the serving process.

Requests hand their images to one ``MicroBatcher``, which runs the encoder on one worker thread, one
batch at a time, on everything that queued up while the previous batch ran: one image alone at low
load, large batches under load, and no timer to tune. Batches are formed on the server's event loop:
a batch's answers are handed out, and the next batch started, by a callback that the loop runs after
the request handlers already waiting to run, so every request that reached the encoder meanwhile joins
the next batch. (An earlier version formed batches on the encoder thread, which took each request as
it came: under load at concurrency 32 the sync endpoint's batches held 2.1 images on average, and a
first async version's 1.1, against 8 here; every one cost hand-offs between threads.)

This replaced a separate BentoML batchable service: its dispatcher answered 503 whenever its latency
estimate passed ``max_latency_ms``, and BentoML 1.4.30+ closes the inter-service client session every
100 requests under the requests still in flight (500 "Server disconnected", bentoml/BentoML#5540).
Keeping the encoder in-process also saves an HTTP hop, a serialisation and a second copy of the graph.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

import numpy as np

logger = logging.getLogger("capt.serving")

class MicroBatcher:
    """Calls ``encode`` on the concatenation (axis 0) of concurrent callers' arrays and hands each
    caller its own rows. A batch takes the waiting jobs in order while they fit in ``max_batch`` rows
    (a job is never split: one larger than ``max_batch`` runs alone). An exception in ``encode`` is raised in every caller of that batch.
    ``on_batch(rows)`` is told each batch's size (for metrics).

    ``await batcher.encode_async(inputs)`` from the event loop; ``batcher(inputs)`` from any other
    thread (the server's sync endpoints), which joins the same batches through the loop it was made on
    or that last used ``encode_async``. Where no loop is running (start-up, a script), ``batcher(inputs)`` runs the
    encoder on those inputs alone, in the calling thread: batching changes no answer, because the
    served encoder is checked at start to be batch-invariant (``serving/engine.py``)."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], max_batch: int = 64,
                 on_batch: Callable[[int], None] | None = None, name: str = "micro-batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.encode, self.max_batch, self.on_batch = encode, max_batch, on_batch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)  # one batch at a time
        self._pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._running = False
        # Made on the serving loop (BentoML builds the service in its ASGI start-up), it serves that loop
        # from the start: the readiness check's sync calls join batches before any request came.
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()

    async def encode_async(self, inputs: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None and self._loop.is_closed():
                # A loop closed mid-batch never ran its callbacks: what it left is of no caller now.
                self._running, self._pending = False, deque()
            if self._running or self._pending:
                raise RuntimeError("this MicroBatcher is serving another event loop")
            self._loop = loop
        future = loop.create_future()
        self._pending.append((np.asarray(inputs), future))
        if not self._running:
            self._start_batch()
        return await future

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        loop = self._loop
        if loop is None or not loop.is_running():
            return self._encode([np.asarray(inputs)])
        if _running_loop() is loop:
            raise RuntimeError("MicroBatcher called synchronously on its event loop: await encode_async")
        pending = asyncio.run_coroutine_threadsafe(self.encode_async(inputs), loop)
        while True:  # no time limit on the encoder, but no waiting forever on a loop that has stopped
            try:
                return pending.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if not loop.is_running():
                    pending.cancel()
                    raise RuntimeError("the event loop stopped while an encoder batch was pending") from None

    def _start_batch(self) -> None:
        """On the loop: the waiting jobs (cancelled ones dropped) that fit in ``max_batch`` rows, to the encoder thread."""
        jobs, rows = [], 0
        while self._pending:
            inputs, future = self._pending[0]
            if future.cancelled():  # its request is gone (client disconnected)
                self._pending.popleft()
                continue
            if jobs and rows + len(inputs) > self.max_batch:
                break  # the next batch's first job
            self._pending.popleft()
            jobs.append((inputs, future))
            rows += len(inputs)
        if not jobs:
            return
        if self.on_batch is not None:
            try:
                self.on_batch(rows)
            except Exception:  # noqa: BLE001 - a metric must not stop the encoder
                logger.exception("on_batch failed (the batch runs anyway)")
        try:
            running = self._loop.run_in_executor(self._executor, self._encode, [inputs for inputs, _ in jobs])
        except BaseException as err:  # e.g. an executor shut down: the callers get the error, none waits forever
            for _, future in jobs:
                if not future.done():
                    future.set_exception(err)
            if self._pending:
                self._loop.call_soon(self._start_batch)  # the rest get their answer (or error) too
            return
        self._running = True
        running.add_done_callback(partial(self._finish_batch, jobs))

    def _encode(self, arrays: list[np.ndarray]) -> np.ndarray:
        inputs = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        outputs = self.encode(inputs)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"encoder returned {len(outputs)} rows for {len(inputs)} inputs")
        return outputs

    def _finish_batch(self, jobs: list[tuple[np.ndarray, asyncio.Future]], running: asyncio.Future) -> None:
        """On the loop: each job its rows (or the batch's error), then the next batch."""
        try:
            cancelled = running.cancelled()  # the loop is shutting down
            error = None if cancelled else running.exception()
            outputs = None if cancelled or error is not None else running.result()
            start = 0
            for inputs, future in jobs:
                if not future.done():
                    if cancelled:
                        future.cancel()
                    elif error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(outputs[start:start + len(inputs)])
                start += len(inputs)
        finally:
            self._running = False
            if self._pending:
                self._start_batch()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

