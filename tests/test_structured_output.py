"""Structured output: response_format through constrained decoding, on the real default
model behind the real server, asked with the official openai client. Whatever the model
would say, the answer must parse and validate against the schema."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from test_server import ServerProcess

N_SCHEMAS = 20
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def server(default_model_path, tmp_path_factory):
    proc = ServerProcess(default_model_path, tmp_path_factory.mktemp("server"))
    yield proc
    proc.close()


# --- random schemas, bounded so that a 135M model finishes them within MAX_TOKENS ---------
WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no", "north", "south", "x1", "a b"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum"]
    if depth < 2:
        kinds += ["object", "object", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 16)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":  # a multiple of 0.25: unbounded fractions let a model run on
        return {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.25}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1),
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    names = rng.sample(["name", "age", "color", "pet", "ok", "size", "tags", "where", "info"],
                       rng.randint(1, 4))
    return {"type": "object", "additionalProperties": False,
            "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, rng.randint(0, len(names)))}


def violations(value, schema: dict, where: str = "$") -> list[str]:
    """A validator for the JSON Schema subset random_schema writes (no jsonschema package
    in the environment): every way value breaks schema."""
    if "enum" in schema:
        return [] if value in schema["enum"] else [f"{where}: {value!r} not in enum"]
    kind = schema["type"]
    checks = {"string": lambda v: isinstance(v, str),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "boolean": lambda v: isinstance(v, bool),
              "array": lambda v: isinstance(v, list),
              "object": lambda v: isinstance(v, dict)}
    if not checks[kind](value):
        return [f"{where}: {value!r} is not {kind}"]
    errors = []
    if kind == "string" and len(value) > schema["maxLength"]:
        errors.append(f"{where}: longer than {schema['maxLength']}")
    if kind in ("integer", "number") and not schema["minimum"] <= value <= schema["maximum"]:
        errors.append(f"{where}: {value} out of range")
    if kind == "number" and (value / schema["multipleOf"]) % 1:
        errors.append(f"{where}: {value} not a multiple of {schema['multipleOf']}")
    if kind == "array":
        if not schema["minItems"] <= len(value) <= schema["maxItems"]:
            errors.append(f"{where}: {len(value)} items")
        for i, item in enumerate(value):
            errors += violations(item, schema["items"], f"{where}[{i}]")
    if kind == "object":
        errors += [f"{where}: missing {k}" for k in schema["required"] if k not in value]
        errors += [f"{where}: extra {k}" for k in value if k not in schema["properties"]]
        for k, v in value.items():
            if k in schema["properties"]:
                errors += violations(v, schema["properties"][k], f"{where}.{k}")
    return errors


def test_the_validator_catches_violations():
    schema = {"type": "object", "additionalProperties": False, "required": ["a"],
              "properties": {"a": {"type": "array", "items": {"enum": ["x"]},
                                   "minItems": 0, "maxItems": 1},
                             "b": {"type": "integer", "minimum": 0, "maximum": 3},
                             "c": {"type": "number", "minimum": 0, "maximum": 3,
                                   "multipleOf": 0.25}}}
    assert violations({"a": ["x"], "b": 2, "c": 1.75}, schema) == []
    for bad in ({"b": 1}, {"a": ["y"]}, {"a": ["x", "x"]}, {"a": [], "b": 9}, {"a": [], "d": 1},
                {"a": [], "b": True}, ["a"], {"a": [], "c": 0.3}):
        assert violations(bad, schema), bad


def test_random_schemas_give_valid_json(server):
    client = server.client()
    rng = random.Random(2024)
    for i in range(N_SCHEMAS):
        schema = random_schema(rng)
        if schema.get("type") != "object":  # response schemas are objects at the top
            schema = {"type": "object", "additionalProperties": False, "required": ["value"],
                      "properties": {"value": schema}}
        answer = client.chat.completions.create(
            model="smollm2", max_tokens=MAX_TOKENS, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": "Fill in this JSON form with made-up data."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": f"form{i}", "schema": schema}})
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        value = json.loads(choice.message.content)
        assert violations(value, schema) == [], (schema, value)


def test_json_object_mode(server):
    client = server.client()
    for seed in range(3):
        answer = client.chat.completions.create(  # free-form JSON runs longer than a form
            model="smollm2", max_tokens=2 * MAX_TOKENS, temperature=0.7, seed=seed,
            messages=[{"role": "user", "content": "Describe your favourite city in JSON."}],
            response_format={"type": "json_object"})
        assert answer.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_json_schema_streamed_parses(server):
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "rank": {"type": "integer", "minimum": 1, "maximum": 10}}}
    pieces = server.client().chat.completions.create(
        model="smollm2", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Name a city and its rank."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert violations(json.loads(text), schema) == []


@pytest.mark.parametrize("response_format,param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                      "properties": 5}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_object", "schema": {}}, "response_format.schema"),
])
def test_bad_response_format_is_a_400(server, response_format, param):
    response = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
        "response_format": response_format})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def run_cli(*args, timeout=300):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "llmpress.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_run_json_schema(default_model_path, tmp_path):
    schema = {"type": "object", "additionalProperties": False, "required": ["animal", "legs"],
              "properties": {"animal": {"type": "string", "maxLength": 12},
                             "legs": {"type": "integer", "minimum": 0, "maximum": 8}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    done = run_cli(default_model_path, "--chat", "-p", "Name an animal.", "--json-schema", path,
                   "--temp", "0", "-n", "100", "--ctx", "512")
    assert done.returncode == 0, done.stderr
    assert violations(json.loads(done.stdout), schema) == []


@pytest.mark.parametrize("content,expected", [
    ('{"type": "foo"}', "invalid JSON schema"), ("{not json", "is not a JSON file"),
    (None, "cannot read the JSON schema")])
def test_cli_run_bad_json_schema_is_one_line(default_model_path, tmp_path, content, expected):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    done = run_cli(default_model_path, "-p", "hi", "--json-schema", path, "-n", "4",
                   "--ctx", "512")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and expected in done.stderr
    assert "Traceback" not in done.stderr
