"""Hostile pushes and pulls: a pull never replaces a local change without ``force`` (which moves it aside, never
deletes) and never deletes a file it did not write; it checks every tensor before it reports success; it never
follows a link out of a ``file://`` remote; a push never writes into its own source; concurrent pushes are
refused; a pull during a push sees a whole library; malformed remote files are refused cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from modlora.errors import LibraryError
from modlora.library.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, random_adapter
from modlora.library.index import INDEX, index_bytes, read_index
from modlora.library.location import RemoteLocation, resolve_location
from modlora.library.remote import RemoteLibrary
from modlora.library.store import LOCK, MANIFEST, ExpertLibrary
from modlora.library.transfer import pull, push

from .conftest import make_tiny_llama
from .test_remote import SPEC, assert_same_experts, make_library, memory_url

SRC = Path(__file__).resolve().parents[1] / "src"
WAIT_S = 120   # a guard against a hang (a read blocked on a FIFO, a paused push never resumed), never a timing check


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODLORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


@pytest.fixture
def shared(tmp_path, model) -> tuple[ExpertLibrary, Path]:
    """A library and its copy pushed to a local directory (the ``file://`` remote)."""
    lib = make_library(tmp_path / "lib", model)
    push(lib, f"file://{tmp_path / 'shared'}")
    return lib, tmp_path / "shared"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (lock files aside) with its bytes: what "left as it was" compares."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != LOCK}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rewrite_manifest_checksums(remote: Path, name: str) -> None:
    """After editing expert ``name``'s files on the remote, record their new checksums in its manifest and index
    (what an attacker who controls the remote does), so that only the content checks can refuse them."""
    manifest = json.loads((remote / MANIFEST).read_text())
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        manifest["experts"][name]["files"][fname] = sha((remote / "experts" / name / fname).read_bytes())
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (remote / MANIFEST).write_bytes(data)
    rewrite_index(remote)


def rewrite_index(remote: Path) -> None:
    """Re-record every file of the remote's index with its current checksum, for its current manifest."""
    manifest = (remote / MANIFEST).read_bytes()
    old = json.loads((remote / INDEX).read_text())["files"]
    loc = resolve_location(str(remote))
    from modlora.library.index import FileRecord
    files = {rel: FileRecord(sha((remote / rel).read_bytes()), (remote / rel).stat().st_size) for rel in old}
    (remote / INDEX).write_bytes(index_bytes(manifest, files))
    assert set(read_index(loc, manifest)) == set(old)


def edit_weights(remote: Path, name: str, edit) -> None:
    """Rewrite expert ``name``'s weights on the remote as ``edit(tensors)`` returns them (valid safetensors)."""
    path = remote / "experts" / name / ADAPTER_WEIGHTS
    tensors = dict(load_safetensors_bytes(path.read_bytes()))
    path.write_bytes(save_safetensors_bytes(edit(tensors)))
    rewrite_manifest_checksums(remote, name)


def _first(tensors: dict, which: str) -> str:
    return sorted(k for k in tensors if f"lora_{which}" in k)[0]


def _nan(t):
    key = _first(t, "B")
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")
    return t


def _inf(t):
    key = _first(t, "A")
    t[key] = t[key].clone()
    t[key][0, -1] = float("inf")
    return t


def _wider(t):      # lora_A (r, in + 1): fits the adapter's own pairing, not the base model's layer
    key = _first(t, "A")
    t[key] = torch.cat([t[key], torch.zeros(t[key].shape[0], 1)], dim=1)
    return t


def _rank3(t):      # every factor of rank 3 while the config says r = 2
    return {k: (torch.cat([v, v[:1]], 0) if "lora_A" in k else torch.cat([v, v[:, :1]], 1)) for k, v in t.items()}


def _integer(t):
    key = _first(t, "B")
    t[key] = t[key].to(torch.int32)
    return t


def _nan_artifact(remote: Path) -> None:
    path = remote / "artifacts" / "proto" / "e1.safetensors"
    path.write_bytes(save_safetensors_bytes({"v": torch.tensor([0.0, float("nan"), 1.0])}))
    rewrite_index(remote)


def _bad_meta(remote: Path) -> None:
    (remote / "meta" / "clustering.json").write_bytes(b'{"k": 2, "names": ["e0", ')
    rewrite_index(remote)


HOSTILE_CONTENT = {   # case: (edit the remote, a word the refusal names)
    "nan-weights": (lambda r: edit_weights(r, "e1", _nan), "NaN"),
    "inf-weights": (lambda r: edit_weights(r, "e1", _inf), "Inf"),
    "shape-not-the-base-model": (lambda r: edit_weights(r, "e1", _wider), "base"),
    "rank-not-the-config": (lambda r: edit_weights(r, "e1", _rank3), "rank"),
    "integer-weights": (lambda r: edit_weights(r, "e1", _integer), "floating point"),
    "nan-artifact": (_nan_artifact, "artifacts/proto/e1.safetensors"),
    "invalid-json-meta": (_bad_meta, "meta/clustering.json"),
}


# --------------------------------------------------------------------------------- a pull never loses local data
def test_pull_refuses_to_replace_a_local_change_and_force_moves_it_aside(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    dest = tmp_path / "copy"
    pull(url, dest)
    copy = ExpertLibrary(dest)
    copy.add("e1", random_adapter(model, SPEC, seed=20), tasks=["mine"], overwrite=True)   # changed here
    copy.save_meta("clustering", {"k": 3, "mine": True})
    (dest / "experts" / "e2" / "NOTES.md").write_text("my notes on e2")     # a file of the user's in an expert
    lib.add("e1", random_adapter(model, SPEC, seed=21), tasks=["t1"], overwrite=True)    # changed there too
    lib.add("e2", random_adapter(model, SPEC, seed=22), tasks=["t2"], overwrite=True)
    lib.save_meta("clustering", {"k": 5})
    push(lib, url)
    before = snapshot(dest)
    with pytest.raises(LibraryError, match=r"e1.*e2.*--force") as refused:
        pull(url, dest)
    assert "meta/clustering.json" in str(refused.value) and "\n" not in str(refused.value)
    assert snapshot(dest) == before                                # nothing written, nothing deleted

    report = pull(url, dest, force=True)
    assert report.backup is not None and report.backup.parent == dest / "backups"
    for rel in ("experts/e1/adapter_config.json", "experts/e1/adapter_model.safetensors", "experts/e2/NOTES.md",
                "meta/clustering.json"):
        assert (report.backup / rel).read_bytes() == before[rel], rel
    entries = json.loads((report.backup / "entries.json").read_text())
    assert entries["e1"]["tasks"] == ["mine"]                     # the manifest entries set aside too
    assert entries["e1"]["files"][ADAPTER_WEIGHTS] == sha(before["experts/e1/adapter_model.safetensors"])
    copy = ExpertLibrary(dest)
    assert_same_experts(copy, lib)
    assert copy.load_meta("clustering") == {"k": 5} and copy.verify() == []
    assert sorted(report.set_aside) == ["experts/e1", "experts/e2", "meta/clustering.json"]


def test_pull_updates_what_an_earlier_pull_wrote_without_force(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    dest = tmp_path / "copy"
    pull(url, dest)
    lib.add("e1", random_adapter(model, SPEC, seed=21), tasks=["t1"], overwrite=True)
    lib.save_meta("clustering", {"k": 5})
    push(lib, url)
    report = pull(url, dest)
    assert report.backup is None and not (dest / "backups").exists()
    assert_same_experts(ExpertLibrary(dest), lib)
    assert ExpertLibrary(dest).load_meta("clustering") == {"k": 5}


def test_pull_refuses_to_replace_an_expert_created_here(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    mine = make_library(tmp_path / "mine", model, names=("e0", "m"), seed=40)   # same base, its own e0
    before = snapshot(mine.path)
    with pytest.raises(LibraryError, match=r"e0.*--force"):
        pull(url, mine.path)
    assert snapshot(mine.path) == before


def test_pull_never_deletes_files_it_did_not_write(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    dest = tmp_path / "copy"
    user_files = {"experts/.notes/todo.txt": b"remember", "experts/.e0.abcd1234.tmp/keep": b"mine",
                  "experts/.hidden": b"x", "artifacts/proto/.draft.tmp": b"d", "meta/.scratch.tmp": b"s"}
    for rel, data in user_files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    pull(url, dest)                                                # into a new library
    lib.add("e1", random_adapter(model, SPEC, seed=21), tasks=["t1"], overwrite=True)
    push(lib, url)
    pull(url, dest)                                                # into an existing one
    after = snapshot(dest)
    assert {rel: after.get(rel) for rel in user_files} == user_files
    assert_same_experts(ExpertLibrary(dest), lib)


# ------------------------------------------------------------------------------ every tensor checked, or refused
@pytest.mark.parametrize("case", sorted(HOSTILE_CONTENT))
def test_pull_checks_content_whose_checksums_were_forged(tmp_path, shared, case):
    lib, remote = shared
    existing = tmp_path / "existing"
    pull(str(remote), existing)
    lib_before = snapshot(existing)
    edit, word = HOSTILE_CONTENT[case]
    edit(remote)
    fresh = tmp_path / "fresh"
    with pytest.raises(LibraryError) as refused:
        pull(str(remote), fresh)
    assert word in str(refused.value) and "\n" not in str(refused.value)
    assert not fresh.exists()                                  # a refused pull into a new directory leaves nothing
    with pytest.raises(LibraryError, match=word):
        pull(str(remote), existing, force=True)
    assert snapshot(existing) == lib_before                   # ... and an existing library as it was
    assert ExpertLibrary(existing).verify() == []


# -------------------------------------------------------------------------- a file:// remote: never follow a link
def _link_expert_dir(remote: Path, outside: Path) -> None:
    (outside / "e1").parent.mkdir(parents=True, exist_ok=True)
    os.replace(remote / "experts" / "e1", outside / "e1")
    (remote / "experts" / "e1").symlink_to(outside / "e1")


def _link_weights(remote: Path, outside: Path) -> None:
    outside.mkdir(parents=True, exist_ok=True)
    os.replace(remote / "experts" / "e1" / ADAPTER_WEIGHTS, outside / "w.safetensors")
    (remote / "experts" / "e1" / ADAPTER_WEIGHTS).symlink_to(outside / "w.safetensors")


def _link_top_dir(top: str):
    def link(remote: Path, outside: Path) -> None:
        outside.mkdir(parents=True, exist_ok=True)
        os.replace(remote / top, outside / top)
        (remote / top).symlink_to(outside / top)
    return link


def _link_file(rel: str):
    def link(remote: Path, outside: Path) -> None:
        outside.mkdir(parents=True, exist_ok=True)
        os.replace(remote / rel, outside / "f")
        (remote / rel).symlink_to(outside / "f")
    return link


REMOTE_LINKS = {"expert-dir": _link_expert_dir, "weights-file": _link_weights, "experts-dir": _link_top_dir("experts"),
                "artifacts-dir": _link_top_dir("artifacts"), "meta-file": _link_file("meta/clustering.json"),
                "manifest": _link_file(MANIFEST)}


@pytest.mark.parametrize("case", sorted(REMOTE_LINKS))
def test_pull_never_follows_a_link_out_of_a_file_remote(tmp_path, shared, case):
    _, remote = shared
    REMOTE_LINKS[case](remote, tmp_path / "outside")
    with pytest.raises(LibraryError, match="symbolic link"):
        pull(f"file://{remote}", tmp_path / "copy")
    assert not (tmp_path / "copy" / MANIFEST).exists()              # no library; what was staged waits for a resume
    reached = set(snapshot(tmp_path / "outside").values()) - set(snapshot(remote).values())   # only through it
    copied = snapshot(tmp_path / "copy") if (tmp_path / "copy").exists() else {}
    assert not [rel for rel, data in copied.items() if data in reached]   # nothing read through the link


def test_push_never_writes_through_a_link_in_a_file_remote(tmp_path, shared, model):
    lib, remote = shared
    _link_top_dir("experts")(remote, tmp_path / "outside")
    outside_before = snapshot(tmp_path / "outside")
    lib.add("e3", random_adapter(model, SPEC, seed=7), tasks=["t3"])
    with pytest.raises(LibraryError, match="symbolic link"):
        push(lib, f"file://{remote}")
    assert snapshot(tmp_path / "outside") == outside_before


def _in_child(code: str) -> str:
    """Run ``code`` (``pull``, ``push``, ``ExpertLibrary`` and ``Path`` in scope) in a fresh Python that must return by
    itself; prints ``ok`` or ``error <message>``."""
    script = ("from pathlib import Path\nfrom modlora.errors import ModloraError\n"
              "from modlora.library.store import ExpertLibrary\nfrom modlora.library.transfer import pull, push\n"
              f"try:\n    {code}\n    print('ok')\nexcept ModloraError as exc:\n    print('error', exc)\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{code} blocked (killed after {WAIT_S} s)")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.mark.parametrize("rel", [INDEX, f"experts/e1/{ADAPTER_CONFIG}"])
def test_a_fifo_in_a_file_remote_is_refused_without_blocking(tmp_path, shared, rel):
    _, remote = shared
    (remote / rel).unlink()
    os.mkfifo(remote / rel)
    out = _in_child(f"pull({str(remote)!r}, {str(tmp_path / 'copy')!r})")
    assert out.startswith("error ") and "FIFO" in out and rel in out, out


def test_a_fifo_manifest_in_the_library_being_pushed_is_refused_without_blocking(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    code = (f"lib = ExpertLibrary({str(lib.path)!r}); import os; os.unlink(lib.path / 'library.json'); "
            f"os.mkfifo(lib.path / 'library.json'); push(lib, {str(tmp_path / 'shared')!r})")
    out = _in_child(code)
    assert out.startswith("error ") and "library.json" in out and "FIFO" in out, out


# -------------------------------------------------------------------------------------- a push into its own source
def test_push_and_pull_refuse_a_destination_inside_their_source(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    before = snapshot(lib.path)
    for url in (f"file://{lib.path}/experts/x", str(lib.path / "sub"), f"file://{tmp_path}", str(lib.path)):
        with pytest.raises(LibraryError, match="inside|being pushed"):
            push(lib, url)
        assert snapshot(lib.path) == before, url
    assert not (tmp_path / MANIFEST).exists() and not (lib.path / "experts" / "x").exists()
    shared = tmp_path / "shared"
    push(lib, shared)
    push(make_library(tmp_path / "other", model, names=("o0",), seed=9), shared / "sub")   # a library inside it
    for source, dest in ((f"file://{shared}", shared / "copy"), (str(shared / "sub"), shared),
                         (str(shared), shared)):
        with pytest.raises(LibraryError, match="inside|destination library"):
            pull(source, dest)
    assert not (shared / "copy").exists() and ExpertLibrary(shared).expert_names() == ["e0", "e1", "e2"]


# --------------------------------------------------------------------------------------------- concurrent pushes
def test_a_second_push_to_a_file_remote_during_a_push_is_refused(tmp_path, model, monkeypatch):
    lib_a = make_library(tmp_path / "a", model)
    lib_b = make_library(tmp_path / "b", model, names=("b0", "b1"), seed=10)
    url = f"file://{tmp_path / 'shared'}"
    paused, resume = threading.Event(), threading.Event()
    real_upload = RemoteLocation.upload
    count = {"a": 0}

    def upload(self, src, rel):
        if threading.current_thread().name == "push-a":
            count["a"] += 1
            if count["a"] == 2:                                    # at a seam between two files
                paused.set()
                assert resume.wait(WAIT_S)
        real_upload(self, src, rel)

    monkeypatch.setattr(RemoteLocation, "upload", upload)
    errors: list[BaseException] = []

    def push_a() -> None:
        try:
            push(lib_a, url)
        except BaseException as exc:    # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=push_a, name="push-a")
    thread.start()
    try:
        assert paused.wait(WAIT_S)
        with pytest.raises(LibraryError, match="another push"):
            push(lib_b, url)
    finally:
        resume.set()
        thread.join(WAIT_S)
    assert not errors, errors
    remote = RemoteLibrary(resolve_location(url))
    assert_same_experts(remote, lib_a) and remote.verify() == []
    push(lib_b, url)                                               # once the first push ended, the lock is free
    assert RemoteLibrary(resolve_location(url)).expert_names() == ["b0", "b1"]


def test_a_push_lock_on_an_object_store_is_reported_with_how_to_clear_it(tmp_path, model):
    lib = make_library(tmp_path / "lib", model, names=("e0",))
    url = memory_url()
    loc = resolve_location(url)
    holder = {"host": "build-7", "pid": 4242, "token": "t"}
    loc.fs.pipe_file(loc.path(".push.lock"), json.dumps({**holder, "created": time.time()}).encode())
    with pytest.raises(LibraryError, match="another push.*build-7") as busy:
        push(lib, url)
    assert "stale" not in str(busy.value)
    loc.fs.pipe_file(loc.path(".push.lock"), json.dumps({**holder, "created": time.time() - 3 * 3600}).encode())
    with pytest.raises(LibraryError, match=r"stale.*delete .*\.push\.lock"):
        push(lib, url)
    assert loc.read_bytes(MANIFEST) is None                      # refused before anything was sent
    loc.fs.rm_file(loc.path(".push.lock"))
    push(lib, url)
    assert not loc.exists(".push.lock")                          # released at the end


def test_a_failed_push_releases_its_lock(tmp_path, model, monkeypatch):
    lib = make_library(tmp_path / "lib", model, names=("e0",))
    url = memory_url()

    def failing(self, src, rel):
        raise LibraryError("connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(RemoteLocation, "upload", failing)
        with pytest.raises(LibraryError, match="connection lost"):
            push(lib, url)
    assert not resolve_location(url).exists(".push.lock")
    push(lib, url)


def test_a_symlinked_push_lock_is_refused(tmp_path, shared):
    lib, remote = shared
    target = tmp_path / "precious.txt"
    target.write_text("do not truncate me")
    (remote / ".push.lock").unlink(missing_ok=True)
    (remote / ".push.lock").symlink_to(target)
    with pytest.raises(LibraryError, match=r"\.push\.lock.*symbolic link"):
        push(lib, f"file://{remote}")
    assert target.read_text() == "do not truncate me"


# ------------------------------------------------------------------------------- a pull during a push: whole only
def test_a_pull_at_every_seam_of_a_push_gets_a_whole_library(tmp_path, model, monkeypatch):
    lib = make_library(tmp_path / "lib", model)
    url = f"file://{tmp_path / 'shared'}"
    push(lib, url)
    old = {"experts": ["e0", "e1", "e2"], "meta": {"k": 2, "names": ["e0", "e1", "e2"]}}
    lib.add("e3", random_adapter(model, SPEC, seed=7), tasks=["t3"])
    lib.add("e1", random_adapter(model, SPEC, seed=8), tasks=["t1"], overwrite=True)
    lib.save_artifact("e3", "proto", {"v": torch.full((3,), 3.0)})
    lib.save_meta("clustering", {"k": 3, "names": ["e0", "e1", "e2", "e3"]})
    new = {"experts": ["e0", "e1", "e2", "e3"], "meta": {"k": 3, "names": ["e0", "e1", "e2", "e3"]}}
    seen: list[tuple[list[str], object]] = []
    real_upload, real_write = RemoteLocation.upload, RemoteLocation.write_bytes

    def observe() -> None:
        dest = tmp_path / f"seam{len(seen)}"
        pull(url, dest)
        got = ExpertLibrary(dest)
        assert got.verify() == []
        state = (got.expert_names(), got.load_meta("clustering"))
        # the old library, the old one less the expert being replaced (and its index: no meta yet), or the new one
        allowed = [(old["experts"], old["meta"]), (old["experts"], None), (["e0", "e2"], old["meta"]),
                   (["e0", "e2"], None), (new["experts"], new["meta"])]
        assert state in allowed, state
        seen.append(state)

    def upload(self, src, rel):
        observe()
        real_upload(self, src, rel)

    def write_bytes(self, rel, data):
        observe()
        real_write(self, rel, data)

    with monkeypatch.context() as patch:
        patch.setattr(RemoteLocation, "upload", upload)
        patch.setattr(RemoteLocation, "write_bytes", write_bytes)
        push(lib, url)
    assert len(seen) >= 5
    final = tmp_path / "final"
    pull(url, final)
    assert (ExpertLibrary(final).expert_names(), ExpertLibrary(final).load_meta("clustering")) == (
        new["experts"], new["meta"])


# -------------------------------------------------------------------------------------- malformed remote documents
def test_a_deeply_nested_index_is_treated_as_malformed(tmp_path, shared, model):
    lib, remote = shared
    (remote / INDEX).write_bytes(b"[" * 200_000 + b"]" * 200_000)
    report = pull(str(remote), tmp_path / "copy")               # experts are checked against the manifest alone
    copy = ExpertLibrary(tmp_path / "copy")
    assert copy.expert_names() == ["e0", "e1", "e2"] and copy.verify() == []
    assert not any(r.startswith(("artifacts/", "meta/")) for r in report.transferred)  # nothing the index vouches for
    lib.add("e3", random_adapter(model, SPEC, seed=7), tasks=["t3"])
    push(lib, str(remote))                                      # a push rewrites it
    assert json.loads((remote / INDEX).read_text())["format"] == "modlora-remote-index"
    (remote / MANIFEST).write_bytes(b'{"experts":' * 200_000 + b"1" + b"}" * 200_000)
    with pytest.raises(LibraryError, match="nested too deeply"):
        pull(str(remote), tmp_path / "copy2")


def test_an_index_naming_a_hidden_file_is_ignored(tmp_path, shared):
    _, remote = shared
    (remote / "meta" / ".x.json").write_text("{}")
    index = json.loads((remote / INDEX).read_text())
    index["files"]["meta/.x.json"] = {"sha256": sha(b"{}"), "size": 2}
    (remote / INDEX).write_text(json.dumps(index))
    pull(str(remote), tmp_path / "copy")
    assert not (tmp_path / "copy" / "meta" / ".x.json").exists()
    assert not (tmp_path / "copy" / "meta" / "clustering.json").exists()   # nothing in that index is trusted


# -------------------------------------------------------------------------------------------- hostile lock files
def test_a_symlinked_library_lock_is_a_library_error(tmp_path, shared, model):
    lib, remote = shared
    target = tmp_path / "elsewhere"
    target.write_text("")
    (lib.path / LOCK).unlink()
    (lib.path / LOCK).symlink_to(target)
    with pytest.raises(LibraryError, match=r"lib/\.lock"):
        push(lib, tmp_path / "other")
    dest = tmp_path / "copy"
    pull(str(remote), dest)
    (dest / LOCK).unlink()
    (dest / LOCK).symlink_to(target)
    lib_b = make_library(tmp_path / "b", model, names=("b0",), seed=3)
    push(lib_b, tmp_path / "b-shared")
    with pytest.raises(LibraryError, match=r"copy/\.lock"):
        pull(str(tmp_path / "b-shared"), dest)


def test_cli_pull_force(tmp_path, model, capsys):
    from modlora.cli import main
    lib = make_library(tmp_path / "lib", model, names=("e0",))
    url = memory_url()
    push(lib, url)
    dest = tmp_path / "copy"
    assert main(["pull", url, str(dest)]) == 0
    ExpertLibrary(dest).add("e0", random_adapter(model, SPEC, seed=20), tasks=["mine"], overwrite=True)
    lib.add("e0", random_adapter(model, SPEC, seed=21), tasks=["t0"], overwrite=True)
    push(lib, url)
    capsys.readouterr()
    assert main(["pull", url, str(dest)]) == 2
    err = capsys.readouterr().err
    assert "e0" in err and "--force" in err and "Traceback" not in err
    assert main(["pull", url, str(dest), "--force"]) == 0
    out = capsys.readouterr().out
    assert "experts/e0" in out and str(dest / "backups") in out.replace("\n", "")
    assert_same_experts(ExpertLibrary(dest), lib)


def test_pull_never_writes_through_a_link_in_the_destination(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    dest = tmp_path / "copy"
    pull(url, dest)
    outside = tmp_path / "outside"
    os.replace(dest / "artifacts" / "proto", outside)
    (dest / "artifacts" / "proto").symlink_to(outside)
    before = snapshot(outside)
    lib.save_artifact("e0", "proto", {"v": torch.full((3,), 9.0)})
    push(lib, url)
    with pytest.raises(LibraryError, match="symbolic link"):
        pull(url, dest, force=True)
    assert snapshot(outside) == before
