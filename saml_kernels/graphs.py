"""CUDA-graph capture of a whole training step: the fast path when launches and host syncs, not math, bound the
step (small and medium batches on a GPU).

    model = nn.SAML(cfg, embedding_optimizer="rowwise_adagrad").cuda()
    opt = nn.TrainingOptimizer(model, capturable=True)
    step = CapturedTrainingStep(model, opt, example_inputs, loss_fn=lambda m, *t: ...)  # warm-up + capture
    for inputs in loader:
        loss = step(*inputs)          # copy into the static inputs, one graph replay: forward, backward, the
                                      # fused embedding update and the dense optimizer step

Contract:
- every replay's tensors have the example's shapes, dtypes and device (jagged inputs: keep nnz fixed, e.g. pad
  bags with a padding id of per-sample weight 0, or capture one graph per nnz bucket);
- the value checks run in capture-safe mode (``saml_kernels.ops._checks``): no host sync, bad inputs are counted
  on the device (one count per failing check call), made safe, and the fused embedding update of such a step is
  skipped in every fused layer of the model (the model's forward snapshots the counters before its first
  check); call ``saml_kernels.raise_errors()`` now and then (one sync) to surface them;
- one backward per step: the fused embedding update runs in each backward (see ``nn.ScenarioEmbedding``);
- the warm-up steps (``warmup``, on the example inputs, on a side stream as torch requires) are real training
  steps; the capture itself changes nothing;
- hyper-parameters: the fused embedding optimizer's lr / weight_decay (``ScenarioEmbedding.fused_optimizer``) are
  read on the device at every replay, so schedulers work; a torch optimizer built with ``capturable=True`` keeps
  its lr as the value at capture unless given as a tensor.

What cannot be captured (a host read of device data: the sizes of what follows depend on the data), and is refused
with a ValueError before the capture begins (never a CUDA error in the middle of it):
- a ``ScenarioEmbedding`` with mixed pooling (consecutive features pooled differently, e.g. "sum" and "none"): each
  run of features gets its own slice of the ids, whose bounds are offsets values (refused when the step is built,
  before the warm-up: :func:`capture_blockers`); use one pooling per layer (two layers for two poolings);
- a ``KeyedJaggedTensor`` holding keys the layer has no feature for: the layer's entries are a data-dependent part
  of the values (refused after the warm-up, which records it). A KJT with exactly the layer's keys in another order
  is reordered on the device and captures;
- the ``triton`` embedding backend when its tables train: its backward reads segment sizes on the host (refused
  when the step is built; the ``cuda`` backend, the automatic choice on CUDA, is sync-free).
Layer code calls :func:`host_read` just before such a read: inside a capture it raises a clear error, and during
the warm-up of a ``CapturedTrainingStep`` it records what read the host.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .ops import _checks

__all__ = ["CapturedTrainingStep", "capture_blockers", "host_read"]

_local = threading.local()


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA-graph capture is under way on the current stream and ``device`` is a CUDA device."""
    return _checks._capturing(device)


def host_read(what: str, device: torch.device) -> None:
    """To be called just before a host read of data on ``device`` (``.tolist()``, ``int(t)`` ...) that a
    CUDA-graph capture cannot contain. ``what``: the input that needs it and how to avoid it. Raises RuntimeError
    inside a capture (instead of the CUDA error the read would give); records ``what`` while
    :func:`record_host_reads` is active (a ``CapturedTrainingStep``'s warm-up); otherwise does nothing."""
    log = getattr(_local, "host_reads", None)
    if log is not None and what not in log:
        log.append(what)
    if _capturing(torch.device(device)):
        raise RuntimeError(f"saml_kernels: {what}: a CUDA-graph capture cannot contain this host read "
                           "(saml_kernels/graphs.py lists what cannot be captured)")


