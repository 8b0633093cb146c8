"""Sharing libraries: open/push/pull through fsspec (memory:// and a local directory stand in for hf://), lazy
checked downloads, incremental and interrupted transfers, tampered files, the library card, offline hf:// errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modlora.errors import LibraryError
from modlora.library.adapters import LoraSpec, random_adapter
from modlora.library.card import library_card
from modlora.library.index import INDEX
from modlora.library.location import HubRepo, RemoteLocation, resolve_location
from modlora.library.remote import RemoteLibrary, open_library
from modlora.library.store import ExpertLibrary
from modlora.library.transfer import pull, push
from modlora.models import LoadedModel, model_identity

from .conftest import make_char_tokenizer, make_tiny_llama, save_tiny_model, write_sni_task

SPEC = LoraSpec(rank=2, alpha=4, dropout=0.0)
CHILD = Path(__file__).with_name("remote_child.py")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODLORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model():
    return make_tiny_llama(seed=0)


def make_library(path: Path, model, names=("e0", "e1", "e2"), seed: int = 0) -> ExpertLibrary:
    lib = ExpertLibrary.open_or_create(path, model_identity(model, "org/tiny-base"))
    for i, name in enumerate(names):
        lib.add(name, random_adapter(model, SPEC, seed=seed + i, std=0.2), tasks=[f"task_{name}"],
                metrics={"best_val_loss": 1.0 + i, "steps": 10}, overwrite=True)
        lib.save_artifact(name, "proto", {"v": torch.full((3,), float(seed + i))})
    lib.save_meta("clustering", {"k": 2, "names": list(names)})
    return lib


def memory_url() -> str:
    return f"memory://libs/{uuid.uuid4().hex}"


def assert_same_experts(got: ExpertLibrary, want: ExpertLibrary) -> None:
    assert got.expert_names() == want.expert_names()
    for name in want.expert_names():
        a, b = got.get(name), want.get(name)
        assert got.entry(name).to_dict() == want.entry(name).to_dict()
        for m in b.modules:
            assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])


def test_push_then_open_downloads_each_expert_lazily(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    report = push(lib, url)
    assert len(report.transferred) == 3 * 2 + 3 + 1 and report.unchanged == 0 and report.card
    shared = open_library(url)
    assert isinstance(shared, RemoteLibrary) and shared.expert_names() == lib.expert_names()
    mirror = shared.path
    assert mirror.is_relative_to(tmp_path / "cache") and not (mirror / "experts").exists()
    assert shared.size_bytes("e1") == lib.size_bytes("e1")  # from the index: nothing downloaded
    assert not (mirror / "experts").exists()
    got = shared.get("e1")
    assert sorted(p.name for p in (mirror / "experts").iterdir()) == ["e1"]
    for m in got.modules:
        assert torch.equal(got.A[m], lib.get("e1").A[m])
    assert torch.equal(shared.load_artifact("e2", "proto")["v"], torch.full((3,), 2.0))
    assert shared.load_meta("clustering") == {"k": 2, "names": ["e0", "e1", "e2"]}
    assert_same_experts(shared, lib)
    assert shared.verify() == []
    reopened = open_library(url)  # the mirror is reused: nothing to download again
    assert reopened.path == mirror and reopened.get("e0") is not None


def test_remote_library_is_read_only_but_caches_derived_data(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    shared = open_library(url)
    with pytest.raises(LibraryError, match="read-only.*modlora pull"):
        shared.add("new", random_adapter(model, SPEC, seed=9))
    with pytest.raises(LibraryError, match="read-only"):
        shared.remove("e0")
    with pytest.raises(LibraryError, match=f"^{url}: no expert named 'nope'"):
        shared.get("nope")
    shared.save_artifact("e0", "local-proto", {"v": torch.ones(2)})  # e.g. Arrow prototypes: mirror only
    assert torch.equal(open_library(url).load_artifact("e0", "local-proto")["v"], torch.ones(2))
    assert resolve_location(url).read_bytes("artifacts/local-proto/e0.safetensors") is None


def test_arrow_routes_over_a_remote_library_like_over_the_local_one(tmp_path, model):
    from modlora.reuse.prepare import prepare_model
    tok = make_char_tokenizer()
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    ids = torch.randint(3, 90, (2, 8))
    shared = open_library(url)
    outs = []
    for library in (lib, shared):
        lm = LoadedModel(make_tiny_llama(seed=0), tok, lib.base_model, "memory")
        with torch.no_grad():
            rm = prepare_model(lm, library, "arrow", {"top_k": 2})
            outs.append(rm(ids).logits)
            rm.restore()
    torch.testing.assert_close(outs[0], outs[1])
    kinds = {p.name for p in (shared.path / "artifacts").iterdir()}
    assert kinds - {"proto"}, "the Arrow prototypes are cached in the local mirror"


def test_push_is_incremental_and_mirrors_changes(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    again = push(lib, url)
    assert again.transferred == [] and again.removed == [] and again.unchanged == 10
    lib.add("e3", random_adapter(model, SPEC, seed=7), tasks=["t3"])
    lib.add("e1", random_adapter(model, SPEC, seed=8), tasks=["t1"], overwrite=True)  # drops e1's artifacts
    lib.remove("e0")
    report = push(lib, url)
    assert sorted(report.transferred) == sorted(
        f"experts/{n}/{f}" for n in ("e1", "e3") for f in ("adapter_config.json", "adapter_model.safetensors"))
    assert sorted(report.removed) == ["artifacts/proto/e0.safetensors", "artifacts/proto/e1.safetensors",
                                      "experts/e0/adapter_config.json", "experts/e0/adapter_model.safetensors"]
    shared = open_library(url)
    assert_same_experts(shared, lib)
    assert shared.load_artifact("e1", "proto") is None and shared.load_artifact("e2", "proto") is not None
    fs_root = resolve_location(url)
    assert fs_root.read_bytes("experts/e0/adapter_config.json") is None
    other = make_library(tmp_path / "other", make_tiny_llama(seed=1), names=("x",))
    with pytest.raises(LibraryError, match="for base model"):
        push(other, url)  # a library for another base model is refused, nothing sent
    with pytest.raises(LibraryError, match="for base model"):
        pull(url, other.path)
    assert open_library(url).expert_names() == ["e1", "e2", "e3"]


def test_pull_copies_and_resumes_and_keeps_local_experts(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    dest = tmp_path / "copy"
    first = pull(url, dest)
    assert len(first.transferred) == 10
    copy = ExpertLibrary(dest)
    assert_same_experts(copy, lib) and copy.verify() == []
    assert torch.equal(copy.load_artifact("e0", "proto")["v"], torch.zeros(3))
    assert copy.load_meta("clustering")["k"] == 2
    assert pull(url, dest).transferred == []
    copy.add("mine", random_adapter(model, SPEC, seed=5), tasks=["m"])
    lib.add("e1", random_adapter(model, SPEC, seed=11), tasks=["t1"], overwrite=True)
    push(lib, url)
    update = pull(url, dest)
    assert sorted(update.transferred) == ["experts/e1/adapter_config.json", "experts/e1/adapter_model.safetensors"]
    copy = ExpertLibrary(dest)
    assert copy.expert_names() == ["e0", "e1", "e2", "mine"]
    assert torch.equal(copy.get("e1").A[copy.get("e1").modules[0]], lib.get("e1").A[lib.get("e1").modules[0]])


def test_a_local_directory_as_the_remote_and_peft_loads_an_expert_from_it(tmp_path, model):
    from peft import PeftModel
    lib = make_library(tmp_path / "lib", model)
    shared_dir = tmp_path / "shared"
    push(lib, f"file://{shared_dir}")
    assert isinstance(open_library(f"file://{shared_dir}"), ExpertLibrary)  # local: the library itself
    assert ExpertLibrary(shared_dir).verify() == []
    through_fsspec = RemoteLibrary(resolve_location(f"file://{shared_dir}"))  # the remote code path
    assert_same_experts(through_fsspec, lib)
    card = (shared_dir / "README.md").read_text()
    assert "subfolder='experts/e0'" in card
    peft_model = PeftModel.from_pretrained(make_tiny_llama(seed=0), str(shared_dir), subfolder="experts/e1")
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_A" in k}
    want = lib.get("e1")
    assert len(state) == len(want.modules)
    module = want.modules[0]
    key = next(k for k in state if module in k)
    assert torch.equal(state[key], want.A[module])


def test_library_card_is_a_hub_model_card(tmp_path, model):
    from huggingface_hub import ModelCard
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    text = resolve_location(url).read_bytes("README.md").decode()
    card = ModelCard(text)
    assert card.data.library_name == "modlora" and card.data.base_model == "org/tiny-base"
    assert "modlora" in card.data.tags
    for name in lib.expert_names():
        assert f"| {name} | task_{name} | 2 |" in text
    assert f"open_library({url!r})" in text and "PeftModel.from_pretrained" in text
    hub = RemoteLocation("hf://org/repo@dev/libs/a", None, "", HubRepo("org/repo", "model", "dev", "libs/a"))
    text = library_card(lib, hub)
    assert "PeftModel.from_pretrained(base, 'org/repo', subfolder='libs/a/experts/e0', revision='dev')" in text


def test_tampered_remote_files_are_refused(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    shared_dir = tmp_path / "shared"
    push(lib, shared_dir)
    weights = shared_dir / "experts" / "e1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    artifact = shared_dir / "artifacts" / "proto" / "e2.safetensors"
    artifact.write_bytes(artifact.read_bytes()[:-4] + b"\0\0\0\0")
    shared = RemoteLibrary(resolve_location(str(shared_dir)))
    with pytest.raises(LibraryError, match=r"expert 'e1': file experts/e1/adapter_model.safetensors .*tampered"):
        shared.get("e1")
    assert not (shared.path / "experts" / "e1").exists()  # never renamed into the mirror
    with pytest.raises(LibraryError, match=r"expert 'e2' artifact 'proto': file artifacts/proto/e2.safetensors"):
        shared.load_artifact("e2", "proto")
    assert shared.get("e0") is not None
    problems = {p.expert for p in shared.verify()}
    assert problems == {"e1", "artifacts/proto/e2.safetensors"}
    with pytest.raises(LibraryError, match="e1"):
        pull(str(shared_dir), tmp_path / "copy")
    with pytest.raises(LibraryError):
        ExpertLibrary(tmp_path / "copy")  # no manifest: the refused pull left no library


def _observing_every_write(monkeypatch, url: str, allowed: list[set[str]]) -> list[list[str]]:
    """Before every remote write, open the remote afresh and check it is a complete library whose experts are one
    of the ``allowed`` sets (or no library at all); returns the expert lists seen."""
    seen: list[list[str]] = []
    real_upload, real_write = RemoteLocation.upload, RemoteLocation.write_bytes
    counter = {"n": 0}

    def observe() -> None:
        counter["n"] += 1
        try:
            lib = RemoteLibrary(resolve_location(url), mirror=Path(os.environ["MODLORA_CACHE"]) / f"obs{counter['n']}")
        except LibraryError as exc:
            assert "no modlora library" in str(exc)
            seen.append([])
            return
        assert set(lib.expert_names()) in allowed, lib.expert_names()
        assert lib.verify() == []
        seen.append(lib.expert_names())

    def upload(self, src, rel):
        observe()
        real_upload(self, src, rel)

    def write_bytes(self, rel, data):
        observe()
        real_write(self, rel, data)

    monkeypatch.setattr(RemoteLocation, "upload", upload)
    monkeypatch.setattr(RemoteLocation, "write_bytes", write_bytes)
    return seen


def test_a_reader_never_sees_a_half_pushed_library(tmp_path, model, monkeypatch):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    seen = _observing_every_write(monkeypatch, url, [{"e0", "e1", "e2"}])
    push(lib, url)
    assert seen[0] == [] and set(map(tuple, seen)) == {()}  # before the manifest: no library at all
    lib.add("e3", random_adapter(model, SPEC, seed=7), tasks=["t3"])
    lib.add("e1", random_adapter(model, SPEC, seed=8), tasks=["t1"], overwrite=True)
    monkeypatch.undo()
    monkeypatch.setenv("MODLORA_CACHE", str(tmp_path / "cache"))
    seen = _observing_every_write(monkeypatch, url, [{"e0", "e1", "e2"}, {"e0", "e2"}, {"e0", "e1", "e2", "e3"}])
    push(lib, url)
    assert {tuple(s) for s in seen} == {("e0", "e1", "e2"), ("e0", "e2")}
    assert open_library(url).expert_names() == ["e0", "e1", "e2", "e3"]


def test_a_reader_that_opened_before_a_push_is_told_to_reopen(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    push(lib, url)
    stale = open_library(url)
    lib.add("e1", random_adapter(model, SPEC, seed=8), tasks=["t1"], overwrite=True)
    push(lib, url)
    with pytest.raises(LibraryError, match="changed since it was opened.*open it again"):
        stale.get("e1")
    stale.reload()
    assert torch.equal(stale.get("e1").B[lib.get("e1").modules[0]], lib.get("e1").B[lib.get("e1").modules[0]])


def test_a_failed_push_resumes_without_resending(tmp_path, model, monkeypatch):
    lib = make_library(tmp_path / "lib", model)
    url = memory_url()
    real_upload = RemoteLocation.upload
    calls = {"n": 0}

    def failing_upload(self, src, rel):
        calls["n"] += 1
        if calls["n"] == 4:
            raise LibraryError("connection lost")
        real_upload(self, src, rel)

    monkeypatch.setattr(RemoteLocation, "upload", failing_upload)
    with pytest.raises(LibraryError, match="connection lost"):
        push(lib, url)
    monkeypatch.setattr(RemoteLocation, "upload", real_upload)
    with pytest.raises(LibraryError, match="no modlora library"):
        open_library(url)
    report = push(lib, url)
    assert len(report.transferred) == 10 - 2 and report.unchanged == 2  # the first expert's two files arrived
    assert_same_experts(open_library(url), lib)


def _run_child(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CHILD), *args], env=env, capture_output=True, text=True, timeout=300)


def test_killed_push_and_pull_resume_with_nothing_lost(tmp_path, model):
    lib = make_library(tmp_path / "lib", model)
    shared_dir = tmp_path / "shared"
    push(lib, shared_dir, card=False)
    old = ExpertLibrary(shared_dir).expert_names()
    lib.add("e3", random_adapter(model, SPEC, seed=7), tasks=["t3"])
    lib.add("e4", random_adapter(model, SPEC, seed=8), tasks=["t4"])
    lib.add("e1", random_adapter(model, SPEC, seed=9), tasks=["t1"], overwrite=True)
    proc = _run_child("push", str(tmp_path / "lib"), str(shared_dir), "3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    mid = RemoteLibrary(resolve_location(str(shared_dir)))  # killed mid-transfer: a complete, older library
    assert set(mid.expert_names()) <= set(old) and mid.verify() == []
    index = json.loads((shared_dir / INDEX).read_text())
    assert "experts/e1/adapter_model.safetensors" in index["files"]  # what arrived is recorded
    resumed = push(lib, shared_dir)
    assert "experts/e1/adapter_model.safetensors" not in resumed.transferred
    assert_same_experts(RemoteLibrary(resolve_location(str(shared_dir))), lib)

    dest = tmp_path / "copy"
    proc = _run_child("pull", str(shared_dir), str(dest), "4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with pytest.raises(LibraryError, match="not a modlora library"):
        ExpertLibrary(dest)  # no manifest yet: no half library
    report = pull(str(shared_dir), dest)
    assert report.unchanged >= 2 and len(report.transferred) < 10 + 2 * 2
    copy = ExpertLibrary(dest)
    assert copy.verify() == [] and copy.clean_incomplete() == []
    assert_same_experts(copy, lib)


def test_locations_and_revisions(tmp_path):
    with pytest.raises(LibraryError, match="revision applies to hf://"):
        resolve_location(memory_url(), revision="dev")
    with pytest.raises(LibraryError, match="revision applies to hf://"):
        open_library(tmp_path, revision="dev")
    with pytest.raises(LibraryError, match="names revision 'a' but --revision is 'b'"):
        resolve_location("hf://org/repo@a", revision="b")
    loc = resolve_location("hf://datasets/org/repo@refs/pr/3/libs/x")
    assert loc.root == "datasets/org/repo@refs%2Fpr%2F3/libs/x"
    assert loc.hub == HubRepo("org/repo", "dataset", "refs/pr/3", "libs/x")
    assert resolve_location("hf://org/repo", revision="dev").root == "org/repo@dev"
    with pytest.raises(LibraryError, match="nosuchproto://x: cannot open"):
        resolve_location("nosuchproto://x")
    with pytest.raises(LibraryError, match="no modlora library"):
        open_library(memory_url())


def test_hf_without_network_names_the_url(tmp_path, model, monkeypatch):
    """HF_HUB_OFFLINE=1 (read by huggingface_hub at import, so set on its constants here) with no cached snapshot of
    the repository: every operation fails at once with a LibraryError naming the URL, never a traceback from the
    HTTP client (a cached snapshot is read instead: tests/test_architectures.py)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    url = "hf://some-org/some-library@dev"
    no_snapshot = f"^{url}: HF_HUB_OFFLINE is set and the Hugging Face cache holds no snapshot of some-org/some-library"
    with pytest.raises(LibraryError, match=no_snapshot):
        open_library(url)
    with pytest.raises(LibraryError, match=no_snapshot):
        pull(url, tmp_path / "copy")
    lib = make_library(tmp_path / "lib", model, names=("e0",))
    with pytest.raises(LibraryError, match=f"^{url}: cannot create the repository or branch"):
        push(lib, url)
    assert not (tmp_path / "copy").exists()


