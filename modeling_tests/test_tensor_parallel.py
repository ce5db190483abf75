"""`from_pretrained(..., tp_plan="auto")` shards the model with transformers' own tensor parallelism (the plans are
native NemotronH's): 2 gloo processes on CPU give the single-process logits."""

from __future__ import annotations

import torch
from tiny_configs import randomize, tiny_config

from transformers_nemotron3 import Nemotron3ForCausalLM
from transformers_nemotron3.parallel.spawn import run_processes

X = torch.arange(3, 13)[None]


def _rank(rank: int, world: int, folder: str) -> dict:
    from transformers import DistributedConfig

    model = Nemotron3ForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto"))
    with torch.no_grad():
        logits = model(X).logits
    q = model.model.layers[1].mixer.q_proj.weight
    return {"logits": logits.numpy(), "q_type": type(q).__name__, "q_local": tuple(q.to_local().shape)}


def test_tp_plan_auto_on_two_processes_equals_one(tmp_path):
    model = Nemotron3ForCausalLM(tiny_config("all_blocks")).eval()
    randomize(model)
    model.save_pretrained(tmp_path / "ck")
    with torch.no_grad():
        expected = model(X).logits
    for out in run_processes(_rank, 2, args=(str(tmp_path / "ck"),), timeout=240):
        assert out["q_type"] == "DTensor"
        assert out["q_local"] == (model.config.num_attention_heads * model.config.head_dim // 2,
                                  model.config.hidden_size)  # colwise: half the query heads per rank
        assert torch.allclose(torch.from_numpy(out["logits"]), expected, atol=1e-5)
