"""Check Kubernetes manifests against real schemas, offline.

- Core kinds (Namespace, Secret, RBAC, CronJob, Deployment, ...): the Kubernetes OpenAPI schemas that
  `kubernetes-validate` ships, in its strict form (unknown fields are errors), for KUBERNETES_VERSION.
- Custom resources (InferenceService, PyTorchJob, TrainJob, Argo CD Application): the
  `openAPIV3Schema` of the CRD each project publishes, kept in tests/k8s/crds/ (sources and licences
  in tests/k8s/crds/SOURCES.md), with `metadata` checked as the Kubernetes ObjectMeta.

A CRD schema alone lets unknown fields through: the API server *prunes* them (drops them, at best
with a warning), which is exactly how a misspelled or misplaced field gets lost on a cluster. So an
object schema that lists its properties and neither allows additional ones nor sets
`x-kubernetes-preserve-unknown-fields` is made closed here, as `kubectl apply --validate=strict`
and the API server's strict field validation treat it. CEL rules (`x-kubernetes-validations`) are not
evaluated.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource

# The Kubernetes minor version the manifests are validated for (README: "On a Kubeflow cluster").
KUBERNETES_VERSION = "1.33"
CRD_DIR = Path(__file__).resolve().parents[1] / "k8s" / "crds"
OBJECT_META = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class SchemaError(AssertionError):
    """The manifest does not match its schema (or no schema is known for its kind)."""


def closed(node):
    """A copy of a CRD structural schema in which objects with listed properties reject unknown
    fields (see the module docstring), and `nullable` becomes a JSON-schema null type."""
    if isinstance(node, list):
        return [closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions", "$defs"):
            out[key] = {k: closed(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = closed(value)
        else:
            out[key] = value
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> closed JSON schema, for every served version of every CRD in CRD_DIR."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                if not v.get("served"):
                    continue
                schema = closed(v["schema"]["openAPIV3Schema"])
                schema["$id"] = f"https://kubernetes.io/api/crd/{spec['group']}/{v['name']}/{spec['names']['kind'].lower()}"
                schema.setdefault("properties", {})["metadata"] = {"$ref": OBJECT_META}
                out[(spec["group"], v["name"], spec["names"]["kind"])] = schema
    return out


def _schema_dir(version: str) -> Path:
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = Path(str(root / f"v{version}.0-local-strict"))
    if not path.is_dir():
        raise SchemaError(f"kubernetes-validate has no schemas for Kubernetes {version}")
    return path


@functools.lru_cache(maxsize=None)
def _registry(version: str) -> Registry:
    defs = json.loads((_schema_dir(version) / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(root)"


def validate(doc: dict, version: str = KUBERNETES_VERSION) -> str:
    """Raise SchemaError unless `doc` matches its schema; returns which schema checked it."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, ver = api_version.rpartition("/")
    name = f"{kind} {(doc.get('metadata') or {}).get('name', '?')}"
    schema = crd_schemas().get((group, ver, kind))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema, registry=_registry(version))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            raise SchemaError(f"{name} ({api_version}) does not match its CRD schema:\n"
                              + "\n".join(f"  {_where(e)}: {e.message[:300]}" for e in errors[:20]))
        return f"CRD {group}/{ver} {kind}"
    import kubernetes_validate

    try:
        kubernetes_validate.validate(copy.deepcopy(doc), version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        raise SchemaError(f"{name}: no schema for {api_version} {kind}: neither a Kubernetes {version} kind nor a CRD in "
                          f"{CRD_DIR} (add the CRD and name its source in SOURCES.md)") from None
    except kubernetes_validate.ValidationError as e:
        raise SchemaError(f"{name} ({api_version}) does not match the Kubernetes {version} schema: "
                          f"{_where(e)}: {e.message[:300]}") from None
    return f"Kubernetes {version} {api_version} {kind}"
