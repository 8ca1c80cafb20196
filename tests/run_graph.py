"""Run one ONNX graph on inputs from an .npz and save its outputs: the body of the cross-CPU tests.

Imports only numpy and onnxruntime so it starts quickly under `qemu-x86_64 -cpu Haswell` (an AVX2 CPU
without VNNI), where MLAS picks its non-VNNI integer kernels from the emulated CPUID.

    python tests/run_graph.py GRAPH INPUTS.npz OUTPUTS.npz [session.config.key=value ...]
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort


def main(graph: str, inputs: str, outputs: str, *config: str) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for entry in config:
        key, _, value = entry.partition("=")
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["CommonSubexpressionElimination"])
    feed = dict(np.load(inputs))
    names = [o.name for o in session.get_outputs()]
    np.savez(outputs, **dict(zip(names, session.run(None, feed), strict=True)))


if __name__ == "__main__":
    main(*sys.argv[1:])
