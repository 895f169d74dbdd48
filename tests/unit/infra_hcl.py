"""infra/*.tf parsed with python-hcl2, with the quotes it keeps around strings removed: what the infra tests read.

Also the offline provider-schema check (`check_document`, `check_infra`): every resource,
data source and provider block against tests/data/terraform_provider_schema.json.
"""

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


# ---------------------------------------------------------------- the provider schema check
# tests/data/terraform_provider_schema.json (infra/scripts/extract_schema.py): the argument and
# block names of every resource and data source type infra/*.tf uses, from the provider's own
# schema. What `terraform validate` would say first about names, without the providers.

SCHEMA_FILE = INFRA.parent / "tests" / "data" / "terraform_provider_schema.json"

# What Terraform itself accepts in any resource or data source, whatever the provider.
META_ARGUMENTS = {"count", "for_each", "depends_on", "provider"}
_CONDITION = {"attributes": {"condition": {"required": True}, "error_message": {"required": True}}, "blocks": {}}
LIFECYCLE = {
    "attributes": {name: {"required": False} for name in ("create_before_destroy", "prevent_destroy", "ignore_changes", "replace_triggered_by")},
    "blocks": {kind: {"required": False, "max_one": False, "block": _CONDITION} for kind in ("precondition", "postcondition")},
}
DATA_LIFECYCLE = {"attributes": {}, "blocks": LIFECYCLE["blocks"]}
# Terraform's built-in resources (no provider schema to extract).
BUILTIN_RESOURCES = {
    "terraform_data": {"attributes": {"input": {"required": False}, "triggers_replace": {"required": False}}, "blocks": {}},
}


def load_schema() -> dict:
    import json

    return json.loads(SCHEMA_FILE.read_text())


