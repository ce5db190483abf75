"""Mixture-of-Experts of Nemotron 3 (`E` layers): router, token dispatcher, grouped experts, shared expert.

Three seams let code outside the model change how the layer runs without touching it:

- ``Nemotron3MoE.dispatcher``: how routed tokens reach the experts and come back. `LocalDispatcher`
  sorts token copies by expert; the expert-parallel plugin swaps in an all-to-all dispatcher.
- ``Nemotron3Experts.gemm(x, weight, counts)``: the grouped GEMM over tokens sorted by expert; the
  NVFP4 plugin swaps in a quantized version.
- ``Nemotron3Router.expert_load``: per-expert token counts gathered during training, read by the
  aux-loss-free bias update (`Nemotron3ForCausalLM.update_expert_bias`).

Padding tokens are routed like any other (their outputs are never used) but never counted: the model passes
each MoE layer a ``token_mask`` (its padding mask, which context parallelism's right padding also sets), and
``expert_load`` and the aux loss see only the real tokens, so a padded batch gives the statistics of the same
rows unpadded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
except ImportError:  # pragma: no cover - older transformers: experts run eagerly
    ALL_EXPERTS_FUNCTIONS = {}

    def use_experts_implementation(cls=None, **_):
        return cls if cls is not None else (lambda c: c)


def activation(name: str):
    """Activation functions by config name (``relu2`` is squared ReLU)."""
    if name == "relu2":
        return _relu2
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def _relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU; without autograd in place (its input is always a fresh GEMM output here)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.square(F.relu(x))
    return F.relu_(x).square_()


_TORCH_GROUPED_MM: bool | None = None  # whether torch._grouped_mm runs on CPU in this torch (probed once)


def _cpu_grouped_mm_available() -> bool:
    global _TORCH_GROUPED_MM
    if _TORCH_GROUPED_MM is None:
        try:
            out = torch._grouped_mm(torch.ones(2, 4), torch.ones(2, 4, 8), offs=torch.tensor([1, 2], dtype=torch.int32))
            _TORCH_GROUPED_MM = tuple(out.shape) == (2, 8) and bool((out == 4).all())
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _TORCH_GROUPED_MM = False
    return _TORCH_GROUPED_MM


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: rows of ``x`` [T, in] sorted by expert, ``weight`` [E, out, in], ``counts`` [E].

    On CPU one ``torch._grouped_mm`` call (where this torch has it: the same per-group products as
    the loop below, bit for bit, with autograd, 10-30 % faster as it skips a Python call per expert);
    elsewhere, or without it, a ``F.linear`` per expert that received rows.
    """
    row_bytes = 16 // x.element_size()  # the kernel wants 16-byte aligned strides
    if (x.device.type == "cpu" and x.dtype == weight.dtype and weight.shape[1] % row_bytes == 0
            and not torch.compiler.is_compiling()  # fake tensors reject fp32 _grouped_mm under torch.compile
            and weight.shape[2] % row_bytes == 0 and x.is_contiguous() and _cpu_grouped_mm_available()):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    sizes = counts.tolist()
    outs = [F.linear(chunk, weight[e]) for e, chunk in enumerate(torch.split(x, sizes)) if sizes[e]]
    if not outs:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@use_experts_implementation(has_gate=False)
