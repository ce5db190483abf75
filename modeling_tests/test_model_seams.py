"""The model's seams, seen from outside: the block table (`MIXER_TYPES`) and the Mamba-2 ``sequence_mixer``.

Context parallelism replaces only the Mamba mixer's ``sequence_mixer`` and goes through the same
`mamba2.conv_scan` (and so the same kernel choice) as one process: with stand-in "CUDA kernels" installed
(the PyTorch reference behind mamba_ssm's / causal_conv1d's signatures, counting calls) CP=2 on two gloo
processes calls them with its half of the heads, and loss and every gradient equal one process using them.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import LinearAttentionLayer

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.modeling import blocks, mamba2
from transformers_nemotron3.modeling.ssd import ssd_chunked
from transformers_nemotron3.parallel.accelerate_plugin import prepare_nemotron3_parallel
from transformers_nemotron3.parallel.config import Nemotron3ParallelConfig
from transformers_nemotron3.parallel.spawn import run_processes

try:
    from tiny_configs import tiny_config
except ImportError:  # pragma: no cover
    from modeling_tests.tiny_configs import tiny_config


class StandInKernels:
    """mamba_ssm's ``mamba_chunk_scan_combined`` and causal_conv1d's ``causal_conv1d_fn`` signatures over the
    PyTorch reference, recording the number of heads of each scan call."""

    def __init__(self) -> None:
        self.scan_heads: list[int] = []
        self.conv_calls = 0

    def chunk_scan(self, x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")),
                   initial_states=None, seq_idx=None, return_final_states=True):
        self.scan_heads.append(x.shape[2])
        dt = mamba2.mamba2_dt(dt, dt_bias, dt_limit)
        return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_states, seq_idx=seq_idx)

    def conv1d(self, x, weight, bias=None, seq_idx=None, activation=None):
        self.conv_calls += 1
        return mamba2.causal_conv(x, weight, bias, None, seq_idx)

    def install(self) -> None:
        mamba2._kernel_chunk_scan = self.chunk_scan
        mamba2._kernel_conv1d = self.conv1d
        mamba2.use_kernels_for = lambda tensor, enabled: enabled  # "CUDA" here: the stand-ins run on CPU


def _cp_with_stand_in_kernels(rank, world, length):
    kernels = StandInKernels()
    kernels.install()
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).float().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, length), generator=g)
    pos = torch.arange(length)[None].repeat(2, 1)
    pos[:, 7:] = torch.arange(length - 7)  # two packed documents per row
    ref = copy.deepcopy(model)
    ref_loss = ref(ids, labels=ids, position_ids=pos).loss
    ref_loss.backward()
    ref_heads = list(kernels.scan_heads)
    kernels.scan_heads.clear()

    par = prepare_nemotron3_parallel(model, Nemotron3ParallelConfig(context_parallel_size=world))
    out = par.model(input_ids=ids, labels=ids, position_ids=pos)
    out.loss.backward()
    par.reduce_gradients()
    worst = max(float((p.grad - q.grad).abs().max()) for p, q in zip(par.base.parameters(), ref.parameters()))
    seams = {type(m.sequence_mixer).__name__ for m in par.base.modules() if isinstance(m, mamba2.Nemotron3Mamba2Mixer)}
    return {"loss_diff": abs(float(par.mean_loss(out.loss)) - float(ref_loss)), "grad_diff": worst,
            "ref_heads": ref_heads, "cp_heads": list(kernels.scan_heads), "conv_calls": kernels.conv_calls,
            "seams": seams, "attn": par.base.config._attn_implementation}


def test_context_parallel_mamba_goes_through_the_sequence_mixer_seam_and_its_kernels():
    results = run_processes(_cp_with_stand_in_kernels, 2, (19,), timeout=150)
    heads = tiny_config("all_blocks").mamba_num_heads
    for r in results:
        assert r["seams"] == {"ContextParallelMamba"}, r["seams"]
        assert r["attn"] == "nemotron3_context_parallel"
        assert r["ref_heads"] and all(h == heads for h in r["ref_heads"])  # one process: all heads per call
        assert r["cp_heads"] and all(h == heads // 2 for h in r["cp_heads"]), r["cp_heads"]  # CP: its half
        assert r["conv_calls"] >= 2 * len(r["ref_heads"])  # the conv kernel too, in both runs
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r


def test_sequence_mixer_seam_is_what_the_mixer_calls():
    """A replaced ``sequence_mixer`` receives the projections of every token and its output feeds the gated norm."""
    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    seen = []

    class Recording(mamba2.Mamba2SequenceMixer):
        def __call__(self, mixer, xbc, dt, state, **kwargs):
            seen.append((mixer.layer_idx, tuple(xbc.shape), tuple(dt.shape), sorted(kwargs)))
            return super().__call__(mixer, xbc, dt, state, **kwargs)

    mixers = [m for m in model.modules() if isinstance(m, mamba2.Nemotron3Mamba2Mixer)]
    for m in mixers:
        m.sequence_mixer = Recording()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    assert [s[0] for s in seen] == [m.layer_idx for m in mixers]
    m = mixers[0]
    assert seen[0][1] == (2, 9, m.conv_dim) and seen[0][2] == (2, 9, m.num_heads)
    assert {"padding_mask", "seq_idx"} <= set(seen[0][3])

    class Zero(mamba2.Mamba2SequenceMixer):
        def __call__(self, mixer, xbc, dt, state, **kwargs):
            return xbc.new_zeros(*xbc.shape[:2], mixer.intermediate_size)

    for m in mixers:
        m.sequence_mixer = Zero()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, ref)  # the seam's output is what the layer uses


class DoubledMLP(nn.Module):
    """A stand-in mixer class for the block table: ``2 * relu(x W)``."""

    pattern_char = "-"  # replaces the `mlp` kind: keeps its letter

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.calls = 0

    def forward(self, x, cache=None, **layer_kwargs):
        self.calls += 1
        assert {"attn_mask", "padding_mask", "seq_idx", "position_ids"} <= set(layer_kwargs)
        return 2 * F.relu(self.proj(x))


def test_block_table_builds_and_calls_each_kind(monkeypatch):
    """`MIXER_TYPES` is the only place a block kind is mapped to its mixer: replacing an entry is enough for the
    model to build and run that class for every layer of the kind."""
    monkeypatch.setitem(blocks.MIXER_TYPES, "mlp", DoubledMLP)
    config = tiny_config("all_blocks", hybrid_override_pattern="M-*E-")
    model = Nemotron3ForCausalLM(config).eval()
    kinds = [type(layer.mixer).__name__ for layer in model.model.layers]
    assert kinds == ["Nemotron3Mamba2Mixer", "DoubledMLP", "Nemotron3Attention", "Nemotron3MoE", "DoubledMLP"]
    ids = torch.randint(3, config.vocab_size, (1, 6))
    with torch.no_grad():
        model(ids)
    assert [layer.mixer.calls for layer in model.model.layers if isinstance(layer.mixer, DoubledMLP)] == [1, 1]


class TokenShiftState(LinearAttentionLayer):
    """The state of a `TokenShiftMixer` layer: the last hidden vector seen, per row."""

    def __init__(self, batch_size: int, hidden: int, dtype: torch.dtype, device) -> None:
        super().__init__(number_of_states=1)
        self.last = torch.zeros(batch_size, hidden, dtype=dtype, device=device)
        self.seen = 0

    def get_seq_length(self) -> int:
        return self.seen


class TokenShiftMixer(nn.Module):
    """A new stateful block kind: ``proj(x_t - x_{t-1} / 2)``, carrying ``x_{t-1}`` across decode steps."""

    pattern_char = "T"

    @staticmethod
    def cache_layer(config, batch_size, dtype, device):
        return TokenShiftState(batch_size, config.hidden_size, dtype, device)

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cache=None, **layer_kwargs):
        state = cache.layers[self.layer_idx] if cache is not None else None
        first = state.last[:, None].to(x.dtype) if state is not None else torch.zeros_like(x[:, :1])
        prev = torch.cat([first, x[:, :-1]], dim=1)
        if state is not None:
            state.last = x[:, -1].detach().clone()
            state.seen += x.shape[1]
        return self.proj(x - 0.5 * prev)


def test_new_stateful_block_kind_is_one_table_entry_and_its_class(monkeypatch, tmp_path):
    """A block kind the package does not know, with its own cache state, needs only its `MIXER_TYPES` entry and
    its mixer class (which names its pattern letter and its cache layer): the config parses and round-trips the
    letter, the model builds it, and cached greedy generation equals recomputing every prefix without a cache."""
    from transformers_nemotron3 import Nemotron3Config

    try:
        tiny_config("all_blocks", hybrid_override_pattern="MT*E")
        raise AssertionError("an unknown pattern letter must be refused")
    except ValueError as err:
        assert "'T'" in str(err)
    monkeypatch.setitem(blocks.MIXER_TYPES, "token_shift", TokenShiftMixer)
    config = tiny_config("all_blocks", hybrid_override_pattern="MT*ET")
    assert config.layers_block_type == ["linear_attention", "token_shift", "full_attention", "moe", "token_shift"]
    config.save_pretrained(tmp_path)
    assert Nemotron3Config.from_pretrained(tmp_path).hybrid_override_pattern == "MT*ET"

    torch.manual_seed(0)
    model = Nemotron3ForCausalLM(config).eval()
    assert [type(layer.mixer).__name__ for layer in model.model.layers].count("TokenShiftMixer") == 2
    ids = torch.randint(3, config.vocab_size, (2, 5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
        seq = ids
        for _ in range(6):  # no cache: every prefix from scratch
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    cache = out.past_key_values
    assert isinstance(cache.layers[1], TokenShiftState) and cache.layers[1].seen == 5 + 6 - 1
    assert torch.equal(out.sequences, seq)

    class NoLetter(TokenShiftMixer):
        pattern_char = "M"  # taken by Mamba-2

    monkeypatch.setitem(blocks.MIXER_TYPES, "token_shift", NoLetter)
    try:
        tiny_config("all_blocks", hybrid_override_pattern="M*E")
        raise AssertionError("a letter used twice must be refused")
    except ValueError as err:
        assert "'token_shift'" in str(err) and "NoLetter" in str(err)
