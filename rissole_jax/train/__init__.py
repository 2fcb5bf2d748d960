"""Trainers (one per stage), optimizers and checkpoints."""
