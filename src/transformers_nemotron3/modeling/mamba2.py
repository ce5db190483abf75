"""The Mamba-2 mixer of Nemotron 3 (`M` layers).

``in_proj`` -> split z | xBC | dt -> **sequence_mixer** (depthwise causal conv + SiLU on xBC, split x | B | C,
SSD scan: chunked for whole sequences, one step per token for decode) -> gated grouped RMSNorm with z -> ``out_proj``.

The ``sequence_mixer`` is the seam between the token-wise projections and the part that mixes along the
sequence: `Mamba2SequenceMixer` by default (the cache logic), context parallelism swaps in its own (an
all-to-all to heads, the same `conv_scan`, an all-to-all back). Kernel choice happens inside `conv_scan` /
`conv_scan_step`, so every caller gets the fastest path available: mamba_ssm / causal_conv1d when importable and
the tensors are on CUDA, else the plain PyTorch path in `ssd.py` (what the CPU tests check).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .norms import rms_norm
from .ssd import ssd_chunked, ssd_step
from .cache import MambaLayer, mamba_layer

logger = logging.getLogger(__name__)

try:  # optional CUDA kernels; the PyTorch path is always available
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _kernel_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _kernel_chunk_scan
except Exception:  # noqa: BLE001 - any import failure means "no kernels"
    _kernel_chunk_scan = _kernel_state_update = None
try:
    from causal_conv1d import causal_conv1d_fn as _kernel_conv1d
except Exception:  # noqa: BLE001
    _kernel_conv1d = None

_warned_fallback = False


def use_kernels_for(tensor: torch.Tensor, enabled: bool) -> bool:
    """True when the mamba_ssm kernels can run on this tensor; warns once when CUDA runs without them."""
    global _warned_fallback
    if not enabled or tensor.device.type != "cuda":
        return False
    if _kernel_chunk_scan is None:
        if not _warned_fallback:
            logger.warning("mamba_ssm is not installed: Mamba-2 layers use the PyTorch scan on CUDA (slower).")
            _warned_fallback = True
        return False
    return True


# The chunk length is an implementation choice (any length gives the same result up to rounding). On CPU
# 64 beats the checkpoints' 128 by ~5 % in prefill: the quadratic in-chunk work halves, and the extra
# chunk-boundary work is small.
CPU_SSD_CHUNK = 64


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z))`` normalised separately over each of ``n_groups`` channel groups.

    ``kernel`` is a seam (a plain attribute, None by default): a backend's ``kernel(norm, y, z, out_dtype)``
    returning the same result, or None where it does not apply (then the PyTorch ops run). The CPU kernels
    install one per model (`cpu_kernels.enable_cpu_kernels`)."""

    kernel = None

    def __init__(self, size: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = size // n_groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.kernel is not None:
            out = self.kernel(self, y, z, out_dtype)
            if out is not None:
                return out
        y = F.silu(z.float()) * y.float()
        shape = y.shape
        y = rms_norm(y.view(*shape[:-1], -1, self.group_size), None, self.eps)
        return (y.view(shape) * self.weight.float()).to(out_dtype)


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                             out_dtype: torch.dtype) -> torch.Tensor:
    """`GatedRMSNorm` written out op by op (the reference its fused ``F.rms_norm`` form is tested against)."""
    y = y.float() * F.silu(z.float())
    shape = y.shape
    y = y.view(*shape[:-1], -1, group_size)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y.view(shape)).to(out_dtype)


