"""Vendor the CRD schemas the manifests are validated against: `python deploy/schemas/vendor.py CRD.yaml ...`.

Takes the openAPIV3Schema of each CustomResourceDefinition's stored version, drops descriptions,
status and the subtrees deploy/ does not use (kept as plain objects, so they are not validated),
and writes deploy/schemas/<group>_<kind>.json. Where each input came from is in deploy/schemas/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
UNUSED = {  # kind: paths (under spec) not validated; anything there passes as an object
    "InferenceService": ["canary", "explainer", "transformer",
                         *(f"predictor.{f}" for f in ("workerSpec", "sklearn", "xgboost", "tensorflow", "onnx", "pmml",
                                                      "lightgbm", "paddle", "huggingface", "triton"))],
}


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def vendor(crd_path: Path) -> Path:
    crd = yaml.safe_load(crd_path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strip(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    kind = crd["spec"]["names"]["kind"]
    for dotted in UNUSED.get(kind, []):
        parent = schema["properties"]["spec"]
        *path, leaf = dotted.split(".")
        for key in path:
            parent = parent["properties"][key]
        parent["properties"][leaf] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    out = HERE / f"{crd['spec']['group']}_{kind}.json"
    schema = {"$comment": f"{kind} {crd['spec']['group']}/{version['name']}, vendored by deploy/schemas/vendor.py",
              "x-api-version": f"{crd['spec']['group']}/{version['name']}", **schema}
    out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(vendor(Path(arg)))
