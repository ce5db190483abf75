"""The state handed from stage to stage, each stage's result, and the progress bar of a training stage."""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .sizes import QuickstartSize

__all__ = ["QuickstartContext", "StageResult", "StageProgress", "quiet_trainer"]


@dataclass
class StageResult:
    """What one stage did.

    Attributes:
        name: the stage.
        status: ``"ok"``, ``"FAILED"`` or ``"skipped (...)"``.
        metrics: numbers for the summary (``loss_before``, ``loss_after``, ``reward/<env>``, ...).
        message: one line: what the stage showed, or why its check failed.
        seconds, cpu_seconds: wall and CPU time of the stage (CPU time counts every thread of this process).
        raised: the stage stopped with an exception (its successors are not run).
    """

    name: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    raised: bool = False

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"


@dataclass
class QuickstartContext:
    """Run-wide settings and the artefacts stages pass on (the tokenizer, the current model, the saved folder).

    Attributes:
        out: the output directory; stage ``s`` writes its curves and logs under ``out/s``.
        size, size_name: shapes and step counts (``--size``).
        seed: seed of every random draw.
        nvfp4: continued pretraining with NVFP4 emulation (``--nvfp4``).
        no_train: stages whose training is skipped (``--no-train``), to see their checks fail.
        tokenizer, dense, model: set by the stages that make them.
        saved: the folder the ``save`` stage wrote (the model, its remote code, the tokenizer).
        results: the results of the stages run so far.
    """

    out: str
    size: QuickstartSize
    size_name: str = "tiny"
    seed: int = 0
    nvfp4: bool = False
    no_train: frozenset[str] = frozenset()
    tokenizer: Any = None
    dense: Any = None
    model: Any = None
    saved: str | None = None
    results: list[StageResult] = field(default_factory=list)

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.out, name)
        os.makedirs(path, exist_ok=True)
        return path

    def steps(self, stage: str, steps: int) -> int:
        """Optimizer steps of a training stage: ``steps``, or 0 under ``--no-train``."""
        return 0 if stage in self.no_train else steps


class StageProgress(TrainerCallback):
    """One tqdm bar per training stage, with the latest logged values of ``keys`` (names or globs such as
    ``env/*/reward``) in its postfix. It replaces the Trainer's own bar and log printing, so each stage is
    one line on the terminal."""

    def __init__(self, desc: str, keys: tuple[str, ...] = ("loss",)) -> None:
        self.desc, self.keys, self.bar = desc, keys, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True, leave=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k.removeprefix("env/").removesuffix("/reward"): f"{v:.3f}" for k, v in (logs or {}).items()
                 if isinstance(v, float) and (k in self.keys or any(fnmatchcase(k, key) for key in self.keys))}
        if self.bar is not None and shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def quiet_trainer(trainer, progress: StageProgress):
    """Swap the Trainer's printing callbacks for ``progress``; returns the trainer."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(progress)
    return trainer
