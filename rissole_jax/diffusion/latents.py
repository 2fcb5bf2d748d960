"""Latent normalisation: the diffusion sees (z - mean) / std per channel, with
the statistics of the training latents (train/diffusion.py computes them)."""


def normalise(z, stats):
  return (z - stats["mean"]) / stats["std"]


def denormalise(z, stats):
  return z * stats["std"] + stats["mean"]
