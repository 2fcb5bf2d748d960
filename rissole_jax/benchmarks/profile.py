"""Per-op profile of the denoiser's train step and one sampling step, and of
the VQ-GAN's train step.

  python -m rissole_jax.benchmarks.profile --config configs/mnist.py \
      [--config configs/celeba64.py:paper] [--steps 2] [--warmup 1] \
      [--what train,sample,vqgan] [--out runs/profile.md | runs/profile.json]

Builds the denoiser's programs as benchmarks/throughput.py does (same
synthetic database; --override, --sample_batch and --database are its flags)
and the VQ-GAN step as benchmarks/vqgan_step.py does (the stage's jitted step
on a random batch, its step counter at vqgan.disc_start so the GAN terms act;
the output says whether they did), compiles
each, runs --warmup untimed calls, then --steps calls under jax.profiler.trace,
and gives each op its time from the trace (benchmarks/xplane.py: an op is
working while its own event or an Eigen pool task it queued runs, on any
thread; each instant is split evenly between the ops working then). Each op
is joined with the compiled HLO text: its opcode and fused computation give
its kind, its `op_name` metadata (jax's name stack, which flax fills with
module paths) the top-level flax module (in the VQ-GAN step, ops under one of
the step's named scopes, train/vqgan.SCOPES, go to the scope: the
discriminator runs in three of them); an op without metadata (e.g. a
weight-gradient convolution XLA made) takes the module of the nearest operand
that has one. Reported per program (medians over the profiled calls; per op
too, so an op the OS preempted once, on a shared machine, does not skew it):

  busy ms      time at least one thread worked for the call (the ops' times
               add up to it);
  wall ms      the call's wall time, blocked until ready (and the warm-up
               calls', untraced: the profiler's own cost is the difference);
  host share   1 - busy / wall: dispatch, launch, waiting with no thread
               working for the call;
  FLOPs        XLA's cost analysis of the whole program, and the FLOPs of
               the convolutions and dots counted from their shapes (as
               XLA counts them: taps on padding are not work; GFLOP/s is
               per op time, so it is a lower bound where ops overlap);
and two tables of time shares, by top-level module (forward and backward
split by jax's `transpose(...)` name stack) and by op kind, plus the slowest
ops. The shares add up to 100% (the executor's bookkeeping is a row, and so
are pool tasks whose queuer the trace does not show, if any).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import math
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Iterator

from absl import app, flags

from rissole_jax.benchmarks import markdown_table, throughput, vqgan_step, xplane

# --config, --override, --steps, --warmup, --sample_batch, --database and
# --compilation_cache are throughput.py's flags (one definition each).


def define_flags() -> None:
  """This CLI's own flags, defined when it runs (not on import: other
  benchmark modules define --out too, and tests import several)."""
  flags.DEFINE_list("what", ["train", "sample"], "Programs to profile: train (the denoiser's "
                    "donating train step), sample (one DDIM step over all blocks), vqgan (the "
                    "VQ-GAN's train step, GAN terms on).")
  flags.DEFINE_string("out", None, "Also write the results here: markdown if the name ends in "
                      ".md, else JSON.")
  flags.DEFINE_integer("top", 10, "Slowest HLO ops listed per program (the JSON lists all).")


KINDS = ("convolution", "dot", "reduction", "elementwise", "copy/transpose", "other",
         "executor", "unlinked pool tasks")
# Opcodes that only move or reshape data.
_MOVE = {"copy", "transpose", "bitcast", "reshape", "broadcast", "concatenate", "slice",
         "dynamic-slice", "dynamic-update-slice", "pad", "gather", "scatter", "reverse",
         "parameter", "constant", "tuple", "get-tuple-element", "iota", "bitcast-convert"}
_OTHER = {"while", "call", "conditional", "async-start", "async-done", "custom-call",
            "rng-bit-generator", "sort", "all-reduce", "all-gather", "infeed", "outfeed"}


# ---------------------------------------------------------------------------
# The compiled HLO.

@dataclasses.dataclass
class Op:
  name: str
  opcode: str
  shape: str
  operands: list
  attrs: str
  op_name: str = ""

  def dims(self) -> list[int] | None:
    m = re.match(r"\w+\[([\d,]*)\]", self.shape)
    return None if m is None else [int(d) for d in m.group(1).split(",") if d]

  def called(self, key: str = "calls") -> str | None:
    m = re.search(key + r"=%?([\w.\-]+)", self.attrs)
    return m and m.group(1)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')


def parse_hlo(text: str) -> tuple[str, dict[str, Op], dict[str, list[str]]]:
  """HLO text -> (module name, ops by name, op names by computation)."""
  module, ops, comps, current = "", {}, {}, None
  for line in text.splitlines():
    if line.startswith("HloModule "):
      module = line.split()[1].rstrip(",")
    elif line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = line.replace("ENTRY ", "").split()[0].lstrip("%")
      comps[current] = []
    elif current and (m := _INSTR.match(line)):
      name, shape, opcode, rest = m.groups()
      depth, end = 1, len(rest)
      for i, ch in enumerate(rest):   # the operand list ends at its closing paren
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
          end = i
          break
      meta = _OP_NAME.search(rest[end:])
      ops[name] = Op(name, opcode, shape, re.findall(r"%([\w.\-]+)", rest[:end]), rest[end:],
                     meta.group(1).replace("\\'", "'") if meta else "")
      comps[current].append(name)
  return module, ops, comps


def _fused(op: Op, ops, comps) -> list[Op]:
  """The instructions a fusion runs (nested fusions flattened); [op] otherwise."""
  body = op.called() if op.opcode == "fusion" else None
  if body is None or body not in comps:
    return [op]
  return [i for n in comps[body] for i in _fused(ops[n], ops, comps)]


def op_kind(op: Op, ops, comps) -> str:
  """The kind of one op: what its fused computation contains, most costly first."""
  codes = {i.opcode for i in _fused(op, ops, comps)}
  if "convolution" in codes:
    return "convolution"
  if "dot" in codes:
    return "dot"
  if codes & {"reduce", "reduce-window", "select-and-scatter"}:
    return "reduction"
  if codes <= _MOVE:
    return "copy/transpose"
  if codes & _OTHER:
    return "other"
  return "elementwise"


def op_flops(op: Op, ops, comps) -> float:
  """FLOPs (2 per multiply-add) of the convolutions and dots an op runs, as
  XLA's cost analysis counts them: a convolution's taps on padding are not
  work. Other ops: 0."""
  total = 0.0
  for i in _fused(op, ops, comps):
    if i.opcode not in ("convolution", "dot") or len(i.operands) < 2:
      continue
    out, lhs, rhs = i.dims(), *(ops[n].dims() if n in ops else None for n in i.operands[:2])
    if out is None or lhs is None or rhs is None:
      continue
    if i.opcode == "dot":
      m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
      total += 2.0 * math.prod(out) * math.prod(
          lhs[int(d)] for d in (m.group(1).split(",") if m else ()) if d)
    else:
      total += 2.0 * _conv_macs(i.attrs, out, lhs, rhs)
  return total


def _conv_macs(attrs: str, out, lhs, rhs) -> float:
  """Multiply-adds of one convolution: per output batch and feature, the
  (output position, kernel tap) pairs that land on an input pixel, times the
  input features per group."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
  if labels is None:
    return 0.0
  ll, rl, ol = labels.groups()
  m = re.search(r"window=\{([^}]*)\}", attrs)
  window = dict(re.findall(r"(\w+)=([\dx_\-]+)", m.group(1))) if m else {}
  spatial = [d for d in ol if d.isdigit()]
  def field(key):
    return [int(v) for v in window[key].split("x")] if key in window else [1] * len(spatial)
  strides, ldil, rdil = field("stride"), field("lhs_dilate"), field("rhs_dilate")
  pads = ([int(p.split("_")[0]) for p in window["pad"].split("x")] if "pad" in window
          else [0] * len(spatial))
  macs = float(out[ol.index("b")] * out[ol.index("f")] * rhs[rl.index("i")])
  for n, d in enumerate(spatial):
    size, k = (lhs[ll.index(d)] - 1) * ldil[n] + 1, rhs[rl.index(d)]
    macs *= sum(1 for o in range(out[ol.index(d)]) for t in range(k)
                if 0 <= (p := o * strides[n] + t * rdil[n] - pads[n]) < size and p % ldil[n] == 0)
  return macs


