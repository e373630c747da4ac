"""Batching across concurrent requests, inside the serving process.

Every request thread hands its images to one worker thread, which runs the encoder on everything
that queued up while the previous batch ran: one image alone at low load, large batches under load,
and no timer to tune. This replaced a separate BentoML batchable service: its dispatcher answered
503 whenever its latency estimate passed ``max_latency_ms``, and BentoML 1.4.30+ closes the
inter-service client session every 100 requests under the requests still in flight (500 "Server
disconnected", bentoml/BentoML#5540). Keeping the encoder in-process also saves an HTTP hop, a
serialisation and a second copy of the graph.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np


class _Job:
    __slots__ = ("inputs", "output", "error", "done")

    def __init__(self, inputs: np.ndarray):
        self.inputs = inputs
        self.output: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class MicroBatcher:
    """Calls ``encode`` on the concatenation (axis 0) of concurrent callers' arrays and hands each
    caller its own rows. A batch takes every waiting job until it holds ``max_batch`` rows or more
    (a job is never split). An exception in ``encode`` is raised in every caller of that batch.
    ``on_batch(rows)`` is told each batch's size (for metrics)."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], max_batch: int = 64,
                 on_batch: Callable[[int], None] | None = None, name: str = "micro-batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.encode, self.max_batch, self.on_batch = encode, max_batch, on_batch
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()  # lives as long as the server

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        job = _Job(np.asarray(inputs))
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.output

    def _next_batch(self) -> list[_Job]:
        jobs = [self._jobs.get()]
        rows = len(jobs[0].inputs)
        while rows < self.max_batch:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                break
            rows += len(jobs[-1].inputs)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._next_batch()
            try:
                inputs = jobs[0].inputs if len(jobs) == 1 else np.concatenate([job.inputs for job in jobs])
                if self.on_batch is not None:
                    self.on_batch(len(inputs))
                outputs = self.encode(inputs)
                if len(outputs) != len(inputs):
                    raise RuntimeError(f"encoder returned {len(outputs)} rows for {len(inputs)} inputs")
                start = 0
                for job in jobs:
                    job.output = outputs[start:start + len(job.inputs)]
                    start += len(job.inputs)
            except BaseException as err:  # noqa: BLE001 - handed to every waiting caller, never lost
                for job in jobs:
                    job.error = err
            finally:
                for job in jobs:
                    job.done.set()
