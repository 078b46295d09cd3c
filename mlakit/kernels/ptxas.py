"""Compiling kernels for sm_90a without a GPU, and Triton's bundled ptxas to read what they cost."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


def ptxas_path() -> str | None:
    """The ptxas that ships with the installed triton (the newer one reads the newest PTX), or None."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    return None


def ptxas_resources(ptx: str, ptxas: str, arch: str = "sm_90a") -> dict:
    """Registers per thread and spill-store bytes of ``ptx`` assembled for ``arch`` (``ptxas -v``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    info = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=int(spills.group(1)) if spills else None)


# Triton's type names of what each quantised cache format stores (a pointer is "*" + the name)
STORAGE_TYPES = {"int8": "i8", "fp8": "fp8e4nv", "int4": "u8"}


def compile_offline(fn, pointers: dict, constexprs: dict, options: dict, arch: int = 90, gluon: bool = False,
                    floats: tuple = ()):
    """``fn`` (a ``triton.jit`` or ``gluon.jit`` kernel) compiled for ``sm_{arch}`` without a GPU:
    ``pointers`` maps pointer (and descriptor) arguments to their types (``"*bf16"``), ``constexprs``
    gives every constexpr, the arguments named in ``floats`` are fp32 and every other one i32.
    Returns triton's compiled kernel (``.asm["ptx"]``, ``.metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        from triton.compiler import ASTSource as Source
    names = fn.arg_names
    signature = {n: pointers.get(n) or ("constexpr" if n in constexprs else "fp32" if n in floats else "i32")
                 for n in names}
    source = Source(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
