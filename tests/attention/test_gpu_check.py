"""bench/gpu_check.py's checks fail on a kernel with a 1% wrong softmax scale (and pass on the
real one), so its verdict on a GPU can be trusted; tests/test_scripts.py runs the whole script."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ringpatch.attention.kernels import MaskSpec, select
from tests.helpers import ROOT

pytestmark = pytest.mark.unit


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_catches_a_wrong_kernel():
    gc = _module()
    kernel = select("torch", torch.empty(1, 1, 1, 8))

    class Skewed:  # a 1% error in the softmax scale
        tile = kernel.tile

        def forward(self, q, k, v, call, spec):
            return kernel.forward(q, k, v, call, MaskSpec(spec.causal, spec.window, spec.scale * 1.01))

        def backward(self, *args):
            *rest, call, spec = args
            return kernel.backward(*rest, call, MaskSpec(spec.causal, spec.window, spec.scale * 1.01))

    case = gc.block_cases(64)[1]
    assert gc.check_block(kernel, case, torch.device("cpu"), torch.float32, 4, 2, 32)[0]
    assert not gc.check_block(Skewed(), case, torch.device("cpu"), torch.float32, 4, 2, 32)[0]
    assert not gc.check_ring(Skewed(), 256, 4, "zigzag", None, torch.device("cpu"), torch.float32, 4, 2, 32)[0]
