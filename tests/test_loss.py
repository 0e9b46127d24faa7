"""The fused chunked cross-entropy equals dense cross-entropy on full logits, value and gradients, in fp64."""

import pytest
import torch
import torch.nn.functional as F

from ringtrain.model.loss import IGNORE_INDEX, auto_chunk_tokens, chunked_cross_entropy_sum, count_valid_tokens


def _case(seed, n=37, d=16, vocab=53, dtype=torch.float64, weighted=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = IGNORE_INDEX
    weights = torch.rand(n, generator=g, dtype=dtype) * 2 if weighted else None
    return hidden, weight, labels, weights


def _dense(hidden, weight, labels, weights):
    losses = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (losses * weights).sum() if weights is not None else losses.sum()


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_loss_and_grads_match_dense_fp64(chunk, weighted):
    hidden, weight, labels, weights = _case(chunk + 7 * weighted, weighted=weighted)
    ref = _dense(hidden, weight, labels, weights)
    ref_gh, ref_gw = torch.autograd.grad(3.0 * ref, (hidden, weight))
    got = chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk, token_weights=weights)
    gh, gw = torch.autograd.grad(3.0 * got, (hidden, weight))  # a non-unit upstream gradient
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)  # the sum is accumulated in fp32
    torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-9)


def test_no_grad_path_and_bf16():
    hidden, weight, labels, _ = _case(3, n=64, d=32, vocab=97)
    ref = _dense(hidden, weight, labels, None).item()
    with torch.no_grad():
        assert chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=10).item() == pytest.approx(ref, rel=1e-6)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    got = chunked_cross_entropy_sum(hb, wb, labels, chunk_tokens=10)
    got.backward()
    assert got.item() == pytest.approx(ref, rel=2e-2)
    ref_gh, ref_gw = torch.autograd.grad(_dense(hidden, weight, labels, None), (hidden, weight))
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert (hb.grad.double() - ref_gh).abs().max() <= 2e-2 * ref_gh.abs().max()
    assert (wb.grad.double() - ref_gw).abs().max() <= 2e-2 * ref_gw.abs().max()


def test_valid_token_count_and_auto_chunk():
    labels = torch.tensor([1, IGNORE_INDEX, 2, 3, IGNORE_INDEX])
    assert count_valid_tokens(labels).item() == 3
    assert count_valid_tokens(labels, torch.tensor([0.5, 9.0, 1.0, 2.0, 9.0])).item() == 3.5
    assert auto_chunk_tokens(32768) == 1024 and auto_chunk_tokens(131072) == 256 and auto_chunk_tokens(10**9) == 64
