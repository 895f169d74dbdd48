"""infra/*.tf parsed with python-hcl2, with the quotes it keeps around strings removed: what the infra tests read.

Also the offline provider-schema check (`check_document`, `check_infra`): every resource,
data source and provider block against tests/data/terraform_provider_schema.json; and
`Infra`, which evaluates infra/'s expressions for one deployment's variables (the
functions' environment, a VM's metadata, a for_each's instances), by value.
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


# ---------------------------------------------------------------- evaluating expressions, by value
# What a plan would compute for the values the tests care about (the functions' environment, a VM's
# metadata, which instances a for_each makes), for one deployment's variables: a small evaluator of
# the HCL that infra/*.tf writes, over python-hcl2's syntax tree. What Terraform only learns at apply
# time (a cluster's endpoint, a reserved address) stays a `Ref` that prints as `${<its address>}`;
# known ids and emails are derived from the resources' own arguments as the provider forms them.
# An expression or function it does not know raises, so a test cannot pass by misreading one.


class Ref:
    """A value known only after apply: its address, e.g. google_compute_address.aggregator[0].address."""

    def __init__(self, path: str) -> None:
        self.path = path

    def attr(self, name: str) -> Ref:
        return Ref(f"{self.path}.{name}")

    def index(self, key) -> Ref:
        return Ref(f"{self.path}[{_tf_literal(key)}]")

    def __str__(self) -> str:
        return "${" + self.path + "}"

    def __eq__(self, other) -> bool:
        return isinstance(other, Ref) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    __repr__ = __str__


class TfSet(tuple):
    """toset(...): unique, iterated in lexical order (for the strings infra/ puts in sets)."""


def _tf_literal(key) -> str:
    return f'"{key}"' if isinstance(key, str) else str(key)


def _tf_str(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        raise ValueError("null in a string template")
    if isinstance(value, list | dict | tuple):
        raise ValueError(f"cannot interpolate a collection: {value!r}")
    return str(value)


def _plain(value):
    """A value as jsonencode sees it (a Ref as its address, sets as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Ref):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _sorted_items(value):
    """(key, value) in Terraform's iteration order: maps and objects by key, lists by index."""
    if isinstance(value, dict):
        return sorted(value.items())
    if isinstance(value, list | tuple):
        return list(enumerate(value))
    raise TypeError(f"cannot iterate over {value!r}")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
        elif text.startswith("$${", i):
            out.append("${")
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _format(fmt: str, *args) -> str:
    """format() with %s verbs only (all infra/ uses)."""
    import re

    verbs = re.findall(r"%.", fmt)
    if any(v not in ("%s", "%%") for v in verbs) or verbs.count("%s") != len(args):
        raise NotImplementedError(f"format({fmt!r}, ...)")
    return fmt % tuple(_tf_str(a) for a in args)


def _functions() -> dict:
    import json

    def merge(*maps):
        out = {}
        for m in maps:
            if m is None:
                continue
            if not isinstance(m, dict):
                raise TypeError(f"merge of a non-map {m!r}")
            out.update(m)
        return out

    def coalesce(*values):
        for v in values:
            if v is not None and v != "":
                return v
        raise ValueError("coalesce: no non-null, non-empty argument")

    def lookup(m, key, *default):
        if key in m:
            return m[key]
        if default:
            return default[0]
        raise KeyError(key)

    def toset(values):
        if any(isinstance(v, Ref) for v in values):
            raise TypeError("toset of values known only after apply")
        return TfSet(sorted(set(values)))

    return {
        "merge": merge,
        "coalesce": coalesce,
        "lookup": lookup,
        "toset": toset,
        "join": lambda sep, items: sep.join(_tf_str(i) for i in items),
        "jsonencode": lambda v: json.dumps(_plain(v), sort_keys=True, separators=(",", ":")),
        "format": _format,
        "keys": lambda m: sorted(m),
        "values": lambda m: [v for _, v in sorted(m.items())],
        "contains": lambda items, v: v in items,
        "concat": lambda *lists: [x for lst in lists for x in lst],
        "length": len,
        "tostring": _tf_str,
        "upper": str.upper,
        "lower": str.lower,
        "startswith": lambda s, p: s.startswith(p),
        "split": lambda sep, s: s.split(sep),
        "sort": lambda items: sorted(items),
        "distinct": lambda items: list(dict.fromkeys(items)),
        "replace": lambda s, old, new: s.replace(old, new),
        "alltrue": lambda items: all(items),
        "anytrue": lambda items: any(items),
    }


