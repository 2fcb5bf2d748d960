"""The pipeline stages (registry: main.STAGES). Each pipeline stage is
stages/<name>.py with run(ctx) -> metrics; the training machinery they use is in train/."""
