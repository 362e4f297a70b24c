"""rmsnorm: chunked: the same forward, bit for bit; gradients within float32 rounding of the stock
norm's; only the input and 1/rms saved."""

from __future__ import annotations

import pytest
import torch

from ringpatch.memory import rmsnorm
from ringpatch.memory.rmsnorm import ChunkedRMSNorm, chunk_rmsnorms
from tests.helpers.models import batch, build
from tests.helpers.reference import rel_err

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_norm_in_chunks(dtype, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(rmsnorm, "RMS_CHUNK_BYTES", 4 * 64 * 5)  # 5 tokens a chunk: 37 tokens in 8 chunks
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64).to(dtype)
    norm.weight.data.normal_()
    x, g = (torch.randn(2, 37, 64).to(dtype) for _ in range(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    stock = norm(xa)
    stock.backward(g)
    dw_stock, norm.weight.grad = norm.weight.grad, None
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        chunked = ChunkedRMSNorm.apply(xb, norm.weight, norm.variance_epsilon)
    chunked.backward(g)
    assert torch.equal(chunked, stock)  # the stock arithmetic, row by row
    assert [tuple(t.shape) for t in seen] == [(2, 37, 64), (64,), (74, 1)]  # input, weight, 1/rms
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(xb.grad, xa.grad) <= tol and rel_err(norm.weight.grad, dw_stock) <= tol


def test_a_model_with_chunked_norms_has_the_stock_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(rmsnorm, "RMS_CHUNK_BYTES", 4 * 64 * 7)
    full = batch(rows=2, seq=24)
    stock, chunked = build("llama"), build("llama")
    assert chunk_rmsnorms(chunked) == 2 * stock.config.num_hidden_layers + 1
    losses, grads = [], []
    for model in (stock, chunked):
        loss = model(**full).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for name, want in grads[0].items():
        assert rel_err(grads[1][name], want) <= 1e-5, name


def test_a_model_without_rmsnorm_is_refused():
    with pytest.raises(ValueError, match="rmsnorm: chunked, but Linear has no RMSNorm modules; set rmsnorm: stock"):
        chunk_rmsnorms(torch.nn.Linear(2, 2))
