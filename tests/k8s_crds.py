"""Kubeflow Trainer and JobSet objects checked against the real CRD schemas (read where they are, never copied
into the project): the directory named by ASRFT_K8S_CRDS, by default ../shared/k8s-crds beside the repository
(.ci/run exports it the same way). Each CRD's OpenAPI v3 schema becomes a JSON schema with the API server's
strict field validation (an unknown field is an error, as with `kubectl apply`'s default), plus the TrainJob
name rules the CRD states as CEL."""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CRDS_ENV = "ASRFT_K8S_CRDS"
REPO = Path(__file__).resolve().parents[1]
FILES = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml", "JobSet": "jobset.x-k8s.io_jobsets.yaml",
         "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml"}
RFC_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # the TrainJob CRD's CEL rule on metadata.name


def crd_dir() -> Path:
    folder = Path(os.environ.get(CRDS_ENV) or REPO.parent / "shared" / "k8s-crds")
    if not (folder / FILES["TrainJob"]).is_file():
        pytest.fail(f"the Kubeflow Trainer / JobSet CRDs are not in {folder}: set {CRDS_ENV} to the folder holding "
                    f"{', '.join(FILES.values())} (kubeflow/trainer manifests/base/crds, kubernetes-sigs/jobset)")
    return folder


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((crd_dir() / FILES[kind]).read_text())
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(_strict(schema))


def errors(obj: dict[str, Any]) -> list[str]:
    """Every way ``obj`` (a TrainJob, JobSet or ClusterTrainingRuntime) breaks its CRD's schema; [] when valid."""
    kind, version = obj["kind"], obj["apiVersion"].split("/")[-1]
    found = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
             for e in validator(kind, version).iter_errors(obj)]
    name = obj.get("metadata", {}).get("name", "")
    if kind == "TrainJob" and not (RFC_1035.match(name) and len(name) <= 63):
        found.append(f"metadata.name {name!r}: must be an RFC 1035 DNS label of at most 63 characters")
    return found


def runtime(name: str) -> dict[str, Any]:
    """One of the ClusterTrainingRuntimes Kubeflow Trainer installs (torch_distributed.yaml, …)."""
    return yaml.safe_load((crd_dir() / f"{name.replace('-', '_')}.yaml").read_text())
