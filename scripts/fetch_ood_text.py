#!/usr/bin/env python3
"""Fetch the texts of ood-smollm2-v1 (docs/protocols.md): ``pip download`` the sdist of
Brotli==1.1.0, check its SHA-256, write ``alice29.txt`` and ``lcet10.txt`` (each checked)
to DIR (default: data/ood of the repository, which git ignores; carry it to a machine
without network, e.g. ``run(carry=["data/ood"])``).

    python3 scripts/fetch_ood_text.py [DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlakit.errors import MlakitError  # noqa: E402
from mlakit.ood import TEXTS, fetch  # noqa: E402

if __name__ == "__main__":
    try:
        dest = fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    except MlakitError as e:
        sys.exit(f"fetch_ood_text: error: {e}")
    for text in TEXTS:
        print(f"{dest / text.file}  ({text.name}: {text.title})")
