"""LEGO bricks (Zheng et al., ICLR 2024): a stackable, skippable denoiser.

A brick sees the whole canvas (the noisy input, two coordinate channels and,
after the first brick, the previous brick's prediction), cuts it into
non-overlapping regions, embeds p x p patches inside each region, runs DiT
blocks whose attention spans one region (all regions of all images in one
batched call), and maps the tokens back to a full-canvas prediction. Every
brick predicts the target on its own (the training loss is the mean over
bricks), so bricks can be skipped at sampling time, and a canvas larger than
the training one is just more regions.

Stacking orders (the paper's): PG, progressive growth (local bricks first,
the full-canvas brick last); PR, progressive refinement (the reverse); U, PR
then PG (full, local, full). The canvas is one block for the block variants
(rissole, blocks_only) and the whole latent for `full`.

Block variants: the neighbours' blocks enter as channels at every brick's
input (model.lego.neighbours='channels'), or as extra tokens that each region
attends to (keys and values: that region of every neighbour; 'tokens'), or
both; the coordinates span the whole latent (a block knows where it sits),
and the block position joins the timestep in the adaLN-Zero condition.

The module presents the denoiser interface (models/common.py: attributes
variant, grid, blocks, retrieval, position, prev_block, learn_null; the same
call signature), so models/rows.py and the samplers serve it unchanged. Extra
call arguments: `active` (the brick indices to run; the others are skipped)
and `all_bricks` (every active brick's prediction, stacked first).

Larger canvases: `grid` is the grid of the canvas being made and `train_grid`
the one the block positions were learned on; a block of a larger grid takes
the learned position at its relative place (row * gh_train // gh) and
coordinates over the larger canvas. See docs/lego.md.
"""
from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rissole_jax import blocks as blk
from rissole_jax.diffusion import solvers
from rissole_jax.errors import ConfigError, check_choice
from rissole_jax.models.common import VariantFlags, need, timestep_embedding, uses_blocks, with_null
from rissole_jax.models.layers import dense, embedding

PRESETS = ("pg", "pr", "u")
# How the neighbours' blocks enter every brick: as input channels, as extra
# tokens each region attends to (its region of every neighbour), or both.
NEIGHBOURS_AS = ("channels", "tokens", "both")
SKIP_ENDS = ("low", "high")
HEAD_DIM = 32


# ---------------------------------------------------------------------------
# Geometry: coordinates, regions, patches. Pure functions, tested directly.

def coords(h: int, w: int, dtype=jnp.float32):
  """(h, w, 2) (x, y) coordinates spanning [-1, 1] over an h x w canvas."""
  ys = jnp.linspace(-1.0, 1.0, h, dtype=dtype) if h > 1 else jnp.zeros((1,), dtype)
  xs = jnp.linspace(-1.0, 1.0, w, dtype=dtype) if w > 1 else jnp.zeros((1,), dtype)
  return jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), -1)


def block_coords(pos, grid, bh: int, bw: int):
  """(B, bh, bw, 2) coordinates of blocks `pos` (raster indices into `grid`)
  cut from the coordinates of the whole gh*bh x gw*bw canvas."""
  gh, gw = int(grid[0]), int(grid[1])
  full = coords(gh * bh, gw * bw)
  tiles = einops.rearrange(full, "(gh bh) (gw bw) c -> (gh gw) bh bw c", gh=gh, gw=gw)
  return tiles[pos]


