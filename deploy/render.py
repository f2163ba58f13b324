#!/usr/bin/env python3
"""Renders deploy/kubernetes/kustomization.yaml offline, the small part of kustomize it uses:
every file in `resources` (namespace applied), each `configMapGenerator` as a ConfigMap of its
files (no hash suffix, as `generatorOptions` asks). Writes the documents to OUT_DIR, one file
each, for schema validation, and prints the policy files the ConfigMaps carry (one a line) for
`outriderctl validate`. Fails on anything it does not understand, on a listed file that is
missing, and on a manifest in the directory that the kustomization does not list."""

import os
import sys

import yaml

KNOWN = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions"}


def main(base, out_dir):
    with open(os.path.join(base, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN
    if unknown:
        sys.exit(f"render.py: unsupported kustomization fields: {sorted(unknown)}")
    if not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
        sys.exit("render.py: generatorOptions.disableNameSuffixHash must be true")
    namespace = k.get("namespace")
    docs = []
    listed = set()
    for res in k.get("resources", []):
        listed.add(os.path.normpath(res))
        with open(os.path.join(base, res)) as f:
            for doc in yaml.safe_load_all(f):
                if doc is None:
                    continue
                if namespace and doc["kind"] != "Namespace":
                    doc.setdefault("metadata", {})["namespace"] = namespace
                docs.append(doc)
    policies = []
    for gen in k.get("configMapGenerator", []):
        data = {}
        for path in gen["files"]:
            listed.add(os.path.normpath(path))
            full = os.path.join(base, path)
            with open(full) as f:
                data[os.path.basename(path)] = f.read()
            policies.append(full)
        meta = {"name": gen["name"]}
        if namespace:
            meta["namespace"] = namespace
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for root, _, files in os.walk(base):
        for name in files:
            rel = os.path.normpath(os.path.relpath(os.path.join(root, name), base))
            if name.endswith((".yaml", ".yml")) and rel != "kustomization.yaml" and rel not in listed:
                sys.exit(f"render.py: {rel} is not listed in kustomization.yaml")
    os.makedirs(out_dir, exist_ok=True)
    for i, doc in enumerate(docs):
        name = f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        with open(os.path.join(out_dir, name), "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    print("\n".join(policies))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
