"""Stage 'sample': the trained model's samples, through `rissole_jax.Sampler`.

A pseudo-query is a database item; its k neighbours come from the train
neighbour table, which never lists an item as its own neighbour, so a sample
is not a copy of its query by construction (checked by the Sampler). With
sample.database set, retrieval uses that database instead (RDM's swap),
encoded and indexed under DIR/sample/database.

Writes under DIR/sample/: samples.npy (uint8 (n, H, W, C)), queries.npy (ids
into the database used), samples.png (a grid) and figure.png (as the paper's
Figure 2: each row a query, its k neighbours, and the generated sample).
"""
from __future__ import annotations

import time

from rissole_jax.inference import pictures
from rissole_jax.inference.program import check_config
from rissole_jax.inference.queries import query_neighbours
from rissole_jax.inference.sampler import Sampler
from rissole_jax.files import atomic_save_npy

__all__ = ["run", "check_config"]


def run(ctx) -> dict:
  config, s = ctx.config, ctx.config.sample
  check_config(config)
  sampler = Sampler.from_workdir(ctx.root, config).quantized(s.quantize)
  if s.database:
    sampler = sampler.with_database(s.database, directory=ctx.stage_dir / "database",
                                    progress=ctx.progress_bars)
  ctx.log("sampling %d images (%s, %s, guidance %.2f) from %d pseudo-queries (%s) of a "
          "database of %d", s.num, config.model.variant, s.sampler, s.guidance_scale, s.num,
          s.pseudo_query, len(sampler.db))
  t0 = time.perf_counter()
  samples, queries = sampler.sample(s.num, seed=config.seed, return_queries=True,
                                    progress=ctx.progress_bars and ctx.is_main)
  seconds_sampling = time.perf_counter() - t0

  # Decoding runs on the whole mesh, so every process takes part; one writes.
  show = min(s.show, s.num)
  q_img = sampler.decode(queries[:show])
  nb_img = sampler.decode_rows(query_neighbours(sampler.db.neighbours, queries[:show]))
  if ctx.is_main:
    out = ctx.stage_dir
    atomic_save_npy(out / "samples.npy", samples)
    atomic_save_npy(out / "queries.npy", queries)
    pictures.save_png(out / "samples.png", pictures.tile(
        samples[:256], 16 if len(samples) >= 16 * 16 else 8))
    pictures.save_png(out / "figure.png", pictures.figure(q_img, nb_img, samples[:show]))
  t = sampler.last_timings
  # The first batch compiles; later ones time the sampler itself.
  from rissole_jax.inference.quantize import param_bytes
  return {"denoiser_bytes": param_bytes(sampler.params), "decoder_bytes": param_bytes(sampler.decoder_params),
          "num": int(len(samples)), "seconds_sampling": seconds_sampling,
          "seconds_first_batch": t["seconds_first_batch"],
          "seconds_per_batch": t["seconds_per_batch"], "samples_per_sec": t["samples_per_sec"],
          "nfe_per_sample": t["nfe_per_sample"]}
