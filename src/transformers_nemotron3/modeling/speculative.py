"""Self-speculative greedy decoding with the model's own multi-token-prediction (MTP) head.

Entry points: ``model.generate(input_ids, use_mtp=True, num_draft_tokens=k, ...)`` and :func:`mtp_generate`
(which also returns acceptance statistics). This file lives in ``modeling/`` so that it travels with
saved checkpoints as remote code. One round:

1. **Draft.** The MTP head reads the main model's final hidden state at the last committed position
   and the embedding of the pending token, and proposes the token after it. Applied recursively
   (its output hidden state and its own draft as the next input; one set of weights, as Nemotron 3
   Super/Ultra do) it proposes ``k`` tokens.
2. **Verify.** The main model runs once over ``[pending, draft_1 .. draft_k]`` (k+1 tokens) from its
   cache; its greedy choice at each position says how many drafts are right (``a``). The pending
   token, the ``a`` accepted drafts and the main model's own next token after them are kept, so a
   round produces ``a + 1`` tokens for one main-model forward.
3. **Roll back.** Attention keys are cropped to the accepted length. Mamba conv and SSM states
   cannot be cropped, so during verification the Mamba layers run the k+1 tokens as decode steps
   and record the state after each (`Nemotron3HybridCache.start_recording` / `keep_first`); on a
   rejection the state after the last accepted token is copied back, no forward is repeated.
   The MTP head's own KV cache is cropped to the committed positions and refilled with the true
   hidden states of the accepted ones.

Greedy output is therefore the main model's own greedy output, token for token (up to ties of the
argmax between a one-token and a multi-token forward, which random-weight tests do not hit).
Batch size 1 (acceptance differs between rows). ``num_draft_tokens=0`` runs a plain cached greedy
loop, the baseline for wall-clock comparisons.
"""

from __future__ import annotations

import time

import torch

from .cache import AttentionLayer, Nemotron3HybridCache

__all__ = ["mtp_generate", "greedy_generate"]


def _mtp_kv_states(cache: Nemotron3HybridCache, first_mtp_layer: int) -> list[AttentionLayer]:
    return [st for i, st in enumerate(cache.layers) if i >= first_mtp_layer and isinstance(st, AttentionLayer)]


def _crop_mtp(cache: Nemotron3HybridCache, first_mtp_layer: int, length: int) -> None:
    for st in _mtp_kv_states(cache, first_mtp_layer):
        st.length = min(st.length, length)


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, device=device) if ids else None


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """Boolean tensor: which of ``tokens`` are end-of-sequence ids (all False without eos ids)."""
    if eos is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, eos)


def _positions(start: int, length: int, device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)[None]


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.LongTensor, max_new_tokens: int,
                    eos_token_id: int | list[int] | None = None) -> torch.LongTensor:
    """Plain cached greedy decoding (any batch size), the no-draft baseline of :func:`mtp_generate`."""
    eos = _eos_tensor(eos_token_id, input_ids.device)
    cache = Nemotron3HybridCache(model.config, input_ids.shape[0], model.dtype, input_ids.device)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        if bool(_is_eos(tokens[-1], eos).all()) and eos is not None:
            break
        out = model(input_ids=tokens[-1][:, None], cache=cache, use_cache=True, logits_to_keep=1)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


