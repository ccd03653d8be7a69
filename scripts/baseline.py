"""The centralized alternative p2pml is measured against: one process, one soft-voting ensemble
(scikit-learn VotingClassifier) of the same five model kinds on the same training rows, behind an
aiohttp ``GET /predict?features=a,b,c,d``.

    python scripts/baseline.py --port 9000
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from aiohttp import web
from sklearn.ensemble import VotingClassifier

from p2pml.config import MODEL_KINDS
from p2pml.ledger import CLASSES
from p2pml.model import _split, build

ENSEMBLE = web.AppKey("ensemble", VotingClassifier)


def train() -> VotingClassifier:
    x_train, _, y_train, _ = _split()
    return VotingClassifier([(k, build(k)) for k in MODEL_KINDS], voting="soft").fit(x_train, y_train)


async def predict(request: web.Request) -> web.Response:
    try:
        row = [float(x) for x in request.query["features"].split(",")]
        if len(row) != 4 or not all(math.isfinite(x) for x in row):
            raise ValueError("four finite numbers")
    except (KeyError, ValueError) as exc:
        return web.json_response({"error": f"features: {exc}"}, status=400)
    proba = request.app[ENSEMBLE].predict_proba(np.array([row]))[0]
    return web.json_response({"prediction": CLASSES[int(proba.argmax())],
                              "probabilities": dict(zip(CLASSES, proba.round(6).tolist()))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    app = web.Application()
    app[ENSEMBLE] = train()
    app.router.add_get("/predict", predict)
    app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