@contextlib.contextmanager
def record_host_reads():
    """Collects the ``what`` of every :func:`host_read` inside (this thread); yields the list."""
    prev = getattr(_local, "host_reads", None)
    _local.host_reads = log = []
    try:
        yield log
    finally:
        _local.host_reads = prev


def capture_blockers(model: nn.Module) -> list[str]:
    """What in ``model`` cannot be captured, known without running it: every submodule's ``capture_blockers()``
    (e.g. ``ScenarioEmbedding``: mixed pooling, the triton backend), prefixed with its name. Empty when nothing
    static blocks a capture (the data can still: see the module docstring)."""
    found = []
    for name, m in model.named_modules():
        f = getattr(m, "capture_blockers", None)
        if callable(f):
            found += [f"{name or type(m).__name__}: {why}" for why in f()]
    return found


class CapturedTrainingStep:
    """A training step ``loss = loss_fn(model, *inputs); loss.backward(); optimizer.step()`` captured in one
    ``torch.cuda.CUDAGraph`` and replayed per batch (see the module docstring for the contract).

    Args:
        model: a module on a CUDA device (train mode).
        optimizer: anything with ``zero_grad(set_to_none=...)`` and a capturable ``step()`` (``TrainingOptimizer
            (model, capturable=True)``, a torch optimizer with ``capturable=True``), or None when the model's
            only update is a fused embedding optimizer.
        example_inputs: tensors of one batch on the model's device; their shapes are the graph's.
        loss_fn: ``(model, *inputs) -> 0-dim loss``; e.g. ``lambda m, *t: saml_loss(*m(*t[:-1]), t[-1], 0.3)``.
        warmup: eager steps on the example before the capture (real steps; at least 1 so that lazily created
            state, e.g. optimizer moments and cached layout tensors, exists before the capture).

    Calling the step copies the new inputs into the static ones, replays, and returns the static loss tensor
    (read it with ``float(loss)`` only when needed: that is a sync).
    """

    def __init__(self, model: nn.Module, optimizer, example_inputs: Sequence[Tensor],
                 loss_fn: Callable[..., Tensor], warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CapturedTrainingStep needs a CUDA device (CUDA graphs)")
        inputs = tuple(example_inputs)
        for k, t in enumerate(inputs):
            if not isinstance(t, Tensor) or t.device.type != "cuda":
                raise ValueError(f"CapturedTrainingStep: example_inputs[{k}] must be a CUDA tensor, got "
                                 f"{type(t).__name__ if not isinstance(t, Tensor) else t.device}")
        if warmup < 1:
            raise ValueError(f"CapturedTrainingStep: warmup must be >= 1, got {warmup}")
        blockers = capture_blockers(model)
        if blockers:
            raise ValueError("CapturedTrainingStep: this model cannot be captured in a CUDA graph (host reads of "
                             "device data, see saml_kernels/graphs.py): " + "; ".join(blockers))
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn
        self.static_inputs = tuple(t.clone() for t in inputs)
        device = inputs[0].device
        _checks.prepare_capture_safe(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), _checks.capture_safe_checks(), record_host_reads() as reads:
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        if reads:
            raise ValueError("CapturedTrainingStep: the warm-up step read device data on the host, which a CUDA "
                             "graph cannot capture (see saml_kernels/graphs.py): " + "; ".join(reads))
        self.graph = torch.cuda.CUDAGraph()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph), _checks.capture_safe_checks():
            self.static_loss = self._step(zero=False)

    def _step(self, zero: bool = True) -> Tensor:
        if zero and self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, *self.static_inputs)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach()

    def __call__(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"CapturedTrainingStep: expected {len(self.static_inputs)} input tensors, got {len(inputs)}")
        for k, (dst, src) in enumerate(zip(self.static_inputs, inputs)):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"CapturedTrainingStep: input {k} is {src.dtype} {tuple(src.shape)} but the graph "
                                 f"was captured with {dst.dtype} {tuple(dst.shape)}")
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.static_loss
