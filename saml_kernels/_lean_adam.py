"""``LeanAdam``: ``torch.optim.Adam(fused=True)`` whose ``step()`` calls torch's fused kernel directly on the CPU.

Math (torch's Adam, bitwise: the same kernel ``torch._fused_adam_`` with the same arguments), per parameter p with
gradient g at step t (t counted per parameter, kept in ``state["step"]``):

    m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2          (g += weight_decay p first)
    p -= lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

Why: on a small batch the dense step is a few hundred microseconds of kernel, and ``Adam.step``'s Python around it
(hook wrappers, ``_init_group``, grouping by device and dtype, per-step flag checks) costs about half as much again
on the 2-core CPU (benchmarks/results/step_latency_cpu2.md measures the whole training step).

``zero_grad()`` (set_to_none, the default) sets every gradient to None without the profiler span around it.

Contract: an ``Adam`` in every way a user sees (``isinstance``, param groups, ``state_dict``, LR schedulers, hooks).
The direct call runs only when it is exactly what ``Adam.step`` would run: no closure, no step hooks (global or
this optimizer's), every group fused, not capturable / amsgrad / differentiable / decoupled weight decay, float
betas and a float (or CPU tensor) lr, every parameter with a gradient a dense CPU tensor of one dtype whose Adam
state exists (so the first step, which creates the state, goes through ``Adam.step``). Anything else calls
``Adam.step`` itself.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer

__all__ = ["LeanAdam"]


class LeanAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (construct it with ``fused=True``) with a direct-call fast path in ``step()`` (module
    docstring: when it applies; bitwise the same result as ``Adam.step``)."""

    def _fast_lists(self):
        """Per group: (params, grads, exp_avgs, exp_avg_sqs, steps, group) for the direct call, or None when
        ``Adam.step`` must run."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _optimizer._global_optimizer_pre_hooks or _optimizer._global_optimizer_post_hooks):
            return None
        out, dtype = [], None
        for group in self.param_groups:
            if (not group.get("fused") or group["capturable"] or group["amsgrad"] or group["differentiable"]
                    or group.get("decoupled_weight_decay", False)):
                return None
            b1, b2 = group["betas"]
            lr = group["lr"]
            if isinstance(b1, Tensor) or isinstance(b2, Tensor) or (isinstance(lr, Tensor) and lr.device.type != "cpu"):
                return None
            ps, gs, ms, vs, ts = [], [], [], [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or p.device.type != "cpu" or (dtype is not None and p.dtype != dtype):
                    return None
                dtype = p.dtype
                st = self.state.get(p)
                if not st or "exp_avg" not in st:
                    return None
                ps.append(p), gs.append(g), ms.append(st["exp_avg"]), vs.append(st["exp_avg_sq"])
                ts.append(st["step"])
            out.append((ps, gs, ms, vs, ts, group))
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad`` without its profiler span: set_to_none (the default) drops every gradient."""
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        return None

    def step(self, closure=None):
        lists = self._fast_lists() if closure is None else None
        if lists is None:
            return super().step(closure)
        with torch.no_grad():
            for ps, gs, ms, vs, ts, group in lists:
                if not ps:
                    continue
                b1, b2 = group["betas"]
                torch._foreach_add_(ts, 1)
                torch._fused_adam_(ps, gs, ms, vs, [], ts, amsgrad=False, lr=group["lr"], beta1=b1, beta2=b2,
                                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                                   grad_scale=None, found_inf=None)
        return None


# Optimizer.__init__ wraps a class's step() in its profiling / hook wrapper unless the function is marked "hooked";
# the fast path checks the hooks itself and hands every hooked call to Adam.step (which is wrapped), so the
# wrapper's cost is left out here.
LeanAdam.step.hooked = True
