"""Diffusion maths: the noise schedule (a value) and the samplers."""
from rissole_jax.diffusion.schedule import Schedule, make_schedule, from_betas, PREDICTIONS
from rissole_jax.diffusion.samplers import ddpm, ddim, ddim_timesteps, guided, run_sampler, SAMPLERS

__all__ = ["Schedule", "make_schedule", "from_betas", "PREDICTIONS", "ddpm", "ddim",
           "ddim_timesteps", "guided", "run_sampler", "SAMPLERS"]
