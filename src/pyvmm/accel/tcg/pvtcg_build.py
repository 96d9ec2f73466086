"""How ``pvtcg.c`` is compiled: the cffi build description, used at install time.

``setup.py`` names :func:`ffibuilder` in ``cffi_modules``, so ``pip install``
compiles ``pvtcg.c`` into the extension module ``pyvmm.accel.tcg._pvtcg`` and
the runtime never needs a compiler.  The extension carries the hash of the
sources it was built from (:func:`source_hash`); :mod:`pyvmm.accel.tcg.native`
compares it with the installed sources and refuses a stale build.

This file runs in the build environment too (cffi executes it by path), so it
imports nothing from pyvmm and nothing but cffi from outside the standard
library.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

MODULE_NAME = "pyvmm.accel.tcg._pvtcg"
_SRC_DIR = Path(__file__).resolve().parent


def _header_declarations() -> str:
    """pvtcg.h's types as cffi declarations: the header is the one source for both sides.

    cffi's parser takes no comments and no preprocessor lines other than numeric
    ``#define`` constants, and needs no ``volatile``.
    """
    text = (_SRC_DIR / "pvtcg.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"^\s*#(?!define [A-Z_]+ \d+\s*$).*$", "", text, flags=re.M)   # keep numeric #defines
    return text.replace("volatile ", "")


_FUNCTIONS = """
const char *pv_build_hash(void);
uint64_t pv_now_ns(void);
uint64_t pv_tsc_now(struct pv_vcpu *v);
void pv_tsc_set(struct pv_vcpu *v, uint64_t value);
void pv_load_seg(struct pv_vcpu *v, int seg, uint32_t selector, uint64_t base, uint32_t limit, uint32_t flags);
int pv_patch_msr(void *rdmsr_fn, int rd_len, void *wrmsr_fn, int wr_len);
int pv_msr_patched(void);
int pv_patch_tsc(void *rdtsc_fn, int rdtsc_len, void *rdtscp_fn, int rdtscp_len);
int pv_patch_code(void *addr, const void *bytes, int len);
void pv_set_intr(struct pv_vcpu *v, int level);
void pv_raise_nmi(struct pv_vcpu *v);
int pv_nmi_pending(struct pv_vcpu *v);
int pv_install_hardirq(void *plt_entry, void *real_fn);
int pv_install_kick(void *plt_entry, void *real_fn);
void pv_kick(struct pv_vcpu *v, int stop);
void pv_note_written(struct pv_vcpu *v, uint64_t host, uint64_t len);
int pv_drop_stale(struct pv_vcpu *v);
int pv_install_cross_engine(void *protect_plt, void *real_protect, void *map_ram, void *ram_from_host);
void pv_set_engines_shared(int shared);
int pv_install_pause_exit(void *plt_entry, void *real_fn);
void pv_set_turn_waiters(int n);
int pv_install_store_invalidate(void *plt_entry, void *real_fast, void *range_fn);
int pv_attach(struct pv_vcpu *v);
void pv_detach(struct pv_vcpu *v);
void pv_prepare_run(struct pv_vcpu *v);
int pv_halted(struct pv_vcpu *v);
int pv_old_exception(struct pv_vcpu *v);
void pv_clear_old_exception(struct pv_vcpu *v);
uint32_t pv_hflags(struct pv_vcpu *v);
uint64_t pv_eflags_raw(struct pv_vcpu *v);
uint64_t pv_env_u64(struct pv_vcpu *v, int off);
uint32_t pv_env_u32(struct pv_vcpu *v, int off);
"""


def cdef() -> str:
    """The declarations cffi exposes to Python."""
    return _header_declarations() + _FUNCTIONS


def source_hash() -> str:
    """A digest of everything the extension is built from (C source, header, declarations)."""
    c = (_SRC_DIR / "pvtcg.c").read_text()
    h = (_SRC_DIR / "pvtcg.h").read_text()
    return hashlib.sha256((c + h + cdef()).encode()).hexdigest()[:16]


def ffibuilder() -> Any:
    """The cffi builder for ``pyvmm.accel.tcg._pvtcg`` (``setup.py``'s ``cffi_modules``)."""
    import cffi

    source = (_SRC_DIR / "pvtcg.c").read_text() + (
        f'\nconst char *pv_build_hash(void) {{ return "{source_hash()}"; }}\n')
    ffi = cffi.FFI()
    ffi.cdef(cdef())
    ffi.set_source(MODULE_NAME, source, include_dirs=[str(_SRC_DIR)],
                   extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wno-unused-function"])
    return ffi
