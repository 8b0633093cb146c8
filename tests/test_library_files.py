"""Library files that cannot hang, escape or be read wrongly: FIFOs, devices and symlinks where a library file should
be, a hostile ``.lock``, and every PEFT ``adapter_config.json`` field that changes the maths (honoured exactly, as
PEFT computes it, or refused naming the field)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modlora.errors import LibraryError
from modlora.io import sha256_file
from modlora.library.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSpec, merge_adapter, random_adapter
from modlora.library.store import LOCK, MANIFEST, ExpertLibrary

from .conftest import fresh_copy, make_library_template, make_tiny_llama

SPEC = LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
WAIT_S = 180   # a guard against a hang, not a timing assertion: a correct read returns at once
CHILD_MEMORY = 3 << 30   # a read of /dev/zero fails fast instead of filling the machine


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_library_template(tmp_path_factory.mktemp("tpl") / "lib")


def _in_child(expression: str) -> str:
    """Evaluate ``expression`` (``ExpertLibrary`` and ``Path`` in scope) in a fresh Python, which must exit by
    itself: a read blocked on a FIFO (possibly holding the GIL, as a safetensors open does) is killed at the guard's
    limit and fails the test. Returns what it printed: ``ok <value>`` or ``error <ModloraError message>``."""
    script = ("from pathlib import Path\nfrom modlora.errors import ModloraError\n"
              "from modlora.library.store import ExpertLibrary\n"
              f"try:\n    print('ok', {expression})\nexcept ModloraError as exc:\n    print('error', exc)\n")
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{expression} blocked (killed after {WAIT_S} s)")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    return run.stdout.strip()


def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def _symlink(path: Path, target: str | Path) -> Path:
    path.unlink(missing_ok=True)
    path.symlink_to(target)
    return path


def _problems(lib_dir: Path) -> str:
    """``expert: problem`` lines of ``verify``, run in a child (see :func:`_in_child`)."""
    out = _in_child(f"'\\n'.join(f'{{p.expert}}: {{p.problem}}' for p in ExpertLibrary({str(lib_dir)!r}).verify())")
    assert out.startswith("ok "), out
    return out.removeprefix("ok ")


# ----------------------------------------------------------------------------------- FIFOs, devices, symlinks
def test_fifo_manifest_is_refused_without_blocking(template, tmp_path):
    lib_dir = fresh_copy(template, tmp_path)
    _fifo(lib_dir / MANIFEST)
    out = _in_child(f"ExpertLibrary({str(lib_dir)!r})")
    assert out.startswith("error ") and "library.json" in out and "FIFO" in out, out


@pytest.mark.parametrize("fname", [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
def test_fifo_expert_file_is_a_verify_problem(template, tmp_path, fname):
    lib_dir = fresh_copy(template, tmp_path)
    _fifo(lib_dir / "experts" / "e1" / fname)
    text = _problems(lib_dir)
    assert text.startswith("e1: ") and f"experts/e1/{fname}" in text and "FIFO" in text, text
    assert "e2" not in text


def test_fifo_weights_in_a_library_without_base_shapes(template, tmp_path):
    """Such a library checks each expert against the others' file headers: an unreadable one is skipped there and
    reported as its own problem, never waited on."""
    lib_dir = fresh_copy(template, tmp_path)
    manifest = json.loads((lib_dir / MANIFEST).read_text())
    del manifest["base_model"]["linear_shapes"]
    (lib_dir / MANIFEST).write_text(json.dumps(manifest))
    _fifo(lib_dir / "experts" / "e2" / ADAPTER_WEIGHTS)
    text = _problems(lib_dir)
    assert text.startswith("e2: ") and "FIFO" in text, text


def test_cli_verify_on_a_fifo_returns(template, tmp_path):
    lib_dir = fresh_copy(template, tmp_path)
    _fifo(lib_dir / "experts" / "e1" / ADAPTER_WEIGHTS)
    run = subprocess.run([sys.executable, "-m", "modlora.cli", "verify", str(lib_dir)], capture_output=True,
                         text=True, timeout=WAIT_S * 3)
    assert run.returncode == 1 and "FIFO" in run.stdout and ADAPTER_WEIGHTS in run.stdout, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr


@pytest.mark.parametrize("where", [MANIFEST, f"experts/e1/{ADAPTER_WEIGHTS}", f"experts/e1/{ADAPTER_CONFIG}"])
def test_device_behind_a_symlink_is_refused_as_a_symlink(template, tmp_path, where):
    lib_dir = fresh_copy(template, tmp_path)
    _symlink(lib_dir / where, "/dev/zero")
    try:
        text = "\n".join(p.problem for p in ExpertLibrary(lib_dir).verify())
    except LibraryError as exc:
        text = str(exc)
    assert where in text and "symbolic link" in text, text


def test_meta_file_must_be_a_regular_file_in_the_library(template, tmp_path):
    lib_dir = fresh_copy(template, tmp_path)
    lib = ExpertLibrary(lib_dir)
    path = lib.save_meta("clustering", {"k": 2})
    _fifo(path)
    out = _in_child(f"ExpertLibrary({str(lib_dir)!r}).load_meta('clustering')")
    assert out.startswith("error ") and "meta/clustering.json" in out and "FIFO" in out, out
    outside = tmp_path / "outside.json"
    outside.write_text('{"k": 99}')
    _symlink(path, outside)
    with pytest.raises(LibraryError, match=r"meta/clustering\.json.*symbolic link"):
        lib.load_meta("clustering")
    assert lib.load_meta("missing") is None


def test_artifact_that_is_not_a_regular_file_is_recomputed(template, tmp_path):
    """Artifacts are a cache: a symlinked or FIFO artifact is never read (treated as absent), and saving the fresh
    one replaces the link, not its target."""
    lib_dir = fresh_copy(template, tmp_path)
    lib = ExpertLibrary(lib_dir)
    lib.save_artifact("e1", "arrow-v1", {"v": torch.ones(3)})
    path = lib_dir / "artifacts" / "arrow-v1" / "e1.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.copy(path, outside)
    before = outside.read_bytes()
    _symlink(path, outside)
    assert lib.load_artifact("e1", "arrow-v1") is None
    assert lib.missing_artifacts("arrow-v1") == ["e1", "e2"]
    lib.save_artifact("e1", "arrow-v1", {"v": torch.zeros(3)})
    assert not path.is_symlink() and outside.read_bytes() == before
    _fifo(path)
    assert _in_child(f"ExpertLibrary({str(lib_dir)!r}).load_artifact('e1', 'arrow-v1')") == "ok None"


# ------------------------------------------------------------------------------------------------- the lock
def test_dangling_lock_symlink_is_refused_and_nothing_is_created(template, tmp_path, tiny_llama):
    lib_dir = fresh_copy(template, tmp_path)
    target = tmp_path / "elsewhere" / "created-by-lock"
    target.parent.mkdir()
    _symlink(lib_dir / LOCK, target)
    lib = ExpertLibrary(lib_dir)
    actions: list[Callable[[], Any]] = [
        lambda: lib.get("e1"), lib.verify, lambda: lib.export("e1", tmp_path / "out"),
        lambda: lib.add("e3", random_adapter(tiny_llama, SPEC, seed=3)), lambda: lib.remove("e2"),
        lib.clean_incomplete]
    for action in actions:
        try:
            problems = action()
        except LibraryError as exc:
            problems = str(exc)
        assert ".lock" in str(problems) and "symbolic link" in str(problems), problems
        assert not target.exists()
    assert ExpertLibrary(lib_dir).expert_names() == ["e1", "e2"]     # nothing written either


def test_fifo_or_directory_lock_is_refused(template, tmp_path, tiny_llama):
    lib_dir = fresh_copy(template, tmp_path)
    fifo = _fifo(lib_dir / LOCK)
    for action in ("get('e1')", "remove('e2')"):     # a reader's shared lock, a writer's exclusive one
        out = _in_child(f"ExpertLibrary({str(lib_dir)!r}).{action}")
        assert out.startswith("error ") and ".lock" in out and "FIFO" in out, out
    fifo.unlink()
    (lib_dir / LOCK).mkdir()
    with pytest.raises(LibraryError, match=r"\.lock.*directory"):
        ExpertLibrary(lib_dir).add("e3", random_adapter(tiny_llama, SPEC, seed=3))


# ------------------------------------------------------------------------------------------- importing adapters
def _adapter_dir(tmp_path: Path, model, **config: Any) -> Path:
    """A PEFT adapter directory of a random adapter, its config fields overridden by ``config``."""
    directory = random_adapter(model, SPEC, seed=5, std=0.1).save(tmp_path / "adapter")
    cfg = json.loads((directory / ADAPTER_CONFIG).read_text())
    (directory / ADAPTER_CONFIG).write_text(json.dumps({**cfg, **config}))
    return directory


def test_import_source_files_must_be_regular(template, tmp_path, tiny_llama):
    """An imported adapter's files may be symlinks (a Hugging Face cache snapshot links into its blobs) but must
    resolve to regular files: a FIFO or a device is refused, never read."""
    lib = ExpertLibrary(fresh_copy(template, tmp_path))
    directory = _adapter_dir(tmp_path, tiny_llama)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.move(directory / fname, blobs / fname)
        _symlink(directory / fname, blobs / fname)
    lib.import_adapter(directory, "linked")
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (directory / fname).unlink()
        shutil.copy(blobs / fname, directory / fname)
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        saved = (directory / fname).read_bytes()
        for hostile, kind in ((_fifo, "FIFO"), (lambda p: _symlink(p, "/dev/zero"), "character device")):
            hostile(directory / fname)
            out = _in_child(f"ExpertLibrary({str(lib.path)!r}).import_adapter(Path({str(directory)!r}), 'x')")
            assert out.startswith("error ") and fname in out and kind in out, out
        (directory / fname).unlink()
        (directory / fname).write_bytes(saved)
    assert lib.expert_names() == ["e1", "e2", "linked"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rank,alpha", [(4, 8.0), (8, 3.0)])
def test_rslora_adapter_applies_as_peft_computes_it(tmp_path, rank, alpha):
    """PEFT scales an rsLoRA adapter by α/√r, not α/r: an imported one gives PEFT's logits, and exports as an adapter
    PEFT loads to the same logits."""
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(make_tiny_llama(seed=3), config)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "rslora")
    ids = torch.randint(3, 99, (2, 12))
    reference = _logits(peft_model, ids)

    base = make_tiny_llama(seed=3)
    from modlora.models import model_identity
    lib = ExpertLibrary.create(tmp_path / "lib", model_identity(base, "tiny"))
    lib.import_adapter(tmp_path / "rslora", "rs")
    assert lib.verify() == []
    merge_adapter(base, lib.get("rs"))
    ours = _logits(base, ids)
    assert (reference - _logits(make_tiny_llama(seed=3), ids)).abs().max() > 1e-2   # the adapter does something
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    exported = PeftModel.from_pretrained(make_tiny_llama(seed=3), lib.export("rs", tmp_path / "out"))
    exported.eval()
    torch.testing.assert_close(_logits(exported, ids), reference, rtol=1e-5, atol=1e-5)


REFUSED = [
    ("use_dora", True), ("fan_in_fan_out", "yes"), ("rank_pattern", {"q_proj": 4}), ("alpha_pattern", {"q_proj": 8}),
    ("layers_to_transform", [0]), ("layers_to_transform", 0), ("layers_pattern", "layers"),
    ("modules_to_save", ["lm_head"]), ("bias", "all"), ("bias", "lora_only"), ("lora_bias", True),
    ("target_modules", ".*\\.(q_proj|v_proj)"), ("target_modules", "all-linear"),
    ("target_modules", "q_proj"),
    ("target_modules", ["self_attn.q_proj", "v_proj"]), ("exclude_modules", ["k_proj"]),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"),
    ("init_lora_weights", "corda"), ("init_lora_weights", "loftq"), ("init_lora_weights", "lora_ga"),
    ("init_lora_weights", "mica"), ("use_qalora", True), ("layer_replication", [[0, 2]]),
    ("trainable_token_indices", [5, 6]), ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("alora_invocation_tokens", [5]), ("arrow_config", {"top_k": 2}), ("use_bdlora", {"nblocks": 2}),
    ("kasa_config", {"x": 1}), ("velora_config", {"rank": 1}), ("monteclora_config", {"n": 2}),
    ("megatron_config", {"tensor_model_parallel_size": 2}), ("use_rslora", "yes"),
]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f"{f}={v!r}" for f, v in REFUSED])
def test_config_field_modlora_does_not_apply_is_refused_naming_it(template, tmp_path, tiny_llama, field, value):
    lib = ExpertLibrary(fresh_copy(template, tmp_path))
    directory = _adapter_dir(tmp_path, tiny_llama, **{field: value})
    with pytest.raises(LibraryError, match=rf"adapter_config\.json.*'{field}'"):
        lib.import_adapter(directory, "x")
    assert lib.expert_names() == ["e1", "e2"]


@pytest.mark.parametrize("field,value", [
    ("bias", "none"), ("init_lora_weights", True), ("init_lora_weights", False), ("init_lora_weights", "gaussian"),
    ("init_lora_weights", "eva"), ("init_lora_weights", "orthogonal"), ("layers_to_transform", None),
    ("layers_pattern", None), ("modules_to_save", None), ("rank_pattern", {}), ("exclude_modules", None),
    ("use_rslora", False), ("loftq_config", {}), ("task_type", "CAUSAL_LM"), ("ensure_weight_tying", True),
])
def test_config_fields_that_change_nothing_are_accepted(template, tmp_path, tiny_llama, field, value):
    lib = ExpertLibrary(fresh_copy(template, tmp_path))
    entry = lib.import_adapter(_adapter_dir(tmp_path, tiny_llama, **{field: value}), "x")
    assert entry.lora["lora_alpha"] == 4 and lib.verify() == []


@pytest.mark.parametrize("field,value", [
    ("lora_alpha", 1e308), ("lora_alpha", -1e308), ("lora_alpha", float("nan")), ("lora_alpha", float("inf")),
    ("lora_alpha", True), ("lora_dropout", float("nan")), ("lora_dropout", True), ("r", 20), ("r", 2.0),
])
def test_numeric_fields_are_bounded_on_import(template, tmp_path, tiny_llama, field, value):
    """α and dropout finite and in range; r a whole number no larger than the narrowest layer it adapts (v_proj of
    the tiny model has 16 outputs)."""
    lib = ExpertLibrary(fresh_copy(template, tmp_path))
    directory = _adapter_dir(tmp_path, tiny_llama, **{field: value})
    if field == "r" and isinstance(value, int):
        spec = LoraSpec(value, 4, 0.0, SPEC.target_modules)
        random_adapter(tiny_llama, spec, seed=1).save(directory, overwrite=True)
    with pytest.raises(LibraryError, match=rf"'{field}'"):
        lib.import_adapter(directory, "x")
    assert lib.expert_names() == ["e1", "e2"]


def _resign(lib_dir: Path, name: str, lora: dict[str, Any] | None = None) -> None:
    """Re-sign an expert's files in the manifest (an attacker controlling the whole directory), optionally with new
    ``lora`` fields."""
    manifest = json.loads((lib_dir / MANIFEST).read_text())
    entry = manifest["experts"][name]
    entry["files"] = {f: sha256_file(lib_dir / "experts" / name / f) for f in entry["files"]}
    entry["lora"].update(lora or {})
    (lib_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("alpha", [1e308, float("nan")])
def test_verify_refuses_absurd_alpha(template, tmp_path, alpha):
    lib_dir = fresh_copy(template, tmp_path)
    cpath = lib_dir / "experts" / "e1" / ADAPTER_CONFIG
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), "lora_alpha": alpha}))
    _resign(lib_dir, "e1")
    text = _problems(lib_dir)
    assert text.startswith("e1: ") and "adapter_config.json" in text and "'lora_alpha' must be" in text, text
    _resign(lib_dir, "e1", {"lora_alpha": alpha})      # the manifest agrees: the library itself is refused
    with pytest.raises(LibraryError, match=r"library\.json.*expert 'e1'.*'lora_alpha' must be"):
        ExpertLibrary(lib_dir)
