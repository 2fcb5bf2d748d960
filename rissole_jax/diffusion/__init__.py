"""Diffusion maths: the noise schedule (a value) and the samplers."""
from rissole_jax.diffusion.schedule import Schedule, make_schedule, from_betas, PREDICTIONS
from rissole_jax.diffusion.solvers import (ddpm, ddim, ddim_timesteps, dpmpp, guided, run_sampler,
                                          SAMPLERS, SPACINGS, check_config)

__all__ = ["Schedule", "make_schedule", "from_betas", "PREDICTIONS", "ddpm", "ddim",
           "ddim_timesteps", "dpmpp", "guided", "run_sampler", "SAMPLERS", "SPACINGS",
           "check_config"]
