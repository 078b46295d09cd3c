"""Run the interpreter test cases in a fresh process (TRITON_INTERPRET=1 set before import).

Usage: TRITON_INTERPRET=1 python tests/kernels/_interpreter_runner.py  -> JSON on stdout
Triton picks interpreter or compiler when a kernel is decorated, i.e. when
mlakit.kernels is imported, so this must run in a process of its own: the test
session may already have imported the kernels in compiled mode.
"""

import json
import sys
import time
import traceback

from mlakit.testing import kernel_cases as _cases


def main():
    import mlakit.kernels as kernels

    if not (kernels.HAS_TRITON and kernels.INTERPRET):
        print(json.dumps({"error": "triton missing or TRITON_INTERPRET not set"}))
        return 1
    results = {}
    for kind, cases, runner in (("decode", _cases.INTERP_DECODE_CASES, _cases.run_decode_case),
                                ("rope", _cases.INTERP_ROPE_CASES, _cases.run_rope_case),
                                ("rope_quant", _cases.INTERP_ROPE_QUANT_CASES, _cases.run_rope_quant_case),
                                ("decode_quant", _cases.INTERP_DECODE_QUANT_CASES, _cases.run_decode_quant_case)):
        for case_id, case in cases.items():
            t0 = time.time()
            try:
                res = runner(case)
            except Exception as exc:  # reported per case by the pytest side
                res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            res["seconds"] = time.time() - t0
            results[f"{kind}:{case_id}"] = res
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
