"""Tolerances shared by the low-precision kernel tests."""
import torch


def rounding_slack(dtype, device, magnitude):
    """One rounding of a gradient of size up to `magnitude` to `dtype`: half an ulp, or a whole one on CPU,
    where Triton's interpreter casts float32 to bfloat16 by truncation (GPUs round to nearest even)."""
    ulp = 2.0 ** (1 - {torch.bfloat16: 8, torch.float16: 11}[dtype]) * magnitude
    return ulp if (device == "cpu" and dtype == torch.bfloat16) else ulp / 2
