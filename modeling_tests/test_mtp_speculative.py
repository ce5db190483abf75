"""MTP self-speculative decoding: greedy output equals plain greedy decoding; the MTP loss trains."""

import pytest
import torch
from tiny_configs import tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.generation import greedy_generate, mtp_generate


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Nemotron3ForCausalLM(tiny_config("latent_groups_mtp", **overrides)).eval()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_greedy_equals_plain_greedy(k):
    model = _model()
    g = torch.Generator().manual_seed(1)
    for length in (1, 5, 11):
        prompt = torch.randint(3, model.config.vocab_size, (1, length), generator=g)
        reference = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        ids, stats = mtp_generate(model, prompt, 20, num_draft_tokens=k, return_stats=True)
        assert torch.equal(ids, reference), (length, k)
        assert 1.0 <= stats["mean_acceptance_length"] <= k + 1
        assert stats["new_tokens"] == 20


def test_greedy_generate_matches_hf_generate_batched():
    model = _model(seed=3)
    prompt = torch.randint(3, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    reference = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(greedy_generate(model, prompt, 12), reference)


def test_acceptance_when_mtp_copies_main_model():
    """All drafts are accepted when the MTP head is forced to predict what the main model predicts.

    With a model whose next token does not depend on the context (lm_head reads only a bias-like
    constant direction), every draft is right, so a round yields k + 1 tokens; this checks that
    full acceptance and the cache bookkeeping after it are correct.
    """
    model = _model(seed=4)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 1.0  # logits = sum of normed hidden: same argmax (7) everywhere ... mostly
    prompt = torch.randint(3, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    reference = model.generate(prompt, max_new_tokens=13, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids, stats = mtp_generate(model, prompt, 13, num_draft_tokens=3, return_stats=True)
    assert torch.equal(ids, reference)
    assert stats["mean_acceptance_length"] > 1.0


def test_eos_stops_generation():
    model = _model()
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    plain = mtp_generate(model, prompt, 20, num_draft_tokens=0)
    eos = int(plain[0, prompt.shape[1] + 6])
    ids = mtp_generate(model, prompt, 20, num_draft_tokens=2, eos_token_id=eos)
    first = (plain[0, prompt.shape[1]:] == eos).nonzero()[0, 0]
    assert torch.equal(ids, plain[:, : prompt.shape[1] + int(first) + 1])


def test_bad_arguments_raise():
    model = _model()
    with pytest.raises(ValueError, match="one sequence"):
        mtp_generate(model, torch.ones(2, 3, dtype=torch.long), 4)
    torch.manual_seed(0)
    no_head = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    with pytest.raises(ValueError, match="no MTP head"):
        mtp_generate(no_head, torch.ones(1, 3, dtype=torch.long), 4, num_draft_tokens=2)


def test_mtp_loss_in_training_forward_and_gradients_reach_head():
    model = _model()
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.mtp_loss is not None and torch.isfinite(out.mtp_loss)
    expected = out.lm_loss + model.config.mtp_loss_scale * out.mtp_loss
    if out.aux_loss is not None:
        expected = expected + out.aux_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.mtp.layers[0].eh_proj.weight.grad is not None
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0


def test_training_the_head_lowers_mtp_loss():
    model = _model()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.mtp.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.mtp.parameters(), lr=3e-3)
    # a deterministic corpus: token t+1 = (t * 5 + 3) mod vocab, so t+2 is a function of t+1
    v = model.config.vocab_size
    start = torch.arange(3, 19)[:, None]
    seq = [start]
    for _ in range(15):
        seq.append((seq[-1] * 5 + 3) % v)
    ids = torch.cat(seq, dim=1)
    first = None
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).mtp_loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_generate_use_mtp_flag_equals_plain_generate():
    from tiny_configs import tiny_config

    from transformers_nemotron3 import Nemotron3ForCausalLM

    model = Nemotron3ForCausalLM(tiny_config("latent_groups_mtp")).eval()
    prompt = torch.randint(3, 96, (1, 9))
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    fast = model.generate(prompt, max_new_tokens=12, use_mtp=True, num_draft_tokens=2, eos_token_id=None)
    assert torch.equal(plain, fast)
    eos_id = int(plain[0, 12])
    first = 9 + int((plain[0, 9:] == eos_id).nonzero()[0, 0])
    eos_stop = model.generate(prompt, max_new_tokens=12, use_mtp=True, eos_token_id=[eos_id, 95])
    assert torch.equal(eos_stop, plain[:, : first + 1])  # stops right after the first eos id it meets
    with pytest.raises(ValueError, match="greedily"):
        model.generate(prompt, max_new_tokens=4, use_mtp=True, do_sample=True)
