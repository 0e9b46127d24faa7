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


@pytest.mark.parametrize("chunk", [5, 37])
def test_final_logit_softcap_matches_dense_fp64(chunk):
    """Gemma 2's c * tanh(logits / c) inside the chunked loss: value (grad and no-grad paths) and gradients."""
    hidden, weight, labels, weights = _case(chunk, weighted=True)
    cap = 1.5  # below the logits' spread: the cap bites
    ref = _dense(hidden, weight, labels, weights)  # uncapped, to show the cap matters
    capped = F.cross_entropy(cap * torch.tanh(hidden @ weight.T / cap), labels, ignore_index=IGNORE_INDEX,
                             reduction="none")
    capped = (capped * weights).sum()
    assert abs(float((capped - ref).detach())) > 1.0
    ref_gh, ref_gw = torch.autograd.grad(2.0 * capped, (hidden, weight))
    got = chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk, token_weights=weights, softcap=cap)
    gh, gw = torch.autograd.grad(2.0 * got, (hidden, weight))
    torch.testing.assert_close(got.double(), capped, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        plain = chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk, token_weights=weights,
                                          softcap=cap)
    torch.testing.assert_close(plain.double(), capped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,extra", [("gemma2", {"final_logit_softcapping": 2.0, "initializer_range": 0.3}),
                                          ("cohere2", {"logit_scale": 0.5})])
def test_model_logit_transforms_in_the_chunked_loss(family, extra):
    """The trainer's loss wrapper applies the model's own logit transforms (its ForCausalLM.forward's): loss and every
    gradient equal transformers' own loss, fp64."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ringtrain.model.causal_lm import CausalLMWithChunkedLoss

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager").double()
    ids = torch.randint(3, 64, (2, 16))
    logits = lm(input_ids=ids).logits  # fp64, the model's transforms applied (its own loss would upcast to fp32)
    ref_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref_loss, list(lm.parameters()))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    got = CausalLMWithChunkedLoss(lm, 7)(ids, torch.arange(16).expand(2, -1), labels)
    grads = torch.autograd.grad(got, list(lm.parameters()))
    torch.testing.assert_close(got.double(), ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)
    for key in extra:  # sensitivity: without the model's transform the loss differs
        if key != "initializer_range":
            setattr(lm.config, key, None if key == "final_logit_softcapping" else 1.0)
    assert abs(float(CausalLMWithChunkedLoss(lm, 7)(ids, torch.arange(16).expand(2, -1), labels) - got)) > 1e-3
