"""Checks Istio objects against the CRD schemas in a manifest (`pilot install` output).

usage: crd_schemas.py MANIFEST FILE...   (exit 0: every Istio object of the files is valid)

Each object of a kind the manifest defines is validated (Python `jsonschema`) against the
openAPIV3Schema of its apiVersion. As the API server's strict field validation (kubectl's
default) does, a field the schema does not name is an error unless the object is marked
x-kubernetes-preserve-unknown-fields. An object whose version the CRD does not serve is an error.
Prints one line per object checked and per problem.
"""
import sys

import jsonschema
import yaml


def strict(schema):
    """Unknown fields refused where the API server would refuse them."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in schema):
            schema = dict(schema, additionalProperties=False)
        return {k: strict(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def main():
    manifest, files = sys.argv[1], sys.argv[2:]
    schemas = {}
    with open(manifest) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served"):
                    continue
                schema = strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["apiVersion"] = {"type": "string"}
                schema["properties"]["kind"] = {"type": "string"}
                schema["properties"]["metadata"] = {"type": "object"}
                schemas[(spec["group"] + "/" + version["name"], spec["names"]["kind"])] = schema
    kinds = {kind for _, kind in schemas}
    problems = checked = 0
    for name in files:
        with open(name) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") not in kinds:
                    continue
                key = (doc.get("apiVersion"), doc["kind"])
                label = "%s: %s %s %s" % (name, key[0], key[1], doc.get("metadata", {}).get("name"))
                checked += 1
                if key not in schemas:
                    print("FAIL %s: no served version" % label)
                    problems += 1
                    continue
                errors = list(jsonschema.Draft7Validator(schemas[key]).iter_errors(doc))
                for error in errors:
                    path = ".".join(str(p) for p in error.absolute_path)
                    print("FAIL %s: %s: %s" % (label, path, error.message))
                problems += len(errors)
                if not errors:
                    print("ok   %s" % label)
    if checked == 0:
        print("FAIL: no object of the manifest's kinds in the files")
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
