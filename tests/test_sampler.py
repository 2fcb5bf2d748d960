"""The sampling API (rissole_jax.Sampler), its CLIs and the model file, on one
smoke workdir: parity with the sample stage, determinism, the compile cache,
variations, database swaps, the model file's round trip and refusals, and
several devices giving the images of one."""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from rissole_jax import Sampler

from rissole_jax.inference import modelfile
from rissole_jax.errors import ConfigError, DataError

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def workdir(smoke_workdir):
  """A smoke run up to the sample stage (conftest's, shared: read only)."""
  return smoke_workdir


@pytest.fixture(scope="module")
def sampler(workdir):
  return Sampler.from_workdir(workdir)


@pytest.fixture(scope="module")
def model_file(sampler, tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "smoke.rissole"
  sampler.save(path)
  return path


def train_images(sampler, ids):
  from rissole_jax.data import load_source
  return load_source(sampler.config.data, "train").get(np.asarray(ids))[0]


def test_parity_with_the_stage_determinism_and_compile_cache(workdir, sampler):
  c = sampler.config
  stage = np.load(workdir / "sample" / "samples.npy")
  a = sampler.sample(c.sample.num, seed=c.seed, progress=False)
  assert a.dtype == np.uint8 and a.shape == (c.sample.num, 32, 32, 1)
  np.testing.assert_array_equal(a, stage)                 # the stage is a caller of this
  np.testing.assert_array_equal(sampler.sample(c.sample.num, seed=c.seed, progress=False), a)
  settings = sampler.settings()
  assert sampler.trace_counts[(settings, c.sample.batch_size)] == 1
  # Fewer images: padded to the compiled batch, nothing compiled, same images.
  np.testing.assert_array_equal(sampler.sample(3, seed=c.seed, progress=False), a[:3])
  assert sum(sampler.trace_counts.values()) == 1
  # More images than a batch: the first ones do not change either.
  more = sampler.sample(c.sample.num + 5, seed=c.seed, progress=False)
  np.testing.assert_array_equal(more[:c.sample.num], a)
  assert sum(sampler.trace_counts.values()) == 1
  # Other settings compile once more; another seed gives other images.
  sampler.sample(4, seed=1, steps=2, progress=False)
  sampler.sample(2, seed=2, steps=2, progress=False)
  assert sum(sampler.trace_counts.values()) == 2
  assert not np.array_equal(sampler.sample(3, seed=5, progress=False), a[:3])


def test_interrupt_returns_nothing_and_the_sampler_stays_usable(sampler):
  settings = sampler.settings()
  expected = sampler.sample(8, seed=3, batch_size=4, progress=False)
  real = sampler._compiled(settings)
  calls = []

  def interrupted(*args):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args)

  sampler._fns[settings] = interrupted
  try:
    with pytest.raises(KeyboardInterrupt):
      sampler.sample(8, seed=3, batch_size=4, progress=False)
  finally:
    sampler._fns[settings] = real
  np.testing.assert_array_equal(sampler.sample(8, seed=3, batch_size=4, progress=False), expected)


def test_bad_sampling_arguments_are_refused(sampler):
  with pytest.raises(ConfigError, match="sampler"):
    sampler.sample(2, sampler="euler")
  with pytest.raises(ConfigError, match="cond_dropout"):
    sampler.sample(2, guidance=2.0)
  with pytest.raises(ConfigError, match="at least one"):
    sampler.sample(0)


def test_variations_never_retrieve_the_query_and_follow_its_neighbours(sampler):
  ids = np.arange(6)
  z = sampler.encode_images(train_images(sampler, ids))
  nb = sampler.retrieve(z)
  assert nb.shape == (6, sampler.stats["k"])
  assert not np.any(nb == ids[:, None])          # the image's own database entry is excluded
  # Re-encoding a database image finds what the index stage found for it.
  assert np.mean(nb == sampler.db.neighbours[ids]) > 0.8
  v = sampler.variations(train_images(sampler, ids[:2]), num_per_image=3, seed=1, progress=False)
  assert v.shape == (2, 3, 32, 32, 1) and v.dtype == np.uint8
  direct = sampler.generate(np.repeat(nb[:2], 3, 0), seed=1, progress=False)
  np.testing.assert_array_equal(v.reshape(direct.shape), direct)