class Instance:
    """One instance of a resource (or a nested block of one), its arguments evaluated on demand."""

    def __init__(self, infra: Infra, address: str, rtype: str, body, each: dict | None) -> None:
        self.infra, self.address, self.rtype, self.body, self.each = infra, address, rtype, body, each

    def attr(self, name: str):
        attributes, blocks = _body_parts(self.body)
        if name in attributes:
            return self.infra.eval(attributes[name], {"each": self.each} if self.each else {})
        if name in blocks:
            return [Instance(self.infra, f"{self.address}.{name}[{i}]", self.rtype, b, self.each) for i, b in enumerate(blocks[name])]
        computed = self.infra.computed(self, name)
        return computed if computed is not None else Ref(f"{self.address}.{name}")

    def get(self, *path):
        """`get("service_config", 0, "environment_variables")`: nested blocks by index, then an argument."""
        value = self
        for step in path:
            value = value.attr(step) if isinstance(step, str) else value[step]
        return value


def _children(tree):
    from lark import Tree

    return [c for c in tree.children if isinstance(c, Tree) and c.data != "new_line_or_comment"]


def _name(tree) -> str:
    """The text of an identifier or keyword node."""
    return str(tree.children[0])


def _body_parts(body) -> tuple[dict, dict]:
    """(attributes by name -> expression tree, nested blocks by type -> [body]) of a block body."""
    attributes, blocks = {}, {}
    for node in _children(body):
        if node.data == "attribute":
            key, expr = _children(node)
            attributes[_name(key)] = expr
        elif node.data == "block":
            parts = _children(node)
            blocks.setdefault(_name(parts[0]), []).append(parts[-1])
    return attributes, blocks


def _label(tree) -> str:
    return "".join(str(p.children[0]) for p in _children(tree))


