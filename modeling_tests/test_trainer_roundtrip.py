"""transformers' plain `Trainer` saves and restores every parameter of the model exactly.

Trainer writes checkpoints with ``save_pretrained`` (the official layout: ``backbone.*``, one tensor per routed
expert) and reads them back with ``load_state_dict(strict=False)``, which applies no conversion mapping; the
model's load_state_dict hook must turn the official layout back into its fused parameters, or the experts would
silently keep their initial values.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from tiny_configs import randomize, tiny_config
from transformers_nemotron3 import Nemotron3ForCausalLM


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, 96, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def _model(seed: int) -> Nemotron3ForCausalLM:
    torch.manual_seed(seed)
    model = Nemotron3ForCausalLM(tiny_config("latent_groups_mtp", moe_bias_update_rate=0.0))
    randomize(model, seed=seed)
    return model


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=6, save_steps=3,
                save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    data = _Tokens()
    full = Trainer(model=_model(0), args=_args(tmp_path / "full"), train_dataset=data)
    full.train()
    expected = _params(full.model)

    # a different initialisation: everything must come from the checkpoint, experts included
    resumed = Trainer(model=_model(1), args=_args(tmp_path / "full"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    got = _params(resumed.model)
    assert set(got) == set(expected)
    assert any(".experts." in k for k in got)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_load_best_model_at_end_restores_every_parameter(tmp_path):
    data = _Tokens()
    args = _args(tmp_path / "best", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=None)
    trainer = Trainer(model=_model(0), args=args, train_dataset=data, eval_dataset=_Tokens(8, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    reference = Nemotron3ForCausalLM.from_pretrained(best)
    ref = _params(reference)
    got = _params(trainer.model)
    for key in ref:
        assert torch.equal(got[key], ref[key].to(got[key].dtype)), key