class FakeHubApi:
    """Stands in for ``huggingface_hub.HfApi``: applies each commit's operations to an fsspec memory filesystem."""

    commits: list[tuple[str, list[str]]] = []
    root = ""
    head = "0" * 40
    after_commit = None   # called after each commit (a test's stand-in for another pusher)

    def __init__(self, *args, **kwargs):
        pass

    def repo_info(self, repo_id, repo_type=None, revision=None):
        return SimpleNamespace(sha=FakeHubApi.head)

    def create_repo(self, repo_id, repo_type=None, exist_ok=False):
        pass

    def create_branch(self, repo_id, repo_type=None, branch=None, exist_ok=False):
        pass

    def create_commit(self, repo_id, operations, commit_message, repo_type=None, revision=None, parent_commit=None):
        import fsspec
        from huggingface_hub import CommitOperationAdd
        if parent_commit is not None and parent_commit != FakeHubApi.head:
            error = RuntimeError("412 Client Error: Precondition Failed")
            error.response = SimpleNamespace(status_code=412)
            raise error
        fs = fsspec.filesystem("memory")
        for op in operations:
            path = f"{self.root}/{op.path_in_repo}"
            if isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                fs.pipe_file(path, src if isinstance(src, bytes) else Path(src).read_bytes())
            else:
                fs.rm_file(path)
        FakeHubApi.commits.append((commit_message, [op.path_in_repo for op in operations]))
        oid = FakeHubApi.head = hashlib.sha1(f"{FakeHubApi.head}{commit_message}".encode()).hexdigest()
        if FakeHubApi.after_commit is not None:
            FakeHubApi.after_commit()
        return SimpleNamespace(oid=oid)


