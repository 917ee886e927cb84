// Run-time ISA selection for the CPU kernels' hot loops.
//
// Why: the extension is compiled for a portable baseline (x86-64-v2: SSE4.2) so one build runs on any x86-64
// machine, but the embedding backward's inner loops (row sums, row updates: D floats per random row) are partly
// compute-bound: at SSE width a model of them runs ~1.7x slower than with AVX-512. SAML_CPU_MULTIVERSION
// on a function makes GCC/Clang emit one clone per listed ISA level plus the baseline and pick one at load time
// (ifunc) from what the CPU supports. Everything the function inlines is compiled for the clone's ISA, so its
// helpers are SAML_INLINE (always_inline) and written as plain loops the compiler vectorises.
//
// Results do not depend on the clone: setup.py compiles with -ffp-contract=off, so no clone fuses a * b + c
// into an FMA the baseline would round twice.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(SAML_NO_MULTIVERSION)
#define SAML_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAML_CPU_MULTIVERSION
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SAML_INLINE inline __attribute__((always_inline))
#else
#define SAML_INLINE inline
#endif
