"""deploy/ validates without a cluster: core objects against Kubernetes' own schemas (kubernetes-validate),
custom resources against the CRD schemas vendored in deploy/schemas/ (README there says from where).

CRD schemas are checked the way `kubectl apply` checks with strict field validation (an unknown field
is an error); their CEL rules (x-kubernetes-validations) run only in a real API server.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "schemas"
K8S_VERSION = "1.33.0"  # schemas bundled with kubernetes-validate 1.37
MANIFESTS = sorted((ROOT / "deploy").glob("*/*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strict(schema: dict) -> dict:
    """Unknown fields are errors unless the schema says to keep them (structural-schema pruning rule)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def crd_schema(doc: dict) -> dict | None:
    group = doc["apiVersion"].split("/")[0]
    path = SCHEMAS / f"{group}_{doc['kind']}.json"
    if not path.exists():
        return None
    schema = json.loads(path.read_text())
    assert schema["x-api-version"] == doc["apiVersion"], f"{path.name} is for {schema['x-api-version']}"
    return strict(schema)


def validate(doc: dict) -> None:
    schema = crd_schema(doc)
    if schema is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    else:
        jsonschema.validate(doc, schema)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manifest_validates(path):
    docs = documents(path)
    assert docs
    for doc in docs:
        validate(doc)


def test_the_expected_objects_are_there():
    kinds = {str(p.relative_to(ROOT)): [d["kind"] for d in documents(p)] for p in MANIFESTS}
    assert kinds == {
        "deploy/kserve/inferenceservice-gpu.yaml": ["InferenceService", "PodDisruptionBudget"],
        "deploy/kserve/inferenceservice-torchserve-gpu.yaml": ["InferenceService", "PodDisruptionBudget"],
        "deploy/kserve/inferenceservice-torchserve.yaml": ["InferenceService", "PodDisruptionBudget"],
        "deploy/kserve/inferenceservice.yaml": ["InferenceService", "PodDisruptionBudget"],
        "deploy/kubeflow/trainjob.yaml": ["TrainJob", "PersistentVolumeClaim"],
    }


@pytest.mark.parametrize(("mutate", "error"), [
    (lambda d: d["spec"]["predictor"]["model"].update(storageURI="s3://x"), "Additional properties"),
    (lambda d: d["spec"]["predictor"].update(minReplicas="two"), "is not of type 'integer'"),
    (lambda d: d["spec"]["predictor"]["model"].pop("modelFormat") and
     d["spec"]["predictor"]["model"]["resources"]["limits"].update(cpu=[2]), "is not valid under any of"),
])
def test_a_broken_inferenceservice_is_refused(mutate, error):
    doc = documents(ROOT / "deploy" / "kserve" / "inferenceservice-torchserve.yaml")[0]
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError, match=error):
        validate(doc)


def test_a_broken_core_object_is_refused():
    doc = documents(ROOT / "deploy" / "kubeflow" / "trainjob.yaml")[1]
    doc["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)


@pytest.mark.parametrize(("mutate", "error"), [
    (lambda d: d["spec"]["predictor"]["containers"][0].update(port=8080), "Additional properties"),
    (lambda d: d["spec"]["predictor"]["storageUris"][0].update(mountPath="mnt"), "does not match"),
])
def test_a_broken_predictor_inferenceservice_is_refused(mutate, error):
    doc = documents(ROOT / "deploy" / "kserve" / "inferenceservice.yaml")[0]
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError, match=error):
        validate(doc)


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-gpu.yaml"])
def test_the_predictor_inferenceservice_serves_the_verified_bundle_and_drains(name):
    """The custom predictor (deploy/kserve/predictor.Dockerfile): the bundle's archive, keys from a Secret
    mounted read-only, readiness from the v2 endpoint, a preStop pause before SIGTERM starts the drain."""
    isvc, pdb = documents(ROOT / "deploy" / "kserve" / name)
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # the name KServe gives a predictor's own container
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    (storage,) = predictor["storageUris"]
    archive = container["args"][container["args"].index("--archive") + 1]
    assert archive.startswith(storage["mountPath"] + "/model-store/")  # `make kserve-bundle`'s layout
    (volume,) = predictor["volumes"]
    (mount,) = container["volumeMounts"]
    assert volume["secret"]["secretName"] and (mount["name"], mount["readOnly"]) == (volume["name"], True)
    assert {"name": "MNIST_SERVE_TRUSTED_DIR", "value": mount["mountPath"]} in container["env"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    dockerfile = (ROOT / "deploy" / "kserve" / "predictor.Dockerfile").read_text()
    assert '"--http_port", "8080"' in dockerfile and '"--host", "0.0.0.0"' in dockerfile
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    # The kubelet SIGKILLs at the end of the grace period, preStop included: the predictor's 30 s grace fits.
    assert predictor["terminationGracePeriodSeconds"] >= pause + 30
    assert predictor["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["serving.kserve.io/inferenceservice"] == isvc["metadata"]["name"]
    assert container["resources"]["limits"].get("nvidia.com/gpu") == (1 if "gpu" in name else None)
    assert ("--device" in container["args"]) == ("gpu" in name)


@pytest.mark.parametrize("name", ["inferenceservice-torchserve.yaml", "inferenceservice-torchserve-gpu.yaml"])
def test_inferenceservice_matches_the_bundle_image_and_drain(name):
    isvc, pdb = documents(ROOT / "deploy" / "kserve" / name)
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert (model["modelFormat"]["name"], model["protocolVersion"]) == ("pytorch", "v2")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    # The probe and the hook run the drain script the Dockerfile copies into the runtime image.
    dockerfile = (ROOT / "deploy" / "kserve" / "torchserve.Dockerfile").read_text()
    assert "COPY serving/drain.py /home/model-server/drain.py" in dockerfile
    assert model["readinessProbe"]["exec"]["command"] == ["python", "/home/model-server/drain.py", "ready"]
    prestop = model["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[:3] == ["python", "/home/model-server/drain.py", "prestop"]
    settle, timeout = float(prestop[prestop.index("--settle") + 1]), float(prestop[prestop.index("--timeout") + 1])
    # The kubelet SIGKILLs at the end of the grace period, preStop included: leave TorchServe time to stop.
    assert predictor["terminationGracePeriodSeconds"] >= settle + timeout + 15
    assert predictor["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["serving.kserve.io/inferenceservice"] == isvc["metadata"]["name"]
    gpu = model["resources"]["limits"].get("nvidia.com/gpu")
    assert gpu == (1 if "gpu" in name else None)