def causal_conv(
    xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> torch.Tensor:
    """Depthwise causal conv over [b, channels, l]; ``prefix`` [b, channels, k-1] are earlier inputs.

    With ``seq_idx`` a window never reaches into the previous packed sequence.
    """
    k = weight.shape[-1]
    length = xbc.shape[-1]
    if prefix is None:
        full = F.pad(xbc, (k - 1, 0))
    else:
        full = torch.cat([prefix.to(xbc.dtype), xbc], dim=-1)
    if seq_idx is None:
        out = F.conv1d(full, weight.unsqueeze(1).to(xbc.dtype), None, groups=xbc.shape[1])
    else:
        out = torch.zeros_like(xbc)
        for shift in range(k):  # tap `shift` looks back k-1-shift positions
            back = k - 1 - shift
            tap = full[..., shift : shift + length]
            if back:
                same = torch.zeros_like(seq_idx, dtype=torch.bool)
                same[:, back:] = seq_idx[:, back:] == seq_idx[:, :-back]
                tap = tap * same[:, None, :]
            out = out + tap * weight[:, shift].to(xbc.dtype)[None, :, None]
    if bias is not None:
        out = out + bias.to(out.dtype)[None, :, None]
    return out


def _same_sequence(seq_idx: torch.Tensor | None, back: int) -> torch.Tensor | None:
    """[b, l, 1] float mask: 1 where the token ``back`` positions earlier is in the same packed sequence."""
    if seq_idx is None:
        return None
    same = torch.zeros_like(seq_idx, dtype=torch.bool)
    same[:, back:] = seq_idx[:, back:] == seq_idx[:, :-back]
    return same[..., None]


class _DepthwiseCausalConv(torch.autograd.Function):
    """`causal_conv_last` without a prefix, for autograd: ``out[t] = bias + sum_j w[:, k-1-j] x[t-j]`` (x = 0
    before the start and, with ``seq_idx``, across packed-sequence starts), x [b, l, channels].

    The forward is the in-place tap loop of `causal_conv_last` (bit for bit); the backward is written out (the
    transposed taps into one buffer, one multiply-and-sum per tap for the weight) instead of autograd's record of
    the out-of-place form, whose slice and ``cat`` backwards zero-fill and copy full-size tensors for every tap
    (~15 % of a training step of the tiny benchmark model). Checked against `causal_conv` (``F.conv1d``) in
    test_fast_paths.py, values and gradients.
    """

    @staticmethod
    def forward(ctx, xbc, w, bias, seq_idx):
        length, k = xbc.shape[1], w.shape[-1]
        out = torch.addcmul(bias, xbc, w[:, k - 1]) if bias is not None else xbc * w[:, k - 1]
        for back in range(1, min(k, length)):
            inp = xbc[:, : length - back]
            same = _same_sequence(seq_idx, back)
            if same is not None:
                inp = inp * same[:, back:]
            out[:, back:].addcmul_(inp, w[:, k - 1 - back])
        ctx.save_for_backward(xbc, w, seq_idx)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        xbc, w, seq_idx = ctx.saved_tensors
        length, k = xbc.shape[1], w.shape[-1]
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = grad * w[:, k - 1] if need_x else None
        gw = torch.zeros_like(w) if need_w else None
        if need_w:
            gw[:, k - 1] = (grad * xbc).sum((0, 1))
        for back in range(1, min(k, length)):
            g = grad[:, back:]
            same = _same_sequence(seq_idx, back)
            if same is not None:
                g = g * same[:, back:]
            if need_x:
                gx[:, : length - back].addcmul_(g, w[:, k - 1 - back])
            if need_w:
                gw[:, k - 1 - back] = (g * xbc[:, : length - back]).sum((0, 1))
        gb = grad.sum((0, 1)) if need_b and ctx.has_bias else None
        return gx, gw, gb, None


def causal_conv_last(
    xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_conv` in the projection's own layout: ``xbc`` [b, l, channels] -> (out [b, l, channels], last
    k inputs [b, channels, k] for the cache).

    One multiply-add per tap over contiguous rows: no transposes and no padded copy of the input
    for a depthwise convolution. ``prefix`` [b, channels, k-1] are earlier inputs (a continuation),
    ``seq_idx`` keeps packed sequences apart as in `causal_conv`.
    """
    b, length, channels = xbc.shape
    k = weight.shape[-1]
    w = weight.to(xbc.dtype)
    if prefix is None and torch.is_grad_enabled() and (xbc.requires_grad or w.requires_grad or (
            bias is not None and bias.requires_grad)):  # training: the same sums, with a hand-written backward
        out = _DepthwiseCausalConv.apply(xbc, w, bias.to(xbc.dtype) if bias is not None else None, seq_idx)
        hist = xbc[:, -k:] if length >= k else torch.cat([xbc.new_zeros(b, k - length, channels), xbc], dim=1)
        return out, hist.transpose(1, 2)
    pre = prefix.transpose(1, 2).to(xbc.dtype) if prefix is not None else None  # [b, k-1, channels]
    if bias is not None:
        out = torch.addcmul(bias.to(xbc.dtype), xbc, w[:, k - 1])
    else:
        out = xbc * w[:, k - 1]
    inplace = not out.requires_grad
    for back in range(1, k):  # the tap reading the input `back` positions earlier
        if seq_idx is not None:
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, back:] = seq_idx[:, back:] == seq_idx[:, :-back]
        pieces = []  # (output rows, input rows) of this tap
        if length > back:
            pieces.append((slice(back, length), xbc[:, : length - back]))
        if pre is not None:  # the first outputs read the prefix
            n = min(back, length)
            pieces.append((slice(0, n), pre[:, k - 1 - back : k - 1 - back + n]))
        for rows, inp in pieces:
            if seq_idx is not None:
                inp = inp * same[:, rows, None]
            if inplace:
                out[:, rows].addcmul_(inp, w[:, k - 1 - back])
            else:
                out = torch.cat([out[:, : rows.start], torch.addcmul(out[:, rows], inp, w[:, k - 1 - back]),
                                 out[:, rows.stop :]], dim=1)
    if length >= k:
        hist = xbc[:, -k:]
    else:
        before = pre if pre is not None else xbc.new_zeros(b, k - 1, channels)
        hist = torch.cat([before, xbc], dim=1)[:, -k:]
    return out, hist.transpose(1, 2)


def mamba2_dt(dt: torch.Tensor, dt_bias: torch.Tensor, time_step_limit: tuple[float, float]) -> torch.Tensor:
    """Time steps: ``softplus(dt + dt_bias)`` in float32, clamped to ``time_step_limit`` when it is set."""
    dt = F.softplus(dt.float() + dt_bias.float())
    lo, hi = time_step_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    return dt


@dataclass
class Mamba2Weights:
    """The per-channel parameters of the conv + scan, for all heads (one process) or a slice of them (context
    parallelism hands each rank its heads' slice): ``conv_weight`` [channels, k], ``conv_bias`` [channels],
    ``dt_bias`` / ``A`` (= -exp(A_log), float32) / ``D`` [heads], with ``n_groups`` B/C groups."""

    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor
    n_groups: int

    @classmethod
    def of(cls, mixer: "Nemotron3Mamba2Mixer") -> "Mamba2Weights":
        return cls(mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.dt_bias, -torch.exp(mixer.A_log.float()),
                   mixer.D, mixer.n_groups)


def conv_scan(
    xbc: torch.Tensor, dt: torch.Tensor, w: Mamba2Weights, *, head_dim: int, state_size: int, chunk_size: int,
    time_step_limit: tuple[float, float], use_kernels: bool = True, prefix: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None, conv_silu: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal conv + SiLU + chunked SSD scan over whole sequences; the kernel is chosen here.

    ``xbc`` [b, l, channels] (x for every head, then B and C for every group), ``dt`` [b, l, heads] (raw, before
    softplus). ``prefix`` [b, channels, k-1] and ``initial_state`` [b, heads, head_dim, state] continue an earlier
    call; ``seq_idx`` [b, l] keeps packed sequences apart; ``padding_mask`` [b, l] zeroes padding after the conv.
    Returns ``(y [b, l, heads * head_dim], final SSM state, last k conv inputs [b, channels, k])``.

    mamba_ssm / causal_conv1d run where installed and the tensors are on CUDA; otherwise the PyTorch paths
    (`causal_conv_last`, `ssd.ssd_chunked`) run. Every caller (the mixer, context parallelism) comes through here.
    ``conv_silu`` is a backend's kernel for the conv + SiLU of a sequence without ``prefix``, called as
    ``conv_silu(xbc, conv_weight [channels, k], conv_bias, seq_idx)``; it returns ``silu(conv)``, or None where it
    does not apply (the CPU kernels' sequence mixer passes one).
    """
    b, length, _ = xbc.shape
    k = w.conv_weight.shape[-1]
    fast = use_kernels_for(xbc, use_kernels)
    activated = None
    if fast and _kernel_conv1d is not None and prefix is None:
        xbc_t = xbc.transpose(1, 2)
        conv = _kernel_conv1d(xbc_t.contiguous(), w.conv_weight, w.conv_bias,
                              seq_idx=seq_idx.int() if seq_idx is not None else None, activation=None)
        conv = conv.transpose(1, 2)
        hist = F.pad(xbc_t, (max(0, k - length), 0))[..., -k:]
    else:
        if conv_silu is not None and prefix is None:
            activated = conv_silu(xbc, w.conv_weight, w.conv_bias, seq_idx)
        if activated is None:
            conv, hist = causal_conv_last(xbc, w.conv_weight, w.conv_bias, prefix, seq_idx)
        else:
            hist = (xbc[:, -k:] if length >= k else F.pad(xbc, (0, 0, k - length, 0))).transpose(1, 2)
    xbc = F.silu(conv) if activated is None else activated
    if padding_mask is not None:
        xbc = xbc * padding_mask[..., None].to(xbc.dtype)
    heads = w.A.shape[0]
    gn = w.n_groups * state_size
    x, B, C = xbc.split([xbc.shape[-1] - 2 * gn, gn, gn], dim=-1)
    x = x.reshape(b, length, heads, head_dim)
    B = B.reshape(b, length, w.n_groups, state_size)
    C = C.reshape(b, length, w.n_groups, state_size)
    if fast:
        y, final = _kernel_chunk_scan(
            x, dt, w.A, B, C, chunk_size, D=w.D.float(), dt_bias=w.dt_bias.float(), dt_softplus=True,
            dt_limit=time_step_limit, initial_states=initial_state,
            seq_idx=seq_idx.int() if seq_idx is not None else None, return_final_states=True,
        )
    else:
        chunk = chunk_size if x.is_cuda else min(chunk_size, CPU_SSD_CHUNK)
        y, final = ssd_chunked(x, mamba2_dt(dt, w.dt_bias, time_step_limit), w.A, B, C, chunk, D=w.D,
                               initial_state=initial_state, seq_idx=seq_idx)
    return y.reshape(b, length, heads * head_dim), final, hist


def conv_scan_step(xbc: torch.Tensor, dt: torch.Tensor, w: Mamba2Weights, state, *, head_dim: int, state_size: int,
                   time_step_limit: tuple[float, float], use_kernels: bool = True) -> torch.Tensor:
    """One decode step of `conv_scan`: ``xbc`` [b, 1, channels], ``dt`` [b, 1, heads] -> y [b, 1, heads * head_dim];
    ``state.conv`` [b, channels, k] and ``state.ssm`` [b, heads, head_dim, state_size] are updated in place."""
    b = xbc.shape[0]
    conv_state = state.conv  # shift left by one, append the new input
    window = torch.cat([conv_state[..., 1:], xbc.transpose(1, 2).to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    conv = torch.linalg.vecdot(window.to(w.conv_weight.dtype), w.conv_weight)
    if w.conv_bias is not None:
        conv = conv + w.conv_bias
    xbc = F.silu(conv)
    heads, gn = w.A.shape[0], w.n_groups * state_size
    x, B, C = xbc.split([xbc.shape[-1] - 2 * gn, gn, gn], dim=-1)
    x = x.reshape(b, heads, head_dim)
    B = B.reshape(b, w.n_groups, state_size)
    C = C.reshape(b, w.n_groups, state_size)
    if use_kernels_for(x, use_kernels) and state.ssm.dtype == torch.float32:
        h, p, n = heads, head_dim, state_size
        y = _kernel_state_update(
            state.ssm, x, dt[:, 0, :, None].expand(b, h, p), w.A[:, None, None].expand(h, p, n), B, C,
            w.D[:, None].expand(h, p), dt_bias=w.dt_bias[:, None].expand(h, p), dt_softplus=True,
        )
    else:
        y = ssd_step(state.ssm, x, mamba2_dt(dt[:, 0], w.dt_bias, time_step_limit), w.A, B, C, w.D)
    return y.reshape(b, 1, heads * head_dim)


class Mamba2SequenceMixer:
    """The default ``sequence_mixer`` seam of the Mamba-2 mixer: causal conv + SiLU + SSD scan, with the cache.

    Called as ``seam(mixer, xbc, dt, state, padding_mask=, seq_idx=, **kwargs) -> y [b, l, intermediate]`` between
    ``in_proj`` and the gated norm; ``state`` is the layer's `cache.MambaLayer` or None (training). It decides
    prefill vs. decode steps and which tokens' states to record for rollback; `conv_scan` / `conv_scan_step` pick
    the kernels. Context parallelism replaces this object (not the mixer's forward) with its own. ``conv_silu``
    (None here) is a backend's conv + SiLU kernel that `prefill` hands to `conv_scan`.
    """

    conv_silu = None

    def __call__(self, mixer: "Nemotron3Mamba2Mixer", xbc: torch.Tensor, dt: torch.Tensor, state,
                 padding_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None, **kwargs
                 ) -> torch.Tensor:
        length = xbc.shape[1]
        w = Mamba2Weights.of(mixer)
        if state is not None and state.history is not None and length > 1 and not state.has_previous:
            # recording from the first forward (assisted decoding): scan the prompt, then step through the tokens
            # that may be rolled back, so each has its recorded state
            keep = state.recurrent_states_to_keep  # how many tokens may be undone (unknown: every one but the first)
            steps = min(length - 1, keep) if keep else length - 1
            head = self.prefill(mixer, w, xbc[:, : length - steps], dt[:, : length - steps], state,
                                padding_mask[:, : length - steps] if padding_mask is not None else None,
                                seq_idx[:, : length - steps] if seq_idx is not None else None)
            return torch.cat([head, self.steps(mixer, w, xbc[:, length - steps :], dt[:, length - steps :], state)],
                             dim=1)
        if state is not None and state.has_previous and (length == 1 or state.history is not None):
            return self.steps(mixer, w, xbc, dt, state)
        return self.prefill(mixer, w, xbc, dt, state, padding_mask, seq_idx)

    def prefill(self, mixer, w: Mamba2Weights, xbc, dt, state, padding_mask, seq_idx) -> torch.Tensor:
        """A whole sequence (training, prefill, or a continuation of a cached one)."""
        cont = state is not None and state.has_previous
        y, final, hist = conv_scan(
            xbc, dt, w, head_dim=mixer.head_dim, state_size=mixer.state_size, chunk_size=mixer.chunk_size,
            time_step_limit=mixer.time_step_limit, use_kernels=mixer.use_kernels,
            prefix=state.conv[..., 1:].clone() if cont else None, initial_state=state.ssm if cont else None,
            seq_idx=seq_idx, padding_mask=padding_mask, conv_silu=self.conv_silu)
        if state is not None:  # keep the last k inputs and the final state for the next step
            state.conv.copy_(hist)
            state.ssm.copy_(final.to(state.ssm.dtype))
            state.has_previous = True
            state.seen += xbc.shape[1]
        return y

    @staticmethod
    def steps(mixer, w: Mamba2Weights, xbc, dt, state) -> torch.Tensor:
        """Decode steps, one token at a time; while recording (speculative verification of several tokens) the
        state after each token is kept for rollback."""
        ys = []
        for t in range(xbc.shape[1]):
            ys.append(conv_scan_step(xbc[:, t : t + 1], dt[:, t : t + 1], w, state, head_dim=mixer.head_dim,
                                     state_size=mixer.state_size, time_step_limit=mixer.time_step_limit,
                                     use_kernels=mixer.use_kernels))
            state.seen += 1
            if state.history is not None:
                state.record()
        return torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]


class Nemotron3Mamba2Mixer(nn.Module):
    """Mamba-2 mixer with grouped B/C, gated grouped RMSNorm and a fp32 SSM state:
    ``in_proj -> sequence_mixer (conv + scan) -> gated norm -> out_proj``.

    ``sequence_mixer`` is a seam (a plain attribute, no parameters): `Mamba2SequenceMixer` by default; context
    parallelism swaps in its own. Parameters stay on this module under the official names."""

    pattern_char = "M"  # this kind's letter in ``hybrid_override_pattern``
    cache_layer = staticmethod(MambaLayer.for_config)  # its state in `Nemotron3HybridCache`: conv window + SSM state

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.intermediate_size = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        self.conv_kernel = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.use_kernels = bool(config.use_mamba_kernels)
        proj = self.intermediate_size + self.conv_dim + self.num_heads
        self.in_proj = nn.Linear(config.hidden_size, proj, bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim,
                                padding=self.conv_kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.get_default_dtype())))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.intermediate_size, self.n_groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.sequence_mixer = Mamba2SequenceMixer()

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states [b, l, d]; padding_mask [b, l] bool (True = real token); cache: a transformers `Cache`.
        Other keyword arguments (the model's per-forward arguments) are handed to the ``sequence_mixer``."""
        b = hidden_states.shape[0]
        dtype = hidden_states.dtype
        if padding_mask is not None:
            hidden_states = hidden_states * padding_mask[..., None].to(dtype)
        z, xbc, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        state = mamba_layer(cache, self.layer_idx, self.config, b, dtype, hidden_states.device)
        y = self.sequence_mixer(self, xbc, dt, state, padding_mask=padding_mask, seq_idx=seq_idx, **kwargs)
        return self.out_proj(self.norm(y, z, dtype))


__all__ = [
    "Nemotron3Mamba2Mixer", "Mamba2SequenceMixer", "Mamba2Weights", "conv_scan", "conv_scan_step", "mamba2_dt",
    "GatedRMSNorm", "causal_conv", "causal_conv_last", "gated_rms_norm_reference",
]
