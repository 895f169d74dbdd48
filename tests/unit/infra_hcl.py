"""infra/*.tf parsed with python-hcl2, with the quotes it keeps around strings removed: what the infra tests read."""

from __future__ import annotations

from pathlib import Path

import hcl2

INFRA = Path(__file__).resolve().parents[2] / "infra"


def unquote(value):
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k not in ("__comments__", "__is_block__")}
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_files() -> dict[str, dict]:
    """Each .tf file's document, by file name."""
    out = {}
    for path in sorted(INFRA.glob("*.tf")):
        with path.open() as fh:
            out[path.name] = unquote(hcl2.load(fh))
    return out


def resources(doc: dict) -> dict[tuple[str, str], dict]:
    """(type, name) -> body of every resource in one parsed document."""
    found = {}
    for item in doc.get("resource", []):
        for rtype, named in item.items():
            for name, body in named.items():
                found[(rtype, name)] = body
    return found


def resources_and_locals() -> dict:
    """Every resource and local of infra/*.tf (Terraform refuses a resource or local declared twice, and so does this)."""
    all_resources, all_locals = {}, {}
    for name, doc in parse_files().items():
        found = resources(doc)
        assert not found.keys() & all_resources.keys(), f"{name} declares again {sorted(found.keys() & all_resources.keys())}"
        all_resources |= found
        for item in doc.get("locals", []):
            item = {k: v for k, v in item.items() if not k.startswith("__")}  # python-hcl2's metadata (inline comments)
            assert not item.keys() & all_locals.keys(), f"{name} declares again local {sorted(item.keys() & all_locals.keys())}"
            all_locals.update(item)
    return {"resources": all_resources, "locals": all_locals}
