"""Sampling a trained model, apart from training (nothing here imports
rissole_jax.train or optax):

  sampler.py        the Sampler API (rissole_jax.Sampler)
  program.py        Settings and the jitted sampling program
  queries.py        pseudo-queries and their neighbours
  database.py       the database sampling retrieves from (SamplingDatabase)
  sources.py        user images as a database (Sampler.with_database)
  configs.py        a trained model's config: a workdir's records or a config file
  loading.py        a finished workdir's parts (Parts), read for sampling only
  modelfile.py      the one-file model export (format v1)
  quantize.py       int8 post-training quantization (Qwix)
  stablehlo.py      the sampler as a jax.export program (format v1)
  export_runner.py  that program's standalone runner (run.py: jax and numpy only)
  pictures.py       grids, figures and PNGs
"""
