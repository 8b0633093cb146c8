"""The serving engine without HTTP: packed and chunked prompt reading, the KV slots rows join and leave, the prefix
cache (keys/values and routing telemetry), cancellation, and the batch router's device.

Greedy outputs are compared with ``prepare_model(...).generate`` one request at a time (the tiny Llama's weights are
scaled up so greedy text varies and a wrong cache position or mask would show).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
import torch

from modlora.library.adapters import LoraSpec, random_adapter, resolve_spec
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.prepare import prepare_model
from modlora.serve import Engine, EngineOptions
from modlora.serve.batching import KVShape, PrefixCache, SlotCache
from modlora.serve.requests import Event, RoutingRequest, SamplingParams
from modlora.serve.routing import BatchRouter, RowRouting

from .conftest import make_tiny_llama, save_served_library
from .test_architectures import save_tiny

SHARED = "Definition: answer the question in one word. "
PROMPTS = [SHARED + "Input: cat", SHARED + "Input: a much longer question about dogs?", "short",
           SHARED + "Input: cat and mouse", "Zebra! " * 6, SHARED + "Input: x"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_library(tmp_path_factory.mktemp("engine"))


def _reference(workdir: Path, prompt: str, max_tokens: int, method: str = "arrow", **opts) -> list[int]:
    lm = load_base_model(str(workdir / "model"), device="cpu")
    reuse = prepare_model(lm, ExpertLibrary(workdir / "lib"), method, opts)
    ids = lm.tokenizer(prompt, return_tensors="pt")
    out = reuse.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=2, eos_token_id=2)
    return out[0, ids["input_ids"].shape[1]:].tolist()


class Collector:
    """An ``emit`` that keeps a request's events and says when it ended."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None or event.error is not None:
            self.done.set()

    def wait(self) -> Event:
        assert self.done.wait(60), "the request did not end"
        return self.events[-1]


def _run(engine: Engine, prompts: list[str], max_tokens: int, plan: RoutingRequest | None = None) -> list:
    """Submit every prompt at once; each request's (generated ids, final event)."""
    tok = engine.tokenizer
    jobs = []
    for p in prompts:
        c = Collector()
        req = engine.submit(tok(p)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0), "lib", plan, c)
        jobs.append((req, c))
    return [(req.generated, c.wait()) for req, c in jobs]


@pytest.mark.parametrize("prefill_tokens", [7, 256])
def test_packed_chunked_reading_with_prefix_cache_matches_generate(workdir, prefill_tokens) -> None:
    """Prompts read in small packed chunks (7 tokens a step: several prompts per forward, long prompts over several
    steps, in the same forwards as the decoding rows' next tokens) and with prefix-cache hits give the greedy tokens
    of one-at-a-time ``generate``."""
    lm = load_base_model(str(workdir / "model"), device="cpu")
    opts = EngineOptions(max_batch=4, batch_wait_s=0.05, prefill_tokens=prefill_tokens, prefix_block=4)
    engine = Engine(lm, workdir / "lib", opts).start()
    try:
        plan = RoutingRequest(top_k=2)
        first = _run(engine, PROMPTS, 10, plan)             # 6 requests, 4 slots: rows leave and others join
        again = _run(engine, PROMPTS, 10, plan)             # every prompt now shares blocks with the cache
    finally:
        engine.stop()
    expected = [_reference(workdir, p, 10, top_k=2) for p in PROMPTS]
    assert [g for g, _ in first] == [e[:len(g)] for g, e in zip([g for g, _ in first], expected, strict=True)]
    for (g, ev), e in zip(first + again, expected + expected, strict=True):
        assert ev.error is None
        assert g == [t for t in e if t != 2][:len(g)] and len(g) == len([t for t in e if t != 2])
    assert engine.stats.reused_tokens > len(SHARED) and engine.stats.max_batch == 4
    assert engine.stats.prefills >= 2
    if prefill_tokens == 7:
        assert engine.stats.shared_steps > 0


