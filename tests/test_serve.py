"""``modlora serve``: the official ``openai`` client against a server on a random loopback port, with a tiny model.

The tiny Llama is saved with its tokenizer to a directory and loaded through ``load_base_model`` (the CLI's path);
its linear weights are scaled up so greedy decoding produces varied text (so batching bugs would show).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from modlora.library.adapters import random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.prepare import prepare_model
from modlora.serve import BackgroundServer, Engine, EngineOptions, ServerOptions, create_app
from modlora.serve.requests import RoutingRequest
from modlora.serve.server import free_port

from .conftest import SERVED_SPEC, save_served_library, served_engine

PROMPTS = ["Hello", "The cat sat", "abc 123", "Once upon", "Zebra!", "query: x", "2+2=", "ok"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model (``model/``) and a library of 3 random experts (``lib/``)."""
    return save_served_library(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(workdir: Path):
    with served_engine(workdir / "model", workdir / "lib", max_batch=8, batch_wait_s=0.05) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def _reference(workdir: Path, method: str, prompt: str, max_tokens: int, **opts) -> str:
    """Greedy text of ``prompt`` with the library applied by ``modlora.reuse.prepare.prepare_model`` and HF ``generate``."""
    lm = load_base_model(str(workdir / "model"), device="cpu")
    reuse = prepare_model(lm, ExpertLibrary(workdir / "lib"), method, opts)
    ids = lm.tokenizer(prompt, return_tensors="pt")
    out = reuse.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=2, eos_token_id=2)
    return lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["lib", "lib:base", "lib:arrow", "lib:mu", "lib:mu-delta", "lib:expert:e0", "lib:expert:e1",
                   "lib:expert:e2"]
    assert client.models.retrieve("lib:expert:e1").id == "lib:expert:e1"


@pytest.mark.parametrize(("model", "routing", "method", "opts"), [
    ("lib", {"top_k": 2}, "arrow", {"top_k": 2}),
    ("lib:mu-delta", None, "mu-delta", {}),
    ("lib:expert:e1", None, "mu-delta", {"experts": ("e1",)}),
    ("lib:base", None, "base", {}),
    ("lib:mu", None, "mu", {}),
    ("lib", {"router": "mu", "experts": ["e1", "e2"]}, "mu", {"experts": ("e1", "e2")}),
    ("lib", {"router": "arrow", "top_k": 1, "experts": ["e0", "e2"]}, "arrow", {"top_k": 1, "experts": ("e0", "e2")}),
    ("lib", {"top_k": 2, "temperature": "sqrt_d"}, "arrow", {"top_k": 2, "temperature": "sqrt_d"}),
])
def test_completion_matches_prepare_model(client, workdir, model, routing, method, opts) -> None:
    extra = {"routing": routing} if routing else None
    r = client.completions.create(model=model, prompt="The cat sat", max_tokens=12, temperature=0, extra_body=extra)
    assert r.choices[0].text == _reference(workdir, method, "The cat sat", 12, **opts)
    assert r.usage.prompt_tokens == len("The cat sat")
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_routing_telemetry(client) -> None:
    r = client.completions.create(model="lib", prompt="Hello", max_tokens=4, temperature=0,
                                  extra_body={"routing": {"top_k": 2, "temperature": 0.5}})
    tel = r.model_extra["routing"]
    assert tel["router"] == "arrow" and tel["library_generation"] >= 1
    names = [e["expert"] for e in tel["top_experts"]]
    assert len(names) == 3 and set(names) == {"e0", "e1", "e2"}
    masses = [e["mass"] for e in tel["top_experts"]]
    assert masses == sorted(masses, reverse=True) and sum(masses) == pytest.approx(1.0, abs=1e-4)
    assert 0 < tel["entropy"] <= torch.log(torch.tensor(2.0)).item() + 1e-6      # top-2: at most log 2
    assert [g["layers"] for g in tel["layer_groups"]] == ["0-0", "1-1"]           # 2 layers, 3 groups → 2 used
    one = client.completions.create(model="lib:expert:e2", prompt="Hello", max_tokens=3, temperature=0)
    tel = one.model_extra["routing"]
    assert tel["top_experts"] == [{"expert": "e2", "mass": 1.0}] and tel["entropy"] == 0.0
    base = client.completions.create(model="lib:base", prompt="Hello", max_tokens=3, temperature=0)
    assert base.model_extra["routing"]["top_experts"] == []
    mu = client.completions.create(model="lib:mu", prompt="Hello", max_tokens=3, temperature=0)
    assert mu.model_extra["routing"]["merged_experts"] == ["e0", "e1", "e2"]


