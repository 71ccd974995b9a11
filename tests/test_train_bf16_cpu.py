"""`thfm train --precision bf16` on CPU: the oneDNN check before a run (training/cpu_bf16.py).

Each case runs in a fresh interpreter: oneDNN reads ONEDNN_MAX_CPU_ISA once, at its first primitive,
and this test process has run convolutions already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from thfm_serve.machine import read_cpu

PROBE = """
import json
from thfm_serve.errors import ThfmError
from thfm_serve.training.cpu_bf16 import GRADIENT_RTOL, check_cpu_bf16_training, conv_weight_gradient_error
try:
    error, refused = check_cpu_bf16_training(), None
except ThfmError as e:
    error, refused = conv_weight_gradient_error(), str(e)
print(json.dumps({"error": error, "rtol": GRADIENT_RTOL, "refused": refused}))
"""


def _probe(env_isa: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if env_isa:
        env["ONEDNN_MAX_CPU_ISA"] = env_isa
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bf16_convolution_weight_gradients_are_right_in_a_training_process():
    """What a bf16 run's process gets after the check, on whatever CPU runs the suite (on an AMX CPU,
    oneDNN capped below AMX by the check itself): weight gradients within bf16 rounding of fp32's."""
    got = _probe(None)
    assert got["refused"] is None
    assert got["error"] <= 0.02  # bf16 rounding measured 0.003-0.004; a wrong kernel gave NaN or 0.38


@pytest.mark.skipif(read_cpu().machine_class != "amx", reason="the AMX bf16 kernels exist only on AMX CPUs")
def test_with_amx_kernels_forced_the_check_refuses_exactly_when_the_gradients_are_wrong():
    """The user's own ONEDNN_MAX_CPU_ISA is kept: with the AMX kernels allowed, a run is refused, with
    the way out, if and only if the probe's weight gradients are off."""
    got = _probe("AVX512_CORE_AMX")
    if got["error"] > got["rtol"]:
        assert got["refused"] and "--precision fp32" in got["refused"] and "AVX512_CORE_BF16" in got["refused"]
    else:
        assert got["refused"] is None
