"""Reliability (issue 14): imports and verify that check everything later commands rely on, no silent NaN in
routing, clear errors for bad paths and files, flat-JSONL line accounting, and a reader racing a writer.

Every bad input must give a modlora error whose message names the expert, file, line or layer, and nothing already
written may be lost."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing as mp
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modlora.data import check_text, load_flat_jsonl, load_sni_task, read_flat_jsonl
from modlora.errors import AdapterError, BaseModelMismatchError, DataError, LibraryError, RoutingError
from modlora.library.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    LoraSpec,
    load_adapter,
    merge_adapter,
    random_adapter,
)
from modlora.library.store import MANIFEST, ExpertLibrary, same_model_name
from modlora.models import model_identity
from modlora.reuse.routing import ArrowRouter, route
from modlora.reuse.routing.routers import CentroidRouter, resolve_temperature

SPEC = LoraSpec(rank=4, alpha=16, dropout=0.05)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEEP = "[" * 100_000 + "]" * 100_000          # nested far beyond the JSON parser's recursion limit


def _lib(tmp_path: Path, model) -> ExpertLibrary:
    return ExpertLibrary.create(tmp_path / "lib", model_identity(model, "tiny"))


def _rewrite_expert(lib: ExpertLibrary, name: str, *, tensors: dict[str, torch.Tensor] | None = None,
                    config: dict | None = None, entry: dict | None = None) -> None:
    """Replace an expert's files / manifest fields and re-seal the checksums, as a careless tool would: the files
    then match the manifest, so only verify's consistency checks can find what is wrong."""
    d = lib.expert_dir(name)
    if tensors is not None:
        save_file(tensors, str(d / ADAPTER_WEIGHTS))
    if config is not None:
        (d / ADAPTER_CONFIG).write_text(json.dumps(config))
    manifest = json.loads((lib.path / MANIFEST).read_text())
    rec = manifest["experts"][name]
    rec.update(entry or {})
    rec["files"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    (lib.path / MANIFEST).write_text(json.dumps(manifest))
    lib.reload()


def _verify_text(lib: ExpertLibrary) -> str:
    return "\n".join(f"{p.expert}: {p.problem}" for p in ExpertLibrary(lib.path).verify())


# ------------------------------------------------------------------------------------------------ §2 import / verify
def test_import_refuses_wrong_shape_and_foreign_base(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    good = random_adapter(tiny_llama, SPEC, seed=1)
    m = good.modules[0]
    # one module with the wrong in_features (A and B still pair up, so the adapter alone looks fine)
    wrong = LoraAdapter(SPEC, {**good.A, m: torch.randn(4, 7)}, dict(good.B))
    wrong.save(tmp_path / "wrong")
    with pytest.raises(LibraryError, match=rf"{m}.*do not fit the base layer"):
        lib.import_adapter(tmp_path / "wrong", "w")
    # a module that does not exist in the model
    ghost = "model.layers.9.self_attn.q_proj"
    LoraAdapter(SPEC, {**good.A, ghost: good.A[m]}, {**good.B, ghost: good.B[m]}).save(tmp_path / "ghost")
    with pytest.raises(LibraryError, match=rf"{ghost} does not exist in the base model"):
        lib.import_adapter(tmp_path / "ghost", "g")
    # config target_modules disagree with the tensors
    LoraAdapter(LoraSpec(4, 16, 0.0, ("q_proj", "v_proj")), dict(good.A), dict(good.B)).save(tmp_path / "tm")
    with pytest.raises(LibraryError, match="not in the config's target_modules"):
        lib.import_adapter(tmp_path / "tm", "t")
    # another declared base model: refused unless forced, and the declared name is kept
    LoraAdapter(SPEC, dict(good.A), dict(good.B), "meta-llama/Llama-2-7b-hf").save(tmp_path / "llama")
    with pytest.raises(BaseModelMismatchError, match="Llama-2-7b-hf.*force"):
        lib.import_adapter(tmp_path / "llama", "l")
    assert len(lib) == 0 and not lib.expert_dir("l").exists()      # nothing was written by the refusals
    entry = lib.import_adapter(tmp_path / "llama", "l", force_base=True)
    assert entry.training["imported_base"] == "meta-llama/Llama-2-7b-hf"
    # the same base under another spelling is accepted without force
    LoraAdapter(SPEC, dict(good.A), dict(good.B), "/models/TINY").save(tmp_path / "same")
    lib.import_adapter(tmp_path / "same", "s")
    assert _verify_text(lib) == ""


def test_same_model_name():
    assert same_model_name("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-Q4_1")
    assert same_model_name("/cache/smollm2-135m-instruct.gguf", "SmolLM2-135M-Instruct")
    assert not same_model_name("meta-llama/Llama-2-7b-hf", "SmolLM2-135M-Instruct-Q4_1")
    assert not same_model_name("SmolLM2-360M-Instruct", "SmolLM2-135M-Instruct")


@pytest.mark.parametrize("case", ["wrong_shape", "ghost_module", "target_modules", "manifest_rank", "int32",
                                  "manifest_params", "foreign_base_in_config", "nonfinite", "swapped_ab"])
def test_verify_finds_what_later_commands_trip_over(tmp_path, tiny_llama, case):
    lib = _lib(tmp_path, tiny_llama)
    ad = random_adapter(tiny_llama, SPEC, seed=1)
    lib.add("e", ad)
    lib.add("ok", random_adapter(tiny_llama, SPEC, seed=2))
    assert _verify_text(lib) == ""
    tensors = load_file(str(lib.expert_dir("e") / ADAPTER_WEIGHTS))
    config = json.loads((lib.expert_dir("e") / ADAPTER_CONFIG).read_text())
    key_a = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    if case == "wrong_shape":
        key_b = key_a.replace("lora_A", "lora_B")
        tensors[key_a], tensors[key_b] = torch.randn(4, 5), torch.randn(6, 4)
        _rewrite_expert(lib, "e", tensors=tensors)
        expect = "do not fit the base layer"
    elif case == "ghost_module":
        tensors[key_a.replace("layers.0", "layers.7")] = tensors[key_a].clone()
        tensors[key_a.replace("layers.0", "layers.7").replace("lora_A", "lora_B")] = \
            tensors[key_a.replace("lora_A", "lora_B")].clone()
        _rewrite_expert(lib, "e", tensors=tensors)
        expect = "does not exist in the base model"
    elif case == "target_modules":
        _rewrite_expert(lib, "e", config={**config, "target_modules": ["q_proj", "k_proj"]})
        expect = "target_modules"
    elif case == "manifest_rank":
        _rewrite_expert(lib, "e", entry={"lora": {**SPEC.to_dict(), "r": 8}})
        expect = r"lora\.r is 8 but .*adapter_config.json has 4"
    elif case == "int32":
        _rewrite_expert(lib, "e", tensors={k: (v * 100).to(torch.int32) for k, v in tensors.items()})
        expect = "dtype torch.int32"
    elif case == "manifest_params":
        _rewrite_expert(lib, "e", entry={"num_parameters": 3, "modules": 1})
        expect = "num_parameters is 3"
    elif case == "foreign_base_in_config":
        _rewrite_expert(lib, "e", config={**config, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"})
        expect = "base_model_name_or_path"
    elif case == "nonfinite":
        tensors[key_a][0, 0] = float("nan")
        _rewrite_expert(lib, "e", tensors=tensors)
        expect = "NaN or Inf"
    else:   # A and B of every module swapped: rank still pairs up only if square, so this is a shape error
        _rewrite_expert(lib, "e", tensors={(k.replace("lora_A", "X").replace("lora_B", "lora_A")
                                            .replace("X", "lora_B")): v for k, v in tensors.items()})
        expect = "rank mismatch"
    text = _verify_text(lib)
    assert text.startswith("e: ") and "ok:" not in text, text     # names the expert, and only the broken one
    assert re.search(expect, text), text
    assert "adapter_" in text or "library.json" in text            # and the file or field


def test_library_without_recorded_shapes_is_backfilled(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    lib.add("e", random_adapter(tiny_llama, SPEC, seed=1))
    manifest = json.loads((lib.path / MANIFEST).read_text())
    del manifest["base_model"]["linear_shapes"]                    # a library written before shapes were recorded
    (lib.path / MANIFEST).write_text(json.dumps(manifest))
    old = ExpertLibrary(lib.path)
    assert old.linear_shapes is None
    assert old.verify() == []                                       # a sound old library still verifies
    # without base shapes an import is still checked against the experts already stored
    good = random_adapter(tiny_llama, SPEC, seed=2)
    m = good.modules[0]
    LoraAdapter(SPEC, {**good.A, m: torch.randn(4, 7)}, dict(good.B)).save(tmp_path / "wrong")
    with pytest.raises(LibraryError, match="do not fit"):
        old.import_adapter(tmp_path / "wrong", "w")
    reopened = ExpertLibrary.open_or_create(lib.path, model_identity(tiny_llama, "tiny"))
    assert reopened.linear_shapes and ExpertLibrary(lib.path).verify() == []


# ------------------------------------------------------------------------------------ §5 paths and broken files
def test_show_train_export_onto_bad_paths(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    ad = random_adapter(tiny_llama, SPEC, seed=1)
    lib.add("e", ad)
    shutil.rmtree(lib.expert_dir("e"))
    with pytest.raises(LibraryError, match=r"expert 'e'.*experts/e/adapter_config.json"):
        lib.size_bytes("e")                                        # what `show` prints per expert
    with pytest.raises(LibraryError, match="expert 'e': missing file"):
        ExpertLibrary(lib.path).get("e")
    afile = tmp_path / "file.txt"
    afile.write_text("precious")
    for target in (afile, afile / "sub"):
        with pytest.raises(LibraryError, match="file.txt"):
            ExpertLibrary.open_or_create(target, model_identity(tiny_llama, "tiny"))
        with pytest.raises(LibraryError, match="file.txt"):
            ExpertLibrary(target)
    lib.add("e", ad, overwrite=True)
    out = tmp_path / "out"
    lib.export("e", out)
    with pytest.raises(LibraryError, match="already exists"):
        lib.export("e", out)
    with pytest.raises(AdapterError, match="already exists"):
        ad.save(out)
    lib.export("e", out, overwrite=True)                            # an adapter directory may be replaced
    with pytest.raises(LibraryError, match="not a directory"):
        lib.export("e", afile, overwrite=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("x")
    with pytest.raises(AdapterError, match="does not hold an adapter"):
        ad.save(notes, overwrite=True)
    with pytest.raises(AdapterError, match="file.txt"):
        ad.save(afile / "sub")
    assert afile.read_text() == "precious" and (notes / "keep.txt").read_text() == "x"   # nothing was lost


def _corrupt_gzip(payload: bytes) -> bytes:
    data = bytearray(gzip.compress(payload))
    for i in range(12, len(data) - 8, 3):                            # scramble the deflate stream, keep the header
        data[i] ^= 0x5A
    return bytes(data)


def test_corrupt_gzip_and_deep_json(tmp_path, tiny_llama):
    payload = json.dumps({"Definition": ["d"], "Instances": [{"id": str(i), "input": "x" * 50, "output": ["y"]}
                                                           for i in range(50)]}).encode()
    bad_gz = tmp_path / "task001_x.json.gz"
    bad_gz.write_bytes(_corrupt_gzip(payload))
    with pytest.raises(zlib.error):
        gzip.decompress(bad_gz.read_bytes())                         # really a broken deflate stream
    with pytest.raises(DataError, match="task001_x.json.gz"):
        load_sni_task(bad_gz)
    flat_gz = tmp_path / "flat.jsonl.gz"
    flat_gz.write_bytes(_corrupt_gzip(b'{"task_name": "a", "source": "s", "target": "t"}\n' * 200))
    with pytest.raises(DataError, match="flat.jsonl.gz"):
        load_flat_jsonl(flat_gz)
    deep_task = tmp_path / "task002_deep.json"
    deep_task.write_text(DEEP)
    with pytest.raises(DataError, match="task002_deep.json.*nested too deeply"):
        load_sni_task(deep_task)
    lib = _lib(tmp_path, tiny_llama)
    lib.add("e", random_adapter(tiny_llama, SPEC, seed=1))
    (lib.expert_dir("e") / ADAPTER_CONFIG).write_text(DEEP)
    with pytest.raises(AdapterError, match="adapter_config.json.*nested too deeply"):
        load_adapter(lib.expert_dir("e"))
    (lib.path / "meta").mkdir()
    (lib.path / "meta" / "clusters.json").write_text(DEEP)
    with pytest.raises(LibraryError, match="clusters.json.*nested too deeply"):
        lib.load_meta("clusters")
    (lib.path / MANIFEST).write_text(DEEP)
    with pytest.raises(LibraryError, match="library.json.*nested too deeply"):
        ExpertLibrary(lib.path)


# ------------------------------------------------------------------------------------------ §6 flat JSONL lines
def test_flat_jsonl_counts_and_names_bad_lines(tmp_path):
    good = [json.dumps({"task_name": "a", "source": f"s{i}", "target": f"t{i}"}).encode() for i in range(4)]
    lines = [good[0], b"{not json", good[1], b'{"task_name": "a", "source": "\xff\xfe", "target": "x"}', b"",
             good[2], json.dumps({"task_name": "a", "source": "s"}).encode(), DEEP.encode(), b"[1, 2]", good[3]]
    path = tmp_path / "flat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    loaded = read_flat_jsonl(path)
    assert len(loaded.tasks["a"]) == 4                               # the non-UTF-8 line lost only itself
    assert loaded.report.skipped == 5 and loaded.tasks["a"].skipped == 5
    where = [p.split(":")[0] for p in loaded.report.problems]
    assert where == ["line 2", "line 4", "line 7", "line 8", "line 9"]
    assert "not valid UTF-8" in loaded.report.problems[1] and "nested too deeply" in loaded.report.problems[3]
    assert loaded.report.summary().startswith("skipped 5 malformed record(s): line 2: invalid JSON")
    with pytest.raises(DataError, match="flat.jsonl: line 2: invalid JSON"):
        read_flat_jsonl(path, strict=True)
    path.write_bytes(b"\n".join(lines[1:2] + lines[3:4]) + b"\n")
    with pytest.raises(DataError, match="no usable records.*skipped 2.*line 1.*line 2"):
        read_flat_jsonl(path)


def test_text_that_cannot_be_tokenised_is_refused(tmp_path):
    """Lone surrogates (a JSON "\\udcff" escape, or non-UTF-8 bytes in argv) make tokenizers raise TypeError."""
    path = tmp_path / "task005_s.json"
    path.write_text(json.dumps({"Definition": ["d"], "Instances": [{"id": "1", "input": "a\udcff", "output": ["y"]},
                                                                  {"id": "2", "input": "ok", "output": ["\ud800"]},
                                                                  {"id": "3", "input": "ok", "output": ["fine"]}]}))
    task = load_sni_task(path)
    assert len(task) == 1 and task.skipped == 2
    with pytest.raises(DataError, match=r"Instances\[0\]: field 'input' is not valid Unicode text at character 1"):
        load_sni_task(path, strict=True)
    path.write_text(json.dumps({"Definition": "\udcff", "Instances": []}))
    with pytest.raises(DataError, match="task005_s.json: field 'Definition': not valid Unicode"):
        load_sni_task(path)
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"task_name": "a", "source": "\udcff", "target": "t"}) + "\n"
                    + json.dumps({"task_name": "a", "source": "s", "target": "t"}) + "\n")
    loaded = read_flat_jsonl(flat)
    assert loaded.report.problems == ["line 1: field 'source' is not valid Unicode text at character 0 (a lone "
                                      "surrogate or non-UTF-8 bytes)"]
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")             # how Python hands non-UTF-8 argv to us
    with pytest.raises(DataError, match="--prompt: not valid Unicode text at character 3"):
        check_text(prompt, "--prompt")
    assert check_text("café", "--prompt") == "café"


# --------------------------------------------------------------------------------------------- §3 silent NaN
@pytest.mark.parametrize("bad", [1e-300, 1e-7, 0.0, -1.0, float("nan"), float("inf"), True, "hot"])
def test_temperature_underflow_is_refused(bad):
    with pytest.raises(RoutingError, match="temperature"):
        ArrowRouter(temperature=bad)
    with pytest.raises(RoutingError, match="temperature"):
        resolve_temperature(bad, 16)


def test_temperature_bound_keeps_logits_finite():
    assert resolve_temperature(1e-6, 16) == 1e-6 and resolve_temperature("sqrt_d", 16) == 4.0
    x = torch.full((1, 16), 1e30 / 4)                                # ‖x‖ = 1e30, the documented limit's scale
    v = torch.nn.functional.normalize(torch.ones(1, 16), dim=1)
    assert torch.isfinite((x @ v.T).abs() / 1e-6).all()


def _experts(model, n: int, scale: float | None = None, scaled: tuple[str, ...] = ("e1",)) -> dict[str, LoraAdapter]:
    """``n`` random experts; those in ``scaled`` have both factors multiplied by ``scale``."""
    ex = {f"e{i}": random_adapter(model, SPEC, seed=i, std=0.2) for i in range(n)}
    for name in scaled if scale is not None else ():
        a = ex[name]
        ex[name] = LoraAdapter(a.spec, {k: v * scale for k, v in a.A.items()}, {k: v * scale for k, v in a.B.items()})
    return ex


@pytest.mark.parametrize("router", ["arrow", "uniform"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_huge_weights_raise_naming_expert_and_layer(tiny_llama, router, path):
    ex = _experts(tiny_llama, 4, scale=1e30, scaled=("e1", "e2", "e3"))   # finite weights, overflowing outputs
    ids = torch.randint(3, 99, (2, 6))
    r = ArrowRouter(top_k=4 if path == "dense" else 1) if router == "arrow" else router
    with route(tiny_llama, ex, r, path=path) as routed:
        with pytest.raises(RoutingError, match=r"layer model\.layers\.0\.self_attn\.\w_proj: the LoRA output of "
                                               r"expert\(s\) 'e[123]'.* is not finite"):
            routed(input_ids=ids)
    with route(tiny_llama, _experts(tiny_llama, 4), ArrowRouter(top_k=2), path=path) as routed:
        assert torch.isfinite(routed(input_ids=ids).logits).all()   # healthy experts pass the check


def test_overflow_in_model_dtype_is_refused_at_route(tiny_llama):
    ex = _experts(tiny_llama, 3, scale=1e5)                      # |s·B| ~ 4e4 · 1e5: beyond float16's 65504
    with pytest.raises(RoutingError, match=r"expert 'e1' has weights that are not finite in torch.float16"):
        route(tiny_llama.to(torch.float16), ex, ArrowRouter(top_k=2))
    tiny_llama.float()


def test_merge_refuses_overflowing_adapter_and_leaves_model_untouched(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    huge = _experts(tiny_llama, 2, scale=1e30)["e1"]
    with pytest.raises(AdapterError, match=r"expert 'e1': module 'model\.layers\.0\.self_attn\.k_proj'.*not finite"):
        merge_adapter(tiny_llama, huge, name="expert 'e1'")
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


class _NanRouter:
    """A router whose weights are NaN for every token (as a softmax of infinite logits would give)."""

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        w = torch.full((x.shape[0], 3), 1 / 3)
        w[:, 2] = float("nan")
        return w


def test_nonfinite_router_weights_raise(tiny_llama):
    with route(tiny_llama, _experts(tiny_llama, 3), _NanRouter()) as routed:
        with pytest.raises(RoutingError, match=r"layer model\.layers\.0\.self_attn\.\w_proj: the router gave NaN/Inf "
                                               r"weights .* 'e0', 'e1', 'e2'"):
            routed(input_ids=torch.randint(3, 99, (1, 5)))
    centroids = {f"e{i}": {m: torch.full((32,), 1e36) for m in _experts(tiny_llama, 1)["e0"].modules}
                 for i in range(3)}
    with route(tiny_llama, _experts(tiny_llama, 3), CentroidRouter(centroids, temperature=1e-6)) as routed:
        with pytest.raises(RoutingError, match="the router gave NaN/Inf weights"):
            routed(input_ids=torch.randint(3, 99, (1, 5)))


# ------------------------------------------------------------------------------------------- §7 concurrency
N_WRITES = 200


def _version(model_seed: int, v: int) -> LoraAdapter:
    """Version ``v`` of the raced expert: every A entry is v, every B entry −v (a read mixing two versions, or
    a config of one with weights of another, shows as more than one value)."""
    from tests.conftest import make_tiny_llama
    ad = random_adapter(make_tiny_llama(seed=model_seed), SPEC)
    return LoraAdapter(LoraSpec(4, float(v), 0.0, TARGETS), {k: torch.full_like(t, v) for k, t in ad.A.items()},
                       {k: torch.full_like(t, -v) for k, t in ad.B.items()})


def _overwrite_many(path: str) -> int:
    torch.set_num_threads(1)
    lib = ExpertLibrary(path)
    for v in range(2, N_WRITES + 2):
        lib.add("x", _version(0, v), overwrite=True)
    return N_WRITES


def _check_version(ad: LoraAdapter) -> int:
    a_vals = torch.cat([t.flatten() for t in ad.A.values()]).unique()
    b_vals = torch.cat([t.flatten() for t in ad.B.values()]).unique()
    assert len(a_vals) == 1 and b_vals.tolist() == [-a_vals.item()], (a_vals, b_vals)
    assert ad.spec.alpha == a_vals.item()                            # config and weights of the same version
    return int(a_vals.item())


def test_reader_sees_old_or_new_while_writer_overwrites(tmp_path, tiny_llama):
    lib = _lib(tmp_path, tiny_llama)
    lib.add("x", _version(0, 1))
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        writer = pool.apply_async(_overwrite_many, (str(lib.path),))
        long_lived = ExpertLibrary(lib.path)
        reads, failures, seen = 0, [], []
        while not writer.ready() or (reads < 10 and len(failures) < 10):
            try:
                fresh = ExpertLibrary(lib.path).get("x")             # a new reader each time
                long_lived._cache.clear()                            # and one that keeps its (stale) manifest
                again = long_lived.get("x")
                seen.append(max(_check_version(fresh), _check_version(again)))
                entry_alpha = ExpertLibrary(lib.path).entry("x").lora["lora_alpha"]
                assert 1 <= entry_alpha <= N_WRITES + 1
                reads += 1
            except Exception as exc:   # noqa: BLE001 - any failed read is what this test counts
                failures.append(repr(exc))
        assert writer.get(timeout=600) == N_WRITES
    assert failures == [] and reads >= 10
    assert seen == sorted(seen)                                      # versions only move forward
    assert _check_version(ExpertLibrary(lib.path).get("x")) == N_WRITES + 1

