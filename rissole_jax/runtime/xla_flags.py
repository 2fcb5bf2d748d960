"""XLA:CPU flags this project sets by default: the one place that does.

jaxlib's CPU backend sends convolutions, dots and reductions to YNNPACK. On
the small maps of the block denoiser, XLA's own (Eigen) kernels are much
faster: with them a default train step runs about 1.6x and a sampling step
about 3x the images/s (docs/performance.md, interleaved measurements), with
the same results to float tolerance (tests/test_performance.py). Not set:
`+eltwise` YNN fusion (wrong results on jaxlib 0.10.2) and single-threaded
Eigen (faster on 2 cores only).

XLA reads XLA_FLAGS once, when JAX's first backend starts, so `apply` runs on
`import rissole_jax` (before any of its modules imports jax). It only appends
to XLA_FLAGS, and never a flag the user's XLA_FLAGS already names (theirs
wins); RISSOLE_XLA_FLAGS=0 leaves XLA_FLAGS alone. The flags are XLA:CPU
flags: GPU and TPU backends ignore them.
"""
from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,"
             "-individual_dot,-reduce",)
OPT_OUT = "RISSOLE_XLA_FLAGS"


def merged(user_flags: str, ours=CPU_FLAGS) -> str:
  """`user_flags` plus each of ours whose flag name it does not already set."""
  names = {f.split("=", 1)[0].lstrip("-") for f in user_flags.split()}
  extra = [f for f in ours if f.split("=", 1)[0].lstrip("-") not in names]
  return " ".join([user_flags.strip(), *extra]).strip()


def apply(environ=os.environ) -> None:
  """Adds the default CPU flags to environ['XLA_FLAGS'] (see the module doc)."""
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return
  environ["XLA_FLAGS"] = merged(environ.get("XLA_FLAGS", ""))
