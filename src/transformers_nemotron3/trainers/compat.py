"""Two small workarounds between the Nemotron 3 model and TRL 1.16 / transformers 5.24.

Both are reported to the model owners; when the model gains the fix these become no-ops.

* TRL's trainers write ``config.router_aux_loss_coef``; our config exposes it as a read-only alias of
  ``moe_aux_loss_coef``. :func:`writable_router_aux_loss_coef` lends the alias a setter while TRL's
  ``__init__`` runs.
* transformers 5.24's ``Trainer`` enables checkpointing through ``activation_checkpointing_enable``, which
  calls ``_set_gradient_checkpointing(..., every_n_layers=...)``; the model's override takes only
  ``(enable, gradient_checkpointing_func)``. :func:`enable_gradient_checkpointing` calls the model's hook
  directly, and the trainers then tell ``Trainer`` that checkpointing is already handled.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import partial

from torch.utils.checkpoint import checkpoint

__all__ = ["writable_router_aux_loss_coef", "enable_gradient_checkpointing", "prepare_model_for_trl"]


@contextlib.contextmanager
def writable_router_aux_loss_coef(config):
    cls = type(config)
    original = cls.__dict__.get("router_aux_loss_coef")
    patch = isinstance(original, property) and original.fset is None
    if patch:
        cls.router_aux_loss_coef = property(
            original.fget, lambda self, value: setattr(self, "moe_aux_loss_coef", float(value)))
    try:
        yield
    finally:
        if patch:
            cls.router_aux_loss_coef = original


def enable_gradient_checkpointing(model, kwargs: dict | None = None) -> bool:
    """Turn on per-block activation checkpointing; returns True when the model's own hook was used."""
    hook = getattr(model, "_set_gradient_checkpointing", None)
    if hook is None or "every_n_layers" in inspect.signature(hook).parameters:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return False
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    hook(True, partial(checkpoint, **kwargs))
    return True


def prepare_model_for_trl(model, args):
    """Apply the checkpointing workaround; returns the context manager to wrap TRL's ``__init__`` in."""
    if isinstance(model, str):
        return contextlib.nullcontext()
    wanted = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    if wanted and enable_gradient_checkpointing(model, kwargs):
        # done; Trainer would take the incompatible path
        args.activation_checkpointing = args.gradient_checkpointing = False
    return writable_router_aux_loss_coef(model.config)
