"""``python -m p2pml.model train --peers peers.toml --kind random_forest --out rf.skops``: a
model file for a seat's ``model = "file:PATH"``, trained on the task's training rows.

``--out`` ending in ``.onnx`` exports to ONNX (needs skl2onnx); anything else is a skops file.
Beside it goes ``OUT.card.json``: the Merkle root and count of the rows it was trained on, which
the node puts in its card (a model file alone cannot say what it was trained on). The file is
loaded back and checked against the task, as a node will, before this says it is done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from p2pml.config import MODEL_KINDS, REGRESSION_KINDS, ConfigError, load
from p2pml.task import rows_root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pml.model train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="peers.toml", help="the network whose task to train on")
    ap.add_argument("--kind", required=True, help=f"classification: {', '.join(MODEL_KINDS)}; "
                    f"regression: {', '.join(REGRESSION_KINDS)}")
    ap.add_argument("--out", required=True, help="the model file to write (.skops, or .onnx)")
    args = ap.parse_args(argv)
    prog = "p2pml.model train"
    from p2pml import modelfile
    from p2pml.model import build

    try:
        net = load(args.peers)
        data = net.task_data()
        task = data.spec
        kinds = REGRESSION_KINDS if task.regression else MODEL_KINDS
        if args.kind not in kinds:
            raise ConfigError(f"--kind {args.kind!r} is not a {task.kind} kind; choose one of {', '.join(kinds)}")
        x_train, _, y_train, _ = data.split()
        estimator = build(args.kind, task.regression).fit(x_train, y_train)
        out = Path(args.out)
        if out.suffix == ".onnx":
            try:
                from skl2onnx import to_onnx
            except ImportError:
                raise ConfigError("exporting to ONNX needs skl2onnx (pip install skl2onnx)") from None
            options = None if task.regression else {id(estimator): {"zipmap": False}}
            onx = to_onnx(estimator, x_train[:1].astype(np.float32), options=options, target_opset=17)
            out.write_bytes(onx.SerializeToString())
        else:
            modelfile.save(estimator, out)
        loaded = modelfile.load(out, n_features=len(task.features), kind=task.kind, n_classes=len(task.classes))
        side = Path(str(out) + ".card.json")
        side.write_text(json.dumps({"task": task.name, "kind": args.kind, "framework": loaded.framework,
                                    "params": loaded.params_sha256,
                                    "data_root": rows_root(x_train, y_train, task.regression).hex(),
                                    "rows": len(x_train)}, indent=1) + "\n")
    except (ConfigError, modelfile.ModelFileError, OSError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({loaded.framework}, {loaded.kind}, params {loaded.params_sha256[:16]}) "
          f"trained on {len(x_train)} rows of {task.name}, and {side}")
    return 0
