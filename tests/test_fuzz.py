"""Property-based fuzzing of everything modlora reads from disk: library manifests, adapter configs, SNI task files
and flat JSONL. Whatever the bytes, the loaders (``ExpertLibrary``, ``get``, ``verify``, ``load_adapter``,
``import_adapter``, ``load_sni_task``, ``read_flat_jsonl``) either succeed or raise a :class:`ModloraError` subclass;
any other exception fails the test. Derandomised, so CI runs the same examples every time."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modlora.data import Task, load_sni_task, load_sni_tasks, read_flat_jsonl
from modlora.errors import ModloraError
from modlora.library.adapters import ADAPTER_CONFIG, LoraSpec, load_adapter
from modlora.library.store import MANIFEST, ExpertLibrary

from .conftest import fresh_copy, make_library_template
from .test_reliability import _rewrite_expert

EXAMPLES = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
SPEC = LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))

LEAF = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=12) | st.sampled_from(["", "LORA", "q_proj", "../../etc", "e1", "\ud800", "x" * 300]))
JSON = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=10)


def _only_modlora_errors(*calls: Callable[[], Any]) -> None:
    """Run each call; a ModloraError is a clear refusal, anything else propagates and fails the example."""
    for call in calls:
        try:
            call()
        except ModloraError:
            pass


def _tokenisable(tasks: dict[str, Task]) -> None:
    """Every text a loader lets through can be encoded as UTF-8 (else the tokenizer raises TypeError later)."""
    for task in tasks.values():
        texts = [task.name, task.definition] + [t for inst in task.instances for t in (inst.input, *inst.outputs)]
        for text in texts:
            text.encode("utf-8")


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """1–4 structural edits: replace a value by arbitrary JSON, delete it, or add a key."""
    for _ in range(data.draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            return data.draw(JSON)
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(JSON)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(JSON)
    return doc


def _raw_mutation(text: bytes, data: st.DataObject) -> bytes:
    """A byte-level corruption of a JSON document: truncation, flipped or inserted bytes, a number with more digits
    than Python parses, or nesting deeper than the parser's recursion limit."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "bignum", "deep", "bad_utf8"]))
    pos = data.draw(st.integers(0, max(len(text) - 1, 0)))
    if kind == "truncate":
        return text[:pos]
    if kind == "flip":
        return text[:pos] + bytes([text[pos] ^ data.draw(st.integers(1, 255))]) + text[pos + 1:]
    if kind == "insert":
        return text[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + text[pos:]
    if kind == "bignum":
        return text.replace(b": 4", b": 4" + b"7" * 5000, 1).replace(b": 2", b": 2" + b"3" * 5000, 1)
    if kind == "deep":
        depth = data.draw(st.sampled_from([50, 5_000, 200_000]))
        return b"[" * depth + text + b"]" * depth
    return text[:pos] + b"\xff\xfe\xc3" + text[pos:]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_library_template(tmp_path_factory.mktemp("fuzz") / "lib")


def _use_library(lib_dir: Path, tmp: Path) -> None:
    """Everything a command does with a library: open, list, load each expert, verify, size, export."""
    def run() -> None:
        lib = ExpertLibrary(lib_dir)
        for name in lib.expert_names():
            _only_modlora_errors(lambda n=name: lib.get(n), lambda n=name: lib.size_bytes(n),
                                 lambda n=name: lib.export(n, tmp / "out", overwrite=True))
        problems = lib.verify()
        assert all(p.expert and p.problem for p in problems)
    _only_modlora_errors(run)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(template, tmp_path, data):
    lib_dir = fresh_copy(template, tmp_path)
    raw = (lib_dir / MANIFEST).read_bytes()
    if data.draw(st.booleans()):
        doc = _mutate(json.loads(raw), data)
        (lib_dir / MANIFEST).write_text(json.dumps(doc))
    else:
        (lib_dir / MANIFEST).write_bytes(_raw_mutation(raw, data))
    _use_library(lib_dir, tmp_path)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_config(template, tmp_path, data):
    lib_dir = fresh_copy(template, tmp_path)
    cfg_path = lib_dir / "experts" / "e1" / ADAPTER_CONFIG
    raw = cfg_path.read_bytes()
    if data.draw(st.booleans()):
        cfg_path.write_text(json.dumps(_mutate(json.loads(raw), data)))
    else:
        cfg_path.write_bytes(_raw_mutation(raw, data))
    exported = tmp_path / "adapter"
    if exported.exists():
        shutil.rmtree(exported)
    shutil.copytree(lib_dir / "experts" / "e1", exported)
    lib = ExpertLibrary(lib_dir)
    _only_modlora_errors(lambda: load_adapter(exported),
                         lambda: lib.import_adapter(exported, "imported", overwrite=True),
                         lambda: _rewrite_expert(lib, "e1"))        # re-seal checksums: only verify's checks remain
    _use_library(lib_dir, tmp_path)


SNI_DOC = {"Definition": ["Add the numbers."], "Categories": ["Arithmetic"], "Source": ["synthetic"],
           "Instances": [{"id": "1", "input": "1 + 1", "output": ["2"]}, {"id": "2", "input": "2 + 2", "output": ["4"]},
                         {"id": 3, "input": "3 + 3", "output": ["6", "six"]}]}


@FUZZ
@given(data=st.data())
def test_fuzz_sni_task_file(tmp_path, data):
    raw = json.dumps(SNI_DOC).encode()
    if data.draw(st.booleans()):
        raw = json.dumps(_mutate(json.loads(raw), data)).encode()
    else:
        raw = _raw_mutation(raw, data)
    tasks = tmp_path / "tasks"
    shutil.rmtree(tasks, ignore_errors=True)
    tasks.mkdir()
    if data.draw(st.booleans()):
        path = tasks / "task001_fuzz.json.gz"
        packed = gzip.compress(raw)
        if data.draw(st.booleans()):                                   # damage the compressed stream too
            cut = data.draw(st.integers(10, len(packed)))
            packed = packed[:cut] + bytes(b ^ 0x33 for b in packed[cut:cut + 4]) + packed[cut + 4:]
        path.write_bytes(packed)
    else:
        path = tasks / "task001_fuzz.json"
        path.write_bytes(raw)
    _only_modlora_errors(lambda: _tokenisable({"t": load_sni_task(path)}), lambda: load_sni_task(path, strict=True),
                         lambda: _tokenisable(load_sni_tasks(tasks)))


RECORD = {"task_name": "a", "source": "1 + 1", "target": "2"}
LINE = (st.just(json.dumps(RECORD).encode())
        | st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(list(RECORD) + ["id", "x"]),
                                                                       JSON, max_size=4))
        | JSON.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=40)
        | st.sampled_from([b"[" * 200_000, b"1" * 5000, b"\xff\xfe", b"{", b""]))


@FUZZ
@given(lines=st.lists(LINE, max_size=8), gz=st.booleans())
def test_fuzz_flat_jsonl(tmp_path, lines, gz):
    body = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    path = tmp_path / ("flat.jsonl.gz" if gz else "flat.jsonl")
    path.write_bytes(gzip.compress(body) if gz else body)

    def lenient() -> None:
        loaded = read_flat_jsonl(path)
        _tokenisable(loaded.tasks)
        assert loaded.report.skipped == sum(t.skipped for t in loaded.tasks.values()) / len(loaded.tasks)
        assert all(p.startswith("line ") for p in loaded.report.problems)
        assert sum(len(t) for t in loaded.tasks.values()) + loaded.report.skipped <= len(lines)

    _only_modlora_errors(lenient, lambda: read_flat_jsonl(path, strict=True))
