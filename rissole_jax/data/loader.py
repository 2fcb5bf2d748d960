"""The training stages' input, through Grain: element k of a list of reads
(batch `step` of a TrainStream, or a chunk of rows for the encode stage) is
decoded in background worker processes, prefetched, and put on the devices
one batch ahead of the step that uses it.

What an element holds depends only on k (batches stay a pure function of
(seed, step), so a resumed run starts the list at its step and needs no
iterator state), and Grain's workers take elements round-robin and hand them
back in order: the batches are the synchronous stream's for any number of
workers. `data.workers`, `data.prefetch` and `data.cache` change how fast,
never what: they are left out of the stage fingerprints (stages/workdir.py).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from rissole_jax.data.pipeline import TrainStream, to_float
from rissole_jax.errors import ConfigError

MAX_AUTO_WORKERS = 16  # MaxText's hosts use about this many; more is rarely faster
WARMUP = 3             # reads left out of input_wait_share: worker start-up, the first compile


def workers_for(setting, in_memory: bool, accelerator: bool = True) -> int:
  """data.workers as a count. "auto": none (a background thread) for data
  already in memory (a gather needs no decode) or when the step itself runs
  on the host's CPU (its threads already use every core: worker processes
  slow it down, docs/performance.md "The input pipeline"); else one per CPU
  core but one (the training process keeps a core), at most MAX_AUTO_WORKERS."""
  if setting == "auto":
    if in_memory or not accelerator:
      return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))
  if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
    raise ConfigError(f"data.workers must be 'auto' or a count >= 0, got {setting!r}. "
                      "Fix: --config.data.workers=auto (or 0 to decode in the training process).")
  return setting


def prefetch_for(setting) -> int:
  """data.prefetch as batches buffered per worker ("auto": 2, as MaxText)."""
  if setting == "auto":
    return 2
  if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
    raise ConfigError(f"data.prefetch must be 'auto' or a count >= 1, got {setting!r}. "
                      "Fix: --config.data.prefetch=auto.")
  return setting


def cache_for(setting, source) -> bool:
  """data.cache: keep the decoded split in memory. "auto" keeps only the
  embedded digits (5,000 small images, read once); everything else is
  streamed, decoded by the workers as it is needed."""
  if setting == "auto":
    return source.name.startswith("mnist_embedded")
  if not isinstance(setting, bool):
    raise ConfigError(f"data.cache must be 'auto', True or False, got {setting!r}.")
  return setting


class StreamBatches:
  """Element k: batch `first + k` of a TrainStream as float images (picklable:
  it is what each worker runs)."""

  def __init__(self, stream: TrainStream, first: int = 0):
    self.stream, self.first = stream, first

  def __call__(self, k: int) -> dict:
    return {"image": self.stream.batch(self.first + int(k))["image"]}


class SourceChunks:
  """Element k: rows chunks[k] = (start, stop) of a source, in order, as float
  images and labels (the encode stage's reads)."""

  def __init__(self, source, chunks):
    self.source, self.chunks = source, list(chunks)

  def __call__(self, k: int) -> dict:
    start, stop = self.chunks[int(k)]
    images, labels = self.source.get(np.arange(start, stop))
    return {"image": to_float(images), "label": labels}


class Timed:
  """Wraps a read: each element also says how long it took to make (the
  loader's own images/s, measured where the work happens)."""

  def __init__(self, read):
    self.read = read

  def __call__(self, k):
    t0 = time.perf_counter()
    out = self.read(k)
    out["read_seconds"] = np.float64(time.perf_counter() - t0)
    return out


def _parse_absl_flags() -> None:
  # Grain's workers read absl flags and fail when they were never parsed
  # (google/grain#1355); `app.run` parses them, pytest and notebooks do not.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Loader:
  """Iterates read(0), ..., read(count - 1), each passed through `put` (e.g.
  onto the devices) ahead of its use: `workers` background processes read
  (0: a background thread), `prefetch` elements buffered each, and a feeder
  thread copies each element out of Grain's shared memory and puts it on the
  devices while the step runs, keeping up to AHEAD of them ready.

  A context manager: leaving it stops the workers. `stats()` gives the share
  of wall time the device waited with no element ready, and the loader's
  images/s."""

  AHEAD = 2  # elements put and ready: one for the step now, one for the next

  def __init__(self, read: Callable[[int], dict], count: int, workers: int = 0,
               prefetch: int = 2, put: Callable[[Any], Any] | None = None):
    import grain
    self.count, self.workers = int(count), int(workers)
    ds = grain.MapDataset.range(self.count).map(Timed(read))
    if not self.count:  # nothing to read (a finished stage resumed): start no worker
      it = []
    elif self.workers:
      _parse_absl_flags()
      it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=prefetch))
    else:  # decode in a thread of this process (PIL releases the GIL while decoding)
      it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    self._it = iter(it)
    self._put = put or (lambda x: x)
    self._ready: queue.Queue = queue.Queue(maxsize=self.AHEAD)
    self._stop = threading.Event()
    self._waits: list[float] = []
    self._reads: list[float] = []
    self._images = 0
    self._times: list[float] = []
    self._given = 0
    self._busy = None
    self._feeder = threading.Thread(target=self._feed, name="rissole-loader", daemon=True)
    self._feeder.start()

  def _feed(self) -> None:
    try:
      for _ in range(self.count):
        el = next(self._it)
        # Grain hands worker results over in shared memory: copied out here,
        # so the segment is freed now and nothing downstream aliases it.
        el = {k: np.array(v) for k, v in el.items()}
        self._reads.append(float(el.pop("read_seconds")))
        self._images += len(el["image"])
        if not self._offer(("ok", self._put(el))):
          return
    except BaseException as e:  # handed to the consumer, raised there
      self._offer(("error", e))

  def _offer(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def busy_until(self, output) -> None:
    """The step just dispatched: its device is busy until `output` (a jax
    array it returns) is ready. With async dispatch the loop runs ahead of
    the device, so waiting for input starves the step only from then on;
    without this, all of the consumer's waiting counts."""
    self._busy = output

  def _wait(self) -> tuple[Any, float]:
    """The next element, and how long the device sat idle waiting for it."""
    try:
      return self._ready.get_nowait(), 0.0
    except queue.Empty:
      pass
    busy, idle_from = self._busy, None
    while True:
      if idle_from is None and (busy is None or busy.is_ready()):
        idle_from = time.perf_counter()
      try:  # poll the device's state every millisecond until it is idle
        item = self._ready.get(timeout=0.001 if idle_from is None else 1.0)
        return item, (time.perf_counter() - idle_from) if idle_from is not None else 0.0
      except queue.Empty:
        continue

  def __next__(self):
    if self._given >= self.count or self._it is None:
      raise StopIteration
    (kind, value), waited = self._wait()
    now = time.perf_counter()
    self._waits.append(waited)
    if kind == "error":
      self.close()
      raise value
    self._given += 1
    self._times.append(now)
    return value

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock the feeder
      try:
        self._ready.get_nowait()
      except queue.Empty:
        break
    if self._feeder.is_alive() and threading.current_thread() is not self._feeder:
      self._feeder.join(timeout=60)
    it, self._it = self._it, None
    if hasattr(it, "close"):
      it.close()  # stops the workers now, not at garbage collection
    del it

  @classmethod
  def for_config(cls, data_cfg, read, count: int, in_memory: bool, put=None) -> "Loader":
    """A loader with the config's data.workers and data.prefetch, on this
    host's backend (workers_for)."""
    import jax
    workers = workers_for(data_cfg.workers, in_memory, jax.default_backend() != "cpu")
    return cls(read, count, workers, prefetch_for(data_cfg.prefetch), put)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def stats(self) -> dict[str, float]:
    """input_wait_share: the time the device sat idle waiting for an element
    (see busy_until), over the wall time, from the element after the first
    WARMUP to the last handed out (0 when too few); input_images_per_second:
    images per second the loader can make (per-element read time, times the
    workers reading in parallel)."""
    out = {"input_wait_share": 0.0, "input_images_per_second": 0.0,
           "input_workers": float(self.workers)}
    n = len(self._times)
    if n > WARMUP + 1:
      wall = self._times[-1] - self._times[WARMUP]
      waited = sum(self._waits[WARMUP + 1:n])
      out["input_wait_share"] = float(min(1.0, waited / wall)) if wall > 0 else 0.0
    reads = self._reads[WARMUP:] or self._reads
    if reads and self._images:
      per_image = np.median(reads) / (self._images / max(len(self._reads), 1))
      out["input_images_per_second"] = float(max(self.workers, 1) / per_image) if per_image > 0 else 0.0
    return out
