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
logits, as the eager model in ``eval()`` mode (dropout off).

8-bit tables: ``export_saml(..., table_dtype="uint8")`` exports the model with its embedding tables as FBGEMM's
fused 8-bit row-wise rows (``saml_kernels.quantized``; each element within scale / 2 of its float value), looked up
by ``saml_kernels::scenario_embedding_bag_8bit``; loading and the input contract are the same.

Bad inputs. ``load_exported`` returns a :class:`ServedProgram`: before the graph it runs the eager model's input
contract (saved beside the program by ``export_saml``): the shape and dtype checks of ``check_model_inputs`` and
of the embedding op's entry, the scenario range named by the model, and it casts ``dense`` to the dense dtype as
the eager model does. Inside the graph the embedding op checks its ids and offsets as in eager mode (the other
ops trust the scenario check made before the graph, as they trust the eager model's boundary), and a
sequence length outside [0, L] is re-raised as the eager ValueError. So each bad input raises the eager model's
exception type and message (``tests/test_serving.py`` compares them one by one). What still differs, and why:

- the sequence length L is fixed when exporting (the trace specialises it); eager takes any L >= 1, the served
  program raises ValueError naming the exported L; likewise a program that ``export_saml`` had to export for
  B >= 2 (it warns) raises ValueError for B = 1;
- ``load_aoti`` of a package from ``aoti_package`` (which stores the contract in it) is a ``ServedProgram`` too,
  and gives back the op's exception where AOTInductor's proxy executor wrapped it in a RuntimeError;
- a bare ``program.module()`` (torch's own wrapper, no saved contract) and a package loaded with torch's
  ``aoti_load_package`` check only what the graph does: torch's input guards (``AssertionError: Guard failed ...`` / ``RuntimeError`` on a shape
  or dtype the program was not exported for), the ops' own value errors (a bad scenario id then names
  ``scenario_embedding_bag``, not the model) and a ``RuntimeError`` without the position for a bad sequence
  length. ``served_module(program)`` wraps an in-memory program returned by ``export_saml`` like ``load_exported``.
"""
from __future__ import annotations

import contextlib
import json
import os
import types
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["export_saml", "save_exported", "load_exported", "served_module", "ServedProgram", "aoti_package",
           "load_aoti", "dynamic_shapes", "example_inputs", "sigmoid_scores"]

_SPEC_FILE = "saml_serving_inputs.json"  # the eager input contract, saved beside the program (extra_files)


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

    _seb._layout_cached.cache_clear()  # belt and braces: table_layout itself does not cache while tracing


#: what ``export_saml(table_dtype=...)`` accepts: None keeps the model's tables, "uint8" exports 8-bit row-wise ones
TABLE_DTYPES = (None, "uint8")


def export_saml(model, example_batch, path: Optional[Union[str, os.PathLike]] = None, *,
                min_batch: int = 1, table_dtype: Optional[str] = None) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``model`` (an ``nn.SAML`` or ``nn.SharedBottom``) for inference.

    Args:
        model: the trained model; traced in ``eval()`` mode (its mode is restored afterwards).
        example_batch: a ``saml_kernels.data.Batch`` (or its ``inputs()`` tuple) on the serving device, with
            B >= 2 samples (a batch of 2 or more keeps the traced shapes general).
        path: where to write the program (``torch.export.save``, ``.pt2``); None writes nothing.
        min_batch: smallest batch size the artifact accepts (1 by default). Where the trace cannot keep B = 1
            general (a model whose ops need B != 1 to decide a memory layout), the export is retried with
            ``min_batch = 2`` and a warning says so.
        table_dtype: None exports the tables as they are; ``"uint8"`` exports ``quantized.quantize_tables(model)``
            (``model`` itself is unchanged): every embedding table as FBGEMM's fused 8-bit row-wise rows (D uint8
            codes + float32 scale + float32 bias per row: (D + 8) / (4 D) of the float32 bytes, 0.375 at
            D = 16), looked up by ``saml_kernels::scenario_embedding_bag_8bit``; each table element is served
            within scale / 2 = (row max - row min) / 510 of its float value (docs/design.md, "8-bit serving
            tables"). The model's tables must be float32 / float16 / bfloat16 and finite, and the model must hold
            kernel embedding layers: otherwise ValueError / TypeError before anything is traced or written.

    Returns:
        the ``ExportedProgram``; ``program.module()(*inputs) -> (main [B], aux [B])`` logits (see the module
        docstring for the inputs). The batch dimension is dynamic: any B >= min_batch runs on it.
    """
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"serving.export_saml: table_dtype must be one of {TABLE_DTYPES}, got {table_dtype!r}")
    inputs = example_inputs(example_batch)
    if table_dtype == "uint8":
        from .quantized import quantize_tables

        return _export(quantize_tables(model), inputs, path, min_batch, table_dtype)
    return _export(model, inputs, path, min_batch, table_dtype)