def _clean(value):
    """python-hcl2's document with quotes taken off keys and strings; `__is_block__` kept (it tells a block from an object value)."""
    if isinstance(value, dict):
        return {unquote(k): _clean(v) for k, v in value.items() if k != "__comments__"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return unquote(value)


def parse_text(text: str) -> dict:
    """One HCL text, as `check_document` reads it."""
    return _clean(hcl2.loads(text))


def parse_raw_files() -> dict[str, dict]:
    """Each infra/*.tf file, as `check_document` reads it."""
    return {path.name: parse_text(path.read_text()) for path in sorted(INFRA.glob("*.tf"))}


def _is_block(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and v.get("__is_block__") for v in value)


def _is_labelled_block(value) -> bool:
    """python-hcl2 writes `dynamic "x" {}` and `provisioner "local-exec" {}` as `[{label: {..., __is_block__}}]`."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and all(isinstance(b, dict) and b.get("__is_block__") for k, b in v.items() if not k.startswith("__")) for v in value
    )


def _labelled(items: list[dict]):
    """(label, body) of python-hcl2's `[{label: body}]` for labelled blocks."""
    for item in items:
        for label, body in item.items():
            if not label.startswith("__"):
                yield label, body


def _hint(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_block(body: dict, schema: dict, where: str, *, meta: set[str] = frozenset(), meta_blocks: dict | None = None) -> list[str]:
    """Every argument and nested block of `body` against `schema` ({attributes, blocks}), recursively; the errors, as text."""
    errors: list[str] = []
    attributes, blocks = schema["attributes"], schema["blocks"]
    meta_blocks = meta_blocks or {}
    seen: set[str] = set()
    for key, value in body.items():
        if key.startswith("__"):
            continue
        if key == "dynamic" and _is_labelled_block(value):
            for name, dyn in _labelled(value):
                here = f"{where}.dynamic[{name}]"
                seen.add(name)
                if name not in blocks:
                    errors.append(f"{here}: {name!r} is not a block of this type{_hint(name, blocks)}")
                    continue
                extra = {k for k in dyn if not k.startswith("__")} - {"for_each", "iterator", "labels", "content"}
                if extra or "for_each" not in dyn or not _is_block(dyn.get("content")) or len(dyn["content"]) != 1:
                    errors.append(f"{here}: a dynamic block has for_each, one content block, and optionally iterator and labels")
                    continue
                errors += check_block(dyn["content"][0], blocks[name]["block"], f"{here}.content")
            continue
        if (_is_block(value) or _is_labelled_block(value)) and key in meta_blocks:
            if meta_blocks[key] is not None:
                for i, item in enumerate(value):
                    errors += check_block(item, meta_blocks[key], f"{where}.{key}[{i}]")
            continue
        if key in meta:
            continue
        seen.add(key)
        if _is_block(value):
            if key in attributes:
                errors.append(f"{where}.{key}: an argument, not a block: write `{key} = ...`")
            elif key not in blocks:
                errors.append(f"{where}.{key}: unknown block{_hint(key, {**blocks, **attributes})}")
            else:
                if blocks[key]["max_one"] and len(value) > 1:
                    errors.append(f"{where}.{key}: at most one {key} block, found {len(value)}")
                for i, item in enumerate(value):
                    errors += check_block(item, blocks[key]["block"], f"{where}.{key}" + (f"[{i}]" if len(value) > 1 else ""))
        elif key in blocks:
            errors.append(f"{where}.{key}: a block, not an argument: write `{key} {{ ... }}`")
        elif key not in attributes:
            errors.append(f"{where}.{key}: unknown argument{_hint(key, {**attributes, **blocks})}")
        elif problem := _literal_mismatch(value, attributes[key].get("type", "any")):
            errors.append(f"{where}.{key}: {problem}")
    for name, spec in {**attributes, **blocks}.items():
        if spec["required"] and name not in seen:
            errors.append(f"{where}: required {'block' if name in blocks else 'argument'} {name!r} is missing")
    return errors


def _is_expression(value) -> bool:
    return isinstance(value, str) and "${" in value


def _literal_mismatch(value, expected: str) -> str | None:
    """What is wrong with a literal value for an argument of this type (None: fine, or an expression Terraform evaluates)."""
    if _is_expression(value) or value is None or expected == "any":
        return None
    if expected == "bool" and not isinstance(value, bool) and value not in ("true", "false"):
        return f"expects a bool, got {value!r}"
    if expected == "number":
        if isinstance(value, bool) or isinstance(value, list | dict):
            return f"expects a number, got {value!r}"
        try:
            float(value)
        except ValueError:
            return f"expects a number, got {value!r}"
    if expected == "string" and isinstance(value, list | dict):
        return f"expects a string, got {type(value).__name__}"
    if expected == "list" and not isinstance(value, list):
        return f"expects a list, got {value!r}"
    if expected == "map" and not isinstance(value, dict):
        return f"expects a map, got {value!r}"
    return None


def _provider_name(tf_type: str, body: dict) -> str | None:
    explicit = body.get("provider")
    if isinstance(explicit, str):
        return explicit.removeprefix("${").removesuffix("}").split(".")[0]
    prefix = tf_type.split("_", 1)[0]
    return None if prefix == "terraform" else prefix


def check_document(doc: dict, schema: dict, where: str = "") -> list[str]:
    """Every resource, data source and provider block of one parsed .tf document against the extracted schema."""
    errors: list[str] = []
    providers = schema["providers"]
    for kind, key, lifecycle in (("resource", "resources", LIFECYCLE), ("data", "data_sources", DATA_LIFECYCLE)):
        for tf_type, named in _labelled(doc.get(kind, [])):
            for name, body in _labelled([named]):
                here = f"{where}{'' if kind == 'resource' else 'data.'}{tf_type}.{name}"
                provider = _provider_name(tf_type, body)
                if provider is None and kind == "resource" and tf_type in BUILTIN_RESOURCES:
                    type_schema = BUILTIN_RESOURCES[tf_type]
                elif provider not in providers:
                    errors.append(f"{here}: provider {provider!r} has no extracted schema (infra/scripts/extract_schema.py)")
                    continue
                elif tf_type not in providers[provider][key]:
                    other = [p for p, s in providers.items() if tf_type in s[key]]
                    errors.append(
                        f"{here}: {provider} {providers[provider]['version']} has no {kind} type {tf_type!r}"
                        + (f" (it is {other[0]}'s: set provider = {other[0]})" if other else " in the extract: re-run infra/scripts/extract_schema.py, or fix the name")
                    )
                    continue
                else:
                    type_schema = providers[provider][key][tf_type]
                meta_blocks = {"lifecycle": lifecycle}
                if kind == "resource":
                    meta_blocks |= {"provisioner": None, "connection": None}
                errors += check_block(body, type_schema, here, meta=META_ARGUMENTS, meta_blocks=meta_blocks)
    for name, body in _labelled(doc.get("provider", [])):
        if name not in providers:
            errors.append(f"{where}provider.{name}: no extracted schema for this provider")
            continue
        errors += check_block(body, providers[name]["provider"], f"{where}provider.{name}", meta={"alias"})
    return errors


def check_infra(schema: dict | None = None) -> list[str]:
    """check_document for every infra/*.tf file."""
    schema = schema or load_schema()
    return [error for name, doc in parse_raw_files().items() for error in check_document(doc, schema, f"{name}: ")]