def test_chat_uses_the_chat_template(client, server) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(model="lib:mu-delta", messages=messages, max_tokens=10, temperature=0)
    tok = server.engine.tokenizer
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = client.completions.create(model="lib:mu-delta", prompt=prompt, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert chat.model_extra["routing"]["router"] == "mu-delta"


def test_streaming_matches_non_streaming(client) -> None:
    kwargs = {"model": "lib", "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(prompt="Once upon", **kwargs).choices[0].text
    chunks = list(client.completions.create(prompt="Once upon", stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].model_extra["routing"]["router"] == "arrow"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = list(client.chat.completions.create(messages=[{"role": "user", "content": "yo"}], stream=True, **kwargs))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "routing" in chat[-1].model_extra
    text = "".join(c.choices[0].delta.content or "" for c in chat)
    again = client.chat.completions.create(messages=[{"role": "user", "content": "yo"}], **kwargs)
    assert text == again.choices[0].message.content


def test_stop_seed_and_sampling(client) -> None:
    full = client.completions.create(model="lib", prompt="abc 123", max_tokens=12, temperature=0).choices[0].text
    stop = full[4:6]
    cut = client.completions.create(model="lib", prompt="abc 123", max_tokens=12, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="lib", prompt="abc 123", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    sample = {"model": "lib", "prompt": "Zebra!", "max_tokens": 12, "temperature": 1.5, "top_p": 0.9}
    a = client.completions.create(seed=7, **sample).choices[0].text
    b = client.completions.create(seed=7, **sample).choices[0].text
    assert a == b
    others = {client.completions.create(seed=s, **sample).choices[0].text for s in range(8, 12)}
    assert len(others | {a}) > 1


def test_concurrent_requests_match_sequential(client, server) -> None:
    """Mixed routers, greedy and seeded sampling: batched results equal one-at-a-time results."""
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        model = ["lib", "lib:mu-delta", "lib:expert:e0", "lib:base", "lib:mu"][i % 5]
        extra = {"routing": {"top_k": 1 + i % 3}} if model == "lib" else None
        sampling = {"temperature": 0} if i % 3 else {"temperature": 1.0, "seed": i}
        jobs.append({"model": model, "prompt": prompt, "max_tokens": 8 + 3 * i, "extra_body": extra, **sampling})

    def run(job: dict) -> str:
        return client.completions.create(**job).choices[0].text

    sequential = [run(j) for j in jobs]
    before = server.engine.stats.max_batch
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        concurrent_texts = list(pool.map(run, jobs))
    assert concurrent_texts == sequential
    assert server.engine.stats.max_batch > max(before, 1)          # the requests really shared decoding steps


def test_hot_add_and_remove_expert(client, server, workdir) -> None:
    lib = ExpertLibrary(workdir / "lib")
    artifacts = sorted((workdir / "lib" / "artifacts").rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in artifacts}
    gen = client.completions.create(model="lib:base", prompt="x", max_tokens=1).model_extra["routing"][
        "library_generation"]
    lm = load_base_model(str(workdir / "model"), device="cpu")
    lib.add("e3", random_adapter(lm.model, SERVED_SPEC, seed=3, std=0.4), tasks=["task3"])
    deadline = time.monotonic() + 30
    while "lib:expert:e3" not in [m.id for m in client.models.list()]:
        assert time.monotonic() < deadline, "the new expert never appeared"
        time.sleep(0.05)
    r = client.completions.create(model="lib:expert:e3", prompt="Hello", max_tokens=3, temperature=0)
    assert r.model_extra["routing"]["library_generation"] == gen + 1
    full = client.completions.create(model="lib", prompt="Hello", max_tokens=3, temperature=0,
                                     extra_body={"routing": {"top_k": 4}})
    assert {e["expert"] for e in full.model_extra["routing"]["top_experts"]} <= {"e0", "e1", "e2", "e3"}
    assert all(p.stat().st_mtime_ns == stamps[p] for p in artifacts)      # only the new expert's prototypes
    assert (workdir / "lib" / "artifacts" / "arrow-v1-untied" / "e3.safetensors").is_file()
    lib.remove("e3")
    while "lib:expert:e3" in [m.id for m in client.models.list()]:
        assert time.monotonic() < deadline + 30
        time.sleep(0.05)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="lib:expert:e3", prompt="Hello", max_tokens=2)


def test_request_keeps_its_snapshot(workdir) -> None:
    """A request admitted before an expert is re-written keeps routing over the old version."""
    lm = load_base_model(str(workdir / "model"), device="cpu")
    engine = Engine(lm, workdir / "lib")
    from modlora.serve.requests import SamplingParams
    events: list = []
    req = engine.submit(lm.tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=2, temperature=0), "lib:expert:e1", None,
                        events.append)
    old_key = req.versions["e1"].key
    lib = ExpertLibrary(workdir / "lib")
    lib.add("e1", random_adapter(lm.model, SERVED_SPEC, seed=99, std=0.4), tasks=["task1"], overwrite=True)
    try:
        engine._refresh()
        assert engine.snapshot.version("e1").key != old_key
        engine._prune_and_route()
        assert old_key in engine._routed_keys and engine.snapshot.version("e1").key in engine._routed_keys
        engine.start()
        deadline = time.monotonic() + 30
        while not any(e.finish_reason for e in events):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert events[-1].routing.top_experts == [("e1", 1.0)]
        engine._prune_and_route()
        assert old_key not in engine._routed_keys                        # released once the request left
    finally:
        engine.stop()
        lib.add("e1", random_adapter(lm.model, SERVED_SPEC, seed=1, std=0.4), tasks=["task1"], overwrite=True)


def test_corrupt_expert_is_never_served(workdir, tmp_path) -> None:
    import shutil
    lib_dir = tmp_path / "lib"
    shutil.copytree(workdir / "lib", lib_dir)
    weights = lib_dir / "experts" / "e2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])                       # truncated, checksum no longer matches
    lm = load_base_model(str(workdir / "model"), device="cpu")
    engine = Engine(lm, lib_dir)
    assert engine.snapshot.names() == ["e0", "e1"]
    assert engine.snapshot.skipped and "e2" in engine.snapshot.skipped[0]
    with BackgroundServer(create_app(engine.start())) as srv:
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
        assert "lib:expert:e2" not in [m.id for m in c.models.list()]
        with pytest.raises(openai.NotFoundError, match="e2"):
            c.completions.create(model="lib:expert:e2", prompt="Hi", max_tokens=2)
        ok = c.completions.create(model="lib", prompt="Hi", max_tokens=2, temperature=0)
        assert {e["expert"] for e in ok.model_extra["routing"]["top_experts"]} <= {"e0", "e1"}
    engine.stop()


def _post(url: str, content: bytes, path: str = "/completions", headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **(headers or {})},
                      timeout=30)


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b'{"model": "nope", "prompt": "x"}', 404, "does not exist"),
    (b'{"model": "lib:expert:zzz", "prompt": "x"}', 404, "unknown expert 'zzz'"),
    (b'{"model": "lib", "prompt": "x", "routing": {"experts": ["e0", "zzz"]}}', 404, "unknown expert 'zzz'"),
    (b'{"model": "lib", "prompt": "x", "routing": {"top_k": 9}}', 400, "top_k=9 exceeds"),
    (b'{"model": "lib", "prompt": "x", "routing": {"temperature": -1}}', 400, "temperature must be"),
    (b'{"model": "lib", "prompt": "x", "routing": {"router": "magic"}}', 400, "unknown router"),
    (b'{"model": "lib:ties", "prompt": "x"}', 400, "dense (full-rank) adapter"),
    (b'{"model": "lib", "prompt": "x", "routing": {"router": "oracle"}}', 400, "training data"),
    (b'{"model": "lib:expert:e0", "prompt": "x", "routing": {"top_k": 1}}', 400, "fixes the expert"),
    (b'{"model": "lib", "prompt": "' + b"a" * 600 + b'"}', 400, "context is 512 tokens"),
    (b'{"model": "lib", "prompt": "x", "max_tokens": 600}', 400, "context is 512 tokens"),
    (b'{"model": "lib", "prompt": "x", "temperature": 3}', 400, "temperature"),
    (b'{"model": "lib", "prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"model": "lib", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "lib", "prompt": "x", "n": 0}', 400, "n: Input should be greater than or equal to 1"),
    (b'{"model": "lib", "prompt": "x", "n": 9}', 400, "n: at most 8 choices"),
    (b'{"model": "lib", "prompt": "x", "stop": ["a","b","c","d","e"]}', 400, "stop"),
    (b'{"model": "lib", "prompt": "x", "bogus": 1}', 400, "bogus: unknown"),
    (b'{"model": "lib", "prompt": ["a", "b"]}', 400, "one prompt"),
    (b'{"model": "lib", "prompt": ""}', 400, "empty"),
    (b'{"model": "lib", "prompt": "x"', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"model": "lib", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle) -> None:
    r = _post(server.url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] and err["code"]


