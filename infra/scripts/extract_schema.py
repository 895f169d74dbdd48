#!/usr/bin/env python3
"""Extract the Terraform provider schema of what infra/*.tf uses, for an offline check (tests/unit/test_infra_schema.py).

`terraform validate` needs the providers, which the development machines cannot
download. The prebuilt CDK for Terraform bindings of a provider
(PyPI `cdktf-cdktf-provider-google`, `-google-beta`, `-archive`) are generated
from that provider's own schema (`terraform providers schema -json`) and ship it
as a jsii assembly (`_jsii/*.jsii.tgz`, `package/.jsii`): one config struct per
resource and data source, whose properties are its arguments, and one struct per
nested block. The google package is ~50 MB (a 300 MB assembly), too big to be a
dev dependency for a test of a few dozen resource types, so this script reads
the wheels once and writes just the types infra/*.tf uses to
tests/data/terraform_provider_schema.json, recording each package's name,
version, wheel sha256, the sha256 of its assembly and the provider version it
wraps (infra/versions.tf pins that version).

    pip download --no-deps -d /tmp/w cdktf-cdktf-provider-google==16.12.1 \\
        cdktf-cdktf-provider-google-beta==16.12.1 cdktf-cdktf-provider-archive==11.0.1
    .venv/bin/python infra/scripts/extract_schema.py /tmp/w/*.whl

Re-run it after adding a resource type to infra/ (the test names the missing type).
With no wheel given it reads the packages from the environment, if installed.

What the extract holds per block: its arguments (name -> required, type) and its
nested blocks (name -> required, max_one, block). Names are Terraform's: taken
from the registry anchor in each property's docs (`...#detect_md5hash`), which
cdktf writes from the schema; a property without one (a handful of the
provider's thousands) falls back to its camelCase name in snake_case.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
OUT = REPO / "tests" / "data" / "terraform_provider_schema.json"

# Terraform provider (its local name in versions.tf) -> the PyPI package of its prebuilt bindings.
PACKAGES = {
    "google": "cdktf-cdktf-provider-google",
    "google-beta": "cdktf-cdktf-provider-google-beta",
    "archive": "cdktf-cdktf-provider-archive",
}
META = "cdktf.TerraformMetaArguments"  # count, for_each, depends_on, provider, lifecycle: Terraform's, not the provider's
_LINK = re.compile(r"\{@link https://registry\.terraform\.io/providers/([\w-]+)/([\w-]+)/([\w.]+)/docs(?:/(resources|data-sources)/(\w+))? ([\w-]+)\}")
_ANCHOR = re.compile(r"\{@link https://registry\.terraform\.io/providers/\S+#([\w-]+) \w+#[\w-]+\}")


@dataclass(frozen=True)
class Assembly:
    """One package's jsii assembly and where it came from."""

    package: str
    package_version: str
    assembly_sha256: str  # of the _jsii/*.jsii.tgz file, as the wheel's RECORD lists it
    wheel_sha256: str | None  # of the wheel, when read from one
    jsii: dict


# ---------------------------------------------------------------- reading a package


