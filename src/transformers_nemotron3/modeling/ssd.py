"""The Mamba-2 state-space scan in plain PyTorch: the chunked SSD algorithm and a step-by-step reference.

Shapes (b batch, l length, h heads, p head dim, g B/C groups, n state size; head ``i`` reads group
``i // (h // g)``, the mapping of mamba_ssm and of ``repeat_interleave``):

    x [b, l, h, p]   dt [b, l, h] (after softplus and clamp)   A [h] (negative)
    B, C [b, l, g, n]   D [h]   state [b, h, p, n] (float32)

Recurrence per head: ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T`` and ``y_t = S_t C_t + D x_t``.
``seq_idx`` [b, l] (non-decreasing integers) marks packed sequences: the state restarts at zero
where ``seq_idx`` changes, so sequences packed into one row never see each other.

`ssd_reference` is the recurrence written literally (slow, for tests). `ssd_chunked` splits the
sequence into chunks: inside a chunk the output is a masked quadratic form (like attention), and
only chunk-boundary states travel along the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EXP_FLOOR = -87.0  # exp(-87) is the smallest float32 exp that is not subnormal


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan. Returns ``(y [b, l, h, p] float32, final_state [b, h, p, n] float32)``.

    Two exact forms of the in-chunk work, chosen per call: the factored one (`_ssd_factored`, GEMMs over all heads
    of a group at once) where every chunk's total decay fits in float32 (``_FACTORED_MAX_DECAY``; the chunk may be
    halved to get there, `_halved_chunk`), else the pairwise-exponent one (any decay). Where only a few heads
    decay too fast (``_MIXED_MAX_SHARE``), the factored form runs for all heads and the pairwise form recomputes
    those heads, which replace theirs."""
    b, length, h, p = x.shape
    chunk_size = max(1, min(chunk_size, length))  # exact for any chunk size; short inputs skip padding
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    pad = (-length) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))  # dt = 0: no decay and no input on padding
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = F.pad(seq_idx, (0, pad), value=0)
            seq_idx[:, length:] = seq_idx[:, length - 1 : length]
    dA = dt * A  # [b, l, h], <= 0
    fast = (_max_chunk_decay(dA.detach(), chunk_size) > _FACTORED_MAX_DECAY).nonzero()[:, 0]  # heads too fast
    cs = chunk_size if not fast.numel() else _halved_chunk(dA.detach(), chunk_size, B.shape[-1])
    if cs:  # the factored forms add D x themselves
        y, final = _ssd_factored(x, dt, dA, B, C, cs, initial_state, seq_idx, D)
    elif fast.numel() > _MIXED_MAX_SHARE * h:
        y, final = _ssd_pairwise(x, dt, dA, B, C, chunk_size, initial_state, seq_idx)
        if D is not None:
            y = torch.addcmul(y, x, D.float()[:, None])
    else:  # factored for all heads (finite everywhere, exact where the decay fits), pairwise for the fast ones
        y, final = _ssd_factored(x, dt, dA, B, C, chunk_size, initial_state, seq_idx, D)
        group = torch.div(fast, h // B.shape[2], rounding_mode="floor")
        x_fast = x.index_select(2, fast)
        y_fast, final_fast = _ssd_pairwise(
            x_fast, dt.index_select(2, fast), dA.index_select(2, fast), B.index_select(2, group),
            C.index_select(2, group), chunk_size,
            None if initial_state is None else initial_state.float().index_select(1, fast), seq_idx)
        if D is not None:
            y_fast = torch.addcmul(y_fast, x_fast, D.float().index_select(0, fast)[:, None])
        y = y.index_copy(2, fast, y_fast)
        final = final.index_copy(1, fast, final_fast)
    return y[:, :length], final


_FACTORED_MAX_DECAY = 80.0
"""Largest total decay ``-sum(dt * A)`` over one chunk that `_ssd_factored` takes: its factors ``exp(+-a)`` stay
within ``exp(40)`` (far from float32 overflow, and from subnormals after multiplying by gradients)."""


_MIXED_MAX_SHARE = 0.4
"""Largest share of heads recomputed by the pairwise form beside a factored pass over all heads (the factored
pass costs about half the pairwise one on the benchmark shapes, so beyond this the pairwise form alone is cheaper)."""


def _max_chunk_decay(dA: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per head, the largest decay ``-sum(dt * A)`` of any chunk of ``chunk_size`` tokens, [h]."""
    b, length, h = dA.shape
    return -dA.view(b, length // chunk_size, chunk_size, h).sum(2).amin(dim=(0, 1))


def _halved_chunk(dA: torch.Tensor, chunk_size: int, state_size: int) -> int:
    """A chunk length below ``chunk_size`` (halving) at which every chunk's decay fits `_ssd_factored`; 0 where none
    does (then the mixed or the pairwise form runs at ``chunk_size``).

    Halving doubles the chunk-boundary states (``[b, chunks, h, p, n]``), so it stops at 32 tokens and at
    ``state_size / 4``: below that the states outweigh the in-chunk work the factored form saves. Scan fwd+bwd on a
    2-core CPU, pairwise at 64 / factored at 64, 32, 16 (ms): n=64 (tiny) 35 / 18, 22, 43; n=128 (small) 252 / 134,
    203, 351."""
    cs = chunk_size
    while not cs % 2 and cs // 2 >= max(32, state_size // 4):
        cs //= 2
        if _max_chunk_decay(dA, cs).max() <= _FACTORED_MAX_DECAY:
            return cs
    return 0


def _ssd_factored(x, dt, dA, B, C, cs, initial_state, seq_idx, D=None):
    """The scan on whole chunks with ``exp(A_i - A_j) = exp(a_i) exp(-a_j)``, ``a = A_cum - A_end / 2`` per chunk.

    In chunk c, with ``u_j = exp(-a_j) dt_j x_j`` (x-sized, shared by every product below):

    - in-chunk output ``y_i = exp(a_i) sum_{j<=i} (C_i . B_j) u_j``: one GEMM per group, ``[cs, cs] @ [cs, r*p]``
      (the heads of a group share B and C), instead of a ``[cs, cs]`` exponent table per head;
    - the chunk's contribution to its end state: ``exp(a_end) u^T B`` (the scale applied inside the state pass);
    - the entering state's contribution: ``exp(a_i) C_i (exp(A_end / 2) S)``, added by the same GEMM call (the
      state pass carries ``exp(A_end / 2) S`` directly).

    No ``[cs, cs]``-per-head tensor exists, forward or backward. ``|a| <= decay / 2 <= 40`` (`ssd_chunked` chooses the form).
    Packing masks go on the ``[cs, cs]`` C.B table and on B and C, not on x-sized tensors. The per-token factors
    (small, ``[b, l, h]``) are built here with autograd; the x-sized work runs in `_FactoredCore` (plus ``D x``
    when ``D`` is given)."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    nc = length // cs
    A_cum = torch.cumsum(dA.view(b, nc, cs, h), dim=2)  # [b, c, cs, h]
    half_end = (0.5 * A_cum[:, :, -1:]).detach()  # the output does not depend on the split point: no gradient
    # |a| <= 40 wherever the decay fits; the clamp only keeps heads that do not fit finite (their results are
    # replaced by the pairwise form's, see `ssd_chunked`)
    a = (A_cum - half_end).clamp(-0.5 * _FACTORED_MAX_DECAY, 0.5 * _FACTORED_MAX_DECAY)
    scale_in = dt.view(b, nc, cs, h) * torch.exp(-a)  # u = x * scale_in; exp(-a) <= exp(40)
    scale_out = torch.exp(a)
    Bc = B.view(b, nc, cs, g, n).transpose(2, 3)  # [b, c, g, cs, n]
    Cc = C.view(b, nc, cs, g, n).transpose(2, 3)
    keep = masks = None
    if seq_idx is not None:
        sc = seq_idx.view(b, nc, cs)
        keep = sc[:, :, :, None] == sc[:, :, None, :]  # [b, c, i, j]: same packed sequence
        owner = torch.cat([sc[:, :1, 0], sc[:, :, -1]], dim=1)  # sequence owning each boundary state
        # B of the tokens of the sequence that owns the chunk's end state; C of those that continue the entering one
        masks = torch.stack([sc == sc[:, :, -1:], sc == owner[:, :-1, None]]).to(x.dtype)[:, :, :, None, :, None]

    # The state pass runs on T_c = exp(h_c) S_c (h = A_end / 2 per chunk, h = 0 after the last chunk): T_c is what
    # the output needs, and T_{c+1} = exp(h_c + h_{c+1}) T_c + exp(a_end_c + h_{c+1}) u_c^T B_c with factors <= 1
    h_c = half_end.view(b, nc, g, r, 1, 1)
    h_next = torch.cat([h_c[:, 1:], torch.zeros_like(h_c[:, :1])], dim=1)
    in_scale = torch.exp(a[:, :, -1].view(b, nc, g, r, 1, 1) + h_next)
    if initial_state is None:
        init = torch.zeros(b, g, r, p, n, dtype=x.dtype, device=x.device)
    else:
        init = initial_state.float().view(b, g, r, p, n) * torch.exp(h_c[:, 0])
    carry = torch.exp(A_cum[:, :, -1].view(b, nc, g, r, 1, 1) - h_c + h_next)
    if seq_idx is not None:
        carry = carry * (owner[:, 1:] == owner[:, :-1])[:, :, None, None, None, None]
    y, final_state = _FactoredCore.apply(x, scale_in, scale_out, Bc, Cc, keep, masks, carry, in_scale, init, D)
    return y, final_state.reshape(b, h, p, n)


def _mul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = a * b`` in one pass, ``out`` possibly a transposed view of a contiguous buffer (a layout change
    for free). Under torch.compile the product is copied in instead: compiled ``out=`` writes may keep ``a``'s
    layout rather than ``out``'s."""
    if torch.compiler.is_compiling():
        out.copy_(a * b)
    else:
        torch.mul(a, b, out=out)


class _FactoredCore(torch.autograd.Function):
    """The x-sized part of `_ssd_factored`, with a hand-written backward.

    Forward (per batch, chunk c and group): ``u = x * scale_in`` written once into the GEMM layout
    ``[cs, r*p]``; ``CB = C B^T`` (causal, same-sequence); chunk states ``u^T B'``; the state pass (`_StatePass`'s
    loop); ``yy = C' T^T + CB u`` in one ``baddbmm``; ``y = yy * scale_out (+ D x)`` written once in x's layout.
    With packing, ``B' = B * masks[0]`` and ``C' = C * masks[1]`` (tokens of the sequence owning the chunk's end
    state, tokens continuing the entering one); without, ``B' = B``, ``C' = C``.

    Backward: the transposes of those GEMMs, accumulated in place (``baddbmm_``) where two products feed one
    gradient, and each x-sized gradient written once in the layout its consumer reads. Autograd's record of the
    same ops keeps layout copies of ``u`` and ``y``, sums two gradients of ``u``, and writes every elementwise
    product as a new tensor: about half of the scan's elementwise passes. Tested against the recurrence
    (`ssd_reference`), values and every gradient, packed and not (test_fast_paths.py)."""

    @staticmethod
    def forward(ctx, x, scale_in, scale_out, Bc, Cc, keep, masks, carry, in_scale, init, D):
        with torch.autocast(x.device.type, enabled=False):  # float32 throughout, as the SSM state
            return _FactoredCore._forward(ctx, x, scale_in, scale_out, Bc, Cc, keep, masks, carry, in_scale, init, D)

    @staticmethod
    def backward(ctx, g_y, g_final):
        with torch.autocast(g_final.device.type if g_final is not None else g_y.device.type, enabled=False):
            return _FactoredCore._backward(ctx, g_y.float() if g_y is not None else None,
                                           g_final.float() if g_final is not None else None)

    @staticmethod
    def _forward(ctx, x, scale_in, scale_out, Bc, Cc, keep, masks, carry, in_scale, init, D):
        b, length, h, p = x.shape
        _, nc, g, cs, n = Bc.shape
        r = h // g
        rows = b * nc * g
        Bc, Cc = Bc.contiguous(), Cc.contiguous()
        x6 = x.view(b, nc, cs, g, r, p)
        u = x.new_empty(b, nc, g, cs, r, p)
        _mul_into(x6, scale_in.view(b, nc, cs, g, r, 1), u.transpose(2, 3))
        mask = torch.ones(cs, cs, dtype=torch.bool, device=x.device).tril()  # j <= i, [i, j]
        if keep is not None:
            mask = (mask & keep)[:, :, None]  # [b, c, 1, i, j]
        CB = torch.matmul(Cc, Bc.transpose(-1, -2)).masked_fill_(~mask, 0.0)  # [b, c, g, i, j]
        # reshape, not view, for what out= wrote: under torch.compile out= may hand back another layout
        u3, B3, C3, CB3 = u.reshape(rows, cs, r * p), Bc.view(rows, cs, n), Cc.view(rows, cs, n), CB.view(rows, cs, cs)
        Bs, Cs = (B3, C3) if masks is None else ((Bc * masks[0]).view(rows, cs, n), (Cc * masks[1]).view(rows, cs, n))
        raw = torch.bmm(u3.transpose(1, 2), Bs).view(b, nc, g, r, p, n)  # u_c^T B'_c
        starts, final = _state_pass_forward(init, raw, carry, in_scale)
        yy = torch.baddbmm(torch.bmm(Cs, starts.view(rows, r * p, n).transpose(1, 2)), CB3, u3)
        y = x.new_empty(b, nc, cs, g, r, p)
        _mul_into(yy.view(b, nc, g, cs, r, p).transpose(2, 3), scale_out.view(b, nc, cs, g, r, 1), y)
        if D is not None:
            y.addcmul_(x6, D.float().view(g, r, 1))
        ctx.save_for_backward(x, scale_in, scale_out, Bc, Cc, mask, masks, CB, u, raw, starts, carry, in_scale, yy, D)
        return y.reshape(b, length, h, p), final

    @staticmethod
    def _backward(ctx, g_y, g_final):
        (x, scale_in, scale_out, Bc, Cc, mask, masks, CB, u, raw, starts, carry, in_scale, yy,
         D) = ctx.saved_tensors  # unpacked once (activation checkpointing allows no second unpack)
        need = ctx.needs_input_grad
        b, length, h, p = x.shape
        _, nc, g, cs, n = Bc.shape
        r = h // g
        rows = b * nc * g
        x6 = x.view(b, nc, cs, g, r, p)
        if g_y is None:
            g_y = torch.zeros_like(x)
        g_y6 = g_y.contiguous().view(b, nc, cs, g, r, p)
        yy_t = yy.view(b, nc, g, cs, r, p).transpose(2, 3)
        g_scale_out = torch.linalg.vecdot(g_y6, yy_t).view(b, nc, cs, h) if need[2] else None
        g_D = None
        if D is not None and need[10]:
            g_D = torch.linalg.vecdot(g_y6, x6).sum((0, 1, 2)).view(h).to(D.dtype)
        g_yy = x.new_empty(b, nc, g, cs, r, p)
        _mul_into(g_y6, scale_out.view(b, nc, cs, g, r, 1), g_yy.transpose(2, 3))
        g_yy3 = g_yy.reshape(rows, cs, r * p)
        u3, B3, C3, CB3 = u.reshape(rows, cs, r * p), Bc.view(rows, cs, n), Cc.view(rows, cs, n), CB.view(rows, cs, cs)
        Cs = C3 if masks is None else (Cc * masks[1]).view(rows, cs, n)
        # yy = C' T^T + CB u
        g_C = torch.bmm(g_yy3, starts.view(rows, r * p, n))  # of C' (masked below)
        g_starts = torch.bmm(g_yy3.transpose(1, 2), Cs).view(starts.shape)
        g_CB = torch.bmm(g_yy3, u3.transpose(1, 2)).view(CB.shape).masked_fill_(~mask, 0.0).view(rows, cs, cs)
        g_u = torch.bmm(CB3.transpose(1, 2), g_yy3)
        del g_yy, g_yy3
        g_init, g_raw, g_carry, g_in_scale = _state_pass_backward(
            starts, carry, raw, in_scale, g_starts, g_final, (need[9], True, need[7], need[8]))
        g_raw3 = g_raw.view(rows, r * p, n)
        # raw = u^T B'; CB = C B^T
        Bs = B3 if masks is None else (Bc * masks[0]).view(rows, cs, n)
        g_u.baddbmm_(Bs, g_raw3.transpose(1, 2))
        g_B = g_C_out = None
        if need[3]:
            g_B = torch.bmm(u3, g_raw3)
            if masks is not None:
                g_B = g_B.view(Bc.shape).mul_(masks[0]).view(rows, cs, n)
            g_B.baddbmm_(g_CB.transpose(1, 2), C3)
        if need[4]:
            if masks is not None:
                g_C = g_C.view(Cc.shape).mul_(masks[1]).view(rows, cs, n)
            g_C_out = g_C.baddbmm_(g_CB, B3)
        # u = x * scale_in (in the GEMM layout)
        g_u6 = g_u.view(b, nc, g, cs, r, p).transpose(2, 3)
        g_scale_in = torch.linalg.vecdot(g_u6, x6).view(b, nc, cs, h) if need[1] else None
        g_x = None
        if need[0]:
            g_x = x.new_empty(b, nc, cs, g, r, p)
            _mul_into(g_u6, scale_in.view(b, nc, cs, g, r, 1), g_x)
            if D is not None:
                g_x.addcmul_(g_y6, D.float().view(g, r, 1))
            g_x = g_x.reshape(b, length, h, p)
        shape = (b, nc, g, cs, n)
        return (g_x, g_scale_in, g_scale_out, None if g_B is None else g_B.view(shape),
                None if g_C_out is None else g_C_out.view(shape), None, None, g_carry, g_in_scale, g_init, g_D)


def _ssd_pairwise(x, dt, dA, B, C, chunk_size, initial_state, seq_idx):
    """The scan with one ``[cs, cs]`` table of ``exp(A_cum_i - A_cum_j)`` per head and chunk: exact for any decay
    (exponents below ``_EXP_FLOOR`` are clamped, where the true factor is zero next to any output)."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    nc, cs = length // chunk_size, chunk_size

    # layout [b, c, g, r, cs, ...]: one batched matmul per contraction (no 3-operand einsums)
    xdt = (x * dt[..., None]).view(b, nc, cs, g, r, p).permute(0, 1, 3, 4, 2, 5)  # [b, c, g, r, cs, p]
    Bc = B.view(b, nc, cs, g, n).transpose(2, 3)  # [b, c, g, cs, n]
    Cc = C.view(b, nc, cs, g, n).transpose(2, 3)
    A_cum = torch.cumsum(dA.view(b, nc, cs, g, r).permute(0, 1, 3, 4, 2), dim=-1)  # [b, c, g, r, cs]
    if seq_idx is not None:
        sc = seq_idx.view(b, nc, cs)

    # 1. inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(A_cum_i - A_cum_j) dt_j x_j
    # The causal mask goes on C.B (per group, r times smaller than L). L's entries are A_cum_i - A_cum_j <= 0 on
    # and below the diagonal (dt >= 0, A < 0); above it they are >= 0 and clamped to 0, so exp stays finite there
    # and the masked C.B zeroes them. The floor keeps exp away from underflow: on CPU exp of -inf or of a number
    # whose exp is subnormal takes a slow path (2-5x), and exp(-87) ~ 1.6e-38 is zero next to any output.
    # L is built transposed ([j, i] in memory) and used through a transposed view: the batched matmul with a
    # column-major left operand runs ~1.7x faster on CPU (MKL), and elementwise work is the same either way.
    causal_t = torch.ones(cs, cs, dtype=torch.bool, device=x.device).triu()  # j <= i, in [j, i] layout
    L = (A_cum[..., None, :] - A_cum[..., :, None]).clamp_(min=_EXP_FLOOR, max=0.0)  # [.., j, i] = A_cum_i - A_cum_j
    CB = torch.matmul(Bc, Cc.transpose(-1, -2)).masked_fill_(~causal_t, 0.0)[:, :, :, None]  # (C_i . B_j) at [j, i]
    if torch.is_grad_enabled() and (x.requires_grad or dt.requires_grad or B.requires_grad or C.requires_grad
                                    or dA.requires_grad):
        L = L.exp() * CB  # autograd keeps the exp output: no in-place ops on it
        if seq_idx is not None:
            L = L * (sc[:, :, :, None] == sc[:, :, None, :])[:, :, None, None]
    else:  # inference: reuse one buffer (the largest tensor of the scan)
        L = L.exp_().mul_(CB)
        if seq_idx is not None:
            L.mul_((sc[:, :, :, None] == sc[:, :, None, :])[:, :, None, None])
    y = torch.matmul(L.transpose(-1, -2), xdt)  # [b, c, g, r, i, p]
    del L

    # 2. each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # [b, c, g, r, cs]
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sc == sc[:, :, -1:])[:, :, None, None]
    # heads of a group share B: fold (r, p) into one matrix dimension instead of broadcasting B over r
    xdt_end = (xdt * decay_to_end[..., None]).permute(0, 1, 2, 3, 5, 4).reshape(b, nc, g, r * p, cs)
    chunk_states = torch.matmul(xdt_end, Bc).view(b, nc, g, r, p, n)

    # 3. states at chunk boundaries, chunk by chunk: S_{c+1} = exp(A_end_c) S_c + chunk_states_c (with packing
    # the carried state is dropped where the sequence owning it ends inside chunk c)
    if initial_state is None:
        init = torch.zeros(b, g, r, p, n, dtype=x.dtype, device=x.device)
    else:
        init = initial_state.float().view(b, g, r, p, n)
    carry = torch.exp(A_cum[..., -1])[..., None, None]  # [b, c, g, r, 1, 1]
    if seq_idx is not None:
        owner = torch.cat([sc[:, :1, 0], sc[:, :, -1]], dim=1)  # sequence owning each boundary state
        carry = carry * (owner[:, 1:] == owner[:, :-1])[:, :, None, None, None, None]
    # [b, c, g, r, p, n]: the state entering each chunk, and the state after the last one
    start_states, final_state = _StatePass.apply(init, chunk_states, carry)

    # 4. contribution of the state entering each chunk: exp(A_cum_i) * (S_start C_i)
    decay_in = torch.exp(A_cum)  # [b, c, g, r, cs]
    if seq_idx is not None:
        decay_in = decay_in * (sc == owner[:, :-1, None])[:, :, None, None]
    # C is shared by the heads of a group as well: one product per group, [b, c, g, i, r*p]
    y_in = torch.matmul(Cc, start_states.reshape(b, nc, g, r * p, n).transpose(-1, -2))
    y_in = y_in.view(b, nc, g, cs, r, p).transpose(3, 4)  # [b, c, g, r, i, p] (a view)
    y = torch.addcmul(y, y_in, decay_in[..., None])

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * cs, h, p)
    return y, final_state.reshape(b, h, p, n)


def state_pass_reference(init: torch.Tensor, chunk_states: torch.Tensor, carry: torch.Tensor,
                         in_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 of `ssd_chunked` op by op: ``S_0 = init``, ``S_{c+1} = in_scale_c chunk_states_c + carry_c S_c``
    (``in_scale`` 1 when None); returns the states entering the chunks ``[b, c, ...]`` and the final one
    (autograd's backward; `_StatePass` is tested against it)."""
    starts = [init]
    for c, (cs_c, carry_c) in enumerate(zip(chunk_states.unbind(1), carry.unbind(1))):
        if in_scale is None:
            starts.append(torch.addcmul(cs_c, starts[-1], carry_c))
        else:
            starts.append(torch.addcmul(starts[-1] * carry_c, cs_c, in_scale[:, c]))
    final = starts.pop()
    return torch.stack(starts, dim=1), final


def _pairwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum((-2, -1), keepdim=True)`` for same-shaped ``[..., p, n]`` tensors, as ``linalg.vecdot`` over
    the flattened ``p*n`` (as fast or faster than the product and sum on CPU; a batched ``[1, K] @ [K, 1]``
    matmul is 2-3x slower)."""
    dots = torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))
    return dots[..., None, None]


def _state_pass_forward(init, chunk_states, carry, in_scale=None):
    """`state_pass_reference`'s forward with the states written into one buffer: (starts [b, c, ...], final)."""
    nc = chunk_states.shape[1]
    starts = torch.empty_like(chunk_states)
    starts[:, 0] = init
    final = torch.empty_like(init)
    for c in range(nc):
        out = starts[:, c + 1] if c + 1 < nc else final
        if in_scale is None:
            torch.addcmul(chunk_states[:, c], starts[:, c], carry[:, c], out=out)
        else:
            torch.mul(starts[:, c], carry[:, c], out=out).addcmul_(chunk_states[:, c], in_scale[:, c])
    return starts, final


def _state_pass_backward(starts, carry, chunk_states, in_scale, g_starts, g_final, needs):
    """The gradients (init, chunk_states, carry, in_scale) of `_state_pass_forward` (``needs``: which, as
    ``ctx.needs_input_grad``); ``chunk_states`` / ``in_scale`` may be None when ``in_scale`` is."""
    nc = starts.shape[1]
    g_cs = torch.empty_like(starts)  # dS_{c+1} (the gradient of chunk_states[:, c] when in_scale is None)
    if g_final is None:
        g_cs[:, nc - 1] = 0
    else:
        g_cs[:, nc - 1] = g_final
    for c in range(nc - 1, 0, -1):
        if g_starts is None:
            torch.mul(g_cs[:, c], carry[:, c], out=g_cs[:, c - 1])
        else:
            torch.addcmul(g_starts[:, c], g_cs[:, c], carry[:, c], out=g_cs[:, c - 1])
    g_init = g_carry = g_in_scale = None
    if needs[0]:
        g_init = g_cs[:, 0] * carry[:, 0] if g_starts is None else torch.addcmul(g_starts[:, 0], g_cs[:, 0],
                                                                                  carry[:, 0])
    if needs[2]:
        g_carry = _pairwise_dot(g_cs, starts)
    g_chunk_states = g_cs if needs[1] else None
    if in_scale is not None:
        if needs[3]:
            g_in_scale = _pairwise_dot(g_cs, chunk_states)
        if g_chunk_states is not None:
            g_chunk_states = g_cs.mul_(in_scale)
    return g_init, g_chunk_states, g_carry, g_in_scale


class _StatePass(torch.autograd.Function):
    """`state_pass_reference` with the states written into one buffer and a hand-written backward.

    Forward: the same ops per chunk (bit for bit), written in place of ``stack``-ing a list. Backward, from
    the last chunk back: ``dS_c = dstart_c + carry_c dS_{c+1}`` (one ``addcmul`` per chunk, into the gradient of
    ``chunk_states`` directly) and ``dcarry = sum_{p,n} dS_{c+1} S_c`` for all chunks at once, instead of autograd's
    five ops per chunk on its record of the loop (a sequential pass over small tensors, ~20 % of the scan's
    backward on the small benchmark model). With ``in_scale`` (per chunk and head) the chunk states are scaled
    inside the loop, on chunk-sized slices, instead of by a pass over all of them.

    The pairwise form calls it without ``in_scale``; the factored form runs the same two helpers
    (`_state_pass_forward` / `_state_pass_backward`) inside `_FactoredCore`, and this Function with ``in_scale`` is
    how the tests check those helpers against `state_pass_reference`.
    """

    @staticmethod
    def forward(ctx, init, chunk_states, carry, in_scale=None):
        starts, final = _state_pass_forward(init, chunk_states, carry, in_scale)
        if in_scale is None:
            ctx.save_for_backward(starts, carry)
        else:
            ctx.save_for_backward(starts, carry, chunk_states, in_scale)
        return starts, final

    @staticmethod
    def backward(ctx, g_starts, g_final):
        saved = ctx.saved_tensors  # unpacked once (activation checkpointing allows no second unpack)
        chunk_states, in_scale = saved[2:] if len(saved) > 2 else (None, None)
        return _state_pass_backward(saved[0], saved[1], chunk_states, in_scale, g_starts, g_final,
                                    ctx.needs_input_grad)


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one token at a time. Same contract as `ssd_chunked`."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Bh = B.float().repeat_interleave(h // g, dim=2)
    Ch = C.float().repeat_interleave(h // g, dim=2)
    state = torch.zeros(b, h, p, n) if initial_state is None else initial_state.float().clone()
    state = state.to(x.device)
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
            state = state * keep
        decay = torch.exp(dt[:, t].float() * A.float())[:, :, None, None]
        state = decay * state + (dt[:, t, :, None, None].float() * x[:, t, :, :, None].float() * Bh[:, t, :, None, :])
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y = y + D.float()[:, None] * x[:, t].float()
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One decode step, updating ``state`` [b, h, p, n] in place. x [b, h, p], dt [b, h], B/C [b, g, n].

    Fused for decode latency (in-place ``addcmul_``, a batched matmul for the readout); checked
    against the literal recurrence `ssd_reference`.
    """
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    r = h // g
    s = state.view(b, g, r, p, n)
    xf, dtf = x.float(), dt.float()
    s.mul_(torch.exp(dtf * A.float()).view(b, g, r, 1, 1))
    s.addcmul_((dtf[..., None] * xf).view(b, g, r, p, 1), B.float().view(b, g, 1, 1, n))
    y = torch.matmul(s.view(b, g, r * p, n), C.float().view(b, g, n, 1)).view(b, h, p)
    return torch.addcmul(y, D.float()[:, None], xf)

__all__ = ["ssd_chunked", "ssd_reference", "ssd_step", "state_pass_reference"]