def test_bad_chat_requests(server, client) -> None:
    assert _post(server.url, b'{"model": "lib", "messages": []}', "/chat/completions").status_code == 400
    r = _post(server.url, b'{"model": "lib", "messages": [{"role": "robot", "content": "x"}]}', "/chat/completions")
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="lib", messages=[{"role": "user", "content": "y" * 600}], max_tokens=2)
    assert httpx.get(server.url + "/nowhere").status_code == 404
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_api_key_and_full_queue(workdir, server) -> None:
    keyed = create_app(server.engine, ServerOptions(api_key="s3cret"))
    with BackgroundServer(keyed) as srv:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(srv.url + "/models").status_code == 401
        ok = openai.OpenAI(base_url=srv.url, api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="lib:base", prompt="a", max_tokens=1).usage.completion_tokens == 1
    lm = load_base_model(str(workdir / "model"), device="cpu")
    stalled = Engine(lm, workdir / "lib", EngineOptions(max_queue=1))        # never started: nothing drains
    with BackgroundServer(create_app(stalled)) as srv:
        def stuck() -> None:   # never answered: the engine does not run; it ends when the server stops
            with contextlib.suppress(httpx.HTTPError):
                _post(srv.url, b'{"model": "lib", "prompt": "x"}')

        first = threading.Thread(target=stuck, daemon=True)
        first.start()
        deadline = time.monotonic() + 10
        while not stalled.busy():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="busy"):
            c.completions.create(model="lib", prompt="y", max_tokens=1)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "artifacts" not in p.parts and p.name != ".lock"}


