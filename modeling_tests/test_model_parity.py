"""Function preservation: our model equals transformers' native NemotronHForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from native_pair import native_pair

TOL = 1e-4


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp", "dense"])
@pytest.mark.parametrize("length", [8, 21])  # a multiple of chunk_size (8) and not
def test_logits_match_native(name, length):
    ours, native = native_pair(name)
    x = torch.randint(3, 96, (2, length))
    with torch.no_grad():
        diff = (ours(x).logits - native(x).logits).abs().max().item()
    assert diff <= TOL, diff


def test_sdpa_equals_eager_and_native():
    ours, native = native_pair("all_blocks", attn="sdpa")
    x = torch.randint(3, 96, (2, 19))
    with torch.no_grad():
        sdpa = ours(x).logits
        ours.config._attn_implementation = "eager"
        eager = ours(x).logits
        assert (sdpa - eager).abs().max() <= TOL
        assert (sdpa - native(x).logits).abs().max() <= TOL


def test_left_padded_batch_matches_native_and_unpadded():
    ours, native = native_pair("all_blocks")
    lengths = [17, 11, 6]
    rows = [torch.randint(3, 96, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask).logits
        nat = native(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = ours(r[None]).logits[0]
            assert (padded[i, width - len(r):] - alone).abs().max() <= TOL
            assert (nat[i, width - len(r):] - alone).abs().max() <= TOL


def test_greedy_generate_matches_native_32_tokens():
    ours, native = native_pair("all_blocks")
    prompt = torch.randint(3, 96, (2, 7))
    kw = dict(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    a = ours.generate(prompt, **kw)
    b = native.generate(prompt, **kw)
    assert a.shape == (2, 39)
    assert torch.equal(a, b)


def test_left_padded_generate_equals_unpadded():
    ours, _ = native_pair("all_blocks")
    rows = [torch.randint(3, 96, (9,)), torch.randint(3, 96, (5,))]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r):] = r
        mask[i, 9 - len(r):] = 1
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = ours.generate(ids, attention_mask=mask, **kw)[:, 9:]
    for i, r in enumerate(rows):
        assert torch.equal(batched[i], ours.generate(r[None], **kw)[0, len(r):])


@pytest.mark.parametrize("name", ["all_blocks", "latent_groups_mtp"])
def test_cached_decode_equals_full_recomputation(name):
    ours, _ = native_pair(name)
    x = torch.randint(3, 96, (2, 23))
    with torch.no_grad():
        full = ours(x, use_cache=False).logits
        out = ours(x[:, :10], use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        steps = [out.logits[:, -1]]
        for t in range(10, 23):  # one token at a time
            o = ours(x[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(o.logits[:, -1])
        # a multi-token continuation on top of a cache (chunked prefill) as well
        o2 = ours(x[:, :5], use_cache=True)
        c2 = o2.cache if "cache" in o2 else o2.past_key_values
        cont = ours(x[:, 5:], cache=c2, use_cache=True).logits
    stepped = torch.stack(steps[:-1], dim=1)
    assert (stepped - full[:, 9:22]).abs().max() <= TOL
    assert (cont - full[:, 5:]).abs().max() <= TOL
