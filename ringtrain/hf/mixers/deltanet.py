# Gated DeltaNet (Qwen3-Next, Qwen3.5) head-parallel: each rank runs the causal conv, the gated delta rule and the
# gated norm over whole sequences of 1/P of the key heads and the value heads that read them.
#
# Value head h reads key head h // (H_v / H_k) (the kernel repeats q and k), so rank j takes key heads
# [j H_k/P, (j+1) H_k/P) and value heads [j H_v/P, (j+1) H_v/P): the grouping is kept when H_k divides by P. The conv
# runs over the channels (q, k, v) concatenated: a rank's conv weights are its q, k and v rows, taken from each part.
# Qwen3-Next projects q, k, v, z grouped per key head (one contiguous slice per rank); Qwen3.5 projects each part on
# its own (each part split by heads).

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ringtrain.hf.mixers.base import MixerKind, conv_rows, exchange, modeling, share
from ringtrain.ring import SequenceParallel
from ringtrain.ring.balance import Spans
from ringtrain.ring.channels import per_document


def _projections(m: nn.Module, x: torch.Tensor, sp: SequenceParallel) -> list[torch.Tensor]:
    """This rank's (q, k, v, z, b, a) over the whole sequence: q, k [B, S, H_k/P x D_k], v, z [B, S, H_v/P x D_v],
    b, a [B, S, H_v/P]."""
    hk, hv, dk, dv = m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    if hasattr(m, "in_proj_qkvz"):  # Qwen3-Next: [q, k, v, z] and [b, a] per key head, key heads in order
        qkvz, ba = exchange([m.in_proj_qkvz(x), m.in_proj_ba(x)], sp)
        r, heads = hv // hk, hk // sp.world
        q, k, v, z = qkvz.unflatten(-1, (heads, -1)).split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = ba.unflatten(-1, (heads, -1)).split([r, r], dim=-1)
        return [t.flatten(2) for t in (q, k, v, z, b, a)]
    q, k, v = m.in_proj_qkv(x).split([m.key_dim, m.key_dim, m.value_dim], dim=-1)  # Qwen3.5: one part at a time
    return exchange([q, k, v, m.in_proj_z(x), m.in_proj_b(x), m.in_proj_a(x)], sp)


def forward(m: nn.Module, x: torch.Tensor, sp: SequenceParallel, spans: list[Spans] | None) -> torch.Tensor:
    mod = modeling(m)
    q, k, v, z, b, a = _projections(m, x, sp)
    values = share(m.num_v_heads, sp)
    kd, vd = share(m.key_dim, sp), share(m.value_dim, sp)
    weight, bias = conv_rows(m.conv1d, [kd, slice(m.key_dim + kd.start, m.key_dim + kd.stop),
                                        slice(2 * m.key_dim + vd.start, 2 * m.key_dim + vd.stop)])
    beta = b.sigmoid()
    # As the module does: fp32 decay, else A might be -inf in fp16.
    g = -m.A_log[values].float().exp() * F.softplus(a.float() + m.dt_bias[values])
    widths = [q.shape[-1], k.shape[-1], v.shape[-1]]

    def document(qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        qkv = mod.causal_conv1d_fn(qkv.transpose(1, 2), weight, bias, activation=m.activation).transpose(1, 2)
        q, k, v = (t.unflatten(-1, (-1, d)) for t, d in zip(qkv.split(widths, dim=-1),
                                                              (m.head_k_dim, m.head_k_dim, m.head_v_dim), strict=True))
        out, _ = mod.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None,
                                                  output_final_state=False, use_qk_l2norm_in_kernel=True)
        return out  # [B, S_doc, H_v/P, D_v]

    out = per_document(document, (torch.cat([q, k, v], dim=-1), g, beta), spans)
    out = m.norm(out.reshape(-1, m.head_v_dim), z.reshape(-1, m.head_v_dim)).reshape(z.shape)
    out = sp.to_sequence(out).flatten(2)  # [B, S_local, H_v x D_v], heads in order
    return m.out_proj(out)


def _buffers(m: nn.Module) -> tuple[int, int]:
    sent = 2 * m.key_dim + 2 * m.value_dim + 2 * m.num_v_heads + m.value_dim  # q, k, v, z, b, a out; the output back
    return sent, m.num_v_heads * m.head_k_dim * m.head_v_dim


KIND = MixerKind(
    name="gated DeltaNet",
    classes=("Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet"),
    layer_types=("linear_attention",),
    units=lambda m: [("linear_num_key_heads", m.num_k_heads, "key heads (and the value heads that read them)", False)],
    forward=forward,
    buffers=_buffers,
)
