"""Source rewriter of the CUDA emulation: turns a copy of csrc/cuda into host C++ (tests/cuda_emu/README.md).

Only these mechanical rewrites are applied (everything else compiles as written, against the stub headers in
``include/``):

1. ``kernel<targs><<<grid, block[, smem[, stream]]>>>(args);`` ->
   ``::emu::launch("kernel", "kernel<targs>", ::emu::config(grid, block, smem, stream),
   [](const auto&... a) { kernel<targs>(a...); }, args);`` (the arguments are evaluated once, at the launch)
   (bracket matching, so template arguments and calls with commas are kept whole; the launch configuration may
   not hold a comma outside parentheses).
2. ``__shared__ [__align__(n)] T name[dims];`` -> ``auto& name = *::emu::static_shared<T[dims], n>();`` and
   ``extern __shared__ [__align__(n)] T name[];`` -> ``T* name = ::emu::dynamic_shared<T>();`` (a fresh, poisoned
   per-CTA arena: emu_runtime.h).
3. ``TORCH_LIBRARY_IMPL(saml_C, CUDA, m)`` -> ``TORCH_LIBRARY_IMPL(saml_C_emu, CPU, m)``, and the schemas: the
   ``TORCH_LIBRARY(saml_C, m) {...}`` block of csrc/registry.cpp as ``TORCH_LIBRARY(saml_C_emu, m) {...}``: the
   emulated ops live in their own namespace on the CPU key, next to the real extension.
4. ``.is_cuda()`` -> ``.is_cpu()`` (the launchers' device checks accept the CPU tensors the emulation runs on).
5. ``defined(__CUDACC__)`` -> ``1`` (code kept from host compilers, e.g. the GEMM launchers, is compiled).

A construct the rewriter does not understand raises ``RewriteError`` naming the file and line.
"""
from __future__ import annotations

import pathlib
import re


class RewriteError(RuntimeError):
    pass


_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _match_forward(text: str, i: int, name: str) -> int:
    """Index just past the bracket closing the one at text[i] (comments skipped)."""
    text = _mask_comments(text)
    stack = []
    j = i
    while j < len(text):
        c = text[j]
        if c in "\"'":  # skip a string / char literal
            k = j + 1
            while text[k] != c:
                k += 2 if text[k] == "\\" else 1
            j = k + 1
            continue
        if c in _OPEN:
            stack.append(_OPEN[c])
        elif c in _CLOSE:
            if not stack or stack.pop() != c:
                raise RewriteError(f"{name}:{_line(text, j)}: unbalanced {c!r}")
            if not stack:
                return j + 1
        j += 1
    raise RewriteError(f"{name}:{_line(text, i)}: unclosed {text[i]!r}")


def _split_top(s: str) -> list[str]:
    """Split at commas outside (), [], {}."""
    out, depth, cur = [], 0, ""
    for c in s:
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    if cur.strip():
        out.append(cur.strip())
    return out


def _kernel_before(text: str, end: int, name: str) -> tuple[int, str, str]:
    """(start, bare name, full expression) of the kernel expression ending at text[end] (exclusive)."""
    j = end
    while text[j - 1].isspace():
        j -= 1
    stop = j
    if text[j - 1] == ">":  # template arguments: match angle brackets backwards
        depth = 0
        k = j - 1
        while k >= 0:
            c = text[k]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
                if depth == 0:
                    break
            k -= 1
        if k < 0:
            raise RewriteError(f"{name}:{_line(text, end)}: unmatched '>' before <<<")
        j = k
    m = re.search(r"((?:::)?[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*)\s*$", text[:j])
    if not m:
        raise RewriteError(f"{name}:{_line(text, end)}: no kernel name before <<<")
    full = re.sub(r"\s+", " ", text[m.start():stop])
    return m.start(), m.group(1).split("::")[-1], full


