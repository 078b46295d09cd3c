"""Triton's bundled ptxas, for reading what a kernel compiled for sm_90a costs without a GPU."""

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