def test_a_hub_push_commits_in_batches_with_the_manifest_last(tmp_path, model, monkeypatch):
    """The Hub transport (HfApi commits) with a fake HfApi over a memory filesystem: one commit per batch of files
    (with the index), one final commit with the card, the index and the manifest, paths under the repo folder."""
    import fsspec
    import huggingface_hub
    lib = make_library(tmp_path / "lib", model)
    repo_root = f"/hub/{uuid.uuid4().hex}"
    monkeypatch.setattr(FakeHubApi, "root", repo_root)
    monkeypatch.setattr(FakeHubApi, "commits", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    monkeypatch.setattr(RemoteLocation, "pinned", lambda self: self)
    loc = RemoteLocation("hf://org/repo@dev/libs", fsspec.filesystem("memory"), f"{repo_root}/libs",
                         HubRepo("org/repo", "model", "dev", "libs"))
    push(lib, loc)
    assert [len(files) for _, files in FakeHubApi.commits] == [10 + 1, 3]
    assert FakeHubApi.commits[1][1] == ["libs/README.md", "libs/files.json", "libs/library.json"]
    assert_same_experts(RemoteLibrary(loc), lib)
    push(lib, loc)
    assert len(FakeHubApi.commits) == 2  # nothing changed: no (empty) commit
    lib.remove("e0")
    lib.add("e1", random_adapter(model, SPEC, seed=8), tasks=["t1"], overwrite=True)
    FakeHubApi.commits.clear()
    push(lib, loc)
    messages = [m for m, _ in FakeHubApi.commits]
    assert messages[0] == "modlora push: withdraw the experts being replaced" and "delete" in messages[-1]
    assert FakeHubApi.commits[-1][1] == ["libs/artifacts/proto/e0.safetensors", "libs/artifacts/proto/e1.safetensors",
                                         "libs/experts/e0/adapter_config.json",
                                         "libs/experts/e0/adapter_model.safetensors"]
    assert_same_experts(RemoteLibrary(loc), lib)


def test_a_hub_push_overtaken_by_another_stops_with_a_clear_error_and_leaves_a_whole_library(tmp_path, model,
                                                                                              monkeypatch):
    """Hub pushes take no lock file: each commit names the head it follows (``parent_commit``), so a push that
    another push overtook is refused by the Hub (412) at its next commit; the remote stays a whole library."""
    import fsspec
    import huggingface_hub
    repo_root = f"/hub/{uuid.uuid4().hex}"
    monkeypatch.setattr(FakeHubApi, "root", repo_root)
    monkeypatch.setattr(FakeHubApi, "commits", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    monkeypatch.setattr(RemoteLocation, "pinned", lambda self: self)
    loc = RemoteLocation("hf://org/repo/libs", fsspec.filesystem("memory"), f"{repo_root}/libs",
                         HubRepo("org/repo", "model", None, "libs"))
    first = make_library(tmp_path / "first", model)
    push(first, loc)
    second = make_library(tmp_path / "second", model, names=("e0", "e9"))
    second.add("e0", random_adapter(model, SPEC, seed=11), tasks=["t0"], overwrite=True)

    def other_pusher():   # another push's commit lands right after this push's first one
        FakeHubApi.after_commit = None
        FakeHubApi.head = "f" * 40

    monkeypatch.setattr(FakeHubApi, "after_commit", staticmethod(other_pusher))
    before = len(FakeHubApi.commits)
    with pytest.raises(LibraryError, match="^hf://org/repo/libs: another push committed to main during this one"):
        push(second, loc)
    assert len(FakeHubApi.commits) == before + 1   # its first commit landed; nothing after the other's
    remote = RemoteLibrary(loc)   # a whole library: the first, less the expert the stopped push withdrew
    assert remote.expert_names() == ["e1", "e2"]
    for name in remote.expert_names():
        got, want = remote.get(name), first.get(name)
        assert all(torch.equal(got.A[m], want.A[m]) for m in want.modules)
    FakeHubApi.after_commit = None
    push(second, loc)   # once the other is done, the push goes through
    assert_same_experts(RemoteLibrary(loc), second)


def test_cli_push_pull_and_every_command_reading_a_library_takes_a_url(tmp_path, capsys):
    from modlora.cli import main
    from modlora.models import load_base_model
    model_dir = save_tiny_model(tmp_path / "tiny")
    (tmp_path / "data" / "eval").mkdir(parents=True)
    rows = [{"query": f"Q{i}:", "choices": [" yes", " no"], "gold": i % 2} for i in range(2)]
    (tmp_path / "data" / "eval" / "boolq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lm = load_base_model(str(model_dir), device="cpu")
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    for i in range(3):
        lib.add(f"e{i}", random_adapter(lm.model, SPEC, seed=i, std=0.2), tasks=[f"task{i}"])
    url = memory_url()
    m = ["--model", str(model_dir)]

    assert main(["push", str(lib.path), url]) == 0
    assert "sent 6 file(s)" in capsys.readouterr().out
    assert main(["push", str(lib.path), url]) == 0
    assert "sent 0 file(s)" in capsys.readouterr().out
    assert main(["show", url]) == 0 and "e2" in capsys.readouterr().out
    assert main(["verify", url]) == 0
    assert main(["export", url, "e1", str(tmp_path / "e1")]) == 0
    assert (tmp_path / "e1" / "adapter_model.safetensors").is_file()
    assert main(["route", url, "--prompt", "a1", "--max-new-tokens", "2", "--route-top-k", "2", "--explain"] + m) == 0
    assert main(["merge", url, "--method", "mu", "--out", str(tmp_path / "mu")]) == 0
    assert main(["cluster", url, "--k", "2", "--out", str(tmp_path / "c.json")]) == 0
    assert main(["eval", "--suite", "choice", "--tasks", "boolq", "--library", url, "--method", "mu", "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "ev.json")] + m) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["config"]["library"] == url
    (tmp_path / "data" / "sni" / "tasks").mkdir(parents=True)
    for i in range(3):
        write_sni_task(tmp_path / "data" / "sni" / "tasks", f"task{i}", "abc"[i])
    assert main(["build", str(tmp_path / "mbc"), "--strategy", "mbc", "--private-library", url, "--k", "2",
                 "--tasks", "task0", "task1", "task2", "--data", str(tmp_path / "data"), "--steps", "1",
                 "--batch-size", "2", "--max-val", "2", "--max-prompt-tokens", "16", "--max-target-tokens", "4"]
                + m) == 0
    assert len(ExpertLibrary(tmp_path / "mbc")) == 2
    capsys.readouterr()

    assert main(["pull", url, str(tmp_path / "copy")]) == 0
    assert "received 6 file(s)" in capsys.readouterr().out
    assert ExpertLibrary(tmp_path / "copy").verify() == []
    assert main(["import", url, str(tmp_path / "e1"), "--name", "x"]) == 2
    assert "read-only" in capsys.readouterr().err
    assert main(["show", url, "--revision", "dev"]) == 2
    assert "revision applies to hf://" in capsys.readouterr().err
    assert main(["pull", url + "-missing", str(tmp_path / "none")]) == 2
    assert "no modlora library" in capsys.readouterr().err and not (tmp_path / "none").exists()
