"""Retrieval: the one place that knows embeddings, indexes, search and
neighbour tables. A package of small modules; every name is here as
`retrieval.X`:

  embedding  embeddings, full and reduced (PCA, pooling)
  index      exact search and the Index (ScaNN or exact), saved and loaded
  manifest   the JSON manifests every file of a build is listed in
  latents    latent files written and read as a whole
  tables     the index stage: build once, search shares, assemble the tables
  database   the Database that training and sampling read; the database swap

  embed(latents, config)            -> (N, d) float32, L2-normalised
  Index.build(emb, config) / .search(queries, k, exclude_ids) / .save / Index.load
  exact_search(database, queries, k) -> the reference (matrix product + top-k)
  index_database(dir, config, ...)  -> index + neighbour tables on disk (index stage)
  load_database(config, root)       -> Database (what training and sampling read)
  build_database(ae, source, config, out_dir) -> Database (database swap)

Similarity is the dot product of L2-normalised embeddings (cosine). Every file
is written atomically and listed, with its size and sha256, in a small JSON
manifest written last; readers verify the manifest, so an interrupted or
damaged build is refused with a message naming the file and the fix.
"""
from rissole_jax.retrieval.database import (Database, build_database, load_database,
                                            open_database)
from rissole_jax.retrieval.embedding import (EMBEDDINGS, REDUCTIONS, Reduction, embed,
                                             embed_rows, embedding_dim, fit_reduction,
                                             normalize, reduction_kind)
from rissole_jax.retrieval.index import (BACKENDS, STRUCTURES, Index, exact_search,
                                         load_reduction, plan, recall_at_k, resolve_backend)
from rissole_jax.retrieval.latents import encode_source, read_latents, save_latents
from rissole_jax.files import read_manifest, write_manifest
from rissole_jax.retrieval.tables import (assemble_tables, build_index, exact_search_rows,
                                          index_database, recall_in_full_space, search_share,
                                          table_from_parts)
