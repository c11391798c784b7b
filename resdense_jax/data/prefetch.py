"""The last data stage: host batches moved to the devices ahead of the step that needs them.

A background thread pulls the next batches from the grain iterator and starts their transfer
(`to_global_batch`) while the current step runs, so neither the decode nor the copy sits between two steps.
The iterator state it reports is the one after the last batch handed out, not after the ones still queued:
a checkpoint resumes at the first batch no step has seen.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, Iterator

from resdense_jax.data.pipeline import to_global_batch

_END = object()


class DevicePrefetcher:
  """Iterates global device batches `size` ahead of the consumer; checkpointable like a grain iterator.

  `wait_s` accumulates the time `next()` blocked because no batch was ready (the step waited for data).
  """

  def __init__(self, iterator: Iterator[dict], sharding: Any, *, size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be at least 1, got {size}")
    self._iterator = iterator
    self._sharding = sharding
    self._state = iterator.get_state()  # before any batch: what a checkpoint at this point resumes from
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self.wait_s = 0.0
    self._thread = threading.Thread(target=self._fill, name="resdense_jax device prefetch", daemon=True)
    self._thread.start()

  def _fill(self) -> None:
    try:
      while not self._stop.is_set():
        host_batch = next(self._iterator)
        item = (self._iterator.get_state(), to_global_batch(host_batch, self._sharding))
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except StopIteration:
      self._queue.put((None, _END))
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer's thread)
      self._queue.put((None, e))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = time.perf_counter()
    state, batch = self._queue.get()
    self.wait_s += time.perf_counter() - start
    if batch is _END:
      self._queue.put((None, _END))
      raise StopIteration
    if isinstance(batch, BaseException):
      raise batch
    self._state = state
    return batch

  def get_state(self) -> bytes:
    """The wrapped iterator's state after the last batch returned (bytes, as grain's checkpoint handler
    stores for iterators that are not a grain DatasetIterator; the same JSON a DatasetIterator writes)."""
    return json.dumps(self._state, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    raise NotImplementedError("restore the grain iterator itself, then wrap it in a new DevicePrefetcher")

  def start_prefetch(self) -> None:
    """grain's checkpoint handler calls it after a restore; this object is never restored."""

  def close(self) -> None:
    """Stops the thread (it may hold one batch more than the queue)."""
    self._stop.set()
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass
    self._thread.join(timeout=10)
