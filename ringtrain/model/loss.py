"""Fused, chunked next-token cross-entropy: [tokens, vocab] logits exist one chunk at a time, in fp32.

A 128K-token shard with a 128K vocabulary would need 31 GiB of bf16 logits. The loss is computed chunk by
chunk and, when gradients are needed, so are the gradients with respect to the hidden states and the
output embedding (the softmax minus the one-hot target is all backward needs): backward only scales the
stored gradients, so no chunk is recomputed and only one [chunk, vocab] fp32 buffer is alive at a time (two with
final-logit soft-capping, Gemma 2's c * tanh(logits / c), whose derivative 1 - tanh^2 scales that gradient).

The per-token log-probabilities a preference loss sums per response (`chunked_token_logprobs`) walk the same chunks
with the same per-chunk helpers; their gradient is known only after the sums, so their backward recomputes each
chunk's logits instead of storing gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""The label of a position without a target (torch's and transformers' default): the one definition."""
# Bytes of fp32 logits per chunk when the chunk size is automatic: small against activations at long
# context, large enough that the matmuls stay efficient (1K tokens at a 32K vocabulary).
AUTO_CHUNK_BYTES = 128 * 2**20


def auto_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about AUTO_CHUNK_BYTES (at least 64)."""
    return max(64, AUTO_CHUNK_BYTES // (4 * vocab_size))


def _chunk_weights(labels: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    valid = labels != IGNORE_INDEX
    if token_weights is None:
        return valid.to(torch.float32)
    return token_weights.to(torch.promote_types(token_weights.dtype, torch.float32)) * valid


def _chunks(n: int, chunk_tokens: int) -> Iterator[slice]:
    """The token slices every chunked pass walks: [0, c), [c, 2c), ... over n tokens."""
    return (slice(start, start + chunk_tokens) for start in range(0, n, chunk_tokens))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, acc: torch.dtype, softcap: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(one chunk's logits [n, V] in `acc`, soft-capped when `softcap`; d capped / d raw logits, or None)."""
    logits = F.linear(h, weight).to(acc)  # [n, V]
    if softcap is None:
        return logits, None
    # In place: c * tanh(logits / c), and d/dlogits = 1 - tanh^2 kept for the gradient.
    tanh = logits.div_(softcap).tanh_()
    slope = 1.0 - tanh * tanh
    return tanh.mul_(softcap), slope


