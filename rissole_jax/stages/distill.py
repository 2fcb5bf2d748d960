"""Stage 'distill': progressive distillation of the trained denoiser
(train/distill.py), one round per halving of the step count:
distill.teacher_steps -> /2 -> ... -> distill.min_steps. Not in the default
main job; `python -m rissole_jax.distill --workdir W` runs it.

Writes under W/distill/: students/<n>.msgpack (each round's student, its EMA
weights) and students.json (their step counts and sha256, rewritten after
every round: a finished round is never redone). A round resumes from its
own checkpoints (round_<n>/checkpoints); its batches are a pure function of
(seed, round, step). The sampler reads the students back with
inference/loading.load_students.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from flax import serialization

from rissole_jax import files
from rissole_jax.errors import DataError
from rissole_jax.inference import loading
from rissole_jax.data.pipeline import RowCount, TrainStream
from rissole_jax.diffusion.schedule import make_schedule
from rissole_jax.runtime import parallel
from rissole_jax.stages import workdir as wd
from rissole_jax.train import checkpoints, guard, loop
from rissole_jax.train import diffusion as dtrain
from rissole_jax.train import distill

# Held-out items each round's match check reads (a fixed subset: the check
# holds their neighbours' latents in memory at once).
HELDOUT_CHECK = 512


def run(ctx) -> dict:
  config, t = ctx.config, ctx.config.distill.train
  distill.check_config(config)
  loading.check_stages(config, ctx.root)
  mesh = parallel.make_mesh(config.mesh)
  rules = config.mesh.logical_axis_rules
  model, teacher, stats = loading.load_denoiser(config, ctx.root, mesh)
  db = dtrain.load_database(config, ctx.root)
  rows, codebook = dtrain.training_rows(db, stats)
  latent_shape, k = tuple(stats["latent_shape"]), int(stats["k"])
  held_z, held_nb = _heldout(db, stats, rows, codebook)
  counts = distill.student_counts(config.distill)
  schedule = make_schedule(config.diffusion)
  done = loading.read_students_index(ctx.stage_dir)
  ctx.log("distilling %d -> %s steps, %d train steps a round of %d images",
          config.distill.teacher_steps, counts, t.steps, t.batch_size)
  rounds, key = {}, parallel.put_replicated(jax.random.PRNGKey(config.seed + 2), mesh)
  t0 = time.time()
  for r, n in enumerate(counts):
    if str(n) in done:   # finished earlier: it is the next round's teacher
      teacher = loading.read_student(ctx.stage_dir, n, done[str(n)], mesh)
      rounds[n] = wd.read_metrics(ctx.stage_dir / f"round_{n}")
      continue
    fns = distill.parts(config, model, schedule, n)
    like, sh = distill.state_target(model, fns.tx, latent_shape, k, mesh, rules)
    mngr = checkpoints.manager(ctx.stage_dir / f"round_{n}" / "checkpoints",
                               t.keep_checkpoints, t.ckpt_every)
    state, start = distill.initial_state(fns.tx, teacher, sh), 0
    if mngr.latest_step() is not None:
      state, start = checkpoints.restore_latest(mngr, like, ctx.log)
      ctx.log("round %d (%d steps): resumed from step %d", r + 1, n, start)
    stream = TrainStream(RowCount(len(rows)), t.batch_size, config.seed + 1000 * (r + 1),
                         ctx.process_index, ctx.process_count, cache=False)
    call, _ = dtrain.make_train_call(fns, config.diffusion.train.gather, rows, codebook,
                                     db.neighbours, stream, key, sh, mesh, rules)
    hints = {f"distill.train.{x}": t[x] for x in ("lr", "warmup_steps", "grad_clip")}
    nan_guard = guard.Guard("distill", t, hints, mngr.directory)
    t_round = time.time()
    ran = loop.run_steps(call, state, start, t, mngr, nan_guard,
                         ctx.progress(t.steps, start, f"distill {2 * n}->{n}"), ctx.writer(),
                         ctx.log, f"distill {2 * n}->{n}")
    student = ran.state["ema"]
    m = {"loss": ran.last["loss"], "steps_per_sec": ran.steps_per_sec,
         "seconds": time.time() - t_round, "skipped_steps": nan_guard.skipped}
    if held_z is not None:   # a student that learnt matches its teacher better than at its start
      err = lambda p: distill.match_error(model, fns.schedule, config.diffusion.prediction, n,
                                          p, ran.state["teacher"], held_z, held_nb)
      m["heldout_match_before"], m["heldout_match_after"] = err(ran.state["teacher"]), err(student)
      ctx.log("round %d (%d -> %d steps): held-out match %.4f -> %.4f", r + 1, 2 * n, n,
              m["heldout_match_before"], m["heldout_match_after"])
    if ctx.is_main:
      done[str(n)] = _write_student(ctx.stage_dir, n, student)
      files.atomic_write_json(ctx.stage_dir / f"round_{n}" / "metrics.json", m)
      loading.write_students_index(ctx.stage_dir, done)
    rounds[n], teacher = m, student
  seconds = time.time() - t0
  teacher_seconds = _teacher_seconds(ctx)
  out = {"num_students": len(done), "fewest_steps": min(int(n) for n in done),
         "teacher_steps": config.distill.teacher_steps,
         "rounds": {str(n): m for n, m in rounds.items()}, "seconds_this_run": seconds}
  if teacher_seconds:
    # Distillation's cost in units of the teacher's training (the diffusion stage's time).
    out["cost_vs_teacher_training"] = sum(m["seconds"] for m in rounds.values()) / teacher_seconds
  return out


def _heldout(db, stats, rows, codebook, cap: int = HELDOUT_CHECK):
  """The first `cap` held-out latents and their neighbours' (normalised), or Nones."""
  held = getattr(db, "heldout_latents", None)
  if held is None or len(held) == 0:
    return None, None
  z = dtrain.normalise(np.asarray(held[:cap], np.float32), stats).astype(np.float32)
  nb = dtrain.lookup(rows[np.asarray(db.heldout_neighbours[:cap])], codebook)
  return z, np.asarray(nb, np.float32)


def _write_student(stage_dir, n: int, params) -> str:
  data = serialization.msgpack_serialize(jax.tree.map(parallel.to_host, params))
  files.atomic_write_bytes(loading.student_path(stage_dir, n), data)
  return files.sha256_bytes(data)


def _teacher_seconds(ctx) -> float:
  try:
    return float(wd.read_metrics(ctx.dir("diffusion")).get("seconds", 0.0))
  except (DataError, OSError):   # the ratio is a report, never a reason to fail
    return 0.0
