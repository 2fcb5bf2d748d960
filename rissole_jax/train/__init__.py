"""The training machinery the vqgan and diffusion stages (stages/) use: train
steps and their builders, optimizers, verified checkpoints, the NaN guard,
the end of a training loop (loop.py), and the trained models back from their
checkpoints."""
