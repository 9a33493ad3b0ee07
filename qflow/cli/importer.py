"""``qflow import``: a quantized model trained elsewhere (QONNX) as a qflow run."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from qflow.errors import QflowError

from .console import make_console

HELP = "import a QONNX model (brevitas, HAWQ, QKeras via qonnx) as a run to export and verify"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="QONNX file (.onnx), e.g. from brevitas's "
                                            "export_qonnx")
    p.add_argument("--data", default=None,
                   help="data for verify: a zoo data set, a .npz file or module:function, as "
                        "for qflow quantize (without it, verify uses corner cases only)")
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, if it is a run qflow wrote")


def run(args: argparse.Namespace) -> int:
    from qflow.outdir import OutputDirectory
    from qflow.qonnx_import import import_qonnx
    from qflow.runs import save_imported_run
    from qflow.sources import module_search_path, resolve_data

    console = make_console()
    OutputDirectory(args.out, kind="run", force=args.force).check()  # before any work
    graph = import_qonnx(args.model)
    data = None
    if args.data is not None:
        data = resolve_data(args.data)
        shape = tuple(data.x_train.shape[1:])
        expected = graph.tensors[graph.input].shape
        if shape != expected:
            raise QflowError(f"--data {args.data}: samples of shape {list(shape)}, the model "
                             f"takes {list(expected)}")
    counts = dict(Counter(node.op for node in graph.nodes))
    save_imported_run(args.out, graph, args.model, data_spec=args.data, data=data,
                      search_path=module_search_path(args.data) if args.data else None,
                      notes={"nodes": counts, "input_type": graph.input_type.to_ap(),
                             "output_type": graph.output_type.to_ap()}, force=args.force)
    console.print(f"imported {args.model}: {len(graph.nodes)} nodes "
                  f"({', '.join(f'{n} {op}' for op, n in counts.items())}); input "
                  f"{graph.input_type.to_ap()}, output {graph.output_type.to_ap()}")
    console.print(f"run written to {args.out}; next: qflow export {args.out} --target onnx|cpu|"
                  "ultra96, then qflow verify")
    return 0
