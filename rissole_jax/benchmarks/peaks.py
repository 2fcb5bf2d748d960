"""Peak FLOP/s of the devices the benchmarks know, for model FLOP utilisation."""

# Dense peak TFLOP/s per device for float32 matmuls as XLA runs them by
# default (TF32 tensor cores on NVIDIA; bf16 MXU passes on TPU). Matched as a
# substring of jax's device_kind.
PEAK_TFLOPS = {"H100": 494.7, "H200": 494.7, "A100": 156.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5p": 459.0}


def peak_tflops(device_kind: str) -> float:
  """The table's peak for a device kind, 0.0 when unknown (e.g. CPUs)."""
  return next((v for n, v in PEAK_TFLOPS.items() if n in device_kind), 0.0)
