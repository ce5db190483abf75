"""Dual-way gradient sparsification (DGS) with SAMomentum for asynchronous data-parallel training.

Yan et al., "Dual-Way Gradient Sparsification for Asynchronous Distributed Deep Learning",
ICPP 2020 (arXiv 1910.10929). One server rank keeps the global model and, per worker, the model
that worker holds; workers send the top fraction of their SAMomentum velocity, the server replies
with the top fraction of the model difference. See docs/dgs.md.

Public API::

    from transformers_nemotron3.dgs import DGSConfig, train_dgs, launch_local
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DGSConfig
from .launch import RankFailure, free_port, launch_local
from .layout import FlatLayout
from .protocol import DGSPeerLostError, DGSTimeoutError
from .samomentum import SAMomentum
from .schedules import StepDecay, WarmupCosine
from .server import DGSServer, ServerResult
from .sparse import decode_sparse, encode_sparse, layer_k, payload_bytes, select_topk, topk_count
from .train import DGSResult, causal_lm_loss, train_dgs, train_nemotron3_dgs
from .worker import DGSWorker, WorkerResult

__all__ = [
    "DGSConfig", "DGSPeerLostError", "DGSResult", "DGSServer", "DGSTimeoutError", "DGSWorker", "FlatLayout",
    "RankFailure", "SAMomentum", "ServerResult", "StepDecay", "WarmupCosine", "WorkerResult", "causal_lm_loss",
    "decode_sparse", "encode_sparse", "free_port", "launch_local", "layer_k", "load_checkpoint",
    "payload_bytes", "save_checkpoint", "select_topk", "topk_count", "train_dgs", "train_nemotron3_dgs",
]
