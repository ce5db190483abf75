"""The Mamba-2 mixer of Nemotron 3 (`M` layers).

in_proj -> split z | xBC | dt -> depthwise causal conv + SiLU on xBC -> split x | B | C ->
SSD scan (chunked for prefill, one step for decode) -> gated grouped RMSNorm with z -> out_proj.

Fast kernels (mamba_ssm, causal_conv1d) are used when importable and the tensors are on CUDA;
everything else runs the plain PyTorch path in `ssd.py`, which is what the CPU tests check.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .fast_ops import fused_mamba_step
from .fused_decode import fits, mamba_block
from .norms import rms_norm
from .ssd import ssd_chunked, ssd_step
from .cache import Nemotron3HybridCache, mamba_layer

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


def use_kernels(tensor: torch.Tensor, enabled: bool) -> bool:
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
    """``rmsnorm(y * silu(z))`` normalised separately over each of ``n_groups`` channel groups."""

    def __init__(self, size: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = size // n_groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
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


class Nemotron3Mamba2Mixer(nn.Module):
    """Mamba-2 mixer with grouped B/C, gated grouped RMSNorm and a fp32 SSM state."""

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

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(lo, hi)
        return dt

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [b, l, d]; padding_mask [b, l] bool (True = real token); cache: a transformers `Cache`."""
        b, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        if padding_mask is not None:
            hidden_states = hidden_states * padding_mask[..., None].to(dtype)
        zxbcdt = self.in_proj(hidden_states)
        A = -torch.exp(self.A_log.float())
        state = mamba_layer(cache, self.layer_idx, self.config, b, dtype, hidden_states.device)

        if state is not None and state.history is not None and length > 1 and not state.has_previous:
            # recording from the first forward (assisted decoding): scan the prompt, then step through the tokens
            # that may be rolled back, so each has its recorded state
            keep = state.recurrent_states_to_keep  # how many tokens may be undone (unknown: every one but the first)
            steps = min(length - 1, keep) if keep else length - 1
            head = self._prefill(zxbcdt[:, : length - steps], A, state, dtype,
                                 padding_mask[:, : length - steps] if padding_mask is not None else None,
                                 seq_idx[:, : length - steps] if seq_idx is not None else None)
            return torch.cat([head, self._steps(zxbcdt[:, length - steps :], A, state, dtype)], dim=1)
        if state is not None and state.has_previous and (length == 1 or state.history is not None):
            return self._steps(zxbcdt, A, state, dtype)
        return self._prefill(zxbcdt, A, state, dtype, padding_mask, seq_idx)

    def _steps(self, zxbcdt: torch.Tensor, A: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
        """Decode steps, one token at a time; while recording (speculative verification of several tokens)
        the state after each token is kept for rollback."""
        length = zxbcdt.shape[1]
        ys = []
        for t in range(length):
            ys.append(self._decode_normed(zxbcdt[:, t : t + 1], A, state, dtype))
            state.seen += 1
            if state.history is not None:
                state.record()
        return self.out_proj(torch.cat(ys, dim=1) if length > 1 else ys[0])

    def _prefill(self, zxbcdt, A, state, dtype, padding_mask, seq_idx) -> torch.Tensor:
        z, xbc, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        y = self._scan(z, xbc, dt, A, state, padding_mask, seq_idx)
        if state is not None:
            state.seen += zxbcdt.shape[1]
        return self.out_proj(self.norm(y, z, dtype))

    # ------------------------------------------------------------------ prefill / training
    def _scan(self, z, xbc, dt, A, state, padding_mask, seq_idx) -> torch.Tensor:
        b, length, _ = xbc.shape
        prefix = state.conv[..., 1:].clone() if (state is not None and state.has_previous) else None
        initial = state.ssm if (state is not None and state.has_previous) else None
        fast = use_kernels(xbc, self.use_kernels)
        if fast and _kernel_conv1d is not None and prefix is None:
            xbc_t = xbc.transpose(1, 2)
            conv = _kernel_conv1d(xbc_t.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                  seq_idx=seq_idx.int() if seq_idx is not None else None, activation=None)
            conv = conv.transpose(1, 2)
            hist = F.pad(xbc_t, (max(0, self.conv_kernel - length), 0))[..., -self.conv_kernel :]
        else:
            conv, hist = causal_conv_last(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, prefix, seq_idx)
        if state is not None:  # keep the last k inputs for the next step
            state.conv.copy_(hist)
        xbc = F.silu(conv)
        if padding_mask is not None:
            xbc = xbc * padding_mask[..., None].to(xbc.dtype)
        x, B, C = xbc.split([self.intermediate_size, self.n_groups * self.state_size,
                             self.n_groups * self.state_size], dim=-1)
        x = x.reshape(b, length, self.num_heads, self.head_dim)
        B = B.reshape(b, length, self.n_groups, self.state_size)
        C = C.reshape(b, length, self.n_groups, self.state_size)
        if fast:
            y, final = _kernel_chunk_scan(
                x, dt, A, B, C, self.chunk_size, D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True,
                dt_limit=self.time_step_limit, initial_states=initial,
                seq_idx=seq_idx.int() if seq_idx is not None else None, return_final_states=True,
            )
        else:
            chunk = self.chunk_size if x.is_cuda else min(self.chunk_size, CPU_SSD_CHUNK)
            y, final = ssd_chunked(x, self._dt(dt), A, B, C, chunk, D=self.D, initial_state=initial,
                                   seq_idx=seq_idx)
        if state is not None:
            state.ssm.copy_(final.to(state.ssm.dtype))
            state.has_previous = True
        return y.reshape(b, length, self.intermediate_size)

    # ------------------------------------------------------------------ decode
    def fused_decode_block(self, norm: nn.Module, cache, dtype: torch.dtype):
        """This block's part of a fused decode plan (`fused_decode.FusedBlock`, ``h + self(norm(h))`` in the
        CPU kernels' decode step), or None where that does not apply (no cached state yet, other dtypes,
        replaced projections)."""
        state = cache.get(self.layer_idx) if isinstance(cache, Nemotron3HybridCache) else None
        if (state is None or not state.has_previous or state.conv.dtype != dtype
                or state.ssm.dtype != torch.float32 or not fits(dtype, self.in_proj, self.out_proj)):
            return None
        return mamba_block(norm, self, state)

    def _decode_normed(self, zxbcdt, A, state, dtype) -> torch.Tensor:
        """One token [b, 1, proj] -> the gated, normed input of ``out_proj``: the fused CPU kernel where it
        applies (enabled, no autograd, CPU), else `_decode_step` and the gated norm."""
        fused = fused_mamba_step(self, zxbcdt, A, state)
        if fused is not None:
            return fused.view(zxbcdt.shape[0], 1, -1).to(dtype)
        z, xbc, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        return self.norm(self._decode_step(z, xbc, dt, A, state), z, dtype)

    def _decode_step(self, z, xbc, dt, A, state) -> torch.Tensor:
        b = xbc.shape[0]
        conv_state = state.conv  # [b, channels, k]: shift left by one, append the new input
        window = torch.cat([conv_state[..., 1:], xbc.transpose(1, 2).to(conv_state.dtype)], dim=-1)
        conv_state.copy_(window)
        w = self.conv1d.weight.squeeze(1)
        conv = torch.linalg.vecdot(window.to(w.dtype), w)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        xbc = F.silu(conv)
        x, B, C = xbc.split([self.intermediate_size, self.n_groups * self.state_size,
                             self.n_groups * self.state_size], dim=-1)
        x = x.reshape(b, self.num_heads, self.head_dim)
        B = B.reshape(b, self.n_groups, self.state_size)
        C = C.reshape(b, self.n_groups, self.state_size)
        if use_kernels(x, self.use_kernels) and state.ssm.dtype == torch.float32:
            h, p, n = self.num_heads, self.head_dim, self.state_size
            y = _kernel_state_update(
                state.ssm, x, dt[:, 0, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C,
                self.D[:, None].expand(h, p), dt_bias=self.dt_bias[:, None].expand(h, p), dt_softplus=True,
            )
        else:
            y = ssd_step(state.ssm, x, self._dt(dt[:, 0]), A, B, C, self.D)
        return y.reshape(b, 1, self.intermediate_size)


__all__ = ["Nemotron3Mamba2Mixer", "GatedRMSNorm", "causal_conv", "causal_conv_last", "gated_rms_norm_reference"]