def train_position(pos, grid, train_grid):
  """The learned position of block `pos` of `grid`: the training-grid block at
  the same relative place (the identity when the grids agree)."""
  gh, gw = int(grid[0]), int(grid[1])
  th, tw = int(train_grid[0]), int(train_grid[1])
  row, col = pos // gw, pos % gw
  return (row * th // gh) * tw + col * tw // gw


def to_regions(x, region, patch):
  """(B, H, W, C) -> (B * nR, L, p*p*C): tokens of each r x r region, a token
  per p x p patch, regions of all images stacked as batch rows."""
  rh, rw = region
  return einops.rearrange(x, "b (gh ph p) (gw pw q) c -> (b gh gw) (ph pw) (p q c)",
                          ph=rh // patch, pw=rw // patch, p=patch, q=patch,
                          gh=x.shape[1] // rh, gw=x.shape[2] // rw)


def from_regions(tokens, batch: int, H: int, W: int, region, patch):
  """The inverse of `to_regions`: (B * nR, L, p*p*C) -> (B, H, W, C)."""
  rh, rw = region
  return einops.rearrange(tokens, "(b gh gw) (ph pw) (p q c) -> b (gh ph p) (gw pw q) c",
                          b=batch, gh=H // rh, gw=W // rw, ph=rh // patch, pw=rw // patch,
                          p=patch, q=patch)


# ---------------------------------------------------------------------------
# The modules.

def num_heads(width: int) -> int:
  """About one head per HEAD_DIM features: the most heads, at most width //
  HEAD_DIM, that divide the width (widths need not be multiples of 32, so
  parameter budgets can be matched)."""
  return max(h for h in range(1, max(1, width // HEAD_DIM) + 1) if width % h == 0)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """Pre-norm Transformer block with adaLN-Zero (DiT): the condition sets the
  norms' shift/scale and gates each residual branch, gates starting at zero so
  every block starts as the identity."""
  width: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, c, train: bool, memory=None):
    """x (N, L, d) tokens; c (N, E) condition; memory (N, M, d): extra tokens
    that x attends to (keys and values only; they are not updated)."""
    N, L, d = x.shape
    mod = dense(6 * d, name="adaln", zero_init=True)(nn.silu(c))
    s1, g1, a1, s2, g2, a2 = jnp.split(mod, 6, -1)
    heads = num_heads(d)
    norm1 = nn.LayerNorm(use_scale=False, use_bias=False, name="norm1")
    h = _modulate(norm1(x), s1, g1)
    kv = h if memory is None else jnp.concatenate([h, _modulate(norm1(memory), s1, g1)], 1)
    split = lambda a: a.reshape(N, a.shape[1], heads, d // heads)
    q, k, v = split(dense(d, name="q")(h)), split(dense(d, name="k")(kv)), split(dense(d, name="v")(kv))
    att = nn.dot_product_attention(q, k, v).reshape(N, L, d)
    x = x + a1[:, None] * dense(d, name="out")(att)
    h = _modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="norm2")(x), s2, g2)
    h = nn.gelu(dense(self.mlp_ratio * d, name="mlp1")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return x + a2[:, None] * dense(d, name="mlp2")(h)


class Brick(nn.Module):
  """Canvas features (B, H, W, C) + condition (B, E) -> full-canvas prediction."""
  region: tuple
  patch: int
  depth: int
  width: int
  out_channels: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, c, train: bool, neighbours=None):
    """h (B, H, W, C) canvas features; c (B, E); neighbours (B, k, H, W, c): the
    neighbours' canvases, as extra tokens of every region (lego.neighbours)."""
    B, H, W, _ = h.shape
    rh, rw = self.region
    if H % rh or W % rw:
      raise ConfigError(f"a brick's {rh}x{rw} regions do not tile the {H}x{W} canvas. Fix: "
                        "a canvas (or larger canvas) whose sides are multiples of every region.")
    n_regions = (H // rh) * (W // rw)
    tok = dense(self.width, name="patch_embed")(to_regions(h, self.region, self.patch))
    L = tok.shape[1]
    # Where a patch sits inside its region; the coordinate channels say where
    # the region sits on the canvas. A table of the region's size, so it serves
    # any canvas the regions tile.
    pe = self.param("region_pos", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None)), (L, self.width))
    tok = tok + pe[None]
    cr = jnp.repeat(c, n_regions, axis=0)      # the condition of each region's image
    memory = None
    if neighbours is not None:
      # Each region attends to the same region of every neighbour: k*L tokens
      # with the patch's place in the region and the neighbour's rank.
      k = neighbours.shape[1]
      nt = to_regions(einops.rearrange(neighbours, "b k h w c -> (b k) h w c"),
                      self.region, self.patch)
      nt = einops.rearrange(nt, "(b k r) l f -> (b r) k l f", b=B, k=k)
      memory = dense(self.width, name="neighbour_embed")(nt) + pe[None, None]
      memory = memory + embedding(k, self.width, "neighbour_rank")(jnp.arange(k))[None, :, None]
      memory = memory.reshape(B * n_regions, k * L, self.width)
    for i in range(self.depth):
      tok = DiTBlock(self.width, self.mlp_ratio, self.dropout, name=f"block{i}")(
          tok, cr, train, memory)
    shift, scale = jnp.split(dense(2 * self.width, name="final_adaln", zero_init=True)(
        nn.silu(cr)), 2, -1)
    tok = _modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="norm_out")(tok),
                    shift, scale)
    out = dense(self.patch * self.patch * self.out_channels, name="head", zero_init=True)(tok)
    return from_regions(out, B, H, W, self.region, self.patch)


class LegoDenoiser(VariantFlags, nn.Module):
  """A stack of LEGO bricks with the U-Net denoiser's interface.

  x: (B, h, w, c) noisy canvas (a block, or the whole latent); t: (B,) int;
  pos: (B,) raster index into `grid` (block variants); neighbours: (B, k, h, w,
  c); prev: (B, h, w, c); keep: (B,) bool (learned null where False).
  active: indices of the bricks to run (None: all); all_bricks: return every
  active brick's prediction, stacked as (n_active, B, h, w, c).
  """
  variant: str = "rissole"
  grid: tuple = (2, 2)           # the canvas's grid (block variants)
  train_grid: tuple = (2, 2)     # the grid the positions were learned on
  bricks: tuple = ()             # ((rh, rw), patch, depth, width) per brick
  emb_dim: int = 128
  mlp_ratio: int = 4
  dropout: float = 0.0
  use_position: bool = True
  use_prev_block: bool = False
  learn_null: bool = False
  out_channels: int = 4
  neighbours_as: str = "channels"   # channels | tokens | both (NEIGHBOURS_AS)
  stacked = True                 # the trainer's cue: a loss on every brick

  def canvas_coords(self, x, pos):
    B, h, w, _ = x.shape
    if self.blocks:
      return block_coords(need(pos, "pos"), self.grid, h, w)
    return jnp.broadcast_to(coords(h, w, x.dtype), (B, h, w, 2))

  @nn.compact
  def __call__(self, x, t, pos=None, neighbours=None, prev=None, keep=None, train=False,
               active=None, all_bricks=False):
    E = self.emb_dim
    c = dense(E, name="time1")(timestep_embedding(t, E))
    c = dense(E, name="time2")(nn.silu(c))
    if self.position:
      p = train_position(need(pos, "pos"), self.grid, self.train_grid)
      c = c + embedding(blk.num_blocks(self.train_grid), E, "position")(p)

    # What every brick sees besides the previous prediction.
    inputs = [x, self.canvas_coords(x, pos).astype(x.dtype)]
    if self.prev_block:
      inputs.append(need(prev, "prev"))
    nb = None
    if self.retrieval:
      nb = with_null(self, need(neighbours, "neighbours"), keep, self.learn_null)
      if self.neighbours_as in ("channels", "both"):
        inputs.append(einops.rearrange(nb, "b k h w c -> b h w (k c)"))
    base = jnp.concatenate(inputs, -1)
    tokens = nb if self.neighbours_as in ("tokens", "both") else None

    run = tuple(range(len(self.bricks))) if active is None else tuple(active)
    preds, prev_pred = [], jnp.zeros_like(x)
    for i, (region, patch, depth, width) in enumerate(self.bricks):
      if i not in run:
        continue   # skipped: the next brick takes the last prediction made
      h = base if i == 0 else jnp.concatenate([base, prev_pred], -1)
      prev_pred = Brick(tuple(region), patch, depth, width, self.out_channels, self.mlp_ratio,
                        self.dropout, name=f"brick{i}")(h, c, train, tokens)
      preds.append(prev_pred)
    return jnp.stack(preds) if all_bricks else preds[-1]


# ---------------------------------------------------------------------------
# Presets and config.

def canvas_shape(config, latent_shape) -> tuple[int, int]:
  """The brick canvas: one block for the block variants, else the latent."""
  if uses_blocks(config.model.variant):
    return blk.check_grid(latent_shape, config.blocks.grid)
  return int(latent_shape[0]), int(latent_shape[1])


def _local_global(h: int, w: int, depth: int, width: int):
  """A local brick (regions of a quarter of the canvas, small patches) and a
  full-canvas brick (larger patches: fewer, cheaper tokens, as in the paper,
  where the global bricks use the larger patch size)."""
  local = (h // 2, w // 2) if h % 2 == 0 and w % 2 == 0 and min(h, w) >= 2 else (h, w)
  p_local = 1 if min(local) <= 4 else 2
  p_global = 1 if min(h, w) < 4 else (2 if min(h, w) <= 16 else 4)
  if h % p_global or w % p_global:
    p_global = 1
  if local[0] % p_local or local[1] % p_local:
    p_local = 1
  return (local, p_local, depth, width), ((h, w), p_global, depth, width)


def preset_bricks(name: str, canvas, depth: int, width: int) -> tuple:
  """The paper's stacking orders, sized for a canvas (bh, bw); `depth` is the
  total number of DiT blocks, split evenly over the bricks."""
  h, w = int(canvas[0]), int(canvas[1])
  if name in ("pg", "pr"):
    d = max(1, depth // 2)
    loc, glo = _local_global(h, w, d, width)
    return (loc, glo) if name == "pg" else (glo, loc)
  if name == "u":
    d = max(1, depth // 3)
    loc, glo = _local_global(h, w, d, width)
    return (glo, loc, glo)
  check_choice("model.lego.preset", name, PRESETS, hint="Or give model.lego.bricks explicitly.")


def _norm_brick(b) -> tuple:
  try:
    region, patch, depth, width = b
    region = (int(region), int(region)) if np.ndim(region) == 0 else tuple(int(r) for r in region)
    return (region, int(patch), int(depth), int(width))
  except (TypeError, ValueError):
    raise ConfigError(f"model.lego.bricks entries are (region, patch, depth, width), with "
                      f"region an int or (rows, cols); got {b!r}.")


def resolve_bricks(config, latent_shape) -> tuple:
  lg = config.model.lego
  if lg.bricks:
    return tuple(_norm_brick(b) for b in lg.bricks)
  return preset_bricks(lg.preset, canvas_shape(config, latent_shape), lg.depth, lg.width)


def check_bricks(bricks, canvas) -> None:
  h, w = canvas
  if not bricks:
    raise ConfigError("model.lego has no bricks. Fix: set model.lego.preset (pg, pr, u) or "
                      "model.lego.bricks.")
  for i, ((rh, rw), p, d, wd) in enumerate(bricks):
    if min(rh, rw, p, d, wd) < 1:
      raise ConfigError(f"brick {i}: region, patch, depth and width must be positive.")
    if h % rh or w % rw:
      raise ConfigError(
          f"brick {i}: its {rh}x{rw} regions do not divide the {h}x{w} canvas (a block for "
          f"the block variants, else the latent). Fix: a region whose sides divide {h} and "
          f"{w}, e.g. {h // 2 if h % 2 == 0 else h}x{w // 2 if w % 2 == 0 else w}.")
    if rh % p or rw % p:
      raise ConfigError(
          f"brick {i}: its patch {p}x{p} does not divide its {rh}x{rw} region. Fix: a patch "
          f"size dividing both, e.g. {math.gcd(rh, rw)} or 1.")


def check_config(config, latent_shape) -> None:
  """The LEGO part of the model config; models/registry.py checks the rest."""
  m = config.model
  if m.variant not in ("rissole", "blocks_only", "full"):
    raise ConfigError(f"model.backbone='lego' serves the variants rissole, blocks_only and "
                      f"full; {m.variant!r} needs the U-Net. Fix: model.backbone='unet'.")
  if m.cond != "concat":
    raise ConfigError("model.backbone='lego' takes the neighbours' blocks as input channels "
                      "(model.cond='concat'). Fix: --config.model.cond=concat.")
  check_choice("model.lego.neighbours", m.lego.get("neighbours", "channels"), NEIGHBOURS_AS)
  bricks = resolve_bricks(config, latent_shape)
  check_bricks(bricks, canvas_shape(config, latent_shape))
  check_skip(config.sample.skip, len(bricks))


def make_denoiser(config, latent_shape) -> LegoDenoiser:
  """The config's brick stack (checked by models/registry.py's check_config)."""
  m = config.model
  grid = tuple(int(g) for g in config.blocks.grid)
  return LegoDenoiser(
      variant=m.variant, grid=grid, train_grid=grid, bricks=resolve_bricks(config, latent_shape),
      emb_dim=int(m.lego.emb_dim), mlp_ratio=int(m.lego.mlp_ratio), dropout=m.dropout,
      use_position=m.use_position, use_prev_block=m.use_prev_block,
      learn_null=m.variant == "rissole" and config.diffusion.cond_dropout > 0,
      out_channels=int(latent_shape[-1]), neighbours_as=m.lego.get("neighbours", "channels"))


# ---------------------------------------------------------------------------
# Skipping bricks at sampling time.

def skipped_bricks(skip, n: int) -> tuple:
  """The brick indices `skip.bricks` names (negative ones count from the end)."""
  out = []
  for b in skip.bricks:
    i = int(b) + n if int(b) < 0 else int(b)
    if not 0 <= i < n:
      raise ConfigError(f"sample.skip.bricks names brick {b}, but the stack has {n} bricks "
                        f"(0..{n - 1}, or -1..-{n}). Fix: name bricks of the stack (-1: the last).")
    out.append(i)
  return tuple(sorted(set(out)))


def check_skip(skip, n: int) -> None:
  check_choice("sample.skip.end", skip.end, SKIP_ENDS)
  if not 0.0 <= skip.t_break <= 1.0:
    raise ConfigError(f"sample.skip.t_break={skip.t_break} must be a fraction in [0, 1].")
  drop = skipped_bricks(skip, n)
  if skip.t_break <= 0:
    return   # nothing is skipped
  if len(drop) == n:
    raise ConfigError(f"sample.skip.bricks {tuple(skip.bricks)} skips every brick of the "
                      f"{n}-brick stack: nothing would predict. Fix: keep at least one brick.")
  if 0 in drop:
    raise ConfigError("sample.skip.bricks skips brick 0, whose prediction every later brick "
                      "was trained to take as input. Fix: skip later bricks (the full-canvas "
                      "brick of PG is -1; the local bricks of PR are 1..n-1).")


def skip_plan(model, config):
  """None (no skipping), or (active for t >= t_switch, active for t < t_switch,
  t_switch) for solvers.run_sampler(model_fn, model_fn_low, t_switch).

  skip.end='low' skips the bricks for the lowest-noise fraction t_break of the
  trajectory (t < t_break*T: PG's full-canvas brick); 'high' for the highest
  (t >= (1 - t_break)*T: PR's local bricks). t_break=0 skips nothing."""
  if not getattr(model, "stacked", False):
    return None
  skip, T = config.sample.skip, int(config.diffusion.timesteps)
  n = len(model.bricks)
  check_skip(skip, n)
  drop = skipped_bricks(skip, n)
  if not drop or skip.t_break <= 0:
    return None
  reduced = tuple(i for i in range(n) if i not in drop)
  if skip.end == "low":
    return None, reduced, int(round(skip.t_break * T))
  return reduced, None, int(round((1.0 - skip.t_break) * T))


def default_skip(preset: str, n: int) -> dict:
  """The paper's skipping for a preset: PG and U skip the last (full-canvas)
  brick at the low-noise end; PR skips its local bricks at the high-noise end."""
  if preset == "pr":
    return {"bricks": tuple(range(1, n)), "end": "high"}
  return {"bricks": (-1,), "end": "low"}


# ---------------------------------------------------------------------------
# Larger canvases.

def for_canvas(model: LegoDenoiser, latent_hw, train_latent_hw) -> LegoDenoiser:
  """The model for a canvas of latent_hw (e.g. 2x the training latent each
  side). Block variants keep their block size, so the grid grows; `full`
  needs nothing (its coordinates follow the input's size)."""
  H, W = int(latent_hw[0]), int(latent_hw[1])
  th, tw = int(train_latent_hw[0]), int(train_latent_hw[1])
  if not model.blocks:
    for (rh, rw), *_ in model.bricks:
      if H % rh or W % rw:
        raise ConfigError(f"the {H}x{W} canvas is not tiled by a brick's {rh}x{rw} regions. "
                          "Fix: sides that are multiples of every region.")
    return model
  gh, gw = int(model.train_grid[0]), int(model.train_grid[1])
  bh, bw = th // gh, tw // gw
  if H % bh or W % bw:
    raise ConfigError(f"a {H}x{W} canvas is not a whole number of {bh}x{bw} blocks. Fix: "
                      f"sides that are multiples of the block ({bh}x{bw}).")
  return model.clone(grid=(H // bh, W // bw))


def canvas_neighbours(nb, latent_hw):
  """Neighbours' latents (B, k, h, w, c) stretched (nearest) to the larger
  canvas, so that each block of the larger grid is conditioned on the part of
  the neighbours' layout at its relative place."""
  B, k, h, w, c = nb.shape
  return jax.image.resize(nb, (B, k, int(latent_hw[0]), int(latent_hw[1]), c), "nearest")


def step_counts(config, plan) -> tuple[int, int]:
  """(steps run with the first model, steps with the second) of the config's
  sampler under a skip plan (None: every step with the first)."""
  s, T = config.sample, int(config.diffusion.timesteps)
  ts = np.arange(T) if s.sampler == "ddpm" else solvers.ddim_timesteps(T, s.steps)
  if plan is None:
    return len(ts), 0
  high = int(np.sum(ts >= plan[2]))
  return high, len(ts) - high


def sampler_flops(model, params, config, x, cond) -> dict:
  """FLOPs of the sampler's network evaluations under config.sample.skip, from
  XLA's cost analysis of each compiled model (XLA counts a loop's body once,
  whatever its trip count, so the loop's share is body FLOPs x steps).
  x: one batch of sampler rows; cond: their condition (rows.condition)."""
  plan = skip_plan(model, config)
  n_hi, n_lo = step_counts(config, plan)
  hi, lo = (None, None) if plan is None else plan[:2]

  def flops(active):
    fn = lambda p, x, t: model.apply({"params": p}, x, t, **cond,
                                     **({} if active is None else {"active": active}))
    t = jnp.zeros((x.shape[0],), jnp.int32)
    ca = jax.jit(fn).lower(params, x, t).compile().cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])

  f_hi = flops(hi)
  f_lo = flops(lo) if n_lo else 0.0
  return {"flops": n_hi * f_hi + n_lo * f_lo, "flops_per_step_high": f_hi, "flops_per_step_low": f_lo,
          "steps_high": n_hi, "steps_low": n_lo}