def _assembly_from_tgz(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile("package/.jsii")
        assert member is not None, "no package/.jsii in the assembly tarball"
        return json.load(member)


def read_wheel(path: Path) -> Assembly:
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        fields = dict(line.split(": ", 1) for line in wheel.read(metadata).decode().splitlines() if ": " in line and not line.startswith(" "))
        (tgz_name,) = [n for n in wheel.namelist() if re.search(r"/_jsii/[^/]+\.jsii\.tgz$", n)]
        tgz = wheel.read(tgz_name)
    name = re.sub(r"[-_.]+", "-", fields["Name"]).lower()  # PyPI's normal form: the wheel says cdktf-cdktf-provider-google_beta
    return Assembly(name, fields["Version"], hashlib.sha256(tgz).hexdigest(), hashlib.sha256(data).hexdigest(), _assembly_from_tgz(tgz))


def installed_assembly_path(package: str) -> Path | None:
    """The installed package's _jsii/*.jsii.tgz, found without importing the package (its import needs node)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_jsii/*.jsii.tgz"))
    return found[0] if found else None


def read_installed(package: str) -> Assembly | None:
    from importlib.metadata import version

    path = installed_assembly_path(package)
    if path is None:
        return None
    tgz = path.read_bytes()
    return Assembly(package, version(package), hashlib.sha256(tgz).hexdigest(), None, _assembly_from_tgz(tgz))


# ---------------------------------------------------------------- the schema in an assembly


def _struct(types: dict, ty: dict) -> tuple[str | None, bool]:
    """(fqn of the struct a property's type holds, whether it is a list of them); (None, _) for plain values."""
    if "fqn" in ty:
        target = types.get(ty["fqn"])
        return (ty["fqn"], False) if target and target.get("datatype") else (None, False)
    if "union" in ty:
        for option in ty["union"]["types"]:
            fqn, many = _struct(types, option)
            if fqn:
                return fqn, many
    if "collection" in ty:
        fqn, _ = _struct(types, ty["collection"]["elementtype"])
        return fqn, True
    return None, False


def _value_type(ty: dict) -> str:
    """string | number | bool | list | map | any: what an argument holds, coarsely."""
    if "primitive" in ty:
        return {"boolean": "bool", "json": "any"}.get(ty["primitive"], ty["primitive"])
    if "collection" in ty:
        return "map" if ty["collection"]["kind"] == "map" else "list"
    if "union" in ty:
        kinds = {_value_type(option) for option in ty["union"]["types"] if option.get("fqn") != "cdktf.IResolvable"}
        return kinds.pop() if len(kinds) == 1 else "any"
    return "any"


def _tf_name(prop: dict) -> str:
    docs = prop.get("docs", {})
    m = _ANCHOR.search(f"{docs.get('summary', '')} {docs.get('remarks', '')}")
    if m:
        return m.group(1)
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", prop["name"]).lower()


def _properties(types: dict, fqn: str) -> list[dict]:
    struct = types[fqn]
    props = list(struct.get("properties", []))
    for parent in struct.get("interfaces", []):
        if parent != META and parent in types:
            props += _properties(types, parent)
    return props


def block_schema(types: dict, fqn: str) -> dict:
    attributes, blocks = {}, {}
    for prop in _properties(types, fqn):
        name = _tf_name(prop)
        required = not prop.get("optional", False)
        struct, many = _struct(types, prop["type"])
        if struct:
            blocks[name] = {"required": required, "max_one": not many, "block": block_schema(types, struct)}
        else:
            attributes[name] = {"required": required, "type": _value_type(prop["type"])}
    return {"attributes": dict(sorted(attributes.items())), "blocks": dict(sorted(blocks.items()))}


def index(jsii: dict) -> dict:
    """provider version, provider config and every resource / data source type -> its config struct's fqn."""
    out: dict = {"resources": {}, "data_sources": {}}
    for fqn, ty in jsii["types"].items():
        base = ty.get("base")
        if base not in ("cdktf.TerraformResource", "cdktf.TerraformDataSource", "cdktf.TerraformProvider"):
            continue
        m = _LINK.search(ty.get("docs", {}).get("summary", ""))
        assert m, f"{fqn}: no registry link in its docs"
        namespace, provider, version, kind, _, tf_type = m.groups()
        (config,) = [p for p in ty["initializer"]["parameters"] if p["name"] == "config"]
        if base == "cdktf.TerraformProvider":
            out.update(source=f"{namespace}/{provider}", version=version, provider=config["type"]["fqn"])
        else:
            out["resources" if kind == "resources" else "data_sources"][tf_type] = config["type"]["fqn"]
    return out


def extract(assembly: Assembly, resources: Iterable[str], data_sources: Iterable[str]) -> dict:
    """The provider's schema for these types (KeyError naming a type the provider lacks)."""
    types, found = assembly.jsii["types"], index(assembly.jsii)
    missing = sorted({*resources} - found["resources"].keys()) + sorted({f"data.{d}" for d in data_sources} - {f"data.{d}" for d in found["data_sources"]})
    if missing:
        raise KeyError(f"{assembly.package} {assembly.package_version} (provider {found['version']}) has no {', '.join(missing)}")
    return {
        "source": found["source"],
        "version": found["version"],
        "package": assembly.package,
        "package_version": assembly.package_version,
        "assembly_sha256": assembly.assembly_sha256,
        "wheel_sha256": assembly.wheel_sha256,
        "provider": block_schema(types, found["provider"]),
        "resources": {name: block_schema(types, found["resources"][name]) for name in sorted(set(resources))},
        "data_sources": {name: block_schema(types, found["data_sources"][name]) for name in sorted(set(data_sources))},
    }


# ---------------------------------------------------------------- what infra/ uses


def provider_of(tf_type: str, body: dict) -> str | None:
    """The provider a resource or data source belongs to: its `provider` argument, else its type's prefix (None: Terraform's own)."""
    explicit = body.get("provider")
    if isinstance(explicit, str):
        return explicit.strip('"').removeprefix("${").removesuffix("}").split(".")[0]
    prefix = tf_type.split("_", 1)[0]
    return None if prefix == "terraform" else prefix


def used_types(infra: Path = INFRA) -> dict[str, dict[str, set[str]]]:
    """provider -> {"resources": types, "data_sources": types} of infra/*.tf."""
    import hcl2

    used: dict[str, dict[str, set[str]]] = {}
    for path in sorted(infra.glob("*.tf")):
        with path.open() as fh:
            doc = hcl2.load(fh)
        for kind, key in (("resource", "resources"), ("data", "data_sources")):
            for item in doc.get(kind, []):
                for tf_type, named in item.items():
                    tf_type = tf_type.strip('"')
                    for body in named.values():
                        provider = provider_of(tf_type, body)
                        if provider is not None:
                            used.setdefault(provider, {"resources": set(), "data_sources": set()})[key].add(tf_type)
    return used


def build(assemblies: dict[str, Assembly], used: dict[str, dict[str, set[str]]]) -> dict:
    providers = {}
    for provider, types in sorted(used.items()):
        if provider not in assemblies:
            raise SystemExit(f"infra/ uses provider {provider!r}: give the wheel of {PACKAGES.get(provider, '?')}")
        providers[provider] = extract(assemblies[provider], types["resources"], types["data_sources"])
    return {
        "generated_by": "infra/scripts/extract_schema.py",
        "note": "Terraform provider schemas (argument and block names) of the types infra/*.tf uses, from the prebuilt cdktf bindings named per provider",
        "providers": providers,
    }


def dumps(schema: dict) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", nargs="*", type=Path, help="cdktf-cdktf-provider-* wheels (default: the installed packages)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    by_package = {name: provider for provider, name in PACKAGES.items()}
    assemblies: dict[str, Assembly] = {}
    for wheel in args.wheels:
        assembly = read_wheel(wheel)
        assemblies[by_package[assembly.package]] = assembly
    for provider, package in PACKAGES.items():
        if provider not in assemblies and (installed := read_installed(package)):
            assemblies[provider] = installed
    text = dumps(build(assemblies, used_types()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text)} bytes): " + ", ".join(f"{p} {a.package} {a.package_version}" for p, a in sorted(assemblies.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