@pytest.mark.parametrize("prefill_tokens", [5, 256])
def test_prompt_logprobs_equal_the_routed_models_log_softmax(workdir, prefill_tokens) -> None:
    """``prompt_logprobs``: each prompt token's log-probability (and the top 3) under Arrow routing equals
    ``log_softmax`` of one full forward of the routed model, whether the prompt is read whole or in 5-token chunks
    packed with other prompts (and after a prefix-cache warm-up, which such a request does not use); ``max_tokens``
    0 ends after the prompt with nothing sampled."""
    lm = load_base_model(str(workdir / "model"), device="cpu")
    opts = EngineOptions(max_batch=4, batch_wait_s=0.05, prefill_tokens=prefill_tokens, prefix_block=4)
    engine = Engine(lm, workdir / "lib", opts).start()
    prompts = [SHARED + "Input: cat", SHARED + "Input: a much longer question about dogs?"]
    plan = RoutingRequest(top_k=2)
    try:
        _run(engine, [SHARED + "Input: warm"], 2, plan)
        jobs = []
        for p, max_tokens in zip(prompts, (0, 3), strict=True):
            c = Collector()
            params = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=3)
            jobs.append((engine.submit(engine.tokenizer(p)["input_ids"], params, "lib", plan, c), c))
        ends = [c.wait() for _, c in jobs]
    finally:
        engine.stop()
    ref_lm = load_base_model(str(workdir / "model"), device="cpu")
    reuse = prepare_model(ref_lm, ExpertLibrary(workdir / "lib"), "arrow", {"top_k": 2})
    for (req, c), end, max_tokens in zip(jobs, ends, (0, 3), strict=True):
        assert end.error is None and (max_tokens > 0 or end.finish_reason == "length")
        assert len(req.generated) <= max_tokens and end.usage.completion_tokens == len(req.generated)
        scored = [e.prompt_logprobs for e in c.events if e.prompt_logprobs is not None]
        assert len(scored) == 1
        ids = req.prompt_ids
        with torch.no_grad():
            ref = torch.log_softmax(reuse(torch.tensor([ids])).logits[0].float(), -1)
        entries = scored[0]
        assert [e.token for e in entries] == ids[1:] and [e.offset for e in entries] == list(range(1, len(ids)))
        for e in entries:
            row = ref[e.offset - 1]
            assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
            top = torch.topk(row, 3)
            assert [t for t, _ in e.top] == top.indices.tolist()
            assert [v for _, v in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert len(jobs[0][0].generated) == 0 and jobs[0][1].events[-1].usage.completion_tokens == 0


def test_prefix_cache_keeps_routing_telemetry(workdir) -> None:
    """A request whose prompt comes partly from the prefix cache reports the same routing telemetry as one that
    read its whole prompt (the cached blocks carry their routing sums)."""
    lm = load_base_model(str(workdir / "model"), device="cpu")
    results = {}
    for cache in (0, 4096):
        opts = EngineOptions(max_batch=4, batch_wait_s=0.0, prefix_cache_tokens=cache, prefix_block=4)
        engine = Engine(lm, workdir / "lib", opts).start()
        try:
            _run(engine, [SHARED + "Input: warm"], 3)
            results[cache] = _run(engine, [SHARED + "Input: cat"], 6)[0][1].routing
            reused = engine.stats.reused_tokens
        finally:
            engine.stop()
        assert (reused > 0) == (cache > 0)
    off, on = results[0], results[4096]
    assert [n for n, _ in on.top_experts] == [n for n, _ in off.top_experts]
    assert on.token_layers == off.token_layers
    for name, mass in off.mass.items():
        assert on.mass[name] == pytest.approx(mass, rel=1e-4, abs=1e-5)
    assert on.entropy == pytest.approx(off.entropy, rel=1e-4)


def test_prefix_cache_is_per_routing_and_evicts() -> None:
    """A block is found only under the routing key it was read with and after the same tokens; at most
    ``capacity`` tokens are kept, least recently used out; the prompt's last token is never served."""
    cache = PrefixCache(capacity=6, block=2)
    kv = torch.arange(5.0).view(1, 1, 1, 5, 1).expand(1, 2, 1, 5, 1)
    cache.insert("a", [1, 2, 3, 4, 5], kv, [None, None])
    assert len(cache) == 2
    assert len(cache.lookup("a", [1, 2, 3, 4, 9])) == 2
    assert len(cache.lookup("a", [1, 2, 3, 4])) == 1          # 4 tokens: the last one is read again
    assert cache.lookup("b", [1, 2, 3, 4, 5]) == []
    assert len(cache.lookup("a", [1, 9, 3, 4, 5])) == 0
    found = cache.lookup("a", [1, 2, 3, 4, 5])
    assert torch.equal(torch.cat([b.kv for b in found], dim=3)[0, 0, 0, :, 0], torch.tensor([0.0, 1, 2, 3]))
    cache.insert("b", [7, 7, 7, 7, 7], kv, [None, None])       # 8 tokens > 6: the least recently used block goes
    assert len(cache) == 3
    assert cache.lookup("a", [1, 2, 3, 4, 5]) == [] and len(cache.lookup("b", [7, 7, 7, 7, 7])) == 2


def test_slots_join_and_leave_without_rebuilding() -> None:
    """Rows join into free slots of one preallocated tensor and leave by moving the last row into the hole; each
    row keeps its keys/values, and the tensor is not reallocated while it has room."""
    model = make_tiny_llama()
    shape = KVShape.of(model)
    slots = SlotCache(shape)
    rows = {}
    for i, n in enumerate([3, 5, 2, 4]):
        kv = torch.randn(shape.layers, 2, shape.heads, n, shape.head_dim)
        rows[i] = kv
        slots.join(kv, n)
    slots.join(torch.randn(shape.layers, 2, shape.heads, 2, shape.head_dim), 2)     # 5 rows: grown to 8 slots
    data = slots.data
    assert data is not None and data.shape[2] == 8
    order = slots.keep([True, False, True, True, False])
    assert order == [0, 3, 2] and slots.lengths == [3, 4, 2]
    slots.join(rows[1], 5)                                                            # into a free slot
    assert slots.data is data                                                         # never reallocated
    slots.keep([True, True, True, False])
    for b, old in enumerate(order):
        n = slots.lengths[b]
        assert torch.equal(slots.data[:, :, b, :, :n], rows[old])
    slots.keep([False, False, False])
    assert slots.data is None and slots.lengths == []


def test_cancelled_requests_leave_while_reading_and_decoding(workdir) -> None:
    """A request cancelled while its prompt is being read or while it decodes stops and unpins its experts."""
    lm = load_base_model(str(workdir / "model"), device="cpu")
    engine = Engine(lm, workdir / "lib", EngineOptions(max_batch=4, batch_wait_s=0.0, prefill_tokens=2)).start()
    try:
        tok = engine.tokenizer
        reading, decoding = Collector(), Collector()
        long_req = engine.submit(tok("x" * 60)["input_ids"], SamplingParams(max_tokens=50, temperature=0), "lib",
                                 None, reading)
        long_req.cancelled = True                  # 2 prompt tokens a step: still reading
        dec = engine.submit(tok("Hello")["input_ids"], SamplingParams(max_tokens=500, temperature=0), "lib", None,
                            decoding)
        deadline = time.monotonic() + 30
        while dec.sampled < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        dec.cancelled = True
        while engine.busy():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert long_req.sampled == 0 and dec.sampled < 500
        assert engine._pool.pins == {}
    finally:
        engine.stop()


def test_batch_router_builds_its_tables_on_the_prototypes_device() -> None:
    """Masks, top-k and 1/T of each row live where the prototypes are (the meta device here: any table left on the
    CPU would fail to mix with them), and a packed step's tokens are routed by their own rows."""
    layer = "model.layers.0.self_attn.q_proj"
    protos = {f"k{i}": {layer: torch.nn.functional.normalize(torch.randn(8), dim=0)} for i in range(3)}
    router = BatchRouter(list(protos), protos, num_layers=1, groups=1)
    router.bind(None, {layer: [0, 1, 2]}, device="meta")                           # type: ignore[arg-type]
    router.set_rows([RowRouting("arrow", (0, 1), 1, 0.5), RowRouting.uniform([2])], token_rows=[0, 0, 1],
                    segments=[0, 1, 2])
    out = router(torch.randn(3, 8, device="meta"), layer)
    assert out.device.type == "meta" and out.shape == (3, 3)
    assert router.telemetry is not None and router.telemetry.mass.device.type == "meta"
    # on the CPU: the packed tokens' weights follow their rows and the segments sum them
    router.bind(None, {layer: [0, 1, 2]}, device="cpu")                            # type: ignore[arg-type]
    router.set_rows([RowRouting("arrow", (0, 1), 1, 0.5), RowRouting.uniform([2])], token_rows=[0, 0, 1],
                    segments=[0, 1, 2])
    w = router(torch.randn(3, 8), layer)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    assert torch.equal(w[2], torch.tensor([0.0, 0.0, 1.0])) and w[:2, 2].eq(0).all() and w[:2].sum(1).eq(1).all()
    tel = router.telemetry
    assert tel is not None and tel.tokens[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(tel.mass[:, 0], w)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_request(workdir, stream) -> None:
    """A client that leaves before its response (non-streaming: a read timeout; streaming: closing the stream)
    cancels its request: decoding stops instead of running to max_tokens."""
    import httpx

    from modlora.serve import BackgroundServer, create_app

    lm = load_base_model(str(workdir / "model"), device="cpu")
    engine = Engine(lm, workdir / "lib", EngineOptions(batch_wait_s=0.0)).start()
    step = engine._forward

    def slow_step() -> None:                       # 20 ms a step: 100 tokens take 2 s
        time.sleep(0.02)
        step()

    engine._forward = slow_step                    # type: ignore[method-assign]
    try:
        with BackgroundServer(create_app(engine)) as srv:
            body = {"model": "lib", "prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": stream}
            with pytest.raises(httpx.ReadTimeout) if not stream else contextlib.nullcontext():
                with httpx.stream("POST", srv.url + "/completions", json=body, timeout=0.3) as r:
                    for i, _ in enumerate(r.iter_lines()):
                        if i == 3:
                            break
            deadline = time.monotonic() + 10
            while engine.busy():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert 0 < engine.stats.rows < 60
    finally:
        engine.stop()



def test_ray_replicas_take_a_whole_batch_and_log_quietly() -> None:
    """Each Ray Serve replica takes ``--max-batch`` requests at a time (Ray's default, 5, capped the batch) and logs
    at WARNING with no per-request access log unless asked (checked on the deployment, without starting Ray)."""
    pytest.importorskip("ray.serve")
    from modlora.serve.server import ServeConfig, ray_deployment

    app = ray_deployment(ServeConfig("lib", engine=EngineOptions(max_batch=24)), 2)
    deployment = app._bound_deployment
    assert deployment.max_ongoing_requests == 24 and deployment.num_replicas == 2
    logging = deployment._deployment_config.logging_config
    assert logging["log_level"] == "WARNING" and logging["enable_access_log"] is False
    verbose = ray_deployment(ServeConfig("lib"), 1, log_level="INFO")._bound_deployment
    assert verbose._deployment_config.logging_config["enable_access_log"] is True


@pytest.mark.parametrize("kind", ["gpt2", "phi3", "gemma", "llama-eager"])
def test_other_architectures_batch_and_read_packed(kind, tmp_path) -> None:
    """Rows of different lengths decode together and prompts are read packed, in the same forwards as the decoding
    rows, on other architectures too (GPT-2's
    learned positions and ``past_key_values`` argument, Phi-3's fused qkv, Gemma's head_dim, eager attention's
    additive masks): the greedy tokens of one-at-a-time ``generate``."""
    lm = load_base_model(str(save_tiny(kind.split("-")[0], tmp_path / "model")), device="cpu")
    if kind.endswith("eager"):
        lm.model.set_attn_implementation("eager")
    spec = resolve_spec(lm.model, LoraSpec(dropout=0.0))
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    for i in range(2):
        lib.add(f"e{i}", random_adapter(lm.model, spec, seed=i, std=0.3), tasks=[f"t{i}"])
    prompts = ["b7 is", "a longer prompt here", "zz", "b7 is and more text to read"]
    reuse = prepare_model(lm, lib, "arrow", {"top_k": 1})
    want = []
    for p in prompts:
        enc = lm.tokenizer(p, return_tensors="pt")
        out = reuse.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=8, do_sample=False,
                             pad_token_id=2, eos_token_id=2)
        want.append([t for t in out[0, enc["input_ids"].shape[1]:].tolist() if t != 2])
    reuse.restore()
    engine = Engine(lm, lib.path, EngineOptions(batch_wait_s=0.05, prefill_tokens=6, prefix_block=2)).start()
    try:
        got = [g for g, _ in _run(engine, prompts, 8, RoutingRequest(top_k=1))]
    finally:
        engine.stop()
    assert got == want and engine.stats.max_batch > 1 and engine.stats.shared_steps > 0
    assert lm.model.config._attn_implementation == ("eager" if kind.endswith("eager") else "sdpa")   # given back