def top_module(op_name: str, scopes=()) -> str | None:
  """The top-level flax module in jax's name stack, e.g.
  'jit(step)/transpose(jvp(Denoiser))/up1_res0/norm1/mul' -> 'up1_res0';
  'Denoiser (own ops)' for ops of the root module itself; None outside one.
  The innermost of `scopes` (jax named scopes) in the stack comes first:
  'jit(step)/jvp(gan_loss)/Discriminator/conv1/...' -> 'gan_loss'."""
  if not op_name:
    return None
  if op_name.startswith("state["):   # a copy of the state (donation, optimizer)
    return "(state copies)"
  parts = op_name.split("/")
  inner = [re.sub(r"^(?:\w+\()+|\)+$", "", p) for p in parts]   # transforms stripped
  scoped = [p for p in inner[:-1] if p in scopes]
  if scoped:
    return scoped[-1]
  for i, name in enumerate(inner[:-1]):
    if name[:1].isupper() and name.isidentifier():   # a flax module's class name
      rest = [p for p in parts[i + 1:-1] if "." not in p and "(" not in p]
      return rest[0] if rest else f"{name} (own ops)"
  return None


def outside_label(op_name: str) -> str:
  """A coarse name for an op outside the flax modules (RNG, loss, optimizer...)."""
  if any(w in op_name for w in ("threefry", "random", "_randint", "_normal", "_uniform")):
    return "(RNG)"
  return "(outside the model: loss, gather, optimizer, EMA)"


