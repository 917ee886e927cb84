"""Serving a trained ``nn.SAML``: ``torch.export`` with a dynamic batch dimension, and AOTInductor packages.

The exported graph holds the package's custom ops (``torch.ops.saml_kernels.*``, traced through their fake
implementations) and plain ATen ops around them; the parameters and the table layout are lifted into the
artifact. The backend every op resolved to while tracing (``"cpu"``, ``"cuda"``, ...) is baked into the graph as
an argument, so export on the device (and backend) you serve on.

What the serving process needs: ``import saml_kernels`` before loading (it registers the custom ops, and the
``"cpu"`` / ``"cuda"`` backends need the compiled extension ``saml_kernels._C``, which the import loads). This
holds for both artifacts: an exported program (``load_exported``) runs the ops through the dispatcher, and an
AOTInductor package (``load_aoti``) calls them through its proxy executor by their schema name.

Inputs (the positional inputs of ``SAML.forward``, a ``saml_kernels.data.Batch``'s ``inputs()``)::

    indices [nnz] int64, offsets [F*B + 1] int64, scenario [B] int64,
    seq_ids [B, L] int64 | None, seq_lengths [B] int64 | None, dense [B, num_dense] float32 | None

B (``batch``) and nnz are dynamic; F, L and the widths are fixed by the config. Outputs: (main [B], aux [B])
logits, as the eager model in ``eval()`` mode (dropout off). Input value checks (ids, offsets, scenario ids) run
inside each custom op when the graph runs, one host read per op (free on the CPU); a bad id raises the op's
error as in eager mode. The sequence lengths are checked with a device-side assert.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["export_saml", "save_exported", "load_exported", "aoti_package", "load_aoti", "dynamic_shapes",
           "example_inputs", "sigmoid_scores"]


def example_inputs(batch) -> tuple:
    """The model's positional inputs from a ``saml_kernels.data.Batch`` (its ``inputs()``) or a tuple of six."""
    inputs = tuple(batch.inputs()) if hasattr(batch, "inputs") else tuple(batch)
    if len(inputs) != 6:
        raise ValueError("serving: the example batch must be a saml_kernels.data.Batch or the 6 inputs (indices, "
                         f"offsets, scenario, seq_ids, seq_lengths, dense) of SAML.forward, got {len(inputs)}")
    return inputs


def dynamic_shapes(model, inputs: Sequence, *, min_batch: int = 1) -> tuple:
    """``torch.export`` dynamic shapes of ``SAML.forward``: one ``batch`` dimension shared by every per-sample
    input (offsets = F * batch + 1), and a free ``nnz`` for the ids."""
    from torch.export import Dim

    F = len(model.config.features)
    batch = Dim("batch", min=min_batch)
    per_sample = lambda t: None if t is None else {0: batch}  # noqa: E731
    indices, offsets, scenario, seq_ids, seq_lengths, dense = inputs
    return ({0: Dim("nnz", min=0)}, {0: F * batch + 1}, {0: batch}, per_sample(seq_ids), per_sample(seq_lengths),
            per_sample(dense))


def _size_oblivious():
    """Export without the 0/1 specialisation of the batch size where this torch can (a batch of 1 then runs on
    the same artifact); a no-op on a torch without the switch."""
    cfg = getattr(getattr(torch.fx, "experimental", None), "_config", None)
    if cfg is not None and hasattr(cfg, "backed_size_oblivious"):
        return cfg.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _clear_layout_cache():
    # scenario_embedding_bag caches the table-layout tensors per (layout, device); tensors made while tracing
    # are fake, so they must not outlive the trace (the next eager call would get them).
    from .ops import scenario_embedding_bag as _seb

    _seb._layout_cached.cache_clear()  # belt and braces: table_layout itself no longer caches while tracing


