"""The expert library: round trips, PEFT compatibility, atomic writes, validation, artifacts, concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from modlora.errors import AdapterError, BaseModelMismatchError, LibraryError
from modlora.library.adapters import LoraAdapter, LoraSpec, merge_adapter, random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import BaseModelInfo, model_identity

from .conftest import make_tiny_llama

SPEC = LoraSpec(rank=4, alpha=16, dropout=0.05)


def _lib(tmp_path: Path, model) -> ExpertLibrary:
    return ExpertLibrary.create(tmp_path / "lib", model_identity(model, "tiny"))


def test_round_trip_identical_weights_and_metadata(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    ad = random_adapter(tiny_llama, SPEC, seed=1)
    lib.add("e1", ad, tasks=["t1", "t2"], training={"lr": 1e-4}, metrics={"best_val_loss": 1.5})
    lib2 = ExpertLibrary(tmp_path / "lib")
    assert lib2.expert_names() == ["e1"]
    got = lib2.get("e1")
    assert got.modules == ad.modules and got.spec == ad.spec
    for m in ad.modules:
        assert torch.equal(got.A[m], ad.A[m]) and torch.equal(got.B[m], ad.B[m])
    e = lib2.entry("e1")
    assert e.tasks == ["t1", "t2"] and e.metrics["best_val_loss"] == 1.5 and e.training["lr"] == 1e-4
    assert e.num_parameters == ad.num_parameters() and len(e.files) == 2
    assert lib2.task_to_expert() == {"t1": "e1", "t2": "e1"}
    manifest = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert manifest["base_model"]["name"] == "tiny" and manifest["version"] == 1


def test_library_files_get_normal_permissions(tmp_path, tiny_llama):
    """Atomic writes must not leave files 0600 / directories 0700 (mkstemp/mkdtemp defaults): a library is often
    shared between users or read by workers running as another user."""
    old = os.umask(0o022)
    try:
        lib = _lib(tmp_path, tiny_llama)
        lib.add("e1", random_adapter(tiny_llama, SPEC, seed=1), tasks=["t1"])
    finally:
        os.umask(old)
    root = tmp_path / "lib"
    assert (root / "library.json").stat().st_mode & 0o777 == 0o644
    assert (root / "experts" / "e1").stat().st_mode & 0o777 == 0o755
    for f in (root / "experts" / "e1").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_peft_loads_expert_with_identical_logits(tmp_path):
    model = make_tiny_llama(seed=3)
    lib = _lib(tmp_path, model)
    ad = random_adapter(model, SPEC, seed=2, std=0.1)
    lib.add("e1", ad)
    ids = torch.randint(3, 99, (2, 12))
    peft_model = PeftModel.from_pretrained(make_tiny_llama(seed=3), lib.expert_dir("e1"))
    peft_model.eval()
    with torch.no_grad():
        ref = peft_model(ids).logits
        merge_adapter(model, lib.get("e1"))
        ours = model(ids).logits
        base = make_tiny_llama(seed=3)(ids).logits
    assert (ref - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_import_export(tmp_path, tiny_llama):
    ad = random_adapter(tiny_llama, SPEC, seed=4)
    ad.save(tmp_path / "peft_dir")
    lib = _lib(tmp_path, tiny_llama)
    lib.import_adapter(tmp_path / "peft_dir", "imp", tasks=["x"])
    out = lib.export("imp", tmp_path / "out")
    back = LoraAdapter.load(out)
    for m in ad.modules:
        assert torch.equal(back.A[m], ad.A[m])
    with pytest.raises(LibraryError, match="already exists"):
        lib.export("imp", tmp_path / "out")


def test_duplicate_remove_and_names(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    ad = random_adapter(tiny_llama, SPEC)
    lib.add("a", ad)
    with pytest.raises(LibraryError, match="already exists"):
        lib.add("a", ad)
    lib.add("a", random_adapter(tiny_llama, SPEC, seed=9), overwrite=True)
    assert not torch.equal(lib.get("a").A[ad.modules[0]], ad.A[ad.modules[0]])
    for bad in ("../../etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(LibraryError, match="invalid expert name"):
            lib.add(bad, ad)
    lib.remove("a")
    assert len(ExpertLibrary(tmp_path / "lib")) == 0 and not lib.expert_dir("a").exists()


def test_failure_mid_write_keeps_library_intact(tmp_path, tiny_llama, monkeypatch):
    lib = _lib(tmp_path, tiny_llama)
    lib.add("good", random_adapter(tiny_llama, SPEC, seed=1))
    import modlora.library.store as library_mod

    def exploding_write(adapter, directory):
        (directory / "adapter_config.json").write_text("{")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(library_mod, "write_adapter_files", exploding_write)
    with pytest.raises(OSError, match="disk full"):
        lib.add("bad", random_adapter(tiny_llama, SPEC, seed=2))
    monkeypatch.undo()
    reopened = ExpertLibrary(tmp_path / "lib")
    assert reopened.expert_names() == ["good"]
    reopened.get("good")
    assert reopened.verify() == []
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "lib" / "experts").iterdir())
    # the manifest write failing also leaves the previous manifest
    monkeypatch.setattr(library_mod, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        reopened.add("late", random_adapter(tiny_llama, SPEC, seed=3))
    monkeypatch.undo()
    again = ExpertLibrary(tmp_path / "lib")
    assert again.expert_names() == ["good"]
    assert [p.expert for p in again.verify()] == ["late"]  # orphan directory reported, not listed
    again.add("late", random_adapter(tiny_llama, SPEC, seed=3))  # and overwritten by the next write
    assert again.verify() == []


def test_corrupt_manifest_errors(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    lib.add("e", random_adapter(tiny_llama, SPEC))
    mpath = tmp_path / "lib" / "library.json"
    good = mpath.read_text()
    mpath.write_text(good[: len(good) // 2])
    with pytest.raises(LibraryError, match="library.json: manifest is not valid JSON"):
        ExpertLibrary(tmp_path / "lib")
    raw = json.loads(good)
    raw["experts"]["e"]["tasks"] = "not a list"
    mpath.write_text(json.dumps(raw))
    with pytest.raises(LibraryError, match="expert 'e': field 'tasks'"):
        ExpertLibrary(tmp_path / "lib")
    raw = json.loads(good)
    raw["version"] = 99
    mpath.write_text(json.dumps(raw))
    with pytest.raises(LibraryError, match="'version'"):
        ExpertLibrary(tmp_path / "lib")
    with pytest.raises(LibraryError, match="not a modlora library"):
        ExpertLibrary(tmp_path)


def test_truncated_safetensors_error(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    lib.add("e", random_adapter(tiny_llama, SPEC))
    wpath = lib.expert_dir("e") / "adapter_model.safetensors"
    data = wpath.read_bytes()
    wpath.write_bytes(data[: len(data) // 3])
    fresh = ExpertLibrary(tmp_path / "lib")
    with pytest.raises(LibraryError, match="expert 'e'.*checksum"):
        fresh.get("e")
    assert [p.expert for p in fresh.verify()] == ["e"]
    # loading the directory directly (no manifest) still names the file
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        LoraAdapter.load(lib.expert_dir("e"))


def test_base_model_mismatch(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    other = model_identity(make_tiny_llama(seed=5), "other")
    with pytest.raises(BaseModelMismatchError, match="built for base model 'tiny'"):
        lib.add("e", random_adapter(tiny_llama, SPEC), base_model=other)
    with pytest.raises(BaseModelMismatchError):
        ExpertLibrary.create(tmp_path / "lib", other, exist_ok=True)
    same_weights = BaseModelInfo("renamed", lib.base_model.shapes_hash, lib.base_model.weights_checksum)
    lib.check_base_model(same_weights)


def test_tokenizer_mismatch(tmp_path, tiny_llama):
    ident = model_identity(tiny_llama, "tiny")
    with_tok = BaseModelInfo(ident.name, ident.shapes_hash, ident.weights_checksum, "tokA")
    lib = ExpertLibrary.create(tmp_path / "lib", with_tok)
    lib.check_base_model(with_tok)
    lib.check_base_model(ident)  # a caller that did not fingerprint its tokenizer is not refused
    other = BaseModelInfo(ident.name, ident.shapes_hash, ident.weights_checksum, "tokB")
    with pytest.raises(BaseModelMismatchError, match="tokenizer"):
        lib.add("e", random_adapter(tiny_llama, SPEC), base_model=other)


def test_artifacts_incremental_and_invalidated(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    for i in range(3):
        lib.add(f"e{i}", random_adapter(tiny_llama, SPEC, seed=i))
    assert lib.missing_artifacts("arrow-v1") == ["e0", "e1", "e2"]
    lib.save_artifact("e0", "arrow-v1", {"v": torch.ones(3)})
    assert lib.missing_artifacts("arrow-v1") == ["e1", "e2"]
    assert torch.equal(lib.load_artifact("e0", "arrow-v1")["v"], torch.ones(3))
    lib.add("e0", random_adapter(tiny_llama, SPEC, seed=7), overwrite=True)  # new weights: stale artifact
    assert lib.load_artifact("e0", "arrow-v1") is None
    with pytest.raises(LibraryError, match="invalid artifact kind"):
        lib.save_artifact("e1", "../x", {"v": torch.ones(1)})
    lib.save_meta("clustering", {"k": 2})
    assert lib.load_meta("clustering") == {"k": 2}


def test_symlink_outside_library_refused(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    lib.add("e", random_adapter(tiny_llama, SPEC))
    outside = tmp_path / "outside"
    lib.export("e", outside)
    wpath = lib.expert_dir("e") / "adapter_model.safetensors"
    wpath.unlink()
    os.symlink(outside / "adapter_model.safetensors", wpath)
    with pytest.raises(LibraryError, match="symbolic link"):
        ExpertLibrary(tmp_path / "lib").get("e")


def _add_in_process(args):
    path, name, seed = args
    model = make_tiny_llama()
    lib = ExpertLibrary(path)
    try:
        lib.add(name, random_adapter(model, SPEC, seed=seed))
        return "ok"
    except LibraryError as exc:
        return f"error: {exc}"


def test_concurrent_writers(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    path = str(lib.path)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_add_in_process, [(path, "p1", 1), (path, "p2", 2)])
    assert results == ["ok", "ok"]
    assert ExpertLibrary(path).expert_names() == ["p1", "p2"]
    with ctx.Pool(2) as pool:
        results = pool.map(_add_in_process, [(path, "same", 1), (path, "same", 2)])
    assert sorted(r[:5] for r in results) == ["error", "ok"]
    assert "already exists" in [r for r in results if r != "ok"][0]
    final = ExpertLibrary(path)
    assert final.expert_names() == ["p1", "p2", "same"] and final.verify() == []


def test_cli_show_and_verify(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    lib.add("e", random_adapter(tiny_llama, SPEC), tasks=["t"], metrics={"best_val_loss": 2.0, "steps": 3})
    run = [sys.executable, "-m", "modlora.cli"]
    out = subprocess.run(run + ["show", str(lib.path)], capture_output=True, text=True, check=True).stdout
    assert "e" in out and "2.000" in out
    assert subprocess.run(run + ["verify", str(lib.path)], capture_output=True, text=True).returncode == 0
    (lib.expert_dir("e") / "adapter_config.json").write_text("{}")
    bad = subprocess.run(run + ["verify", str(lib.path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "checksum" in bad.stdout
    missing = subprocess.run(run + ["show", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "library directory not found" in missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