def resolve_module(name: str, ops, comps, scopes=(), depth: int = 6) -> tuple[str | None, bool]:
  """(module of an op, whether it came from an operand): its own metadata,
  else its fused instructions' most common, else the nearest operand's."""
  op = ops[name]
  found = [m for i in [op] + _fused(op, ops, comps) if (m := top_module(i.op_name, scopes))]
  if found:
    return collections.Counter(found).most_common(1)[0][0], False
  frontier, seen = list(op.operands), {name}
  for _ in range(depth):
    nxt = []
    for n in frontier:
      if n in seen or n not in ops:
        continue
      seen.add(n)
      m = top_module(ops[n].op_name, scopes)
      if m and m != "(state copies)":
        return m, True
      nxt += ops[n].operands
    frontier = nxt
  return None, False


# ---------------------------------------------------------------------------
# Profiling one program.

@dataclasses.dataclass
class Program:
  name: str
  model: str                # what it runs, for the output
  params: int
  images: int
  jitted: Any
  args: tuple
  donate: bool = False      # args[0] is donated: each call gets the last call's out[0]
  scopes: tuple = ()        # named scopes that group ops before modules (top_module)
  status: Callable | None = None   # the last call's output -> a line for the output


def programs(config, what, sample_batch: int = 0, n_db: int = 2048) -> Iterator[Program]:
  """The programs asked for, each built when the one before has been profiled."""
  if {"train", "sample"} & set(what):
    s = throughput.setup(config, sample_batch, n_db)
    model, params = s.base["config"], s.base["params"]
    if "train" in what:
      yield Program("train", model, params, s.batch, *throughput.train_program(s), donate=True)
      s.state = None   # donated
    if "sample" in what:
      yield Program("sample_step", model, params, s.sample_batch, *throughput.sample_program(s, 1))
  if "vqgan" in what:
    from rissole_jax.train.vqgan import SCOPES
    v = vqgan_step.setup(config)
    yield Program("vqgan_train", vqgan_step.config_name(config), v.params, v.batch,
                  v.trainer.step, (v.state, v.key, v.images), donate=True, scopes=SCOPES,
                  status=lambda out: vqgan_step.gan_status(config, out[1]))


