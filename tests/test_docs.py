"""The docs in docs/ say what the code does: the config reference is generated from the
schema, every JSON Schema there takes the example beside it and what the agent really
sends and serves, and every link in the README and the docs leads to a file in this tree.

JSON Schemas (draft 2020-12) are checked by a small validator below, which knows the
keywords the docs use and refuses any other (a misspelt keyword would otherwise check
nothing): ``jsonschema`` is not a dependency of the project.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterctl.agent.service import Agent
from clusterctl.hibernate import schedule
from tests.conftest import agent_config, wait_until
from tests.fakes.control_plane import free_port, running

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
LINKED_PAGES = (REPO / "README.md", *sorted(DOCS.glob("*.md")))

# -- the config reference ---------------------------------------------------------------


def gen_config_doc() -> Any:
    """scripts/gen-config-doc as a module (it has no .py suffix)."""
    path = REPO / "scripts" / "gen-config-doc"
    loader = importlib.machinery.SourceFileLoader("gen_config_doc", str(path))
    spec = importlib.util.spec_from_loader("gen_config_doc", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_config_reference_is_what_the_schema_gives() -> None:
    """docs/config.md is the generator's output for the schema in config.py: a setting added,
    renamed or given another default, range or description shows up there."""
    rendered = gen_config_doc().render()
    assert (DOCS / "config.md").read_text(encoding="utf-8") == rendered, (
        "docs/config.md is out of date with agent/clusterctl/config.py: run "
        "scripts/gen-config-doc")


def test_the_config_reference_names_every_key_with_its_default() -> None:
    from clusterctl import config as cfg

    text = (DOCS / "config.md").read_text(encoding="utf-8")
    for section, values in cfg.as_toml_dict(cfg.Config()).items():
        block = text.split(f"\n## [{section}]\n", 1)[1].split("\n## ", 1)[0]
        for key, default in values.items():
            assert f"| `{key}` |" in block and f"`{json.dumps(default)}`" in block, \
                f"[{section}] {key} (default {default!r}) is not in docs/config.md"


# -- a minimal JSON Schema (draft 2020-12) validator ------------------------------------

ANNOTATIONS = {"$schema", "$id", "$comment", "$defs", "title", "description", "examples",
               "default", "format"}
ASSERTIONS = {"type", "enum", "const", "properties", "required", "additionalProperties",
              "propertyNames", "items", "minItems", "maxItems", "minimum", "maximum",
              "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
              "minProperties", "maxProperties", "anyOf", "oneOf", "allOf", "$ref"}
TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}


def schema_problems(schema: Any, where: str = "#") -> list[str]:
    """What is wrong with ``schema`` itself: unknown keywords, bad types, dangling refs."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"{where}: a schema must be an object or a boolean"]
    problems = [f"{where}: unknown keyword {key!r}" for key in schema
                if key not in ANNOTATIONS | ASSERTIONS]
    kinds = schema.get("type")
    for kind in [kinds] if isinstance(kinds, str) else kinds or []:
        if kind not in TYPES:
            problems.append(f"{where}: unknown type {kind!r}")
    if "required" in schema and not (isinstance(schema["required"], list) and all(
            isinstance(name, str) for name in schema["required"])):
        problems.append(f"{where}: required must be a list of names")
    for name, sub in schema.get("properties", {}).items():
        problems += schema_problems(sub, f"{where}/properties/{name}")
    for name, sub in schema.get("$defs", {}).items():
        problems += schema_problems(sub, f"{where}/$defs/{name}")
    for key in ("items", "additionalProperties", "propertyNames"):
        if key in schema:
            problems += schema_problems(schema[key], f"{where}/{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        for index, sub in enumerate(schema.get(key, [])):
            problems += schema_problems(sub, f"{where}/{key}/{index}")
    return problems


def _is_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"object": dict, "array": list, "string": str}[kind])


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    assert ref.startswith("#/"), f"only local references are used in the docs: {ref}"
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def errors(value: Any, schema: Any, root: dict[str, Any], at: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (JSON Schema 2020-12, the keywords above)."""
    if schema is True:
        return []
    if schema is False:
        return [f"{at}: not allowed here"]
    found: list[str] = []
    if "$ref" in schema:
        found += errors(value, _resolve(schema["$ref"], root), root, at)
    if "type" in schema:
        kinds = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_is_type(value, kind) for kind in kinds):
            return [*found, f"{at}: {json.dumps(value)[:60]} is not {' or '.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and (value != schema["const"] or type(value) is not type(
            schema["const"])):
        found.append(f"{at}: {value!r} is not {schema['const']!r}")
    if isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{at}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{at}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            found.append(f"{at}: {value} <= exclusiveMinimum {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            found.append(f"{at}: {value} >= exclusiveMaximum {schema['exclusiveMaximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            found.append(f"{at}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{at}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{at}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            found.append(f"{at}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{at}: more than {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                found += errors(item, schema["items"], root, f"{at}[{index}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [f"{at}: {name!r} is required" for name in schema.get("required", [])
                  if name not in value]
        if len(value) < schema.get("minProperties", 0):
            found.append(f"{at}: fewer than {schema['minProperties']} keys")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            found.append(f"{at}: more than {schema['maxProperties']} keys")
        for name, item in value.items():
            if "propertyNames" in schema:
                found += errors(name, schema["propertyNames"], root, f"{at} key {name!r}")
            if name in properties:
                found += errors(item, properties[name], root, f"{at}.{name}")
            elif "additionalProperties" in schema:
                found += errors(item, schema["additionalProperties"], root, f"{at}.{name}")
    for sub in schema.get("allOf", []):
        found += errors(value, sub, root, at)
    if "anyOf" in schema and all(errors(value, sub, root, at) for sub in schema["anyOf"]):
        found.append(f"{at}: matches none of anyOf")
    if "oneOf" in schema and sum(not errors(value, sub, root, at)
                                 for sub in schema["oneOf"]) != 1:
        found.append(f"{at}: does not match exactly one of oneOf")
    return found


def test_the_validator_catches_what_it_must() -> None:
    """The small validator above is a real check: each of these breaks its schema."""
    schema = {"type": "object", "required": ["a"], "additionalProperties": False,
              "properties": {"a": {"type": "integer", "minimum": 1},
                             "b": {"type": ["string", "null"], "pattern": "^x"},
                             "c": {"$ref": "#/$defs/c"}},
              "$defs": {"c": {"enum": ["yes", "no"]}}}
    assert errors({"a": 1, "b": "xy", "c": "no"}, schema, schema) == []
    bad: Any
    for bad in ({}, {"a": 0}, {"a": True}, {"a": 1.5}, {"a": 1, "z": 1}, {"a": 1, "b": "y"},
                {"a": 1, "c": "maybe"}, [], None):
        assert errors(bad, schema, schema), bad
    assert schema_problems({"type": "object", "require": ["a"]})
    assert schema_problems({"type": "dict"})


# -- the JSON Schemas in docs/ -----------------------------------------------------------


def json_blocks(page: Path) -> list[tuple[int, Any]]:
    """(line, parsed value) of every ```json block of ``page``."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```json\n(.*?)^```$", text, re.M | re.S):
        line = text.count("\n", 0, match.start()) + 1
        try:
            blocks.append((line, json.loads(match.group(1))))
        except ValueError as err:
            pytest.fail(f"{page.name}:{line}: a json block that is not JSON: {err}")
    return blocks


def doc_schemas() -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(where, schema, the example block just before it) for every schema in docs/."""
    for page in sorted(DOCS.glob("*.md")):
        previous: tuple[int, Any] | None = None
        for line, value in json_blocks(page):
            if isinstance(value, dict) and "$schema" in value:
                where = f"{page.name}:{line} {value.get('title', '')}"
                assert previous is not None, f"{where}: no example before the schema"
                yield where, value, previous[1]
                previous = None  # an example serves the one schema after it
            else:
                previous = (line, value)


SCHEMAS = list(doc_schemas())


def schema_titled(title: str) -> dict[str, Any]:
    found = [schema for _, schema, _ in SCHEMAS if schema.get("title") == title]
    assert len(found) == 1, f"docs/ should hold one schema titled {title!r}"
    return found[0]


def test_the_api_and_the_protocol_pages_carry_their_schemas() -> None:
    pages = {where.split(":")[0] for where, _, _ in SCHEMAS}
    assert {"api.md", "protocol.md"} <= pages


@pytest.mark.parametrize(("where", "schema", "example"), SCHEMAS,
                         ids=[where for where, _, _ in SCHEMAS])
def test_each_schema_is_draft_2020_12_and_takes_its_example(
        where: str, schema: dict[str, Any], example: Any) -> None:
    assert schema["$schema"] == DRAFT, f"{where}: not a draft 2020-12 schema"
    assert not schema_problems(schema), schema_problems(schema)
    assert not errors(example, schema, schema), errors(example, schema, schema)


def test_every_endpoint_of_the_local_api_has_its_section() -> None:
    """An endpoint added to the API without a section in docs/api.md fails here."""
    from clusterctl.agent.api import ROUTES

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^## (GET|POST|PUT|DELETE) (/\S*)$", text, re.M))
    missing = sorted(f"{method} {path}" for method, path in set(ROUTES) - documented)
    assert not missing, f"docs/api.md has no section for {missing}"


def get_json(url: str, headers: dict[str, str] | None = None,
             body: dict[str, Any] | None = None, method: str = "GET") -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_what_the_agent_sends_and_serves_matches_the_documented_schemas(
        start_agent: Callable[..., tuple[Agent, list[str]]], tmp_path: Path) -> None:
    """A real agent (one idle fake GPU, the `control` action after 6 s idle) against the
    test control plane: its heartbeats, event batches and hibernation request, and its
    API's answers, each valid under the schema the docs give for it."""
    token = tmp_path / "api-token"
    token.write_text("docs-test-token\n")
    token.chmod(0o600)
    port = free_port()
    with running() as plane:
        text = agent_config(tmp_path, 'enabled = true\npause_after_minutes = 0.1\n'
                            'action = "control"\n', port=port, control_url=plane.url)
        text = text.replace("[api]\n", f'[api]\ntoken_file = "{token}"\n')
        path = tmp_path / "clusterctl.toml"
        path.write_text(text)
        schedule.save(tmp_path / "state", schedule.validate("09:00", "18:00", "UTC"))
        agent, _ = start_agent(path)
        assert agent.first_cycle.wait(10)
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer docs-test-token", "Content-Type": "application/json"}
        served = {
            "GET /api/v1/monitoring/gpu-metrics: 200":
                get_json(f"{base}/api/v1/monitoring/gpu-metrics"),
            "GET /api/gpu/status: 200": get_json(f"{base}/api/gpu/status?gpu_id=0"),
            "GET /api/gpu/temperature/trend: 200":
                get_json(f"{base}/api/gpu/temperature/trend?gpu_id=0&duration=5"),
            "GET /healthz: 200 or 503": get_json(f"{base}/healthz"),
            "POST /api/gpu/memory/allocate: 200": get_json(
                f"{base}/api/gpu/memory/allocate", auth,
                {"allocation_id": "llm", "required_mb": 1024}, "POST"),
            "PUT /api/gpu/config: 200": get_json(f"{base}/api/gpu/config", auth,
                                                 {"temp_throttle": 84}, "PUT"),
        }
        wait_until(lambda: plane.hibernate_requests and any(
            h["status"] == "hibernating" for h in plane.heartbeats), timeout_s=14)
        received = plane.received_list()
    for title, answer in served.items():
        schema = schema_titled(title)
        assert not errors(answer, schema, schema), (title, errors(answer, schema, schema))
    kinds = {"heartbeat": "POST {control_url}/api/agent/status: the heartbeat",
             "events": "POST {control_url}/api/agent/events: a batch",
             "hibernate": "POST {control_url}/api/instances/{instance_id}/hibernate"}
    assert {r.kind for r in received} == set(kinds)
    for r in received:
        schema = schema_titled(kinds[r.kind])
        assert not errors(r.payload, schema, schema), (r.kind, errors(r.payload, schema,
                                                                      schema))
    assert any(r.kind == "heartbeat" and r.payload["schedule"] for r in received)


# -- links ------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(page: Path) -> str:
    """The page without fenced code blocks and inline code: links there are not links."""
    text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    found: set[str] = set()
    text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        words = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", words.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def link_problems(page: Path, repo: Path = REPO) -> list[str]:
    problems = []
    for target in LINK.findall(prose(page)):
        if re.match(r"(https?|mailto):", target):
            continue
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            problems.append(f"{page.name}: {target} is not a path inside this repository")
            continue
        path_part, _, fragment = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.is_relative_to(repo):
            problems.append(f"{page.name}: {target} leads outside the repository")
        elif not linked.exists():
            problems.append(f"{page.name}: {target} does not exist")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            problems.append(f"{page.name}: {target}: no heading #{fragment} there")
    return problems


@pytest.mark.parametrize("page", LINKED_PAGES, ids=[p.name for p in LINKED_PAGES])
def test_every_link_leads_to_a_file_in_this_repository(page: Path) -> None:
    assert not link_problems(page), link_problems(page)


def test_the_readme_lists_the_docs() -> None:
    readme = REPO / "README.md"
    linked = set(LINK.findall(prose(readme)))
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def test_a_link_out_of_the_tree_or_to_nothing_is_caught(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "api.md").write_text("# API\n\n## GET /healthz\n", encoding="utf-8")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "notes.md").write_text("# outside\n", encoding="utf-8")
    probe = repo / "docs" / "probe.md"
    probe.write_text("[a](../../outside/notes.md) [b](missing.md) [c](/etc/passwd) "
                     "[d](file:///etc/passwd) [e](api.md#no-such-heading) [f](api.md#get-healthz) "
                     "`[g](nowhere.md)` [h](https://example.com)\n", encoding="utf-8")
    found = link_problems(probe, repo)
    assert len(found) == 5, found
