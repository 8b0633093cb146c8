"""Untrusted libraries and adapters: bad fields, absurd shapes, traversal, symlinks, NaN, and fuzzing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modlora.errors import AdapterError, LibraryError, ModloraError
from modlora.evaluation.code import decode_plain
from modlora.io import sha256_file
from modlora.library.adapters import LoraAdapter, LoraSpec, load_adapter
from modlora.library.store import ExpertLibrary

from .conftest import fresh_copy, make_library_template

SRC = Path(__file__).resolve().parents[1] / "src" / "modlora"
SPEC = LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_library_template(tmp_path_factory.mktemp("tpl") / "lib")


def _open_all(path: Path) -> None:
    lib = ExpertLibrary(path)
    for name in lib.expert_names():
        lib.get(name)


def test_no_code_execution_paths_in_source():
    """No pickle, no torch.load without weights_only, no trust_remote_code=True anywhere in the package."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|cloudpickle|dill", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path


def test_pickle_file_in_expert_dir_is_never_read(template, tmp_path):
    lib_dir = fresh_copy(template, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle  # only to craft the malicious file

    (lib_dir / "experts" / "e1" / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    _open_all(lib_dir)
    assert not marker.exists()


def _rewrite_adapter(lib_dir: Path, name: str, config: dict | None = None, tensors: dict | None = None) -> None:
    """Change an expert's files and re-sign them in the manifest (an attacker controlling the whole directory)."""
    edir = lib_dir / "experts" / name
    if config is not None:
        (edir / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(edir / "adapter_model.safetensors"))
    manifest = json.loads((lib_dir / "library.json").read_text())
    manifest["experts"][name]["files"] = {f: sha256_file(edir / f) for f in manifest["experts"][name]["files"]}
    (lib_dir / "library.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("field,value,message", [
    ("r", 10**9, "'r'"), ("r", "4", "'r'"), ("r", 0, "'r'"), ("lora_alpha", float("nan"), "lora_alpha"),
    ("lora_dropout", 2.0, "lora_dropout"), ("target_modules", 7, "target_modules"), ("peft_type", "IA3", "peft_type"),
    ("use_dora", True, "use_dora"), ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
])
def test_bad_adapter_config_fields(template, tmp_path, field, value, message):
    lib_dir = fresh_copy(template, tmp_path)
    cfg = json.loads((lib_dir / "experts" / "e1" / "adapter_config.json").read_text())
    cfg[field] = value
    _rewrite_adapter(lib_dir, "e1", config=cfg)
    with pytest.raises(LibraryError, match=f"expert 'e1'.*{re.escape(message)}"):
        ExpertLibrary(lib_dir).get("e1")
    ExpertLibrary(lib_dir).get("e2")  # the other expert is unaffected


def test_bad_tensors(template, tmp_path):
    lib_dir = fresh_copy(template, tmp_path)
    good = load_adapter(lib_dir / "experts" / "e1")
    tensors = good.peft_state_dict()
    key = next(k for k in tensors if "lora_A" in k)
    nan = dict(tensors)
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    _rewrite_adapter(lib_dir, "e1", tensors=nan)
    with pytest.raises(LibraryError, match=r"expert 'e1'.*module .*NaN or Inf"):
        ExpertLibrary(lib_dir).get("e1")
    shape = dict(tensors)
    shape[key] = torch.zeros(3, 32)  # rank 3 against r=2
    _rewrite_adapter(lib_dir, "e1", tensors=shape)
    with pytest.raises(LibraryError, match="rank mismatch"):
        ExpertLibrary(lib_dir).get("e1")
    odd = dict(tensors)
    odd["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    _rewrite_adapter(lib_dir, "e1", tensors=odd)
    with pytest.raises(LibraryError, match="unexpected tensor key"):
        ExpertLibrary(lib_dir).get("e1")
    missing_b = {k: v for k, v in tensors.items() if not (k.startswith(key.rsplit(".lora_A", 1)[0]) and "lora_B" in k)}
    _rewrite_adapter(lib_dir, "e1", tensors=missing_b)
    with pytest.raises(LibraryError, match="different modules"):
        ExpertLibrary(lib_dir).get("e1")


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "x/../../y", "/abs"])
def test_path_traversal_in_manifest(template, tmp_path, name):
    lib_dir = fresh_copy(template, tmp_path)
    manifest = json.loads((lib_dir / "library.json").read_text())
    entry = manifest["experts"].pop("e1")
    entry["name"] = name
    manifest["experts"][name] = entry
    (lib_dir / "library.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryError, match="invalid expert name"):
        ExpertLibrary(lib_dir)


def test_symlinked_expert_directory_refused(template, tmp_path):
    lib_dir = fresh_copy(template, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(str(lib_dir / "experts" / "e1"), outside)
    (lib_dir / "experts" / "e1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LibraryError, match="symbolic link"):
        ExpertLibrary(lib_dir).get("e1")


def test_unexpected_fields_and_wrong_types(template, tmp_path):
    lib_dir = fresh_copy(template, tmp_path)
    good = json.loads((lib_dir / "library.json").read_text())
    manifest = json.loads(json.dumps(good))
    manifest["future_field"] = {"x": 1}
    (lib_dir / "library.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryError, match=r"unexpected manifest field\(s\) \['future_field'\]"):
        ExpertLibrary(lib_dir)
    manifest = json.loads(json.dumps(good))
    manifest["experts"]["e1"]["payload"] = "x"
    (lib_dir / "library.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryError, match=r"expert 'e1': unexpected field"):
        ExpertLibrary(lib_dir)
    cfg = json.loads((lib_dir / "experts" / "e1" / "adapter_config.json").read_text())
    cfg["exec_hook"] = "os.system"
    (lib_dir / "library.json").write_text(json.dumps(good))
    _rewrite_adapter(lib_dir, "e1", config=cfg)
    with pytest.raises(LibraryError, match=r"expert 'e1'.*unexpected field\(s\) \['exec_hook'\]"):
        ExpertLibrary(lib_dir).get("e1")
    manifest = json.loads((lib_dir / "library.json").read_text())
    manifest["experts"]["e1"]["num_parameters"] = "many"
    (lib_dir / "library.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryError, match="expert 'e1': field 'num_parameters'"):
        ExpertLibrary(lib_dir)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=8)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, data):
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = data.draw(JSON)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(st.text(max_size=6))] = data.draw(JSON)
        except (KeyError, IndexError, TypeError):
            continue
    return doc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_manifest(template, tmp_path, data):
    lib_dir = fresh_copy(template, tmp_path)
    manifest = _mutate(json.loads((lib_dir / "library.json").read_text()), data)
    (lib_dir / "library.json").write_text(json.dumps(manifest))
    try:
        _open_all(lib_dir)
    except ModloraError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_adapter_config(template, tmp_path, data):
    lib_dir = fresh_copy(template, tmp_path)
    cfg = _mutate(json.loads((lib_dir / "experts" / "e1" / "adapter_config.json").read_text()), data)
    _rewrite_adapter(lib_dir, "e1", config=cfg)
    try:
        adapter = ExpertLibrary(lib_dir).get("e1")
        assert isinstance(adapter, LoraAdapter)
    except ModloraError:
        pass
    try:
        load_adapter(lib_dir / "experts" / "e1")
    except AdapterError:
        pass


PLAIN_TAGS = ["tuple", "set", "frozenset", "dict", "complex", "list", ""]
TAGGED_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(PLAIN_TAGS), c, min_size=1, max_size=2),
    max_leaves=12)
BUILTIN_VALUES = (type(None), bool, int, float, complex, str, list, tuple, set, frozenset, dict)


def _builtin_only(value) -> bool:
    if type(value) not in BUILTIN_VALUES:
        return False
    if isinstance(value, dict):
        return all(_builtin_only(k) and _builtin_only(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return all(_builtin_only(v) for v in value)
    return True


@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=TAGGED_JSON)
def test_fuzz_graded_programs_answers(data):
    """A graded program's answer is hostile JSON: decoding it either refuses it (ValueError) or builds builtin values
    only, which no ``__eq__`` of the program's can reach."""
    try:
        value = decode_plain(data)
    except ValueError:
        return
    assert _builtin_only(value)
