"""Build our model and transformers' native NemotronHForCausalLM with the same weights."""

from __future__ import annotations

import torch
from tiny_configs import native_config, tiny_config
from transformers import NemotronHForCausalLM

from transformers_nemotron3 import Nemotron3ForCausalLM


def native_pair(name: str = "all_blocks", attn: str = "eager", **overrides):
    """(ours, native) in eval mode, fp32, identical weights (native drops the MTP head)."""
    cfg = tiny_config(name, **overrides)
    ours = Nemotron3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases and routing so that parity means something
        for n, p in ours.named_parameters():
            if n.endswith("norm.weight") or n.endswith("norm_f.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            if n.endswith("e_score_correction_bias"):
                p.normal_(0, 0.02)
        for n, b in ours.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.02)
    ncfg = native_config(cfg)
    ncfg._attn_implementation = attn
    native = NemotronHForCausalLM(ncfg).eval()
    state = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v
             for k, v in ours.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = native.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ours.config._attn_implementation = attn
    return ours, native
