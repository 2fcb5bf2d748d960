"""A trained model's parts, loaded for sampling only: the VQ-GAN generator,
the EMA denoiser and the database of a finished workdir (`load_workdir`), as
`Parts`. Checkpoints are read through rissole_jax/store/checkpoints.py, just
the parameters sampling needs: no optimizer, discriminator or train step is
built (nothing of rissole_jax.train is imported)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rissole_jax import files
from rissole_jax.errors import DataError
from rissole_jax.inference.configs import workdir_config
from rissole_jax.inference.database import SamplingDatabase
from rissole_jax.runtime import parallel

NEEDED_STAGES = ("vqgan", "encode", "index", "diffusion")


@dataclasses.dataclass
class Parts:
  """What sampling needs: the config, the autoencoder, the denoiser (model and
  EMA params), the latent statistics, the database and the device mesh.
  stats: mean and std (latent normalisation), k, latent_shape. manifest: a
  model file's manifest (format, weights, fingerprints, provenance), if it
  came from one."""
  config: Any
  ae: Any
  model: Any
  params: Any
  stats: dict
  db: SamplingDatabase
  mesh: Any = None
  manifest: dict | None = None
  students: dict = dataclasses.field(default_factory=dict)  # steps -> distilled params

  @property
  def schedule(self):
    """The noise schedule (as Sampler.schedule: quantize_parts and the
    StableHLO export take either)."""
    from rissole_jax.diffusion.schedule import make_schedule
    return make_schedule(self.config.diffusion)


def check_stages(config, root: Path, needed=NEEDED_STAGES) -> None:
  """Each needed stage finished with this config, or DataError naming the
  stage and the command that makes it."""
  from rissole_jax.stages import stage_records
  for rec in stage_records(config, Path(root)):
    if rec.name not in needed or rec.is_done():
      continue
    state = rec.load()
    why = ("has not run" if state is None else
           "was made with another config than the stages before it" if
           state.get("fingerprint") != rec.fingerprint else "has not finished")
    raise DataError(
        f"stage '{rec.name}' in {root} {why}, so there is no trained model to sample from. "
        f"Fix: python -m rissole_jax.main --config CONFIG --workdir {root} "
        f"(add --only {rec.name} if the stages before it are done; it resumes where it stopped).")


def read_stats(path: Path) -> dict:
  """The latent statistics the diffusion stage recorded (latent_stats.json):
  mean and std (float32 arrays), k, latent_shape."""
  from rissole_jax.store import checkpoints
  if not path.exists():
    raise DataError(f"{path} is missing: the 'diffusion' stage has not run in "
                    f"{path.parent.parent}.")
  meta = files.read_json(path)
  try:
    return {"mean": np.asarray(meta["mean"], np.float32),
            "std": np.asarray(meta["std"], np.float32),
            "k": int(meta["k"]), "latent_shape": tuple(meta["latent_shape"])}
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{path} is damaged ({type(e).__name__}: {e}). "
                    + checkpoints.remake_fix(path.parent, "diffusion")) from None


def abstract_denoiser_params(model, config, latent_shape, k: int, mesh):
  """The denoiser's params as abstract arrays laid out on `mesh` as training
  laid them out (config.mesh's logical axis rules): a restore target that
  costs no initialisation."""
  from rissole_jax.models import unet
  x, t, cond = unet.init_inputs(model, latent_shape, k)
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, t,
                                            **cond)["params"])
  shardings = parallel.shardings_for(boxed, mesh, config.mesh.logical_axis_rules)
  import flax.linen as nn
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def load_denoiser(config, root: Path, mesh=None):
  """(model, EMA params, stats) of the diffusion stage under `root`; stats holds
  the latent normalisation (mean, std) and the k and latent shape it trained with."""
  from rissole_jax.models import make_denoiser
  from rissole_jax.store import checkpoints
  root = Path(root)
  sdir = root / "diffusion"
  stats = read_stats(sdir / "latent_stats.json")
  mesh = mesh or parallel.make_mesh(config.mesh)
  model = make_denoiser(config, stats["latent_shape"])
  like = abstract_denoiser_params(model, config, stats["latent_shape"], stats["k"], mesh)
  fix = (f"Fix: run the diffusion stage first (python -m rissole_jax.main --config ... "
         f"--workdir {root} --only diffusion); it resumes from its last checkpoint.")
  ema = checkpoints.restore_final(sdir, "diffusion", None, like, fix, only="ema")
  return model, ema, stats


def load_workdir(path, config=None, mesh=None) -> Parts:
  """The model and database of a finished workdir (stages vqgan, encode, index,
  diffusion), checked against their stage records. `config`: the config it
  was made with (default: read back from the stage records)."""
  from rissole_jax import retrieval
  from rissole_jax.models import autoencoder
  from rissole_jax.store import codes as codes_lib
  root = Path(path)
  config = config if config is not None else workdir_config(root)
  check_stages(config, root)
  mesh = mesh or parallel.make_mesh(config.mesh)
  ae = autoencoder.load_autoencoder(config, root / "vqgan")
  model, params, stats = load_denoiser(config, root, mesh)
  db = retrieval.load_database(config, root, ae.fingerprint)
  db = SamplingDatabase.from_retrieval(db, codes_lib.codebook_of(ae.params))
  return Parts(config, ae, model, params, stats, db, mesh,
               students=load_students(config, root, mesh))


# ---------------------------------------------------------------------------
# Distilled students (the distill stage's; train/distill.py).

STUDENTS_INDEX = "students.json"


def student_path(stage_dir: Path, n: int) -> Path:
  return Path(stage_dir) / "students" / f"{int(n)}.msgpack"


def read_students_index(stage_dir: Path) -> dict:
  """{str(steps): sha256} of the students written so far ({} if none)."""
  path = Path(stage_dir) / STUDENTS_INDEX
  if not path.exists():
    return {}
  index = files.read_json(path)
  if not isinstance(index, dict):
    raise DataError(f"{path} is damaged. Fix: delete {Path(stage_dir)} and rerun "
                    "python -m rissole_jax.distill --workdir ...")
  return index


def write_students_index(stage_dir: Path, index: dict) -> None:
  files.atomic_write_json(Path(stage_dir) / STUDENTS_INDEX, index)


def read_student(stage_dir: Path, n: int, sha256: str, mesh):
  """The student of n steps, checked against its recorded sha256, replicated on `mesh`."""
  from flax import serialization
  path = student_path(stage_dir, n)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path} is missing ({e.strerror}). Fix: rerun python -m "
                    f"rissole_jax.distill --workdir {Path(stage_dir).parent}.") from None
  if files.sha256_bytes(data) != sha256:
    raise DataError(f"{path} differs from its checksum in {STUDENTS_INDEX} (damaged). Fix: "
                    f"delete it and rerun python -m rissole_jax.distill --workdir "
                    f"{Path(stage_dir).parent}.")
  return parallel.put_replicated(serialization.msgpack_restore(data), mesh)


def load_students(config, root: Path, mesh) -> dict:
  """{steps: params} of the workdir's finished distill stage made from this
  model ({} when it has not run, or ran on another model or settings)."""
  from rissole_jax.stages import distill_record
  rec = distill_record(config, Path(root))
  if not rec.is_done():
    return {}
  index = read_students_index(rec.directory)
  return {int(n): read_student(rec.directory, int(n), sha, mesh) for n, sha in index.items()}