def _mask_comments(text: str) -> str:
    """text with // and /* */ comments blanked (same length, newlines kept)."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)


def rewrite_launches(text: str, name: str) -> tuple[str, int]:
    out, pos, n = [], 0, 0
    masked = _mask_comments(text)
    while True:
        i = masked.find("<<<", pos)
        if i < 0:
            break
        start, bare, full = _kernel_before(text, i, name)
        j = masked.find(">>>", i)
        if j < 0:
            raise RewriteError(f"{name}:{_line(text, i)}: <<< without >>>")
        cfg = _split_top(text[i + 3:j])
        if not 2 <= len(cfg) <= 4:
            raise RewriteError(f"{name}:{_line(text, i)}: launch configuration needs 2 to 4 arguments, got {cfg}")
        k = j + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise RewriteError(f"{name}:{_line(text, i)}: no argument list after >>>")
        close = _match_forward(text, k, name)
        args = text[k + 1:close - 1].strip()
        call = (f'::emu::launch("{bare}", "{full}", ::emu::config({", ".join(cfg)}), '
                f"[](const auto&... a) {{ {full}(a...); }}" + (f", {args}" if args else "") + ")")
        out.append(text[pos:start])
        out.append(call)
        pos = close
        n += 1
    out.append(text[pos:])
    return "".join(out), n


_SHARED = re.compile(
    r"(?P<ext>\bextern\s+)?\b__shared__\s+(?:__align__\s*\(\s*(?P<al>\d+)\s*\)\s+)?(?P<type>[^;\[\]=]+?)\s*"
    r"\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)+)\s*;")


def rewrite_shared(text: str, name: str) -> tuple[str, int]:
    def sub(m):
        t, var, dims = m.group("type").strip(), m.group("name"), re.sub(r"\s+", "", m.group("dims"))
        if m.group("ext"):
            if dims != "[]":
                raise RewriteError(f"{name}:{_line(text, m.start())}: extern __shared__ {var} must be declared []")
            return f"{t}* {var} = ::emu::dynamic_shared<{t}>();"
        if "[]" in dims:
            raise RewriteError(f"{name}:{_line(text, m.start())}: static __shared__ {var} without a size")
        return f"auto& {var} = *::emu::static_shared<{t}{dims}, {m.group('al') or 1}>();"

    new, n = _SHARED.subn(sub, text)
    left = re.search(r"\b__shared__\b", re.sub(r"//[^\n]*", "", new))
    if left:
        raise RewriteError(f"{name}: a __shared__ declaration the rewriter does not understand: "
                           f"{new[left.start():left.start() + 80]!r}")
    return new, n


def rewrite_source(text: str, name: str) -> tuple[str, dict]:
    """The rewritten text of one csrc/cuda file and the count of each rewrite."""
    counts = {}
    text, counts["launch"] = rewrite_launches(text, name)
    text, counts["shared"] = rewrite_shared(text, name)
    text, counts["library"] = re.subn(r"TORCH_LIBRARY_IMPL\(\s*saml_C\s*,\s*CUDA\s*,", "TORCH_LIBRARY_IMPL(saml_C_emu, CPU,",
                                      text)
    text, counts["is_cuda"] = re.subn(r"\.is_cuda\(\)", ".is_cpu()", text)
    text, counts["cudacc"] = re.subn(r"\bdefined\s*\(\s*__CUDACC__\s*\)", "1", text)
    return text, counts


def rewrite_registry(text: str) -> str:
    """The TORCH_LIBRARY(saml_C, m) block of csrc/registry.cpp (every schema) as TORCH_LIBRARY(saml_C_emu, m), on its
    own (the Python module part of the file is not needed: the library is loaded with torch.ops.load_library)."""
    found = list(re.finditer(r"TORCH_LIBRARY\(\s*saml_C\s*,\s*m\s*\)\s*\{", text))
    if len(found) != 1:
        raise RewriteError(f"csrc/registry.cpp: expected one TORCH_LIBRARY(saml_C, m), found {len(found)}")
    m = found[0]
    end = _match_forward(text, m.end() - 1, "csrc/registry.cpp")
    line = _line(text, m.start())
    return (f"#include <torch/library.h>\n#line {line}\nTORCH_LIBRARY(saml_C_emu, m) "
            + text[m.end() - 1:end] + "\n")


FEW_TYPES = """
// ---- appended by tests/cuda_emu/rewrite.py: the sanitizer builds dispatch float32 and float16 only (compile time)
#ifdef SAML_EMU_FEW_TYPES
#undef SAML_DISPATCH_FLOATING
#define SAML_DISPATCH_FLOATING(TYPE, NAME, ...) \\
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
#endif
"""


def rewrite_tree(root: pathlib.Path, out: pathlib.Path, extra=()) -> tuple[list[pathlib.Path], dict]:
    """Rewritten copies of csrc/cuda/* (.cu -> .cpp, headers kept by name), of the ``extra`` .cu files, of
    csrc/registry.cpp and of csrc/include/saml_common.h (plus FEW_TYPES) under ``out``.

    Returns (the translation units to compile, {file: counts})."""
    out.mkdir(parents=True, exist_ok=True)
    units, report = [], {}
    srcs = [p for p in sorted((root / "csrc/cuda").iterdir()) if p.suffix in (".cu", ".cuh", ".h")]
    for src in srcs + [pathlib.Path(e) for e in extra]:
        label = f"csrc/cuda/{src.name}" if src.parent == root / "csrc/cuda" else src.name
        text, counts = rewrite_source(src.read_text(), label)
        report[label] = counts
        dst = out / (src.stem + ".cpp" if src.suffix == ".cu" else src.name)
        _write_if_changed(dst, f'#line 1 "{src}"\n' + text)
        if src.suffix == ".cu":
            units.append(dst)
    src = root / "csrc/registry.cpp"
    _write_if_changed(out / "registry.cpp", f'#line 1 "{src}"\n' + rewrite_registry(src.read_text()))
    units.append(out / "registry.cpp")
    src = root / "csrc/include/saml_common.h"
    _write_if_changed(out / "saml_common.h", f'#line 1 "{src}"\n' + src.read_text() + FEW_TYPES)
    return units, report


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # keeps ninja's timestamps for unchanged files
        path.write_text(text)
