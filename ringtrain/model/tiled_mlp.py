"""Tiled MLP (ALST, arXiv 2506.13996): a decoder MLP runs over tiles of its tokens and recomputes each tile in backward,
so its [tokens, intermediate] activations exist for one tile at a time instead of for the whole sequence shard.

The MLP module is not wrapped or edited: `apply_tiled_mlp` sets its *instance's* `forward` to a `TiledForward` that
calls the class's own forward per tile (parameter names, state dicts and checkpoints are unchanged). The tile
function saves only its input; backward recomputes one tile at a time and returns the parameters' gradients summed
over the tiles, so autograd accumulates them once per call, exactly as for the untiled module (FSDP2 then
reduce-scatters them once per layer). An MLP is per token, so the result is the untiled one up to the order of
floating-point sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def tile_count(tokens: int, tile_tokens: int) -> int:
    """Tiles for `tokens` tokens of at most `tile_tokens` each (at least one)."""
    return max(1, math.ceil(tokens / tile_tokens))


def _tile_rows(n_rows: int, n_tiles: int) -> list[slice]:
    """`n_tiles` contiguous row ranges covering n_rows (sizes differ by at most one; empty ones dropped)."""
    base, extra = divmod(n_rows, n_tiles)
    rows, start = [], 0
    for i in range(n_tiles):
        size = base + (i < extra)
        if size:
            rows.append(slice(start, start + size))
        start += size
    return rows


def _check_output(y: object, fn: Callable) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        owner = getattr(fn, "__self__", fn)
        raise TypeError(f"train.tiled_mlp: {type(owner).__name__}.forward returned {type(y).__name__}, not one tensor; "
                        "only per-token MLPs returning a tensor can be tiled: set train.tiled_mlp=false")
    return y


def _tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """fn over row tiles of x [..., d], written into one output buffer (no concatenation copy)."""
    flat = x.reshape(-1, x.shape[-1])  # [N, d]
    out = None
    for rows in _tile_rows(flat.shape[0], n_tiles):
        y = _check_output(fn(flat[rows]), fn)
        if out is None:
            out = y.new_empty(flat.shape[0], y.shape[-1])  # [N, d_out]
        out[rows] = y
    if out is None:  # no tokens at all
        return _check_output(fn(flat), fn).view(*x.shape[:-1], -1)
    return out.view(*x.shape[:-1], out.shape[-1])


class _TiledFunction(torch.autograd.Function):
    """fn(x) over tiles; saves only x. `params` are fn's parameters, inputs here so that autograd takes their
    gradient from this node, once, summed over the tiles."""

    @staticmethod
    def forward(ctx, fn, n_tiles, x, *params):  # noqa: D401 - autograd signature
        ctx.fn, ctx.n_tiles, ctx.params = fn, n_tiles, params
        ctx.save_for_backward(x)
        return _tiled_apply(fn, x, n_tiles)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        want_x = ctx.needs_input_grad[2]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if need]
        flat_x = x.reshape(-1, x.shape[-1])  # [N, d]
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])  # [N, d_out]
        grad_x = torch.empty_like(flat_x) if want_x else None
        # Parameter gradients summed over tiles in at least fp32: bf16 partial sums would round once per tile where
        # the untiled GEMM rounds once.
        acc = [torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
               for p in params]
        for rows in _tile_rows(flat_x.shape[0], ctx.n_tiles):
            with torch.enable_grad():
                xt = flat_x[rows].detach().requires_grad_(want_x)
                y = ctx.fn(xt)
            inputs = [xt, *params] if want_x else params
            grads = torch.autograd.grad(y, inputs, flat_g[rows], allow_unused=True)
            if want_x:
                grad_x[rows] = grads[0]
                grads = grads[1:]
            for a, g in zip(acc, grads, strict=True):
                if g is not None:
                    a += g
            del y, grads  # this tile's recomputed activations go before the next tile's
        it = iter(a.to(p.dtype) for a, p in zip(acc, params, strict=True))
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return None, None, None if grad_x is None else grad_x.view_as(x), *param_grads


class _TokenRows:
    """A module's forward called on a [tokens, d] tile as the [1, tokens, d] batch modules expect (an MoE block unpacks
    batch, sequence and hidden; a per-token MLP does not mind), returning [tokens, d_out]. Tokens are routed one by
    one, so an MoE block over tiles is the block over the whole shard."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.__self__ = fn, fn.__self__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x[None])
        return y[0] if isinstance(y, torch.Tensor) else y


class TiledForward:
    """A module's forward over `n_tiles` tiles of its input's tokens (all leading dimensions flattened), recomputed
    per tile in backward. Set as the module instance's `forward`; calls the class's forward, never the hooks again."""

    def __init__(self, module: nn.Module, n_tiles: int):
        self.inner = _TokenRows(type(module).forward.__get__(module))  # the class's forward: what the module ran
        self.module = module
        self.n_tiles = n_tiles

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The parameters as the module holds them now: FSDP2 swaps in the gathered ones for forward and backward.
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            return _tiled_apply(self.inner, x, self.n_tiles)  # no backward: tiles still bound the peak
        return _TiledFunction.apply(self.inner, self.n_tiles, x, *params)


def tile_mlp(mlp: nn.Module, n_tiles: int) -> None:
    """Make `mlp` (a per-token module taking and returning one tensor) run over `n_tiles` tiles; idempotent."""
    mlp.forward = TiledForward(mlp, n_tiles)


def untile_mlp(mlp: nn.Module) -> None:
    """Undo `tile_mlp`: the class's forward again."""
    if isinstance(mlp.__dict__.get("forward"), TiledForward):
        del mlp.forward