def _log_softmax_grad_(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of each row against `y` [n], softmax - onehot [n, V]), the latter formed in place in `logits`.

    log-sum-exp and softmax in the logits buffer itself: torch.logsumexp would allocate a second [n, V] temporary
    (x - max), doubling the loss's peak."""
    target = logits.gather(1, y[:, None]).squeeze(1)  # [n]
    top = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    probs = logits.sub_(top).exp_()
    norm = probs.sum(dim=-1, keepdim=True)  # [n, 1]
    ce = top.squeeze(1) + norm.log().squeeze(1) - target
    probs.div_(norm)
    probs[torch.arange(len(y), device=y.device), y] -= 1.0
    return ce, probs


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_t w_t * CE(hidden_t @ weight.T, label_t), with d/dhidden and d/dweight computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk_tokens, softcap):  # noqa: D401 - autograd signature
        # At least fp32 (fp64 stays fp64): log-softmax over a large vocabulary in bf16 is lossy, and the
        # weight gradient sums many small per-chunk products.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden)  # [N, d]
        # A frozen output head (LoRA's default) needs no [V, d] fp32 gradient: neither its memory nor its matmuls.
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        safe_labels = labels.clamp(min=0)
        for sl in _chunks(hidden.shape[0], chunk_tokens):
            h, y = hidden[sl], safe_labels[sl]
            w = _chunk_weights(labels[sl], None if token_weights is None else token_weights[sl]).to(acc)  # [n]
            logits, slope = _chunk_logits(h, weight, acc, softcap)
            ce, probs = _log_softmax_grad_(logits, y)
            total += (ce * w).sum()
            # d loss / d logits = w * (softmax - onehot), in place in the logits buffer.
            probs.mul_(w[:, None])
            if slope is not None:
                probs.mul_(slope)
            grad_hidden[sl] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), h.to(acc))
            # Free this chunk's logits before the next chunk allocates its own: one buffer alive, not two.
            del logits, probs, slope
        ctx.save_for_backward(grad_hidden, *([] if grad_weight is None else [grad_weight]))
        ctx.weight_dtype = weight.dtype
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, *grad_weight = ctx.saved_tensors
        grad_weight = (grad_weight[0] * grad_out).to(ctx.weight_dtype) if grad_weight else None
        return grad_hidden * grad_out, grad_weight, None, None, None, None


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 0,
    token_weights: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum over tokens of w_t * CE(hidden @ weight.T, labels), never holding more than one chunk of logits.

    hidden: [..., d] final hidden states; weight: [V, d] output embedding; labels: [...] already shifted
    (IGNORE_INDEX where no target); token_weights: optional [...] per-token weights; chunk_tokens: 0 picks
    `auto_chunk_tokens(V)`; softcap: logits become softcap * tanh(logits / softcap) first (Gemma 2's
    final_logit_softcapping). The caller divides by the global number of valid tokens (`count_valid_tokens`).
    """
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r}: pass a positive number or None")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    weights = token_weights.reshape(-1) if token_weights is not None else None
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, weights, chunk, softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    for sl in _chunks(hidden.shape[0], chunk):
        logits = F.linear(hidden[sl], weight).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        losses = F.cross_entropy(logits, labels[sl], ignore_index=IGNORE_INDEX, reduction="none")
        if weights is not None:
            losses = losses * weights[sl].to(torch.float32)
        total += losses.sum()
    return total


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log p(label_t | hidden_t) per token (0 where ignored); backward recomputes each chunk's logits.

    The upstream gradient of a preference loss is only known once every token's log-probability has been summed per
    response (over the sequence-parallel group too), so unlike the fused cross-entropy the gradient cannot be formed
    in forward: backward recomputes the chunk (one more [chunk, V] matmul per chunk), still one buffer at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, softcap):  # noqa: D401 - autograd signature
        acc = torch.promote_types(weight.dtype, torch.float32)
        out = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)  # [N]
        valid = labels != IGNORE_INDEX
        safe_labels = labels.clamp(min=0)
        with torch.no_grad():
            for sl in _chunks(hidden.shape[0], chunk_tokens):
                logits, _ = _chunk_logits(hidden[sl], weight, acc, softcap)
                out[sl] = -_log_softmax_grad_(logits, safe_labels[sl])[0] * valid[sl]
                del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_tokens, ctx.softcap = chunk_tokens, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        w = (-grad_out.to(acc)) * (labels != IGNORE_INDEX)  # d logp = -d CE
        safe_labels = labels.clamp(min=0)
        for sl in _chunks(hidden.shape[0], ctx.chunk_tokens):
            h = hidden[sl]
            logits, slope = _chunk_logits(h, weight, acc, ctx.softcap)
            _, probs = _log_softmax_grad_(logits, safe_labels[sl])
            probs.mul_(w[sl, None])
            if slope is not None:
                probs.mul_(slope)
            if grad_hidden is not None:
                grad_hidden[sl] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), h.to(acc))
            del logits, probs, slope
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """[N] log-probability of each label under the logits hidden @ weight.T (0 where IGNORE_INDEX), in at least fp32,
    never holding more than one chunk of logits, differentiable (backward recomputes the chunks).

    hidden: [..., d]; labels: [...] already shifted; the arguments are those of `chunked_cross_entropy_sum`. A
    preference loss sums these per response (`ringtrain.train.preference`)."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r}: pass a positive number or None")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedTokenLogProbs.apply(hidden, weight, labels.reshape(-1),
                                       chunk_tokens or auto_chunk_tokens(weight.shape[0]), softcap)


def count_valid_tokens(labels: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss denominator of this shard: labels that are not ignored (or their total weight)."""
    return _chunk_weights(labels, token_weights).sum()
