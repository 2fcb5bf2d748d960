"""Peak FLOP/s of the devices the benchmarks know, for model FLOP utilisation."""

# Dense peak TFLOP/s per device for float32 matmuls as XLA runs them by
# default (TF32 tensor cores on NVIDIA; bf16 MXU passes on TPU). Matched as a
# substring of jax's device_kind, first match wins: the PCIe and NVL cards
# (e.g. "NVIDIA H100 PCIe") come before the SXM ones ("NVIDIA H200"), whose
# clocks and power are higher. NVIDIA's data sheets give these with sparsity:
# halved here.
PEAK_TFLOPS = {"H100 PCIe": 378.0, "H100 NVL": 417.5, "H200 NVL": 417.5,
               "H100": 494.7, "H200": 494.7, "A100": 156.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5p": 459.0}
# ... and for bfloat16 compute (model.dtype="bfloat16"): NVIDIA's bf16 tensor
# cores run twice TF32's rate, so MFU against the float32 table would read 2x
# too high; TPUs' peaks above are already bf16.
PEAK_TFLOPS_BF16 = {**PEAK_TFLOPS, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H200 NVL": 835.5,
                    "H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device_kind: str, dtype: str = "float32") -> float:
  """The table's peak for a device kind and compute dtype, 0.0 when unknown
  (e.g. CPUs)."""
  table = PEAK_TFLOPS_BF16 if dtype == "bfloat16" else PEAK_TFLOPS
  return next((v for n, v in table.items() if n in device_kind), 0.0)