def export_saml(model, example_batch, path: Optional[Union[str, os.PathLike]] = None, *,
                min_batch: int = 1) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``model`` (an ``nn.SAML`` or ``nn.SharedBottom``) for inference.

    Args:
        model: the trained model; traced in ``eval()`` mode (its mode is restored afterwards).
        example_batch: a ``saml_kernels.data.Batch`` (or its ``inputs()`` tuple) on the serving device, with
            B >= 2 samples (a batch of 2 or more keeps the traced shapes general).
        path: where to write the program (``torch.export.save``, ``.pt2``); None writes nothing.
        min_batch: smallest batch size the artifact accepts (1 by default). Where the trace cannot keep B = 1
            general (a model whose ops need B != 1 to decide a memory layout), the export is retried with
            ``min_batch = 2`` and a warning says so.

    Returns:
        the ``ExportedProgram``; ``program.module()(*inputs) -> (main [B], aux [B])`` logits (see the module
        docstring for the inputs). The batch dimension is dynamic: any B >= min_batch runs on it.
    """
    inputs = example_inputs(example_batch)
    was_training = model.training
    model.eval()
    try:
        _clear_layout_cache()
        try:
            with _size_oblivious():
                program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(model, inputs,
                                                                                          min_batch=min_batch))
        except torch._dynamo.exc.UserError as exc:  # a constraint violation: B = 1 specialised away
            if min_batch != 1 or "!= 1" not in str(exc):
                raise
            warnings.warn("serving.export_saml: this model's trace needs B != 1 (a layout decision on a [B, ...] "
                          "slice); the artifact accepts batches of 2 or more", RuntimeWarning, stacklevel=2)
            _clear_layout_cache()
            with _size_oblivious():
                program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(model, inputs,
                                                                                          min_batch=2))
    finally:
        _clear_layout_cache()
        model.train(was_training)
    if path is not None:
        save_exported(program, path)
    return program


def save_exported(program, path: Union[str, os.PathLike]) -> str:
    """Writes an ``ExportedProgram`` to ``path`` (``torch.export.save``); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(program, path)
    return path


def load_exported(path: Union[str, os.PathLike]) -> torch.nn.Module:
    """Loads a program written by ``export_saml`` / ``save_exported``: a module whose call
    ``(indices, offsets, scenario, seq_ids, seq_lengths, dense) -> (main [B], aux [B])`` runs the graph.
    Needs the custom ops: this module imports ``saml_kernels`` (and so its compiled extension) first."""
    import saml_kernels  # noqa: F401  (registers torch.ops.saml_kernels.* before the graph is deserialised)

    return torch.export.load(os.fspath(path)).module()


def _check_aoti():
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        raise RuntimeError(f"serving: AOTInductor packages need torch >= 2.6 (aoti_compile_and_package), this is "
                           f"torch {torch.__version__}")


def aoti_package(program, package_path: Union[str, os.PathLike]) -> str:
    """Compiles an ``ExportedProgram`` (or the path of a saved one) with AOTInductor into ``package_path``
    (``.pt2``); returns the path. The package holds a compiled shared library of the graph's ATen part; our
    custom ops stay calls into the dispatcher, so ``load_aoti`` needs ``saml_kernels`` importable (with its
    extension ``saml_kernels._C`` for the cpu/cuda backends). Compiling takes a C++ compiler and tens of seconds
    on a CPU (see docs/design.md section 10)."""
    _check_aoti()
    if isinstance(program, (str, os.PathLike)):
        import saml_kernels  # noqa: F401

        program = torch.export.load(os.fspath(program))
    package_path = os.fspath(package_path)
    os.makedirs(os.path.dirname(os.path.abspath(package_path)), exist_ok=True)
    return torch._inductor.aoti_compile_and_package(program, package_path=package_path)


def load_aoti(package_path: Union[str, os.PathLike]):
    """Loads an AOTInductor package written by ``aoti_package``: a callable with the exported program's inputs
    and outputs. Imports ``saml_kernels`` first (the package calls its custom ops)."""
    _check_aoti()
    import saml_kernels  # noqa: F401

    return torch._inductor.aoti_load_package(os.fspath(package_path))


def sigmoid_scores(fn, batch) -> tuple[Tensor, Tensor]:
    """Runs ``fn`` (a loaded program or package, or the eager model in ``eval()``) on a batch without autograd:
    the click probabilities (sigmoid(main) [B], sigmoid(aux) [B])."""
    with torch.no_grad():
        main, aux = fn(*example_inputs(batch))
    return torch.sigmoid(main), torch.sigmoid(aux)