def profile_program(p: Program, steps: int, warmup: int, top: int = 10) -> dict:
  """Compiles, warms up and profiles `steps` calls; the result's tables are
  shares of op time."""
  import jax
  compiled = p.jitted.lower(*p.args).compile()
  module, ops, comps = parse_hlo(compiled.as_text())

  def timed_calls(n, args):
    """n calls' wall seconds, the last output; a donating program's state goes around."""
    walls, out = [], None
    for _ in range(n):
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(*args))
      walls.append(time.perf_counter() - t0)
      if p.donate:
        args = (out[0],) + tuple(args[1:])
    return walls, args, out

  untraced, args, _ = timed_calls(warmup, p.args)
  p.args = None   # a donated state is invalid after its call
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      walls, args, out = timed_calls(steps, args)
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {d}")
    calls = xplane.op_times(xplane.read_events(files[0]), module)
  if not calls:
    raise RuntimeError(f"the trace has no op events of {module}: this backend's profiler "
                       "does not record HLO ops (XLA:CPU's thunk runtime does)")
  runs = len(calls)
  # Per op, the median over calls: a call's op that the OS preempted (this
  # machine is shared) does not inflate its share.
  names = {n for c in calls for n in c["ops"]}
  own = {n: statistics.median(c["ops"].get(n, 0.0) for c in calls) / 1e6 for n in names}
  executor_us = statistics.median(c["executor"] for c in calls) / 1e6
  unlinked_us = statistics.median(c["unlinked"] for c in calls) / 1e6
  op_us = sum(own.values()) + executor_us + unlinked_us
  hosts = [1 - c["busy"] / 1e12 / w for c, w in zip(calls, walls)] if len(walls) == runs else []

  by_module: dict[str, dict] = collections.defaultdict(lambda: {"fwd": 0.0, "bwd": 0.0})
  by_kind: dict[str, dict] = {k: {"us": 0.0, "flops": 0.0, "ops": 0} for k in KINDS}
  by_module[xplane.EXECUTOR]["fwd"] = by_kind["executor"]["us"] = executor_us
  by_module[xplane.UNLINKED]["fwd"] = by_kind["unlinked pool tasks"]["us"] = unlinked_us
  inferred_us, listed = 0.0, []
  for n, us in own.items():
    op = ops.get(n)
    if op is None:   # an op of a computation the text did not show
      kind, mod, via, flops, stack = "other", None, False, 0.0, ""
    else:
      kind, (mod, via) = op_kind(op, ops, comps), resolve_module(n, ops, comps, p.scopes)
      flops = op_flops(op, ops, comps)
      stack = op.op_name or next((i.op_name for i in _fused(op, ops, comps) if i.op_name), "")
    mod = mod or outside_label(stack)
    inferred_us += us if via else 0.0
    by_module[mod]["bwd" if "transpose(" in stack else "fwd"] += us
    by_kind[kind]["us"] += us
    by_kind[kind]["flops"] += flops
    by_kind[kind]["ops"] += 1
    listed.append({"op": n, "kind": kind, "module": mod, "shape": op.shape if op else "",
                   "name_stack": stack, "gflop": flops / 1e9,
                   "ms_per_call": us / 1e3, "share": us / op_us,
                   "gflops_per_sec": flops / us / 1e3 if flops and us > 0 else None})

  modules = sorted(({"module": m, "share": (v["fwd"] + v["bwd"]) / op_us,
                     "forward": v["fwd"] / op_us, "backward": v["bwd"] / op_us,
                     "ms_per_call": (v["fwd"] + v["bwd"]) / 1e3}
                    for m, v in by_module.items() if v["fwd"] + v["bwd"]),
                   key=lambda r: -r["share"])
  kinds = [{"kind": k, "share": v["us"] / op_us, "ms_per_call": v["us"] / 1e3,
            "ops": v["ops"], "gflop_per_call": v["flops"] / 1e9 if v["flops"] else None,
            "gflops_per_sec": v["flops"] / v["us"] / 1e3 if v["flops"] and v["us"] else None}
           for k, v in by_kind.items() if v["us"]]
  return {"program": p.name, "model": p.model, "params": p.params, "images": p.images,
          "status": p.status(out) if p.status else None,
          "conditionals": sum(op.opcode == "conditional" for op in ops.values()),
          "calls": runs, "hlo_ops": len(own),
          "wall_ms": statistics.median(walls) * 1e3,
          "untraced_ms": statistics.median(untraced) * 1e3 if untraced else None,
          "busy_ms": statistics.median(c["busy"] for c in calls) / 1e9,
          "host_share": max(0.0, statistics.median(hosts)) if hosts else None,
          "xla_gflop": throughput.xla_flops(compiled) / 1e9,
          "inferred_module_share": inferred_us / op_us,
          "by_module": modules, "by_kind": kinds, "top": top,
          "ops": sorted(listed, key=lambda r: -r["share"])}


WHAT = ("train", "sample", "vqgan")