class Infra:
    """infra/*.tf for one deployment: `variables` override the declared defaults (and must give
    those without one); `known` gives values known only to the cloud, by address (e.g.
    {"data.google_project.this.number": "123456789012"}); anything else unknown stays a Ref."""

    def __init__(self, variables: dict, known: dict | None = None) -> None:
        self.known = dict(known or {})
        self.functions = _functions()
        self._locals: dict[str, object] = {}
        self._local_values: dict[str, object] = {}
        self._resources: dict[tuple[str, str], object] = {}
        self._variables: dict[str, object] = {}
        declared: dict[str, object] = {}
        for path in sorted(INFRA.glob("*.tf")):
            for block in _children(_children(hcl2.parses_to_tree(path.read_text()))[0]):
                if block.data != "block":
                    continue
                parts = _children(block)
                kind, labels, body = _name(parts[0]), [_label(p) for p in parts[1:-1]], parts[-1]
                if kind == "locals":
                    self._locals.update(_body_parts(body)[0])
                elif kind == "resource":
                    self._resources[(labels[0], labels[1])] = body
                elif kind == "variable":
                    declared[labels[0]] = _body_parts(body)[0].get("default")
        unknown = set(variables) - set(declared)
        assert not unknown, f"no such variables: {sorted(unknown)}"
        for name, default in declared.items():
            if name in variables:
                self._variables[name] = variables[name]
            elif default is not None:
                self._variables[name] = self.eval(default, {})

    # ---------------------------------------------------------------- names

    def var(self, name: str):
        if name not in self._variables:
            raise KeyError(f"var.{name} has no default: give it")
        return self._variables[name]

    def local(self, name: str):
        if name not in self._local_values:
            if name not in self._locals:
                raise KeyError(f"local.{name} is not declared")
            self._local_values[name] = self.eval(self._locals[name], {})
        return self._local_values[name]

    def instances(self, rtype: str, name: str) -> dict:
        """each.key (or count.index) -> Instance; {None: Instance} for a single resource."""
        body = self._resources[(rtype, name)]
        attributes, _ = _body_parts(body)
        address = f"{rtype}.{name}"
        if "for_each" in attributes:
            each = self.eval(attributes["for_each"], {})
            items = [(v, v) for v in each] if isinstance(each, TfSet) else sorted(each.items())
            return {k: Instance(self, f"{address}[{_tf_literal(k)}]", rtype, body, {"key": k, "value": v}) for k, v in items}
        if "count" in attributes:
            return {i: Instance(self, f"{address}[{i}]", rtype, body, None) for i in range(int(self.eval(attributes["count"], {})))}
        return {None: Instance(self, address, rtype, body, None)}

    def resource(self, rtype: str, name: str):
        """As an expression sees it: a map of instances (for_each), a list (count), or the instance."""
        body = self._resources[(rtype, name)]
        found = self.instances(rtype, name)
        attributes, _ = _body_parts(body)
        if "for_each" in attributes:
            return found
        if "count" in attributes:
            return [found[i] for i in range(len(found))]
        return found[None]

    def computed(self, instance: Instance, name: str):
        """Attributes the provider computes from the arguments, where tests need them by value."""
        if f"{instance.address}.{name}" in self.known:
            return self.known[f"{instance.address}.{name}"]
        project = self.var("project")
        if instance.rtype == "google_service_account" and name in ("email", "name", "id"):
            email = f"{instance.attr('account_id')}@{project}.iam.gserviceaccount.com"
            return email if name == "email" else f"projects/{project}/serviceAccounts/{email}"
        if instance.rtype == "google_kms_key_ring" and name == "id":
            return f"projects/{project}/locations/{instance.attr('location')}/keyRings/{instance.attr('name')}"
        if instance.rtype == "google_kms_crypto_key" and name == "id":
            return f"{instance.attr('key_ring')}/cryptoKeys/{instance.attr('name')}"
        return None

    # ---------------------------------------------------------------- expressions

    def eval_text(self, expression: str, scope: dict | None = None):
        """An expression as python-hcl2's documents write it ("${var.x && local.y}")."""
        text = expression[2:-1] if expression.startswith("${") and expression.endswith("}") else expression
        (attribute,) = _children(_children(hcl2.parses_to_tree(f"x = {text}\n"))[0])
        return self.eval(_children(attribute)[1], scope or {})

    def eval(self, tree, scope: dict):
        from lark import Token

        kind = tree.data
        kids = _children(tree)
        if kind == "expr_term":
            if len(kids) != 1:
                raise NotImplementedError(f"expr_term {tree}")
            return self.eval(kids[0], scope)
        if kind in ("identifier", "keyword"):
            return self._name_value(_name(tree), scope)
        if kind == "literal_value":
            return {"true": True, "false": False, "null": None}[str(tree.children[0])]
        if kind == "int_lit":
            return int(str(tree.children[0]))
        if kind == "float_lit":
            return float(str(tree.children[0]))
        if kind == "string":
            parts = []
            for part in kids:
                (inner,) = part.children
                if isinstance(inner, Token):
                    parts.append(_unescape(str(inner)))
                else:
                    value = self.eval(_children(inner)[0], scope)
                    if len(kids) == 1:
                        return value  # "${x}" alone is x itself, whatever its type
                    parts.append(_tf_str(value))
            return "".join(parts)
        if kind == "tuple":
            return [self.eval(k, scope) for k in kids]
        if kind == "object":
            out = {}
            for elem in kids:
                key_tree, value_tree = _children(elem)
                (key_expr,) = _children(key_tree)
                inner = _children(key_expr)
                key = _name(inner[0]) if len(inner) == 1 and inner[0].data == "identifier" else self.eval(key_expr, scope)
                out[_tf_str(key)] = self.eval(value_tree, scope)
            return out
        if kind == "get_attr_expr_term":
            base, attr = kids
            return self._attr(self.eval(base, scope), _name(_children(attr)[0]))
        if kind == "index_expr_term":
            base, index = kids
            return self._index(self.eval(base, scope), self.eval(_children(index)[0], scope))
        if kind == "function_call":
            name = _name(kids[0])
            args = [self.eval(a, scope) for a in _children(kids[1])] if len(kids) > 1 else []
            if name not in self.functions:
                raise NotImplementedError(f"function {name}()")
            return self.functions[name](*args)
        if kind == "conditional":
            cond, yes, no = kids
            test = self.eval(cond, scope)
            if not isinstance(test, bool):
                raise TypeError(f"condition is not a bool: {test!r}")
            return self.eval(yes if test else no, scope)
        if kind == "unary_op":
            op = str(tree.children[0])
            value = self.eval(kids[0], scope)
            return (not value) if op == "!" else -value
        if kind == "binary_op":
            lhs, term = kids
            op_tree, rhs_tree = _children(term)
            op = str(op_tree.children[0])
            left = self.eval(lhs, scope)
            if op == "&&" and left is False:
                return False
            if op == "||" and left is True:
                return True
            right = self.eval(rhs_tree, scope)
            ops = {
                "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "&&": lambda a, b: a and b, "||": lambda a, b: a or b,
                "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
                "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
            }
            if isinstance(left, Ref) or isinstance(right, Ref):
                if op in ("==", "!=") and (left is None or right is None):
                    return (op == "!=")  # an attribute known after apply is not null
                raise ValueError(f"{left!r} {op} {right!r}: known only after apply")
            return ops[op](left, right)
        if kind in ("for_tuple_expr", "for_object_expr"):
            intro, *rest = kids
            names = [_name(i) for i in _children(intro) if i.data == "identifier"]
            collection = self.eval(_children(intro)[-1], scope)
            cond = rest[-1] if rest and rest[-1].data == "for_cond" else None
            body = rest[:-1] if cond is not None else rest
            items = [(v, v) for v in collection] if isinstance(collection, TfSet) else _sorted_items(collection)
            out_list, out_map = [], {}
            for key, value in items:
                inner = dict(scope)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = key, value
                else:
                    inner[names[0]] = value
                if cond is not None and not self.eval(_children(cond)[0], inner):
                    continue
                if kind == "for_tuple_expr":
                    out_list.append(self.eval(body[0], inner))
                else:
                    out_map[_tf_str(self.eval(body[0], inner))] = self.eval(body[1], inner)
            return out_list if kind == "for_tuple_expr" else out_map
        raise NotImplementedError(f"{kind} expressions")

    def _name_value(self, name: str, scope: dict):
        if name in scope:
            return scope[name]
        return _Namespace(self, name)

    def _attr(self, base, name: str):
        if isinstance(base, _Namespace):
            return base.attr(name)
        if isinstance(base, Instance | Ref):
            return base.attr(name)
        if isinstance(base, dict):
            if name not in base:
                raise KeyError(f"no attribute {name!r} in {sorted(base)}")
            return base[name]
        raise TypeError(f"cannot take .{name} of {base!r}")

    def _index(self, base, key):
        if isinstance(base, Ref):
            return base.index(key)
        if isinstance(base, dict):
            if key not in base:
                raise KeyError(f"invalid index {key!r}: {sorted(base)}")
            return base[key]
        if isinstance(base, list | tuple):
            return base[int(key)]
        raise TypeError(f"cannot index {base!r}")