class Nemotron3Experts(nn.Module):
    """Routed experts as 3-D weights: relu² ``down(act(up x))`` (or, with ``moe_gated_experts``, SwiGLU
    ``down(act(gate x) * up x)``), behind transformers' experts seam.

    ``config._experts_implementation`` picks the kernel (``from_pretrained(..., experts_implementation=...)`` or
    ``model.set_experts_implementation(...)``): ``"eager"`` (this package's default) runs `forward` below, i.e. the
    ``dispatcher`` and ``gemm`` seams; transformers' ``"grouped_mm"`` / ``"batched_mm"`` run its own kernels on the
    same weights (non-gated experts only); an implementation marked ``keeps_seams`` (the package's CPU kernels,
    ``"nemotron3_cpu"``) falls back to this forward wherever it does not apply.
    """

    def __init__(self, config, width: int | None = None) -> None:
        super().__init__()
        gated = bool(config.moe_gated_experts)
        width = width or config.moe_latent_size or config.hidden_size
        num_experts, intermediate = config.n_routed_experts, config.moe_intermediate_size
        self.num_experts = num_experts  # experts held here (expert parallelism keeps a shard)
        self.global_num_experts = num_experts  # experts the router chooses among
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, width))
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, intermediate))
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, width)) if gated else None
        self.act_fn = activation(config.moe_expert_act if gated else config.mlp_hidden_act)
        self.gemm = grouped_mm  # seam: the NVFP4 plugin swaps in a quantized grouped GEMM
        self.dispatcher = LocalDispatcher()  # seam: the expert-parallel plugin swaps in an all-to-all dispatcher

    @property
    def act(self):
        return self.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` [T, width], routing [T, k] -> weighted sum of each token's experts, float32 [T, width].

        A handful of routes without autograd (batch-1 decode) run each chosen expert directly (`routed_few_tokens`);
        otherwise the ``dispatcher`` sorts token copies by expert for the grouped ``gemm``."""
        if (top_k_index.numel() <= FEW_ROUTES_MAX and not torch.is_grad_enabled() and self.gemm is grouped_mm
                and type(self.dispatcher) is LocalDispatcher):
            acc = hidden_states.new_zeros(hidden_states.shape, dtype=torch.float32)
            return routed_few_tokens(self, hidden_states, top_k_weights, top_k_index, acc)
        x_sorted, counts, ctx = self.dispatcher.dispatch(hidden_states, top_k_index, top_k_weights,
                                                         self.global_num_experts)
        return self.dispatcher.combine(self.apply_sorted(x_sorted, counts), top_k_weights, ctx,
                                       hidden_states.shape[0])

    def apply_sorted(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert ``e`` to its ``counts[e]`` consecutive rows of ``x_sorted``."""
        up = self.gemm(x_sorted, self.up_proj, counts)
        h = self.act(self.gemm(x_sorted, self.gate_proj, counts)) * up if self.gate_proj is not None else self.act(up)
        return self.gemm(h, self.down_proj, counts)


def experts_implementation(experts: nn.Module) -> str:
    """The experts kernel the config selects (``"eager"`` when unset)."""
    return getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"


def keeps_seams(implementation: str) -> bool:
    """Whether this experts implementation runs the layer's ``dispatcher`` / ``gemm`` seams (``"eager"``, or a
    registered function marked ``keeps_seams``, which falls back to the eager forward where it does not apply)."""
    return implementation == "eager" or bool(getattr(ALL_EXPERTS_FUNCTIONS.get(implementation), "keeps_seams", False))


FEW_ROUTES_MAX = 8  # decode fast path: at most this many (token, expert) pairs per forward


def routed_few_tokens(experts: "Nemotron3Experts", x: torch.Tensor, weights: torch.Tensor, topk_idx: torch.Tensor,
                      acc: torch.Tensor) -> torch.Tensor:
    """Decode fast path of the default dispatcher + grouped GEMM: ``acc[t] += sum_j w_tj expert_e(x_t)``.

    For a handful of tokens (batch-1 decode) sorting, counting and scattering cost more than the
    matrix-vector products; here each chosen expert runs directly on its token (one ``tolist``
    for the routing, ``addmv_`` accumulates the weighted output). Same result as `LocalDispatcher` +
    `grouped_mm` up to fp rounding; no gradient reaches the router (used only with grad disabled).
    """
    idx, wts = topk_idx.tolist(), weights.tolist()
    up_w, down_w, gate_w = experts.up_proj, experts.down_proj, experts.gate_proj
    for t, (row_e, row_w) in enumerate(zip(idx, wts)):
        xt, out_t = x[t], acc[t]
        for e, w in zip(row_e, row_w):
            up = torch.mv(up_w[e], xt)
            h = experts.act(torch.mv(gate_w[e], xt)) * up if gate_w is not None else experts.act(up)
            if h.dtype == out_t.dtype:
                out_t.addmv_(down_w[e], h, alpha=w)
            else:
                out_t.add_(torch.mv(down_w[e], h), alpha=w)
    return acc


class LocalDispatcher:
    """Single-device dispatch: copy each token once per chosen expert, sort by expert, weight and sum back."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
        """Rows of ``x`` sorted by expert, tokens per expert, context for `combine`. ``topk_weights`` is part of the
        seam (a dispatcher that drops tokens by routing weight needs it); sorting does not use it."""
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // topk_idx.shape[1]
        counts = torch.bincount(flat, minlength=num_experts)
        return x.index_select(0, token), counts, (order, token)

    def combine(self, out: torch.Tensor, weights: torch.Tensor, ctx, num_tokens: int) -> torch.Tensor:
        order, token = ctx
        w = weights.reshape(-1)[order]
        out = out.float()
        if torch.is_grad_enabled() and (out.requires_grad or w.requires_grad):
            return _WeightedIndexAdd.apply(out, w, token, num_tokens)
        return out.new_zeros(num_tokens, out.shape[1]).index_add_(0, token, out.mul_(w[:, None]))


_ROW_BLOCK_BYTES = 8 << 20  # row blocks of `_WeightedIndexAdd`: temporaries the allocator reuses (no page faults)


def _row_blocks(rows: torch.Tensor) -> range:
    """Start rows of blocks of about ``_ROW_BLOCK_BYTES``; each block is ``rows[s:s + blocks.step]``."""
    return range(0, rows.shape[0], max(1, _ROW_BLOCK_BYTES // max(1, rows.shape[1] * rows.element_size())))


class _WeightedIndexAdd(torch.autograd.Function):
    """``zeros(T, H).index_add_(0, token, rows * w[:, None])`` with autograd, in row blocks.

    Autograd's record of the plain form keeps a weighted copy of all token copies (``[T*k, H]``, tens of MB on
    the benchmark configs, each allocation page-faulting its memory in), and its backward makes two more: the
    gradient of ``rows`` and the product summed into the gradient of ``w``. Here the forward weights one block
    of rows at a time, and the backward computes both gradients from the one gathered ``grad[token]``
    (weighted in place, per-row dots in blocks). Same products and sums; tested against the plain form."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, w: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
        result = rows.new_zeros(num_tokens, rows.shape[1])
        blocks = _row_blocks(rows)
        step = blocks.step
        for s in blocks:
            result.index_add_(0, token[s:s + step], rows[s:s + step] * w[s:s + step, None])
        ctx.save_for_backward(rows, w, token)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, w, token = ctx.saved_tensors
        g_rows = grad.index_select(0, token)
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = torch.empty_like(w)
            blocks = _row_blocks(rows)
            step = blocks.step
            for s in blocks:
                torch.sum(g_rows[s:s + step] * rows[s:s + step], dim=-1, out=g_w[s:s + step])
        if ctx.needs_input_grad[0]:
            g_rows.mul_(w[:, None])
        else:
            g_rows = None
        return g_rows, g_w, None, None


class Nemotron3Router(nn.Module):
    """fp32 router: scores, bias for selection only, group-limited top-k, normalised and scaled weights."""

    def __init__(self, config, hidden: int) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.score_function = config.moe_router_score_function
        self.weight = nn.Parameter(torch.zeros(self.num_experts, hidden, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.expert_load: torch.Tensor | None = None  # tokens per expert since the last bias update

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (logits [T, E] fp32, scores [T, E], topk_weights [T, k] fp32, topk_idx [T, k]).

        ``token_mask`` [T] (bool, True = real token) limits the training-time ``expert_load`` count to real
        tokens; every token is routed either way."""
        logits = F.linear(x.float(), self.weight.float())
        if self.score_function == "sigmoid":
            scores = logits.sigmoid()
        elif self.score_function == "softmax":
            scores = logits.softmax(dim=-1)
        else:  # topk_softmax: choose on logits, softmax over the chosen k
            scores = logits
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False)[1], True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.num_experts)
        topk_idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, topk_idx)
        if self.score_function == "topk_softmax":
            weights = weights.softmax(dim=-1)
            scores = logits.softmax(dim=-1)
        elif self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        if self.training:
            counted = topk_idx if token_mask is None else topk_idx[token_mask.reshape(-1).bool()]
            load = torch.bincount(counted.reshape(-1), minlength=self.num_experts).detach().float()
            self.expert_load = load if self.expert_load is None else self.expert_load + load
        return logits, scores, weights, topk_idx


class Nemotron3MLP(nn.Module):
    """Dense non-gated MLP ``down(act(up x))``: the mixer of `-` layers (built from the config as
    ``Nemotron3MLP(config, layer_idx)``) and the shared expert (``intermediate_size`` / ``hidden_act`` given)."""

    pattern_char = "-"  # this kind's letter in ``hybrid_override_pattern`` (stateless: no ``cache_layer``)

    def __init__(self, config, layer_idx: int | None = None, intermediate_size: int | None = None,
                 hidden_act: str | None = None) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, config.mlp_bias
        intermediate = intermediate_size or config.intermediate_size
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(hidden_act or config.mlp_hidden_act)

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Nemotron3GatedMLP(nn.Module):
    """SwiGLU-style MLP ``down(act(gate x) * up x)`` (shared expert of upcycled Llama-family models)."""

    def __init__(self, config, layer_idx: int | None = None, intermediate_size: int | None = None,
                 hidden_act: str | None = None) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, config.mlp_bias
        intermediate = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(hidden_act or config.moe_expert_act)

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def load_balancing_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, num_experts: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-level balance loss: mean over sequences of ``E / (k L) * sum_i count_i * mean_t p_i``.

    With ``token_mask`` ([batch, L] or [batch * L], True = real token) ``L``, the counts and the means run over
    each row's real tokens only, and rows without any are left out of the mean (a padded row gives the value of
    the row unpadded)."""
    k = topk_idx.shape[-1]
    probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    probs = probs.view(batch, -1, num_experts)
    onehot = F.one_hot(topk_idx.reshape(batch, -1, k), num_experts).sum(dim=2).float()  # [b, L, E]
    if token_mask is None:
        f = onehot.sum(dim=1) * num_experts / (k * probs.shape[1])
        return (f * probs.mean(dim=1)).sum(dim=-1).mean()
    real = token_mask.reshape(batch, -1, 1).to(probs.dtype)
    length = real.sum(dim=1)  # [b, 1]
    rows = length[:, 0] > 0
    length = length.clamp(min=1)
    f = (onehot * real).sum(dim=1) * num_experts / (k * length)
    per_row = (f * (probs * real).sum(dim=1) / length).sum(dim=-1)
    return per_row[rows].mean() if bool(rows.any()) else per_row.sum() * 0


class Nemotron3MoE(nn.Module):
    """Routed experts (optionally in a latent width) plus a shared expert on the full hidden size."""

    pattern_char = "E"  # this kind's letter in ``hybrid_override_pattern`` (stateless: no ``cache_layer``)

    def __init__(self, config, layer_idx: int | None = None) -> None:
        super().__init__()
        hidden = config.hidden_size
        latent = config.moe_latent_size
        width = latent or hidden
        self.num_experts = config.n_routed_experts
        self.gate = Nemotron3Router(config, hidden)
        self.experts = Nemotron3Experts(config, width)
        shared_cls = Nemotron3GatedMLP if config.moe_gated_experts else Nemotron3MLP
        shared_act = config.moe_expert_act if config.moe_gated_experts else config.mlp_hidden_act
        self.shared_experts = (
            shared_cls(config, intermediate_size=config.moe_shared_expert_intermediate_size, hidden_act=shared_act)
            if config.n_shared_experts and config.moe_shared_expert_intermediate_size else None
        )
        if latent is not None:
            self.fc1_latent_proj = nn.Linear(hidden, latent, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(latent, hidden, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.config = config  # the aux-loss coefficient is read per forward (trainers may change it)
        self.last_router_logits: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    @property
    def dispatcher(self):
        """The token dispatcher of the routed experts (seam; lives on ``experts``)."""
        return self.experts.dispatcher

    @dispatcher.setter
    def dispatcher(self, value) -> None:
        self.experts.dispatcher = value

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        """``hidden_states`` [b, L, hidden] -> [b, L, hidden]. ``token_mask`` [b, L] (True = real token; in the
        model it is the block's ``padding_mask``) keeps padding out of the router's ``expert_load`` and the aux loss."""
        token_mask = token_mask if token_mask is not None else padding_mask
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None
        flat_mask = token_mask.reshape(-1) if token_mask is not None else None
        logits, scores, weights, topk_idx = self.gate(x) if flat_mask is None else self.gate(x, flat_mask)
        self.last_router_logits = logits
        self.last_aux_loss = (
            load_balancing_loss(scores, topk_idx, shape[0], self.num_experts, flat_mask)
            * self.config.moe_aux_loss_coef
            if self.training and self.config.moe_aux_loss_coef > 0 else None
        )
        routed_in = self.fc1_latent_proj(x) if self.fc1_latent_proj is not None else x
        impl = experts_implementation(self.experts)
        if isinstance(self.experts, Nemotron3Experts) and not keeps_seams(impl) and (
                self.experts.gate_proj is not None or self.experts.gemm is not grouped_mm
                or type(self.experts.dispatcher) is not LocalDispatcher):
            raise ValueError(
                f"experts_implementation={impl!r} would bypass this layer's SwiGLU experts or the dispatcher / GEMM a "
                "plugin installed (expert parallelism, NVFP4); use experts_implementation='eager'."
            )
        return self._finish(self.experts(routed_in, topk_idx, weights), hidden_states)

    def _finish(self, routed: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Routed sum (float32, [T, width]) -> back to hidden width and dtype, plus the shared expert."""
        routed = routed.to(hidden_states.dtype)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        routed = routed.view(hidden_states.shape)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states)
        return routed


__all__ = [
    "Nemotron3MoE", "Nemotron3Router", "Nemotron3Experts", "Nemotron3MLP", "Nemotron3GatedMLP",
    "LocalDispatcher", "grouped_mm", "load_balancing_loss", "activation", "routed_few_tokens", "keeps_seams",
]