def _export(model, inputs, path, min_batch, table_dtype):
    was_training = model.training
    used_min = min_batch
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
                          "slice); the artifact accepts batches of 2 or more", RuntimeWarning, stacklevel=3)
            _clear_layout_cache()
            used_min = 2
            with _size_oblivious():
                program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(model, inputs,
                                                                                          min_batch=2))
    finally:
        _clear_layout_cache()
        model.train(was_training)
    program._saml_serving_inputs = dict(input_contract(model, inputs), min_batch=used_min)
    if table_dtype is not None:
        program._saml_serving_inputs["table_dtype"] = table_dtype
    if path is not None:
        save_exported(program, path)
    return program


def input_contract(model, inputs: Sequence) -> dict:
    """What the eager ``model`` checks of its inputs that a traced graph cannot (JSON-able): its name, M, the
    number of features F, the sequence length L of the example (fixed in the trace), num_dense and the dense
    dtype the model casts ``dense`` to."""
    from .nn.saml import dense_dtype

    c = model.config
    seq_ids = inputs[3]
    return {"model": type(model).__name__, "num_scenarios": int(c.num_scenarios), "num_features": len(c.features),
            "seq_len": int(seq_ids.shape[1]) if c.sequence is not None and seq_ids is not None else None,
            "num_dense": int(c.num_dense), "dense_dtype": str(dense_dtype(model)).replace("torch.", "")}


def save_exported(program, path: Union[str, os.PathLike]) -> str:
    """Writes an ``ExportedProgram`` to ``path`` (``torch.export.save``), with the input contract of a program
    from ``export_saml`` as an extra file; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    spec = getattr(program, "_saml_serving_inputs", None)
    extra = {_SPEC_FILE: json.dumps(spec)} if spec is not None else None
    torch.export.save(program, path, extra_files=extra)
    return path


def load_exported(path: Union[str, os.PathLike]) -> torch.nn.Module:
    """Loads a program written by ``export_saml`` / ``save_exported``: a :class:`ServedProgram` whose call
    ``(indices, offsets, scenario, seq_ids, seq_lengths, dense) -> (main [B], aux [B])`` checks the inputs as the
    eager model does and runs the graph (a program saved without the contract: torch's bare module).
    Needs the custom ops: this module imports ``saml_kernels`` (and so its compiled extension) first."""
    import saml_kernels  # noqa: F401  (registers torch.ops.saml_kernels.* before the graph is deserialised)

    extra = {_SPEC_FILE: ""}
    program = torch.export.load(os.fspath(path), extra_files=extra)
    if not extra[_SPEC_FILE]:
        return program.module()
    return ServedProgram(program.module(), json.loads(extra[_SPEC_FILE]))


def served_module(program) -> torch.nn.Module:
    """The :class:`ServedProgram` of an in-memory ``ExportedProgram`` returned by ``export_saml``."""
    spec = getattr(program, "_saml_serving_inputs", None)
    if spec is None:
        raise ValueError("serving.served_module: this program has no input contract (export it with "
                         "serving.export_saml)")
    return ServedProgram(program.module(), spec)


_WRAPPED = {"IndexError": IndexError, "ValueError": ValueError, "TypeError": TypeError}


class ServedProgram(torch.nn.Module):
    """An exported model's graph behind the eager model's input contract (see the module docstring).

    forward(indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None): the checks run in the eager
    model's order: shapes and dtypes (``check_model_inputs``, then the embedding op's entry checks of indices,
    offsets and scenario), the scenario range (IndexError naming the model; one host read, as the eager model's
    deferred block), then the graph, whose ops check ids and offsets; a sequence length outside [0, L] raises
    the eager ValueError with the position. ``dense`` is cast to the model's dense dtype, as in eager mode."""

    def __init__(self, graph, spec: dict):
        super().__init__()
        self.graph, self.spec = graph, dict(spec)  # the graph: an exported module or an AOTInductor runner
        if isinstance(graph, torch.fx.GraphModule):
            from .ops import _eager

            _eager.bind_graph(graph)  # the ops' eager path, as in the eager model (ops/_eager.py)
        seq = spec["seq_len"]
        # check_model_inputs reads only these two fields of a config
        self._config = types.SimpleNamespace(sequence=seq, num_dense=spec["num_dense"])
        self._dense_dtype = getattr(torch, spec["dense_dtype"])

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        from .config import check_model_inputs
        from .nn.attention import check_seq_lengths
        from .ops import _checks

        sp = self.spec
        who, F, L = sp["model"], sp["num_features"], sp["seq_len"]
        B, L_in = check_model_inputs(who, self._config, scenario, seq_ids, seq_lengths, dense)
        if B < sp.get("min_batch", 1):
            raise ValueError(f"{who}: this program serves batches of B >= {sp['min_batch']} (export_saml could not "
                             f"keep B = 1 general for this model and warned), got B = {B}")
        if L is not None and L_in != L:
            raise ValueError(f"{who}: seq_ids must be [B, L] with L = {L}, the sequence length this program was "
                             f"exported with (the trace fixes it; export again for another L), got "
                             f"{list(seq_ids.shape)}")
        # the embedding op's entry checks (ops/scenario_embedding_bag.prepare_args), with its messages
        op = "scenario_embedding_bag"
        _checks.tensor(op, "indices", indices, ndim=1, dtypes=_checks.INDEX_DTYPES)
        _checks.tensor(op, "offsets", offsets, ndim=1, dtypes=_checks.INDEX_DTYPES)
        _checks.tensor(op, "scenario", scenario, ndim=1, dtypes=_checks.INDEX_DTYPES)
        if offsets.dtype != indices.dtype:
            raise TypeError(f"{op}: offsets must have the dtype of indices ({indices.dtype}), got {offsets.dtype}")
        if offsets.numel() < 1 or (offsets.numel() - 1) % F:
            raise ValueError(f"{op}: offsets must have F*B + 1 entries with F = {F} features, got {offsets.numel()}")
        if (offsets.numel() - 1) // F != B:
            raise ValueError(f"{op}: scenario must have B = {(offsets.numel() - 1) // F} entries (offsets imply F = "
                             f"{F} features x B samples), got {B}")
        if L is not None:  # the attention's type / dtype / shape checks of the lengths (their values: the graph's)
            check_seq_lengths("ScenarioAttention", torch.zeros_like(seq_lengths)
                              if isinstance(seq_lengths, torch.Tensor) else seq_lengths, B, L)
        # the model's boundary check (eager mode): the exported ops trust it (their check argument is False)
        _checks.scenario_range(who, scenario, sp["num_scenarios"])
        if dense is not None:
            dense = dense.to(self._dense_dtype)
        try:
            return self.graph(indices, offsets, scenario, seq_ids, seq_lengths, dense)
        except RuntimeError as exc:
            msg = str(exc)
            if L is not None and "seq_lengths out of the valid range" in msg:
                # the graph's device-side assert: raise the eager error with its position
                check_seq_lengths("ScenarioAttention", seq_lengths, B, L)
                raise
            kind, sep, rest = msg.partition(": ")
            if sep and kind in _WRAPPED:
                # AOTInductor's proxy executor re-raises an op's Python exception as RuntimeError("Kind: message
                # \n\nAt: <traceback>"); give the op's own exception back
                raise _WRAPPED[kind](rest.split("\n\nAt:")[0]) from exc
            raise