def test_block_masks_of_every_form_and_refusals():
  from rissole_jax.errors import ConfigError
  from rissole_jax.inference import editing
  m = lambda keep, grid=(2, 2): editing.block_mask(keep, grid, 32).tolist()
  assert m("top") == [[True, True], [False, False]]
  assert m("bottom", (3, 2)) == [[False, False], [False, False], [True, True]]   # half rounds down
  assert m("left") == [[True, False], [True, False]] and m("right") == [[False, True], [False, True]]
  assert m(np.array([[1, 0], [0, 0]])) == [[True, False], [False, False]]
  pixels = np.zeros((32, 32), bool)
  pixels[:16, :16] = True                         # the top-left block, all of it
  pixels[16:, 16:24] = True                       # half of the bottom-right block: kept
  pixels[16:20, :16] = True                       # a quarter of the bottom-left: not kept
  assert m(pixels) == [[True, False], [False, True]]
  for bad, match in (("middle", "Unknown keep"), (np.ones((2, 2)), "nothing is left"),
                     (np.zeros((2, 2)), "plain sampling"), (np.ones((3, 3)), "shape"),
                     (np.full((2, 2), 2), "bool")):
    with pytest.raises(ConfigError, match=match):
      editing.block_mask(bad, (2, 2), 32)
  with pytest.raises(ConfigError, match="nothing is left"):
    editing.block_mask("top", (1, 2), 32)           # one row: "top" is all of it


def test_masked_neighbours_see_only_the_kept_blocks():
  from rissole_jax.inference import editing
  rng = np.random.default_rng(0)
  db = rng.normal(size=(20, 4, 4, 2)).astype(np.float32)
  q = db[[3]].copy()
  q[:, 2:] = 100.0                                # the missing (bottom) half: anything
  mask = np.array([[True, True], [False, False]])
  assert editing.masked_neighbours(db, q, mask, 3)[0, 0] == 3
  assert 3 not in editing.masked_neighbours(db, q, mask, 3, exclude=[[3]])[0]


def test_inpaint_keeps_the_user_blocks_exactly(sampler):
  from rissole_jax.inference import editing
  images = train_images(sampler, np.arange(2))
  out, z = sampler.inpaint(images, "top", num_per_image=3, seed=0, progress=False,
                           return_latents=True)
  assert out.shape == (2, 3, 32, 32, 1) and out.dtype == np.uint8 and z.shape[:2] == (2, 3)
  mask = editing.block_mask("top", sampler.config.blocks.grid, 32)
  lm = editing.latent_mask(mask, z.shape[2:4])
  own = sampler.encode_images(images)
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(z[i, j][lm], own[i][lm])     # kept: the user's latents
  assert not np.array_equal(z[0, 0][~lm], z[0, 1][~lm])          # completions differ
  # Pixels: the decoder's middle attention mixes every position, so the kept
  # region's pixels are near, not equal to, the reconstruction's; away from
  # the mask line (the top quarter) far nearer than the generated half's.
  recon = sampler.ae.decode(own)
  err = np.abs(out.astype(np.float32) - ((recon[:, None] + 1) * 127.5))
  assert err[:, :, :8].mean() < 0.5 * err[:, :, 16:].mean()


def test_outpaint_places_the_image_and_fills_the_canvas(sampler):
  from rissole_jax.inference import editing
  image = train_images(sampler, [1])[0]
  out, z = sampler.outpaint(image, canvas=(3, 3), at=(1, 0), num_per_image=2, seed=0,
                            progress=False, return_latents=True)
  own = sampler.encode_images([image])[0]
  h, w = own.shape[:2]
  bh = h // 2
  assert out.shape == (2, 48, 48, 1) and z.shape == (2, 3 * bh, 3 * bh, own.shape[-1])
  for j in range(2):
    np.testing.assert_array_equal(z[j, bh:bh + h, :w], own)      # the original, where asked
  assert not np.array_equal(z[0, :bh], z[1, :bh])                  # outpaintings differ
  for canvas, at, match in (((1, 2), (0, 0), "smaller than"), ((3, 3), (2, 0), "does not fit"),
                            ((2, 2), (0, 0), "nothing to generate")):
    with pytest.raises(ConfigError, match=match):
      sampler.outpaint(image, canvas=canvas, at=at)
  # The fill order: the window with the most known blocks first, then the
  # nearest to the image, then row-major; every window keeps >= 1 block.
  known = np.zeros((3, 4), bool)
  known[1:3, 1:3] = True
  assert editing.next_window(known, (2, 2), (1, 1)) == (0, 1)      # 2 known, nearest
  known[:, :] = True
  assert editing.next_window(known, (2, 2), (1, 1)) is None