@torch.inference_mode()
def mtp_generate(
    model,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    num_draft_tokens: int = 2,
    eos_token_id: int | list[int] | None = None,
    return_stats: bool = False,
):
    """Greedy decoding of ``model`` (a `Nemotron3ForCausalLM` with an MTP head) with MTP self-speculation.

    Args:
        input_ids: ``[1, prompt_len]`` prompt (no padding).
        max_new_tokens: number of tokens to generate (fewer if ``eos_token_id`` appears).
        num_draft_tokens: drafts per round ``k`` (recursive MTP applications); 0 = plain greedy.
        eos_token_id: stop after this token (or any of these tokens).
        return_stats: also return a dict with ``mean_acceptance_length`` (tokens produced per
            main-model verification forward, i.e. accepted drafts + 1), ``acceptance_rate`` (accepted
            / proposed drafts), ``rounds``, ``new_tokens`` and ``seconds``.

    Returns:
        ``[1, prompt_len + new]`` token ids, or ``(ids, stats)`` with ``return_stats``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"mtp_generate decodes one sequence at a time; got input_ids of shape "
                         f"{tuple(input_ids.shape)}. Pass a [1, length] tensor (or loop over the batch).")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}.")
    if num_draft_tokens > 0 and getattr(model, "mtp", None) is None:
        raise ValueError("This model has no MTP head (config.num_nextn_predict_layers is 0); use "
                         "num_draft_tokens=0 or a checkpoint with an MTP head.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    start = time.perf_counter()
    if num_draft_tokens == 0:
        ids = greedy_generate(model, input_ids, max_new_tokens, eos_token_id)
        stats = {"mean_acceptance_length": 1.0, "acceptance_rate": 0.0, "rounds": ids.shape[1] - input_ids.shape[1],
                 "new_tokens": ids.shape[1] - input_ids.shape[1], "seconds": time.perf_counter() - start}
        return (ids, stats) if return_stats else ids

    config = model.config
    device = input_ids.device
    eos = _eos_tensor(eos_token_id, device)
    n_main = config.num_hidden_layers
    k = num_draft_tokens
    cache = Nemotron3HybridCache(config, 1, model.dtype, device,
                                 block_types=list(config.layers_block_type) + list(config.mtp_layers_block_type))
    embed = model.model.embeddings

    def mtp_step(hidden, next_ids, pos):
        """MTP over positions ``pos..``: returns (draft token ids, MTP output hidden)."""
        logits, h = model.mtp_draft_logits(hidden, next_ids, cache=cache,
                                           mask_args={"position_ids": _positions(pos, hidden.shape[1], device)})
        return logits[:, -1].argmax(-1), h

    # prefill: main model over the prompt, then the MTP head over the same positions
    prompt_len = input_ids.shape[1]
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    pending = out.logits[:, -1].argmax(-1)  # token at position prompt_len, not yet run through the main model
    hidden = out.last_hidden_state  # [1, L, d], final-normed
    next_ids = torch.cat([input_ids[:, 1:], pending[:, None]], dim=1)
    committed = prompt_len  # tokens run through the main model (and the MTP head)
    generated = [pending]
    rounds = accepted_total = proposed = 0
    draft, mtp_hidden = mtp_step(hidden, next_ids, 0)
    mtp_hidden = mtp_hidden[:, -1:]

    while len(generated) < max_new_tokens and not bool(_is_eos(pending, eos).any()):
        budget = max_new_tokens - len(generated)
        steps = min(k, budget)
        drafts = [draft]
        for j in range(1, steps):  # recursive drafts, written to the MTP cache at later positions
            nxt, mtp_hidden = mtp_step(mtp_hidden, drafts[-1][:, None], committed + j - 1)
            drafts.append(nxt)
        block = torch.cat([pending[:, None], torch.stack(drafts, dim=1)], dim=1)  # [1, steps + 1]
        cache.start_recording()  # Mamba layers keep their state after each block token
        out = model(input_ids=block, cache=cache, use_cache=True, logits_to_keep=0)
        greedy = out.logits[0].argmax(-1)  # main model's choice after each block position
        match = (greedy[:steps] == block[0, 1:]).long()
        a = int(match.cumprod(0).sum())
        if eos is not None:  # do not commit past an accepted eos
            hits = _is_eos(block[0, 1 : a + 1], eos).nonzero()
            if len(hits):
                a = int(hits[0, 0]) + 1
        cache.keep_first(a + 1)  # roll Mamba states and attention keys back to the accepted prefix
        hidden = out.last_hidden_state[:, : a + 1]
        new_pending = greedy[a : a + 1]
        accepted = block[0, 1 : a + 1]
        generated.extend(accepted[i : i + 1] for i in range(a))
        rounds += 1
        accepted_total += a
        proposed += steps
        if len(generated) >= max_new_tokens or (a and bool(_is_eos(accepted[-1:], eos).any())):
            break
        generated.append(new_pending)
        # MTP cache: forget draft positions, run the head over the newly committed positions
        _crop_mtp(cache, n_main, committed)
        next_ids = torch.cat([accepted, new_pending])[None]
        draft, mtp_hidden = mtp_step(hidden, next_ids, committed)
        mtp_hidden = mtp_hidden[:, -1:]
        committed += a + 1
        pending = new_pending

    ids = torch.cat([input_ids, torch.cat(generated)[None, :max_new_tokens]], dim=1)
    if eos is not None:
        new = ids[0, prompt_len:]
        hits = _is_eos(new, eos).nonzero()
        if len(hits):
            ids = ids[:, : prompt_len + int(hits[0, 0]) + 1]
    new_tokens = ids.shape[1] - prompt_len
    stats = {
        "mean_acceptance_length": (accepted_total + rounds) / rounds if rounds else 1.0,
        "acceptance_rate": accepted_total / proposed if proposed else 0.0,
        "rounds": rounds,
        "new_tokens": new_tokens,
        "seconds": time.perf_counter() - start,
    }
    return (ids, stats) if return_stats else ids