def _check_aoti():
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        raise RuntimeError(f"serving: AOTInductor packages need torch >= 2.6 (aoti_compile_and_package), this is "
                           f"torch {torch.__version__}")


def _spec_entry() -> str:
    """The input contract's name inside a PT2 archive (torch's extra-files directory)."""
    from torch.export.pt2_archive.constants import EXTRA_DIR

    return EXTRA_DIR + _SPEC_FILE


def aoti_package(program, package_path: Union[str, os.PathLike]) -> str:
    """Compiles an ``ExportedProgram`` (or the path of a saved one) with AOTInductor into ``package_path``
    (``.pt2``); returns the path. The package holds a compiled shared library of the graph's ATen part; our
    custom ops stay calls into the dispatcher, so ``load_aoti`` needs ``saml_kernels`` importable (with its
    extension ``saml_kernels._C`` for the cpu/cuda backends). The input contract of a program from
    ``export_saml`` goes into the package as an extra file (``load_aoti`` then checks requests as the eager
    model does). Compiling takes a C++ compiler and tens of seconds on a CPU (see docs/design.md section 10)."""
    _check_aoti()
    spec = getattr(program, "_saml_serving_inputs", None)
    if isinstance(program, (str, os.PathLike)):
        import saml_kernels  # noqa: F401

        extra = {_SPEC_FILE: ""}
        program = torch.export.load(os.fspath(program), extra_files=extra)
        spec = json.loads(extra[_SPEC_FILE]) if extra[_SPEC_FILE] else None
    package_path = os.fspath(package_path)
    os.makedirs(os.path.dirname(os.path.abspath(package_path)), exist_ok=True)
    out = torch._inductor.aoti_compile_and_package(program, package_path=package_path)
    if spec is not None:
        import zipfile

        # appended after packaging: the PT2 archive keeps its entries; torch's loader reads only the ones it knows
        with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as z:
            z.writestr(_spec_entry(), json.dumps(spec))
    return out


def load_aoti(package_path: Union[str, os.PathLike]):
    """Loads an AOTInductor package written by ``aoti_package``: a callable with the exported program's inputs
    and outputs, a :class:`ServedProgram` when the package holds the input contract. Imports ``saml_kernels``
    first (the package calls its custom ops)."""
    _check_aoti()
    import zipfile

    import saml_kernels  # noqa: F401

    package_path = os.fspath(package_path)
    runner = torch._inductor.aoti_load_package(package_path)
    with zipfile.ZipFile(package_path) as z:
        names = set(z.namelist())
        spec = json.loads(z.read(_spec_entry())) if _spec_entry() in names else None
    return ServedProgram(runner, spec) if spec is not None else runner


def sigmoid_scores(fn, batch) -> tuple[Tensor, Tensor]:
    """Runs ``fn`` (a loaded program or package, or the eager model in ``eval()``) on a batch without autograd:
    the click probabilities (sigmoid(main) [B], sigmoid(aux) [B])."""
    with torch.no_grad():
        main, aux = fn(*example_inputs(batch))
    return torch.sigmoid(main), torch.sigmoid(aux)
