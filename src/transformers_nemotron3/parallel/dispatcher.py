"""Token dispatchers for the MoE seam ``Nemotron3MoE.dispatcher``: capacity dropping and all-to-all EP.

`AllToAllDispatcher` follows Megatron-Core's ``MoEAlltoAllTokenDispatcher`` without the ETP stage:

1. (optional) sub-sequence capacity dropping on this rank's tokens, policy ``probs`` or ``position``;
2. permute token copies by global expert id (experts are contiguous per ep rank, so this also groups
   them by destination rank);
3. exchange per-expert counts (``all_to_all_single`` on a tiny int tensor);
4. all-to-all-v of the token rows (`all_to_all_v`, an autograd function over ``dist.all_to_all_single``);
5. re-sort the received rows from (source rank, local expert) to (local expert, source rank) and hand
   them with local counts to the grouped experts;
6. combine: undo 5, all-to-all-v back, scale by routing weight, index-add into token rows.

With ``group=None`` (or an ep group of size 1) no communication happens: the same class is then the
single-process reference for dropping. With LatentMoE the rows are latent-width (the MoE layer applies
``fc1_latent_proj`` before calling ``dispatch``), which is where the d/l traffic saving comes from.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class _AllToAllV(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with uneven splits; backward sends the gradient rows back
    with the splits swapped. (``torch.distributed.nn.functional.all_to_all_single`` does the same but is
    deprecated in torch 2.13.)"""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all_v(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group) -> torch.Tensor:
    """Autograd-aware all-to-all of the rows of ``x`` (``None`` splits = equal)."""
    world = dist.get_world_size(group)
    if in_splits is None:
        in_splits = [x.shape[0] // world] * world
    if out_splits is None:
        out_splits = [x.shape[0] // world] * world
    return _AllToAllV.apply(x, list(out_splits), list(in_splits), group)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(tokens * top_k / experts * capacity_factor)`` (Megatron's ``get_capacity``, no minimum)."""
    return int(math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def capacity_keep_mask(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, num_experts: int,
                       capacity: int, policy: str) -> torch.Tensor:
    """Boolean [T, k]: which token copies each expert keeps when it takes at most ``capacity`` of them.

    ``probs`` keeps the highest routing weights (ties: earlier token first), ``position`` the earliest tokens.
    """
    flat = topk_idx.reshape(-1)
    n = flat.numel()
    if policy == "probs":
        if topk_weights is None:
            raise ValueError("drop_policy='probs' needs the routing weights: pass topk_weights to dispatch(), "
                             "or use drop_policy='position'.")
        priority_order = torch.argsort(topk_weights.reshape(-1).detach().float(), descending=True, stable=True)
    elif policy == "position":
        priority_order = torch.arange(n, device=flat.device)
    else:
        raise ValueError(f"drop_policy={policy!r}; use 'probs' or 'position'.")
    # stable sort by expert keeps the priority order inside each expert's segment
    order = priority_order[torch.argsort(flat[priority_order], stable=True)]
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(n, device=flat.device) - starts[flat[order]]
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(topk_idx)


class AllToAllDispatcher:
    """Dispatcher for one MoE layer; ``group`` is the ep process group (None = this process only).

    The MoE layer passes the routing weights to `dispatch` (the ``probs`` drop policy ranks token copies by them).
    ``stats`` counts the bytes this rank sent to other ranks in the forward pass (dispatch + combine).
    """

    def __init__(self, group=None, capacity_factor: float | None = None, drop_policy: str = "probs",
                 pad_to_capacity: bool = False) -> None:
        self.group = group
        self.ep = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.pad_to_capacity = pad_to_capacity and capacity_factor is not None
        self.last_keep: torch.Tensor | None = None  # [T, k] kept copies of the last dispatch (None = dropless)
        self.stats = {"bytes_sent": 0, "rows_sent": 0}

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                 num_experts: int):
        num_tokens, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(num_tokens, k, num_experts, self.capacity_factor)
            keep = capacity_keep_mask(topk_idx, topk_weights, num_experts, capacity, self.drop_policy)
            self.last_keep = keep
            copies = torch.nonzero(keep.reshape(-1)).squeeze(1)
        else:
            self.last_keep = None
            copies = torch.arange(flat.numel(), device=flat.device)
        experts_of = flat[copies]
        sel = copies[torch.argsort(experts_of, stable=True)]  # kept copies sorted by expert
        token = sel // k
        counts = torch.bincount(experts_of, minlength=num_experts)
        rows = x[token]
        if self.pad_to_capacity:  # expert e owns rows [e*capacity, (e+1)*capacity), zeros after its tokens
            starts = torch.cumsum(counts, 0) - counts
            e_sorted = flat[sel]
            dest = e_sorted * capacity + (torch.arange(sel.numel(), device=x.device) - starts[e_sorted])
            rows = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy(0, dest, rows)
            counts = torch.full_like(counts, capacity)
        else:
            dest = None
        ctx = {"sel": sel, "token": token, "dest": dest}
        if self.ep == 1:
            return rows, counts, ctx

        local = num_experts // self.ep
        send_counts = counts.view(self.ep, local).contiguous()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        recv = all_to_all_v(rows, out_splits, in_splits, self.group)
        self._count(in_splits, rows)
        # received rows are grouped (source rank, local expert); the experts want (local expert, source rank)
        seg_len = recv_counts.reshape(-1)
        seg = torch.repeat_interleave(torch.arange(seg_len.numel(), device=x.device), seg_len)
        perm = torch.argsort((seg % local) * self.ep + seg // local, stable=True)
        ctx.update(perm=perm, in_splits=in_splits, out_splits=out_splits)
        return recv[perm], recv_counts.sum(0), ctx

    # ------------------------------------------------------------------ combine
    def combine(self, out: torch.Tensor, weights: torch.Tensor, ctx, num_tokens: int) -> torch.Tensor:
        if self.ep > 1:
            back = out[torch.argsort(ctx["perm"])]
            out = all_to_all_v(back, ctx["in_splits"], ctx["out_splits"], self.group)
            self._count(ctx["out_splits"], back)
        if ctx["dest"] is not None:
            out = out[ctx["dest"]]
        out = out.float() * weights.reshape(-1)[ctx["sel"], None]
        return out.new_zeros(num_tokens, out.shape[1]).index_add_(0, ctx["token"], out)

    def _count(self, splits: list[int], rows: torch.Tensor) -> None:
        remote = sum(s for r, s in enumerate(splits) if r != self.rank)
        self.stats["rows_sent"] += remote
        self.stats["bytes_sent"] += remote * rows.shape[1] * rows.element_size()


__all__ = ["AllToAllDispatcher", "capacity_keep_mask", "expert_capacity", "all_to_all_v"]