@pytest.mark.slow
def test_cli_serve_survives_kill_9(workdir, tmp_path) -> None:
    import shutil
    lib_dir = tmp_path / "lib"
    shutil.copytree(workdir / "lib", lib_dir)
    shutil.rmtree(lib_dir / "artifacts", ignore_errors=True)
    before = _tree_digest(lib_dir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1",
           "MODLORA_API_KEY": "k"}

    def start() -> tuple[subprocess.Popen, openai.OpenAI]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "modlora.cli", "serve", str(lib_dir), "--model",
                                 str(workdir / "model"), "--device", "cpu", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode())
            assert time.monotonic() < deadline, "modlora serve did not come up"
            time.sleep(0.2)
        return proc, openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)

    proc, c = start()
    try:
        first = c.completions.create(model="lib", prompt="Hello", max_tokens=6, temperature=0).choices[0].text
        stream = c.completions.create(model="lib", prompt="Hello", max_tokens=200, temperature=0, stream=True)
        next(iter(stream))                                                   # mid-generation ...
    finally:
        proc.send_signal(signal.SIGKILL)                                     # ... kill -9
        proc.wait(timeout=30)
    assert _tree_digest(lib_dir) == before
    assert ExpertLibrary(lib_dir).verify() == []
    assert not [p for p in lib_dir.rglob("*") if p.name.endswith(".tmp")]
    proc, c = start()
    try:
        again = c.completions.create(model="lib", prompt="Hello", max_tokens=6, temperature=0).choices[0].text
        assert again == first
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_ray_serve_replicas(workdir) -> None:
    """The same app under Ray Serve with 2 replicas on a local Ray instance (skipped where Ray Serve can't start)."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from modlora.serve.server import ServeConfig, ray_deployment
    port = free_port()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as exc:  # noqa: BLE001 - any failure to start Ray here means: no Ray on this machine
        ray.shutdown()
        pytest.skip(f"Ray Serve cannot start here: {exc}")
    try:
        config = ServeConfig(str(workdir / "lib"), model=str(workdir / "model"), device="cpu")
        serve.run(ray_deployment(config, replicas=2), name="modlora", route_prefix="/")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        assert "lib:expert:e0" in [m.id for m in c.models.list()]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: c.completions.create(model="lib", prompt=p, max_tokens=6,
                                                                 temperature=0).choices[0].text, PROMPTS[:4]))
        engine = Engine(load_base_model(str(workdir / "model"), device="cpu"), workdir / "lib").start()
        with BackgroundServer(create_app(engine)) as srv:
            ref = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
            assert texts == [ref.completions.create(model="lib", prompt=p, max_tokens=6, temperature=0)
                             .choices[0].text for p in PROMPTS[:4]]
        engine.stop()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=b"{bad", timeout=30)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_cli_serve_refuses_bad_options(workdir, capsys) -> None:
    from modlora.cli import main
    assert main(["serve", str(workdir / "lib"), "--port", "70000"]) == 2
    assert "expected a port number" in capsys.readouterr().err
    assert main(["serve", str(workdir / "lib"), "--max-batch", "0"]) == 2
    assert main(["serve", str(workdir / "lib"), "--route-top-k", "0"]) == 2          # ArrowOptions' own check
    assert "top_k must be a positive integer" in capsys.readouterr().err
    assert main(["serve", str(workdir / "lib"), "--route-temperature", "0"]) == 2
    assert main(["serve", str(workdir / "lib"), "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err
    assert main(["serve", str(workdir / "lib"), "--ray-log-level", "INFO"]) == 2
    assert "--ray-log-level needs --ray" in capsys.readouterr().err
    assert main(["serve", str(workdir / "lib"), "--prefill-tokens", "0"]) == 2
    assert main(["serve", str(workdir / "lib"), "--prefix-cache-tokens", "-1"]) == 2
    assert main(["serve", str(workdir / "lib"), "--prefix-block", "0"]) == 2
    capsys.readouterr()
    assert main(["serve", str(workdir / "model")]) == 2
    assert "not a modlora library" in capsys.readouterr().err


def test_cli_serve_a_remote_library_from_a_verified_snapshot(workdir, monkeypatch, capsys) -> None:
    """A URL is served from the local mirror, every expert downloaded and checked first (issue: URLs everywhere)."""
    import modlora.serve.server as server_mod
    from modlora.cli import main
    from modlora.library.transfer import push

    url = "memory://serve-test/lib"
    push(workdir / "lib", url)
    seen = {}
    monkeypatch.setattr(server_mod, "run_server", lambda config, host, port, announce: seen.update(config=config))
    assert main(["serve", url, "--model", str(workdir / "model")]) == 0
    served = ExpertLibrary(seen["config"].library)
    assert served.expert_names() == ["e0", "e1", "e2"] and served.verify() == []
    assert "serving a snapshot of memory://serve-test/lib (3 experts, verified)" in capsys.readouterr().out


def test_warm_share_library_routes_over_its_cluster_experts(workdir, tmp_path) -> None:
    """As prepare_model: the shared expert of a warm --share library is left out of the default routed set (it can
    still be named in routing.experts or served alone)."""
    import shutil

    lib_dir = tmp_path / "lib"
    shutil.copytree(workdir / "lib", lib_dir)
    ExpertLibrary(lib_dir).save_meta("share", {"expert": "e0", "mode": "warm", "fraction": 0.2,
                                               "experts": ["e1", "e2"]})
    engine = Engine(load_base_model(str(workdir / "model"), device="cpu"), lib_dir)
    try:
        _, _, versions, _ = engine.resolve("lib", RoutingRequest("arrow"))
        assert sorted(versions) == ["e1", "e2"]
        _, _, named, _ = engine.resolve("lib", RoutingRequest("arrow", experts=("e0", "e1")))
        assert sorted(named) == ["e0", "e1"]
        _, _, alone, _ = engine.resolve("lib:expert:e0", None)
        assert list(alone) == ["e0"]
    finally:
        engine.stop()


def test_residual_share_library_is_refused(workdir, tmp_path) -> None:
    import shutil

    from modlora.errors import ModloraError
    lib_dir = tmp_path / "lib"
    shutil.copytree(workdir / "lib", lib_dir)
    ExpertLibrary(lib_dir).save_meta("share", {"expert": "e0", "mode": "residual", "fraction": 0.2,
                                               "experts": ["e1", "e2"]})
    with pytest.raises(ModloraError, match="residual --share library"):
        Engine(load_base_model(str(workdir / "model"), device="cpu"), lib_dir)
