"""The eager path of the package's custom ops: the same Python body, without the dispatcher round trip.

Why: a ``torch.library.custom_op`` call in eager mode goes dispatcher -> the generated autograd kernel -> a
generated ``autograd.Function`` -> redispatch -> ``fill_defaults`` -> the body behind torch.compile's
``disable`` wrapper. On the CPU that costs about 60 us per forward call and again per backward call, as much as
the whole grouped GEMM of a [64, 256] x [256, 128] layer: at B = 64 a SAML training step spent more time in
that machinery than in its kernels (``benchmarks/results/step_latency_cpu2.md``).

Contract. :func:`custom_op` defines the op exactly as ``torch.library.custom_op`` does (the returned
:class:`EagerOp` forwards ``register_fake`` / ``register_autograd`` to it; graphs, ``torch.export`` and
``torch.compile`` see only the custom op) and calling the :class:`EagerOp`

- in *plain eager mode* (:func:`plain_eager`) runs the op's own function: directly when no input needs a
  gradient (or grad mode is off), else through one ``torch.autograd.Function`` whose forward is that function
  and whose ``setup_context`` / ``backward`` are the ones given to ``register_autograd``. The same code runs as
  in the custom op, so results are bitwise those of the dispatcher path (``tests/test_eager_ops.py``).
  Backwards are ``once_differentiable``: the custom ops have no double backward either (both raise on one).
- otherwise goes through the dispatcher (``torch.ops.saml_kernels.<name>``): under ``torch.compile`` /
  ``torch.export`` / ``jit.trace`` / ``make_fx``, under any torch-function or torch-dispatch mode (FakeTensor,
  functionalization, ``with torch.device(...)``), inside functorch transforms (vmap, grad), for tensor
  subclasses (DTensor, FakeTensor), under ``torch.autocast`` on the inputs' device (the policies of
  ``ops/_autocast.py`` are dispatcher kernels), and for an op without autograd (the backward ops) when a graph
  is being built (the custom op then raises its "no autograd formula" error, as before).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["EagerOp", "bind_graph", "custom_op", "plain_eager"]

_PLAIN = (Tensor, torch.nn.Parameter)


def plain_eager(args: tuple) -> bool:
    """True when a call with ``args`` may skip the dispatcher: no compile / export / trace / mode / transform is
    active, every tensor argument is a plain ``Tensor`` or ``Parameter``, and autocast is off on their device.
    About 2 us."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if torch._C._is_torch_function_mode_enabled() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    device = None
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN:
                return False
            if device is None:
                device = a.device.type
    return device is None or not torch.is_autocast_enabled(device)


def _needs_graph(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


class EagerOp:
    """A custom op (``self.op``, the ``torch.library`` CustomOpDef) with the eager path of the module docstring."""

    def __init__(self, op, fn: Callable):
        self.op = op
        self._fn = fn
        self._function: Optional[type] = None

    @property
    def graph_callable(self) -> Callable:
        """A plain function calling this op (what :func:`bind_graph` puts in a graph: FX names its targets by
        ``__module__`` / ``__name__``)."""
        def call(*args):
            return self(*args)

        call.__name__ = call.__qualname__ = "eager_" + self.op._name.split("::")[-1]
        call.__module__ = __name__
        return call

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Registers the formula on the custom op and builds the eager ``autograd.Function`` from the same two
        functions (``ctx.needs_input_grad`` / ``ctx.saved_tensors`` mean the same in both)."""
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        # forward(ctx, *args) calls setup_context itself: a Function with a separate setup_context staticmethod
        # binds its arguments through inspect.signature on every apply (tens of us)
        def forward(ctx, *args):
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        @once_differentiable
        def bwd(ctx, *grads):
            return backward(ctx, *grads)

        self._function = type(f"Eager_{self.op._name.replace('::', '_')}", (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(bwd)})

    def __call__(self, *args):
        if plain_eager(args):
            if not _needs_graph(args):
                return self._fn(*args)
            if self._function is not None:
                return self._function.apply(*args)
        return self.op(*args)


_REGISTRY: dict = {}  # "saml_kernels::<name>" -> its EagerOp


def bind_graph(gm: torch.fx.GraphModule) -> int:
    """Points every call of a package custom op (``torch.ops.saml_kernels.<name>.default``, positional
    arguments) in ``gm`` at the op's :class:`EagerOp`, so a loaded exported program runs its ops' bodies as an
    eager model does (plain eager: no dispatcher round trip; anything else: the custom op, as before). The values
    are the same: the graph fixes every argument, the EagerOp runs the body the custom op would run. Returns the
    number of calls bound (``gm`` is recompiled when there are any)."""
    bound = 0
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or node.kwargs:
            continue
        op = _REGISTRY.get(target._schema.name) if target._overloadname == "default" else None
        if op is not None:
            node.target = op.graph_callable
            bound += 1
    if bound:
        gm.recompile()
    return bound


def custom_op(name: str, *, mutates_args=()) -> Callable[[Callable], EagerOp]:
    """``torch.library.custom_op(name, mutates_args=...)`` returning an :class:`EagerOp`. Only for ops that mutate
    nothing and take positional arguments (every op of this package)."""
    if mutates_args != ():
        raise ValueError(f"ops._eager.custom_op: {name} mutates {mutates_args}; the eager path is for pure ops only")

    def wrap(fn: Callable) -> EagerOp:
        op = _REGISTRY[name] = EagerOp(torch.library.custom_op(name, mutates_args=())(fn), fn)
        return op

    return wrap
