# The log-sum-exp merge of partial attention results: the one place blocks' (out, lse) pairs are combined. The ring
# driver and the varlen waves both fold into the same fp32 accumulators through it.

from __future__ import annotations

import torch


def merge_partial(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor
) -> None:
    """Fold one block's (out, lse) into the running (out_acc, lse_acc), in place, in the merge dtype.

    out_acc [B, s, H, D] and lse_acc [B, H, s] are (views of) fp32 accumulators; out_blk is the kernel's
    output in the input dtype, lse_blk [B, H, s]. logaddexp is the stable form (no exp of a large lse);
    rows no block has reached yet hold lse = -inf and out = 0, and keep finite weights below.
    """
    new = torch.logaddexp(lse_acc, lse_blk)
    ref = new.masked_fill(new == float("-inf"), 0.0)  # both -inf: weights exp(-inf) = 0, not nan
    w_acc = torch.exp(lse_acc - ref).transpose(1, 2).unsqueeze(-1)  # [B, s, H, 1]
    w_blk = torch.exp(lse_blk - ref).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out_blk.to(out_acc.dtype).mul_(w_blk))
    lse_acc.copy_(new)
