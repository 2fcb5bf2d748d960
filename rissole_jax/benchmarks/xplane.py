"""Time per HLO op from the .xplane.pb that jax.profiler.trace writes.

XLA:CPU's thunk executor records each op it runs (an event with the op's
name, module and run id). A convolution or large dot may return once its
work is queued on the Eigen thread pool: the work then runs in pool tasks,
which the trace records as regions (ThreadpoolListener::StartRegion ..
StopRegion), each linked by an id to the Record marker where it was queued.
Following those links gives every task its op: an op is working while its
own event or any task it queued (or they queued) runs, on any thread. Time
in executor bookkeeping (ThunkExecutor::Execute outside any op, completion
callbacks) is the executor's. Each instant of a call is split evenly between
the ops working then, so the ops' times add up to the time any thread worked
for the call (wall-clock shares, not thread time: a thread blocked inside an
op, waiting for its pool tasks, is not counted twice).

The trace JSON next to the .pb drops the links, so the protobuf is read here
with a minimal wire-format decoder (XSpace, XPlane, XLine, XEvent, XStat as
in tsl/profiler/protobuf/xplane.proto).
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import struct

EXECUTOR = "(executor)"
UNLINKED = "(unlinked pool tasks)"


@dataclasses.dataclass
class Event:
  thread: int
  name: str
  start: int          # picoseconds
  end: int
  stats: dict


def _varint(b: bytes, i: int):
  shift = value = 0
  while True:
    c = b[i]
    i += 1
    value |= (c & 0x7F) << shift
    shift += 7
    if c < 0x80:
      return value, i


def _fields(b: bytes):
  """(field number, value) of one message: ints for varints, bytes otherwise."""
  i, n = 0, len(b)
  while i < n:
    key, i = _varint(b, i)
    wire = key & 7
    if wire == 0:
      value, i = _varint(b, i)
    elif wire == 1:
      value, i = b[i:i + 8], i + 8
    elif wire == 2:
      size, i = _varint(b, i)
      value, i = b[i:i + size], i + size
    elif wire == 5:
      value, i = b[i:i + 4], i + 4
    else:
      raise ValueError(f"xplane.pb: unsupported wire type {wire}")
    yield key >> 3, value


def _signed(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def read_events(path: str, plane: str = "/host:CPU") -> list[Event]:
  """The events of one plane of an XSpace file."""
  with open(path, "rb") as f:
    space = f.read()
  events = []
  for field, raw in _fields(space):
    if field != 1:
      continue
    fields = collections.defaultdict(list)
    for k, v in _fields(raw):
      fields[k].append(v)
    if not fields[2] or fields[2][0].decode() != plane:
      continue
    names = {}
    for entry in fields[4]:   # event_metadata: id -> XEventMetadata (name = 2)
      e = dict(_fields(entry))
      names[e.get(1, 0)] = dict(_fields(e.get(2, b""))).get(2, b"").decode()
    stat_names = {}
    for entry in fields[5]:   # stat_metadata: id -> XStatMetadata (name = 2)
      e = dict(_fields(entry))
      stat_names[e.get(1, 0)] = dict(_fields(e.get(2, b""))).get(2, b"").decode()
    for line in fields[3]:
      lf = collections.defaultdict(list)
      for k, v in _fields(line):
        lf[k].append(v)
      thread, base = (lf[1] or [0])[0], (lf[3] or [0])[0] * 1000
      for raw_event in lf[4]:
        meta, offset, dur, stats = 0, 0, 0, {}
        for k, v in _fields(raw_event):
          if k == 1:
            meta = v
          elif k == 2:
            offset = v
          elif k == 3:
            dur = v
          elif k == 4:
            stat = dict(_fields(v))
            name = stat_names.get(stat.get(1), "")
            if 7 in stat:      # a reference to an interned string
              stats[name] = stat_names.get(stat[7], "")
            elif 5 in stat:
              stats[name] = stat[5].decode(errors="replace")
            elif 4 in stat:
              stats[name] = _signed(stat[4])
            elif 3 in stat:
              stats[name] = stat[3]
            elif 2 in stat:
              stats[name] = struct.unpack("<d", stat[2])[0]
        start = base + offset
        events.append(Event(thread, names.get(meta, ""), start, start + dur, stats))
  return events


def op_times(events: list[Event], module: str) -> list[dict]:
  """Per call of `module` (in time order): {"ops": {op: ps}, "executor": ps,
  "unlinked": ps, "busy": ps (time any thread worked for the call), "window":
  (first op start, last op end)}; the times add up to busy. See the module
  doc for the attribution."""
  by_thread = collections.defaultdict(list)
  intervals = []   # (thread, start, end, kind, key[, run id])
  records = []     # (thread, time, id)
  for e in events:
    by_thread[e.thread].append(e)
  for thread, evs in by_thread.items():
    evs.sort(key=lambda e: (e.start, -e.end))
    open_regions = []
    for e in evs:
      if e.name == "ThreadpoolListener::StartRegion":
        open_regions.append((e.start, e.stats.get("_c")))
      elif e.name == "ThreadpoolListener::StopRegion":
        if open_regions:
          start, cid = open_regions.pop()
          intervals.append((thread, start, e.start, "region", cid))
      elif e.name == "ThreadpoolListener::Record":
        records.append((thread, e.start, e.stats.get("_p")))
      elif e.stats.get("hlo_module") == module and "hlo_op" in e.stats:
        intervals.append((thread, e.start, e.end, "op", e.stats["hlo_op"], e.stats.get("run_id")))
      elif e.name.startswith("ThunkExecutor::Execute (wait"):
        intervals.append((thread, e.start, e.end, "wait", None))   # the caller, blocked
      elif e.name.startswith(("end: ", "ThunkExecutor::Execute")):
        intervals.append((thread, e.start, e.end, "executor", None))

  nested = collections.defaultdict(list)
  for iv in intervals:
    nested[iv[0]].append(iv)
  for thread, t, rid in records:
    nested[thread].append((thread, t, t, "record", rid))
  segments, parent = [], {}   # (start, end, innermost interval); record id -> interval
  for ivs in nested.values():
    points = []
    for k, iv in enumerate(ivs):
      if iv[3] == "record":
        points.append((iv[1], 2, k))
      else:
        points += [(iv[1], 1, k), (iv[2], 0, k)]
    points.sort()
    active, last = [], None
    for t, what, k in points:
      if active and t > last:
        segments.append((last, t, ivs[active[-1]]))
      if what == 2:   # the innermost interval where a task was queued owns it
        parent[ivs[k][4]] = ivs[active[-1]] if active else None
        continue
      if what == 1:
        active.append(k)
      elif k in active:
        active.remove(k)
      last = t

  resolved: dict = {}

  def owner(iv):
    """The op (or EXECUTOR, or None) at the root of a task's chain of queuers;
    chains can be long (Eigen's contractions queue task after task)."""
    chain, seen = [], set()
    while iv is not None and iv[3] == "region" and iv[4] not in resolved:
      if iv[4] in seen:
        iv = None
        break
      seen.add(iv[4])
      chain.append(iv[4])
      iv = parent.get(iv[4])
    if iv is None:
      root = None
    elif iv[3] == "region":
      root = resolved[iv[4]]
    else:
      root = EXECUTOR if iv[3] == "executor" else iv[4] if iv[3] == "op" else None
    for rid in chain:
      resolved[rid] = root
    return root

  # Calls: the op events of one run id.
  runs = collections.defaultdict(list)
  for iv in intervals:
    if iv[3] == "op":
      runs[iv[5]].append(iv)
  windows = sorted((min(iv[1] for iv in ivs), max(iv[2] for iv in ivs))
                   for ivs in runs.values())
  calls = [{"busy": 0.0, "window": w, "spans": []} for w in windows]
  starts = [w[0] for w in windows]
  for start, end, iv in segments:   # each instant of a thread: its innermost interval's owner
    i = bisect.bisect_right(starts, start) - 1
    if i < 0 or start >= windows[i][1] or iv[3] == "wait":
      continue
    who = owner(iv)
    calls[i]["spans"].append((start, min(end, windows[i][1]),
                              UNLINKED if who is None else who))
  for c in calls:
    # Each instant is split evenly between the owners working then (on any
    # thread): an op on both cores for 1 ms gets 1 ms, two ops sharing the
    # cores for 1 ms get 0.5 ms each. The times add up to busy.
    points = sorted([(s0, 1, who) for s0, _, who in c["spans"]]
                    + [(s1, -1, who) for _, s1, who in c.pop("spans")])
    active, last, times = collections.Counter(), None, collections.defaultdict(float)
    for t, step, who in points:
      if active and t > last:
        c["busy"] += t - last
        for name in active:
          times[name] += (t - last) / len(active)
      active[who] += step
      if active[who] <= 0:
        del active[who]
      last = t
    c["executor"] = times.pop(EXECUTOR, 0.0)
    c["unlinked"] = times.pop(UNLINKED, 0.0)
    c["ops"] = dict(times)
  return calls
