"""bf16 training on CPU: oneDNN's AMX bf16 convolution weight gradients, checked before a run.

On a Xeon with AMX, PyTorch 2.13's oneDNN computed wrong bf16 weight gradients for 3-D convolutions
at the small preset's full-resolution width (32 channels over 64x64 crops: NaN; 64 channels:
relative error 0.38), while the data gradients and the forward were right. Stage 1 then went NaN
from its second step (`thfm train --precision bf16`); the same kernels capped below AMX
(ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) are right, relative error 0.003-0.004 (bf16 rounding).
oneDNN reads that variable once, when it first runs a primitive, so it is set here before any
convolution of the process runs, and a probe of the failing shape then checks the gradients,
whatever the CPU, before a run relies on them.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ..errors import ThfmError
from ..machine import read_cpu

logger = logging.getLogger(__name__)

ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
BELOW_AMX = "AVX512_CORE_BF16"
# A bf16 weight gradient off by more than this (relative to its largest element) is wrong, not rounded.
GRADIENT_RTOL = 0.05


def cap_isa_below_amx() -> bool:
    """Set ONEDNN_MAX_CPU_ISA below AMX on an AMX CPU where the user has not set it; True if set.
    It takes effect only if no oneDNN primitive has run in this process yet."""
    if ISA_VARIABLE in os.environ or read_cpu().machine_class != "amx":
        return False
    os.environ[ISA_VARIABLE] = BELOW_AMX
    logger.info("bf16 training on an AMX CPU: %s=%s (oneDNN's AMX bf16 convolution weight gradients are wrong; "
                "the AVX-512 BF16 kernels are right)", ISA_VARIABLE, BELOW_AMX)
    return True


def conv_weight_gradient_error(channels: int = 32, side: int = 64) -> float:
    """Largest relative error of a bf16 3-D convolution's weight gradient against fp32's (inf when
    not finite), on a causal-padded input of the shape that failed."""
    gen = torch.Generator().manual_seed(0)
    x = F.pad(torch.rand(4, channels, 1, side, side, generator=gen) * 2 - 1, (1, 1, 1, 1, 2, 0))
    w = torch.randn(channels, channels, 3, 3, 3, generator=gen) * 0.05
    grad_out = torch.randn(4, channels, 1, side, side, generator=gen) * 1e-5
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = w.to(dtype).detach().requires_grad_(True)  # a leaf of its own per dtype
        F.conv3d(x.to(dtype), weight).backward(grad_out.to(dtype))
        grads[dtype] = weight.grad.float()
    got, ref = grads[torch.bfloat16], grads[torch.float32]
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max())


def check_cpu_bf16_training() -> float:
    """Before `thfm train --precision bf16` on CPU: cap oneDNN below AMX where needed, then fail with
    the way out if bf16 convolution weight gradients are still wrong in this process. Returns the
    probe's relative error (conv_weight_gradient_error)."""
    capped = cap_isa_below_amx()
    error = conv_weight_gradient_error()
    if error > GRADIENT_RTOL:
        where = (f"{ISA_VARIABLE}={os.environ[ISA_VARIABLE]} was set too late: a convolution had already run in "
                 "this process" if capped else f"{ISA_VARIABLE}={os.environ.get(ISA_VARIABLE, '(unset)')}")
        raise ThfmError(f"--precision bf16 on this CPU ({read_cpu().machine_class}): PyTorch's bf16 convolution weight "
                        f"gradients are wrong here (relative error {error:.3g} against fp32; {where}). Use "
                        f"--precision fp32, or start the process with {ISA_VARIABLE}={BELOW_AMX}")
    logger.info("bf16 convolution weight gradients checked: relative error %.2g against fp32", error)
    return error
