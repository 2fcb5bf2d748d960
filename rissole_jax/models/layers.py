"""Layers that name the logical axes of their parameters.

Every model builds its convolutions and dense layers from here, so that
`parallel.py` can map parameters to the mesh with the config's rules:
output features are "embed" (sharded over fsdp by default), codebooks are
"vocab"; everything else is replicated.
"""
from __future__ import annotations

import flax.linen as nn


def conv(features: int, kernel: int = 3, stride: int = 1, name: str | None = None,
         zero_init: bool = False, padding="SAME", use_bias: bool = True) -> nn.Conv:
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 use_bias=use_bias, name=name,
                 kernel_init=nn.with_logical_partitioning(init, (None, None, None, "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def dense(features: int, name: str | None = None, zero_init: bool = False,
          use_bias: bool = True) -> nn.Dense:
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(features, name=name, use_bias=use_bias,
                  kernel_init=nn.with_logical_partitioning(init, (None, "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def group_norm(groups: int, channels: int, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with the largest group count <= `groups` that divides `channels`."""
  g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
  return nn.GroupNorm(num_groups=g, name=name)


def embedding(num: int, features: int, name: str | None = None) -> nn.Embed:
  return nn.Embed(num, features, name=name, embedding_init=nn.with_logical_partitioning(
      nn.initializers.normal(stddev=1.0), ("vocab", None)))