def profile(config, what=("train", "sample"), steps: int = 2, warmup: int = 1,
            sample_batch: int = 0, n_db: int = 2048, top: int = 10,
            compilation_cache: bool = False) -> dict:
  """The profiles of a config's programs (see the module doc)."""
  import jax
  unknown = set(what) - set(WHAT)
  if unknown:
    from rissole_jax.errors import ConfigError
    raise ConfigError(f"--what {','.join(sorted(unknown))}: the programs are "
                      f"{', '.join(WHAT)}")
  # A cached executable keeps the op metadata (name stacks) of the program it
  # was compiled from, which jax leaves out of the cache key by default: a
  # program that differs only in its named scopes would show stale modules.
  settings = {"jax_enable_compilation_cache":
              compilation_cache and jax.config.jax_enable_compilation_cache,
              "jax_compilation_cache_include_metadata_in_key": True}
  was = {k: getattr(jax.config, k) for k in settings}
  try:
    for k, value in settings.items():
      jax.config.update(k, value)
    profiled = [profile_program(p, steps, warmup, top)
                for p in programs(config, what, sample_batch, n_db)]
  finally:
    for k, value in was.items():
      jax.config.update(k, value)
  dev = jax.devices()[0]
  return {"platform": jax.default_backend(), "device_kind": dev.device_kind,
          "programs": profiled}


# ---------------------------------------------------------------------------
# Output.

def markdown(result: dict) -> str:
  def pct(rows, keys):
    return [dict(r, **{k: f"{100 * r[k]:.1f}%" for k in keys}) for r in rows]

  out = [f"### {result.get('spec', '')} ({result['device_kind']})\n\n"]
  for p in result["programs"]:
    notes = [f"{p['params']:,} parameters", f"{p['conditionals']} conditionals"]
    out.append(f"- **{p['program']}**: {p['model']} ({', '.join(notes)})"
               + (f"; {p['status']}" if p["status"] else "") + "\n")
  out.append("\n")
  summary = [dict(p, host_share=None if p["host_share"] is None
                  else f"{100 * p['host_share']:.1f}%",
                  gflops=p["xla_gflop"] / p["wall_ms"] * 1e3) for p in result["programs"]]
  out.append(markdown_table(summary, [
      ("program", "program"), ("images", "images"), ("calls", "profiled calls"),
      ("untraced_ms", "warm-up ms (no trace)"), ("wall_ms", "wall ms/call"),
      ("busy_ms", "busy ms"),
      ("host_share", "host share"), ("hlo_ops", "HLO ops"), ("xla_gflop", "XLA GFLOP/call"),
      ("gflops", "GFLOP/s (wall)")]))
  for p in result["programs"]:
    out.append(f"\n**{p['program']}**, share of op time by top-level module "
               f"({100 * p['inferred_module_share']:.1f}% attributed via an operand):\n")
    out.append(markdown_table(pct(p["by_module"], ("share", "forward", "backward")), [
        ("module", "module"), ("share", "share"), ("forward", "forward"),
        ("backward", "backward"), ("ms_per_call", "ms/call")]))
    out.append(f"\n**{p['program']}**, by op kind:\n")
    out.append(markdown_table(pct(p["by_kind"], ("share",)), [
        ("kind", "kind"), ("share", "share"), ("ms_per_call", "ms/call"), ("ops", "HLO ops"),
        ("gflop_per_call", "GFLOP/call"), ("gflops_per_sec", "GFLOP/s")]))
    out.append(f"\n**{p['program']}**, slowest ops:\n")
    out.append(markdown_table(pct(p["ops"][:p["top"]], ("share",)), [
        ("op", "HLO op"), ("kind", "kind"), ("module", "module"), ("shape", "output"),
        ("share", "share"), ("ms_per_call", "ms/call"), ("gflops_per_sec", "GFLOP/s")]))
  return "".join(out)


def main(argv):
  del argv
  F = flags.FLAGS
  results = []
  for spec in F.config:
    config = throughput.load_config(spec, F.override)
    results.append(dict(profile(config, F.what, F.steps, F.warmup, F.sample_batch,
                                F.database, F.top, F.compilation_cache),
                        spec=spec))
  text = "\n".join(markdown(r) for r in results)
  print(text)
  if F.out:
    from rissole_jax import files
    if F.out.endswith(".md"):
      files.atomic_write_bytes(F.out, text.encode())
    else:
      files.atomic_write_json(F.out, results)


if __name__ == "__main__":
  throughput.define_flags()
  define_flags()
  flags.FLAGS.set_default("steps", 2)   # throughput's defaults are for timing, not tracing
  flags.FLAGS.set_default("warmup", 1)
  app.run(main)
