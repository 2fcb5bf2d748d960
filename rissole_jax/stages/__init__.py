"""Pipeline stages that are not trainers: encode, index, sample, evaluate."""