class _Namespace:
    """var., local., data., each., or a resource type, before its name is read."""

    def __init__(self, infra: Infra, head: str, rest: tuple[str, ...] = ()) -> None:
        self.infra, self.head, self.rest = infra, head, rest

    def attr(self, name: str):
        infra, head = self.infra, self.head
        if head == "var":
            return infra.var(name)
        if head == "local":
            return infra.local(name)
        if head == "path":
            return Ref(f"path.{name}")
        if head == "data":
            if not self.rest:
                return _Namespace(infra, "data", (name,))
            address = f"data.{self.rest[0]}.{name}"
            return _KnownOrRef(infra, address)
        if (head, name) in infra._resources:
            return infra.resource(head, name)
        raise KeyError(f"{head}.{name} is not declared")


class _KnownOrRef(Ref):
    """A data source's attribute: known when the test says so, else a Ref."""

    def __init__(self, infra: Infra, path: str) -> None:
        super().__init__(path)
        self.infra = infra

    def attr(self, name: str):
        address = f"{self.path}.{name}"
        return self.infra.known.get(address, Ref(address))


# ---------------------------------------------------------------- one example deployment, for Infra

EXAMPLE_NODE_REGIONS = {"us": "us-central1", "eu": "europe-west4", "ch": "europe-west6"}
EXAMPLE_PROJECT_NUMBER = "123456789012"
EXAMPLE_AGGREGATOR_ADDRESS = "10.9.0.2"


def example_variables(nodes: tuple[str, ...] = ("us", "eu", "ch"), bucket_prefix: str = "", **choices) -> dict:
    """The variables of a deployment of project acme-fl with these nodes (rendered names, a region, worker
    subnet, confidential zone, GKE zone and ranges each), plus `choices` (any variable of infra/)."""
    from shared.config import Settings
    from shared.infra_render import render

    regions = {n: EXAMPLE_NODE_REGIONS[n] for n in nodes}
    variables = dict(render(Settings(project="acme-fl", nodes=nodes, bucket_prefix=bucket_prefix)))
    variables.update(
        node_regions=regions,
        worker_subnet_cidrs={n: f"10.8.{i}.0/24" for i, n in enumerate(nodes)},
        confidential_zones={n: f"{r}-a" for n, r in regions.items()},
        gke_zones={n: f"{r}-b" for n, r in regions.items()},
        gke_cidrs={
            n: {"nodes": f"10.{16 + i}.0.0/20", "pods": f"10.{32 + 4 * i}.0.0/14", "services": f"10.{24 + i}.0.0/20", "control_plane": f"172.16.0.{16 * i}/28"}
            for i, n in enumerate(nodes)
        },
    )
    variables.update(choices)
    return variables


def example_known(nodes: tuple[str, ...] = ("us", "eu", "ch")) -> dict:
    """What the cloud would say for that deployment: the project number, each cluster's DNS endpoint, the aggregator's address."""
    known = {"data.google_project.this.number": EXAMPLE_PROJECT_NUMBER, "google_compute_address.aggregator[0].address": EXAMPLE_AGGREGATOR_ADDRESS}
    for n in nodes:
        known[f'google_container_cluster.workers["{n}"].control_plane_endpoints_config[0].dns_endpoint_config[0].endpoint'] = (
            f"gke-{n}0123.{EXAMPLE_NODE_REGIONS[n]}.gke.goog"
        )
    return known