def test_user_images_of_any_mode_and_size(sampler, tmp_path):
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 255, (50, 40), np.uint8)
  rgb = np.stack([grey, grey // 2, 255 - grey], -1)
  files = {"grey.png": Image.fromarray(grey), "rgb.jpg": Image.fromarray(rgb),
           "rgba.png": Image.fromarray(np.concatenate([rgb, grey[..., None]], -1)),
           "palette.png": Image.fromarray(rgb).convert("P"),
           "sixteen.png": Image.fromarray(grey.astype(np.uint16) * 257),
           "cmyk.jpg": Image.fromarray(rgb).convert("CMYK")}
  for name, im in files.items():
    im.save(tmp_path / name)
  paths = [tmp_path / n for n in files]
  z = sampler.encode_images(paths + [grey, rgb / 255.0, Image.fromarray(grey)])
  assert z.shape == (9, *sampler.stats["latent_shape"])
  from rissole_jax.data.images import to_model_image
  # 16-bit is scaled, not clipped: the same picture as its 8-bit twin.
  np.testing.assert_array_equal(to_model_image(tmp_path / "sixteen.png", 32, 1),
                                to_model_image(tmp_path / "grey.png", 32, 1))
  with pytest.raises(DataError, match="5 channels"):
    sampler.encode_images(np.zeros((1, 8, 8, 5), np.uint8))
  (tmp_path / "fake.png").write_text("not an image")
  with pytest.raises(DataError, match="fake.png is not a readable image"):
    sampler.encode_images(tmp_path / "fake.png")


def test_with_database_swaps_neighbours_and_caches(sampler, tmp_path, monkeypatch):
  from rissole_jax import retrieval
  monkeypatch.setenv("RISSOLE_CACHE", str(tmp_path / "cache"))
  images = train_images(sampler, np.arange(100, 130))[:, :, ::-1]   # mirrored digits
  encoded = []
  real = retrieval.encode_source
  monkeypatch.setattr(retrieval.database, "encode_source",   # where build_database looks it up
                      lambda *a, **k: encoded.append(1) or real(*a, **k))
  other = sampler.with_database(images, progress=False)
  assert len(other.db) == 30 and other.db.name.startswith("array:")
  assert other.db.neighbours.max() < 30 and len(encoded) == 1
  again = sampler.with_database(images, progress=False)        # from the cache, not re-encoded
  assert len(encoded) == 1
  np.testing.assert_array_equal(again.db.neighbours, other.db.neighbours)
  # Same model: the copy runs the program already compiled for it, tracing nothing.
  sampler.sample(4, seed=0, progress=False)                    # compiled for these settings
  traces = sum(other.trace_counts.values())
  out = other.sample(4, seed=0, progress=False)
  assert out.shape == (4, 32, 32, 1)
  assert sum(other.trace_counts.values()) == traces
  # A folder of images, and what cannot be a database.
  folder = tmp_path / "folder"
  folder.mkdir()
  for i, im in enumerate(images[:6]):
    Image.fromarray(im[..., 0]).save(folder / f"{i}.png")
  assert len(sampler.with_database(f"folder:{folder}", progress=False).db) == 6
  with pytest.raises(DataError, match="needs at least"):
    sampler.with_database(images[:sampler.stats["k"]], progress=False)
  (folder / "notes.png").write_text("not an image")
  with pytest.raises(DataError, match="not usable images; the first is .*notes.png"):
    sampler.with_database(folder, progress=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="No images"):
    sampler.with_database(tmp_path / "empty", progress=False)


def test_pictures(sampler):
  fig = sampler.figure(2, progress=False)
  k = sampler.stats["k"]
  assert fig.size[0] > (k + 2) * 32 and fig.size[1] > 2 * 32
  assert sampler.neighbours(3).size[1] > 3 * 32
  assert sampler.grid(np.zeros((5, 32, 32, 1), np.uint8)).size == (3 * 34 - 2, 2 * 34 - 2)


def test_model_file_round_trip(sampler, model_file):
  before = model_file.read_bytes()
  loaded = Sampler.load(model_file)
  a = sampler.sample(5, seed=4, progress=False)
  np.testing.assert_array_equal(loaded.sample(5, seed=4, progress=False), a)
  assert model_file.read_bytes() == before                  # loading never writes
  manifest, data = modelfile.read(model_file)
  codes = np.load(io.BytesIO(data["database/codes.npy"]))
  assert codes.dtype == np.uint8 and codes.shape == sampler.db.latents.shape[:-1]
  np.testing.assert_array_equal(loaded.db.latents, sampler.db.latents)   # codes lose nothing
  z = sampler.encode_images(train_images(sampler, [7]))
  np.testing.assert_array_equal(loaded.retrieve(z), sampler.retrieve(z))  # rebuilt index


def test_model_file_int8_weights_and_version_1(sampler, workdir, model_file, tmp_path):
  from flax import serialization
  from rissole_jax.inference import quantize
  sizes = sampler.save(tmp_path / "q.rissole", weights="int8")
  float_sizes = {n: i["size"] for n, i in modelfile.read(model_file)[0]["files"].items()}
  assert sizes["denoiser.msgpack"] < 0.4 * float_sizes["denoiser.msgpack"]
  manifest, data = modelfile.read(tmp_path / "q.rissole")
  assert manifest["version"] == modelfile.VERSION and manifest["weights"] == "int8"
  assert manifest["model_fingerprint"] == modelfile.model_fingerprint(sampler.config)
  assert manifest["model_fingerprint"] == json.loads(
      (Path(workdir) / "diffusion" / "stage.json").read_text())["fingerprint"]
  stored = serialization.msgpack_restore(data["denoiser.msgpack"])
  loaded = Sampler.load(tmp_path / "q.rissole")
  flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
                    for p, v in jax.tree_util.tree_leaves_with_path(t)}
  want, got, raw = flat(sampler.params), flat(loaded.params), flat(stored)
  assert want.keys() == got.keys()
  for name, a in want.items():
    if name.endswith("kernel") and a.ndim >= 2:    # int8 in the file, float32 when read
      assert raw[name + "/" + quantize.INT8_VALUES].dtype == np.int8
      scale = raw[name + "/" + quantize.INT8_SCALE]
      assert np.all(np.abs(got[name] - a) <= scale / 2 + 1e-7) and got[name].dtype == np.float32
    else:
      np.testing.assert_array_equal(got[name], a)
  assert loaded.ae.fingerprint == manifest["autoencoder_fingerprint"] != sampler.ae.fingerprint
  with pytest.raises(DataError, match="quantized for computing"):
    sampler.quantized("int8_weights").save(tmp_path / "x.rissole")

  def version_1(m):   # what format 1 wrote: float weights, no weights/fingerprint/provenance
    man = json.loads(m["manifest.json"])
    for key in ("weights", "model_fingerprint", "provenance"):
      man.pop(key)
    m["manifest.json"] = json.dumps({**man, "version": 1}).encode()
  _rewrite(model_file, tmp_path / "v1.rissole", version_1)
  v1 = Sampler.load(tmp_path / "v1.rissole")
  for name, a in flat(v1.params).items():
    np.testing.assert_array_equal(a, want[name])


def _rewrite(src, dst, change):
  with zipfile.ZipFile(src) as z:
    members = {n: z.read(n) for n in z.namelist()}
  change(members)
  with zipfile.ZipFile(dst, "w") as z:
    for n, b in members.items():
      z.writestr(n, b)


def test_damaged_model_files_are_refused(model_file, tmp_path):
  data = model_file.read_bytes()
  (tmp_path / "cut.rissole").write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match="not a readable model file"):
    Sampler.load(tmp_path / "cut.rissole")

  def flip(m):
    b = bytearray(m["denoiser.msgpack"])
    b[len(b) // 2] ^= 0xFF
    m["denoiser.msgpack"] = bytes(b)
  _rewrite(model_file, tmp_path / "altered.rissole", flip)
  with pytest.raises(DataError, match="damaged: denoiser.msgpack differs from its checksum"):
    Sampler.load(tmp_path / "altered.rissole")

  def newer(m):
    man = json.loads(m["manifest.json"])
    man["version"] = modelfile.VERSION + 1
    m["manifest.json"] = json.dumps(man).encode()
  _rewrite(model_file, tmp_path / "newer.rissole", newer)
  with pytest.raises(DataError, match="newer than this rissole_jax reads"):
    Sampler.load(tmp_path / "newer.rissole")
  _rewrite(model_file, tmp_path / "partial.rissole", lambda m: m.pop("manifest.json"))
  with pytest.raises(DataError, match="incomplete"):
    Sampler.load(tmp_path / "partial.rissole")
  with pytest.raises(DataError, match="no such model file"):
    Sampler.load(tmp_path / "missing.rissole")


def test_unfinished_workdirs_are_refused(workdir, tmp_path):
  with pytest.raises(DataError, match="no finished 'vqgan' stage"):
    Sampler.from_workdir(tmp_path)
  partial = tmp_path / "partial"
  shutil.copytree(workdir, partial, symlinks=True)
  (partial / "diffusion" / "stage.json").unlink()
  with pytest.raises(DataError, match="stage 'diffusion' .* has not run.*--only diffusion"):
    Sampler.from_workdir(partial)
  rec = json.loads((partial / "index" / "stage.json").read_text())
  (partial / "index" / "stage.json").write_text(json.dumps({**rec, "done": False}))
  with pytest.raises(DataError, match="stage 'index' .* has not finished"):
    Sampler.from_workdir(partial)


def test_sample_and_export_clis(workdir, tmp_path, capsys):
  from rissole_jax import export, sample
  assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "m.rissole")]) == 0
  assert "database as codes" in capsys.readouterr().out
  assert sample.main(["--model", str(tmp_path / "m.rissole"), "--num", "3", "--out",
                      str(tmp_path / "out"), "--steps", "2", "--no_progress"]) == 0
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "grid.png", "sample_00000.png", "sample_00001.png", "sample_00002.png"]
  img = train_images(Sampler.load(tmp_path / "m.rissole"), [0])[0]
  Image.fromarray(img[..., 0]).save(tmp_path / "me.png")
  assert sample.main(["--workdir", str(workdir), "--variations", str(tmp_path / "me.png"),
                      "--num", "2", "--out", str(tmp_path / "var"), "--no_progress"]) == 0
  assert (tmp_path / "var" / "variation_000_01.png").exists()
  # Inpainting: a mask image (white: kept) or a shorthand; the grid shows
  # input | mask | completions per row.
  mask = np.zeros((32, 32), np.uint8)
  mask[:, :16] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  assert sample.main(["--workdir", str(workdir), "--inpaint", str(tmp_path / "me.png"),
                      "--keep", str(tmp_path / "mask.png"), "--num", "2", "--steps", "2",
                      "--out", str(tmp_path / "inp"), "--no_progress"]) == 0
  assert (tmp_path / "inp" / "inpaint_000_01.png").exists()
  assert Image.open(tmp_path / "inp" / "grid.png").size[0] > 4 * 32     # 4 columns and padding
  assert sample.main(["--workdir", str(workdir), "--inpaint", str(tmp_path / "me.png"),
                      "--keep", "middle", "--out", str(tmp_path / "x")]) == 2
  assert "not a mask image" in capsys.readouterr().err
  assert sample.main(["--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
  assert "is not a folder" in capsys.readouterr().err
  # --outpaint: the grid shows the input on its canvas | outpaintings.
  assert sample.main(["--workdir", str(workdir), "--outpaint", str(tmp_path / "me.png"),
                      "--canvas", "2,3", "--at", "0,1", "--num", "2", "--steps", "2",
                      "--out", str(tmp_path / "outp"), "--no_progress"]) == 0
  assert Image.open(tmp_path / "outp" / "outpaint_01.png").size == (48, 32)
  assert sample.main(["--workdir", str(workdir), "--outpaint", str(tmp_path / "me.png"),
                      "--canvas", "2", "--out", str(tmp_path / "x")]) == 2
  assert "ROWS,COLS" in capsys.readouterr().err
  # --model: an existing file wins over a shipped name, and the command says which.
  shutil.copy(tmp_path / "m.rissole", tmp_path / "mnist")
  capsys.readouterr()
  from rissole_jax import pretrained
  args = sample.parse(["--model", str(tmp_path / "mnist"), "--out", "x"])
  assert sample.load_model(args)[1] == f"the model file {tmp_path / 'mnist'}"
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    assert sample.load_model(sample.parse(["--model", "mnist", "--out", "x"]))[1] == (
        "the model file mnist")
    os.chdir(tmp_path / "out")
    assert "shipped model 'mnist'" in sample.load_model(
        sample.parse(["--model", "mnist", "--out", "x"]))[1]
  finally:
    os.chdir(cwd)
  assert pretrained.path("mnist").is_file()
  assert sample.main(["--model", "nosuch", "--out", str(tmp_path / "x")]) == 2
  assert "no shipped model of that name (shipped: mnist)" in capsys.readouterr().err
  help_text = subprocess.run([sys.executable, "-m", "rissole_jax.sample", "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60).stdout
  for flag in ("--workdir", "--model", "--num", "--seed", "--sampler", "--steps", "--eta",
               "--guidance", "--database", "--variations", "--inpaint", "--keep", "--outpaint",
               "--canvas", "--at"):
    assert flag in help_text


def test_sampling_loads_no_training_code(workdir, model_file):
  """Inference imports and loads only what sampling needs: no train/ module
  (optimizers, train steps) and no optax, from a workdir or a model file."""
  code = ("import sys; from rissole_jax import Sampler;"
          "import rissole_jax.inference.modelfile, rissole_jax.inference.stablehlo;"
          "import rissole_jax.inference.quantize;"
          "Sampler.from_workdir(sys.argv[1]); Sampler.load(sys.argv[2]);"
          "bad = sorted(m for m in sys.modules if m.startswith('rissole_jax.train')"
          " or m.split('.')[0] == 'optax');"
          "assert not bad, bad")
  r = subprocess.run([sys.executable, "-c", code, str(workdir), str(model_file)], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]


def test_eight_devices_make_the_images_of_one(sampler, model_file):
  """The batch is split over the devices JAX finds; each image's noise comes
  from its own key, so the images do not change (float rounding aside)."""
  code = ("import numpy as np, sys, jax; from rissole_jax import Sampler;"
          "s = Sampler.load(sys.argv[1]); assert s._shards == 8, s._shards;"
          "np.save(sys.argv[2], s.sample(5, seed=4, progress=False))")
  env = {**os.environ, "XLA_FLAGS": (f"{os.environ.get('XLA_FLAGS', '')} "
                                    "--xla_force_host_platform_device_count=8"),
         "JAX_PLATFORMS": "cpu"}
  out = model_file.parent / "eight.npy"
  r = subprocess.run([sys.executable, "-c", code, str(model_file), str(out)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  one = sampler.sample(5, seed=4, progress=False).astype(int)
  eight = np.load(out).astype(int)
  assert np.abs(eight - one).max() <= 2 and np.mean(eight != one) < 0.01


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  """notebooks/sampling.ipynb, committed without outputs, executed as a user
  opens it: on the shipped pretrained model. Its jupytext twin holds the
  same code."""
  import nbformat
  from nbclient import NotebookClient
  path = os.path.join(ROOT, "notebooks", "sampling.ipynb")
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not any(c.get("outputs") or c.get("execution_count") for c in code)
  twin = open(os.path.join(ROOT, "notebooks", "sampling.py")).read()
  assert all(c.source in twin for c in code), "notebook and sampling.py differ: jupytext --sync"
  monkeypatch.delenv("RISSOLE_MODEL", raising=False)
  monkeypatch.setenv("RISSOLE_NOTEBOOK_DIR", str(tmp_path / "work"))
  monkeypatch.setenv("RISSOLE_CACHE", str(tmp_path / "cache"))
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "".join(o.get("text", "") for c in code for o in c.outputs)
  assert "nothing was installed" in text and "python -m rissole_jax.pretrained.remake" in text
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 6   # grid, figure, variations, inpainting, outpainting, swapped figure
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def test_int8_sampler_and_stablehlo_export_cli(sampler, workdir, tmp_path, capsys):
  q = sampler.quantized("int8_weights")
  assert q.quantization == "int8_weights" and sampler.quantization == "none"
  a = sampler.sample(4, seed=6, progress=False).astype(int)
  b = q.sample(4, seed=6, progress=False).astype(int)
  assert b.shape == a.shape and np.abs(b - a).mean() < 20     # close to float, not equal
  from rissole_jax import export
  out = tmp_path / "hlo"
  assert export.main(["--format", "stablehlo", "--workdir", str(workdir), "--out", str(out),
                      "--platforms", "cpu", "--steps", "2"]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["sampler"]["steps"] == 2 and manifest["platforms"] == ["cpu"]
  assert (out / "run.py").exists() and (out / "sampler.stablehlo").exists()
  # A platform asked for that cannot be: an error naming it, nothing written
  # (lowering failures: tests/test_quantize_export.py).
  capsys.readouterr()
  assert export.main(["--format", "stablehlo", "--workdir", str(workdir), "--out",
                      str(tmp_path / "bad"), "--platforms", "cpu,nosuch", "--steps", "2"]) == 2
  assert "platform 'nosuch'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
