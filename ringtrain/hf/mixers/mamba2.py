# Mamba-2 (Nemotron-H, Falcon-H1) head-parallel: each rank runs the causal conv, the SSD scan and the gated norm over
# whole sequences of 1/P of the heads and of the B/C groups they read.
#
# Head h reads group h // (heads / groups), so rank j takes heads [j H/P, (j+1) H/P) and, when G divides by P, groups
# [j G/P, (j+1) G/P): the gated norm normalises per group, so a rank's share is its own. With fewer groups than ranks
# (P a multiple of G; Falcon-H1 ships mamba_n_groups=1) each group's B and C go to the P/G ranks whose heads read it
# (the copies' gradients add up in the exchange's backward), and a norm group spans P/G ranks: its sum of squares is
# added over the SP group (one [B, S, G] fp32 all-reduce). The conv runs over (x, B, C) concatenated: a rank's conv rows
# are its x, B and C rows. Falcon-H1 adds its input multiplier and muP vector (token-wise, applied on the shard) and
# may leave the norm out.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ringtrain.hf.mixers.base import MixerKind, call_sliced, conv_rows, exchange, modeling, share
from ringtrain.ring import SequenceParallel
from ringtrain.ring.balance import Spans
from ringtrain.ring.channels import per_document


def _falcon(m: nn.Module) -> bool:
    return hasattr(m, "ssm_in_multiplier")


def _replicas(m: nn.Module, sp: SequenceParallel) -> int:
    """How many ranks share one B/C group: 1 when the groups divide by P."""
    return 1 if m.n_groups % sp.world == 0 else sp.world // m.n_groups


def _group_rows(m: nn.Module, sp: SequenceParallel) -> slice:
    """This rank's rows of the B (or C) projection: its share of the groups, or the one group its heads read."""
    copies, n = _replicas(m, sp), m.ssm_state_size
    if copies == 1:
        return share(m.n_groups * n, sp)
    g = sp.rank // copies
    return slice(g * n, (g + 1) * n)


def _per_rank(t: torch.Tensor, m: nn.Module, copies: int) -> torch.Tensor:
    """B or C [B, S_local, G x N] laid out so that its P equal channel groups are the ranks' rows (copies of a group
    side by side when P > G)."""
    if copies == 1:
        return t
    return t.unflatten(-1, (m.n_groups, 1, m.ssm_state_size)).expand(-1, -1, -1, copies, -1).flatten(2)


def _norm_across_ranks(m: nn.Module, out: torch.Tensor, gate: torch.Tensor, rows: slice, sp: SequenceParallel
                       ) -> torch.Tensor:
    """The module's gated RMS norm when its groups span ranks: the same arithmetic as NemotronHRMSNormGated /
    FalconH1RMSNormGated, with each group's sum of squares added over the SP group first."""
    norm, dtype = m.norm, out.dtype
    falcon = _falcon(m)
    gate_after = falcon and norm.norm_before_gate
    h = out.float()
    if not gate_after:
        h = h * F.silu(gate.float())
    copies = _replicas(m, sp)
    own = F.one_hot(torch.tensor(sp.rank // copies), m.n_groups).to(h)  # this rank's channels lie in one group
    squares = sp.all_reduce_sum(h.pow(2).sum(-1, keepdim=True) * own)[..., sp.rank // copies]  # [B, S]
    h = h * torch.rsqrt(squares / (m.intermediate_size // m.n_groups) + norm.variance_epsilon)[..., None]
    weight = norm.weight[rows]
    if not falcon:
        return weight * h.to(dtype)
    h = weight * h
    if gate_after:
        h = h * F.silu(gate.float())
    return h.to(dtype)


def forward(m: nn.Module, x: torch.Tensor, sp: SequenceParallel, spans: list[Spans] | None) -> torch.Tensor:
    mod = modeling(m)
    dtype = x.dtype
    inner, groups_state = m.intermediate_size, m.n_groups * m.ssm_state_size
    falcon, copies = _falcon(m), _replicas(m, sp)
    if falcon:
        x = x * m.ssm_in_multiplier
    projected = m.in_proj(x)
    if falcon:
        projected = projected * m.mup_vector
    gate, xs, b, c, dt = projected.split([inner, inner, groups_state, groups_state, m.num_heads], dim=-1)
    gate, xs, b, c, dt = exchange([gate, xs, _per_rank(b, m, copies), _per_rank(c, m, copies), dt], sp)
    heads, rows, states = share(m.num_heads, sp), share(inner, sp), _group_rows(m, sp)
    weight, bias = conv_rows(m.conv1d, [rows, slice(inner + states.start, inner + states.stop),
                                        slice(inner + groups_state + states.start, inner + groups_state + states.stop)])
    n_heads, n_groups = m.num_heads // sp.world, max(m.n_groups // sp.world, 1)
    a = -torch.exp(m.A_log[heads].float())
    widths = [xs.shape[-1], b.shape[-1], c.shape[-1]]

    def document(xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        xbc = mod.causal_conv1d_fn(xbc.transpose(1, 2), weight, bias, activation=m.activation).transpose(1, 2)
        xs, b, c = xbc.split(widths, dim=-1)
        out = mod.mamba2_chunk_scan(
            xs.unflatten(-1, (n_heads, m.head_dim)), dt, a, b.unflatten(-1, (n_groups, m.ssm_state_size)),
            c.unflatten(-1, (n_groups, m.ssm_state_size)), chunk_size=m.chunk_size, D=m.D[heads], z=None,
            dt_bias=m.dt_bias[heads], dt_softplus=True, dt_limit=m.time_step_limit)
        return out.flatten(2)  # [B, S_doc, H/P x head_dim], the D skip included

    out = per_document(document, (torch.cat([xs, b, c], dim=-1), dt), spans)
    if falcon and not m.mamba_rms_norm:
        out = out * F.silu(gate)
    elif copies > 1:
        out = _norm_across_ranks(m, out, gate, rows, sp)
    elif falcon:  # FalconH1RMSNormGated: n_groups groups of its last dim
        out = call_sliced(m.norm, {"weight": m.norm.weight[rows]}, (out, gate), n_groups=n_groups)
    else:  # NemotronHRMSNormGated: groups of group_size channels, so a share of whole groups is its own
        out = call_sliced(m.norm, {"weight": m.norm.weight[rows]}, (out, gate))
    out = sp.to_sequence(out).flatten(2)  # [B, S_local, intermediate], heads in order
    return m.out_proj(out.to(dtype))


def _buffers(m: nn.Module) -> tuple[int, int]:
    groups_state = m.n_groups * m.ssm_state_size
    sent = 2 * m.intermediate_size + 2 * groups_state + m.num_heads + m.intermediate_size  # gate, x, B, C, dt; back
    return sent, m.num_heads * m.head_dim * m.ssm_state_size


def _units(m: nn.Module) -> list:
    falcon = _falcon(m)
    return [("mamba_n_heads" if falcon else "mamba_num_heads", m.num_heads, "heads", False),
            ("mamba_n_groups" if falcon else "n_groups", m.n_groups, "B/C groups (or ranks per group)", True)]


KIND = MixerKind(
    name="Mamba-2",
    classes=("NemotronHMamba2Mixer", "FalconH1Mixer"),
    layer_types=("linear_attention", "hybrid", "mamba"),
    units=_units,
    forward=forward,
    buffers=_buffers,
)
