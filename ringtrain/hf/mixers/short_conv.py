# LFM2's gated short convolution head-parallel: the gates B and C and the input x are token-wise (computed on the
# shard); only the depthwise causal conv of B * x mixes tokens, so each rank convolves whole sequences of 1/P of the
# channels. (A halo exchange of the previous kernel-1 tokens would move less for a kernel of 3; the all-to-all keeps
# one form for every mixer kind.)

from __future__ import annotations

import torch
from torch import nn

from ringtrain.hf.mixers.base import MixerKind, conv_rows, exchange, modeling, share
from ringtrain.ring import SequenceParallel
from ringtrain.ring.balance import Spans
from ringtrain.ring.channels import per_document


def forward(m: nn.Module, x: torch.Tensor, sp: SequenceParallel, spans: list[Spans] | None) -> torch.Tensor:
    mod = modeling(m)
    gate_b, gate_c, xs = m.in_proj(x).chunk(3, dim=-1)
    (bx,) = exchange([gate_b * xs], sp)
    weight, bias = conv_rows(m.conv, [share(m.conv.in_channels, sp)])

    def document(bx: torch.Tensor) -> torch.Tensor:
        return mod.causal_conv1d_fn(bx.transpose(1, 2), weight, bias).transpose(1, 2)

    conv = sp.to_sequence(per_document(document, (bx,), spans)).flatten(2)
    return m.out_proj(gate_c * conv)


KIND = MixerKind(
    name="short convolution",
    classes=("Lfm2ShortConv",),
    layer_types=("conv",),
    units=lambda m: [("hidden_size", m.conv.in_channels, "convolution channels", False)],
    forward=forward,
    buffers=lambda m: (2 * m.conv.in_channels, m.conv.in_channels * (m.conv_kernel_size - 1)),
)
