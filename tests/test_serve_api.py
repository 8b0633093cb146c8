"""The OpenAI fields of ``modlora serve`` (issue 26): ``n``, ``logprobs``/``top_logprobs``, ``echo``, ``top_k``,
``min_p``, the three penalties, ``logit_bias``, ``stop_token_ids``, ``response_format`` (llguidance), and the
``/metrics``, ``/tokenize``, ``/detokenize``, ``/version`` and ``/v1/(un)load_lora_adapter`` endpoints.

Exactness: logprobs against ``log_softmax`` of the model's own logits; penalties, bias and the sampling filters
against a brute-force reimplementation, step by step; every refused value names its field. Uses the tiny model and
library of ``tests/test_serve.py`` (its ``workdir`` fixture) and the official ``openai`` client.
"""

from __future__ import annotations

import json
import math
import shutil

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from modlora.library.adapters import random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.serve import BackgroundServer, Engine, EngineOptions, ServerOptions, create_app
from modlora.serve.requests import SamplingParams
from modlora.serve.sampling import RowSampler, choose_tokens

from .conftest import SERVED_SPEC, make_tiny_llama, served_engine
from .test_serve import workdir  # noqa: F401 - the saved tiny model and library (a pytest fixture)
from .test_serve_hostile import Records

VOCAB = 100


@pytest.fixture(scope="module")
def served(workdir):  # noqa: F811 - the imported fixture
    with served_engine(workdir / "model", workdir / "lib", max_batch=8, batch_wait_s=0.01) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base(workdir):  # noqa: F811
    """The plain base model (no library) and its tokenizer: the reference for ``lib:base``."""
    return load_base_model(str(workdir / "model"), device="cpu")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits (V,) after ``ids``, in one full forward."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


# ------------------------------------------------------------------------------------------- exactness
def test_completion_logprobs_equal_log_softmax_of_the_model(client, base) -> None:
    r = client.completions.create(model="lib:base", prompt="The cat sat", max_tokens=6, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    ids = base.tokenizer("The cat sat")["input_ids"]
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(6)]
    for i, token in enumerate(lp.tokens):
        ref = torch.log_softmax(_logits(base.model, ids), -1)
        chosen = base.tokenizer.convert_tokens_to_ids(token)
        assert chosen == int(torch.argmax(ref))                                  # greedy
        assert lp.token_logprobs[i] == pytest.approx(float(ref[chosen]), abs=1e-4)
        top = torch.topk(ref, 5)
        want = {base.tokenizer.decode([j]): v for j, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)}
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(lp.top_logprobs[i][k] == pytest.approx(v, abs=1e-4) for k, v in want.items())
        ids.append(chosen)


def test_echo_with_logprobs_scores_the_prompt(client, base) -> None:
    """``echo`` + ``logprobs`` (and ``max_tokens`` 0, as lm-evaluation-harness scores a continuation): the legacy
    lists start with the prompt's tokens, the first without a log-probability, each next one with ``log_softmax``
    of the model's logits before it; streamed, the echo chunk carries them; with new tokens, theirs follow."""
    prompt = "The cat sat on the mat"
    ids = base.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(base.model(torch.tensor([ids])).logits[0].float(), -1)
    texts = [base.tokenizer.decode([t]) for t in ids]
    r = client.completions.create(model="lib:base", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == prompt and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert lp.tokens == texts and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len("".join(texts[:j])) for j in range(len(ids))]
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        top = torch.topk(ref[j - 1], 2)
        want = {base.tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)}
        want[texts[j]] = float(ref[j - 1, ids[j]])
        assert lp.top_logprobs[j].keys() == want.keys()
        assert all(lp.top_logprobs[j][k] == pytest.approx(v, abs=1e-4) for k, v in want.items())
    more = client.completions.create(model="lib:base", prompt=prompt, max_tokens=3, echo=True, logprobs=2,
                                     temperature=0)
    plain = client.completions.create(model="lib:base", prompt=prompt, max_tokens=3, logprobs=2, temperature=0)
    mlp = more.choices[0].logprobs
    assert more.choices[0].text == prompt + plain.choices[0].text
    assert mlp.tokens == lp.tokens + plain.choices[0].logprobs.tokens
    assert mlp.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:] + plain.choices[0].logprobs.token_logprobs,
                                                   abs=1e-5)
    assert mlp.text_offset[len(ids):] == [len(prompt) + o for o in plain.choices[0].logprobs.text_offset]
    chunks = list(client.completions.create(model="lib:base", prompt=prompt, max_tokens=3, echo=True, logprobs=2,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == more.choices[0].text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == mlp.tokens and chunks[0].choices[0].text == prompt


def test_loglikelihood_as_lm_evaluation_harness_asks(served, base) -> None:
    """lm-evaluation-harness's ``local-completions`` loglikelihood request (token-id prompt, ``echo``, ``logprobs``
    1, ``max_tokens`` 1) and its parser: ``sum(token_logprobs[ctxlen:-1])`` is the continuation's log-likelihood
    given the context, as one full forward gives it, and its greedy flag says whether each token was the argmax."""
    context = base.tokenizer("Question: is the sky blue? Answer:")["input_ids"]
    continuation = base.tokenizer(" yes it is", add_special_tokens=False)["input_ids"]
    ids = context + continuation
    body = {"model": "lib:base", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = httpx.post(served.url + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    with torch.no_grad():
        ref = torch.log_softmax(base.model(torch.tensor([ids])).logits[0].float(), -1)
    want = sum(float(ref[j - 1, ids[j]]) for j in range(len(context), len(ids)))
    assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(want, abs=1e-3)
    greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(context):-1],
                                                           lp["top_logprobs"][len(context):-1], strict=True))
    assert greedy == all(int(ref[j - 1].argmax()) == ids[j] for j in range(len(context), len(ids)))
    assert r.json()["choices"][0]["text"].startswith(base.tokenizer.decode(ids))


def test_chat_logprobs_in_openai_shape(client, base) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="lib:base", messages=messages, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    prompt = base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = base.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for c in content:
        ref = torch.log_softmax(_logits(base.model, ids), -1)
        token = base.tokenizer.convert_tokens_to_ids(c.token)
        assert c.logprob == pytest.approx(float(ref[token]), abs=1e-4) and c.bytes == list(c.token.encode())
        assert [t.token for t in c.top_logprobs] == [base.tokenizer.decode([j]) for j in torch.topk(ref, 3).indices]
        assert c.top_logprobs[0].logprob == pytest.approx(float(ref.max()), abs=1e-4)
        ids.append(token)
    plain = client.chat.completions.create(model="lib:base", messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def _brute_force_next(logits: torch.Tensor, prompt: list[int], out: list[int], rep: float, freq: float, pres: float,
                      bias: dict[int, float]) -> torch.Tensor:
    """The processed logits, written out token by token (vLLM's order: bias, repetition, frequency/presence)."""
    z = logits.double().tolist()
    for j, b in bias.items():
        z[j] += b
    for j in set(prompt) | set(out):
        z[j] = z[j] / rep if z[j] > 0 else z[j] * rep
    for j in set(out):
        z[j] -= freq * out.count(j) + pres
    return torch.tensor(z)


def test_penalties_and_bias_equal_a_brute_force_greedy_loop(client, base) -> None:
    prompt = "abc 123"
    ids = base.tokenizer(prompt)["input_ids"]
    bias = {5: 3.0, 40: -2.5, 77: 1.25}
    r = client.completions.create(model="lib:base", prompt=prompt, max_tokens=12, temperature=0,
                                  frequency_penalty=0.7, presence_penalty=-0.4, logit_bias={str(k): v for k, v in
                                                                                             bias.items()},
                                  extra_body={"repetition_penalty": 1.6})
    out: list[int] = []
    for _ in range(12):
        z = _brute_force_next(_logits(base.model, ids + out), ids, out, 1.6, 0.7, -0.4, bias)
        out.append(int(torch.argmax(z)))
    assert r.choices[0].text == base.tokenizer.decode(out)
    unpenalised = client.completions.create(model="lib:base", prompt=prompt, max_tokens=12, temperature=0)
    assert unpenalised.choices[0].text != r.choices[0].text                   # the penalties changed something


def test_sampling_filters_equal_brute_force_on_random_logits() -> None:
    """top_k, min_p, top_p, temperature, penalties and bias over several steps: the same draws as a brute-force
    implementation with the same seed."""
    torch.manual_seed(0)
    prompt = [3, 4, 5, 9]
    cases = [dict(top_k=5), dict(min_p=0.2), dict(top_p=0.7), dict(top_k=8, min_p=0.05, top_p=0.9),
             dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3, top_k=10),
             dict(logit_bias=((7, 5.0), (8, -100.0)), temperature=0.7, min_p=0.1)]
    for case in cases:
        params = SamplingParams(10, **{"temperature": 1.3, **case})
        gen = torch.Generator().manual_seed(11)
        row = RowSampler(params, gen, prompt)
        ref_gen = torch.Generator().manual_seed(11)
        out: list[int] = []
        for _ in range(6):
            logits = torch.randn(1, VOCAB) * 3
            got = choose_tokens(logits, [row])[0].token
            z = _brute_force_next(logits[0], prompt, out, params.repetition_penalty, params.frequency_penalty,
                                  params.presence_penalty, dict(params.logit_bias))
            q = torch.softmax(z / params.temperature, -1)
            keep = torch.ones(VOCAB, dtype=torch.bool)
            if params.min_p:
                keep &= q >= params.min_p * q.max()
            if params.top_k:
                keep &= q >= torch.sort(q, descending=True).values[params.top_k - 1]
            q = torch.where(keep, q, 0) / torch.where(keep, q, 0).sum()
            if params.top_p < 1:
                order = torch.argsort(q, descending=True)
                mass, nucleus = 0.0, torch.zeros(VOCAB, dtype=torch.bool)
                for j in order.tolist():
                    if mass >= params.top_p:
                        break
                    nucleus[j], mass = True, mass + float(q[j])
                keep &= nucleus
            assert keep[got], (case, got)
            want = int(torch.multinomial(torch.where(keep, q, 0).float(), 1, generator=ref_gen))
            assert got == want, case
            out.append(got)


def test_n_choices_with_a_seed_are_reproducible(client) -> None:
    kwargs = dict(model="lib", prompt="Once upon", max_tokens=8, temperature=1.0, seed=1234)
    a = client.completions.create(n=3, **kwargs)
    b = client.completions.create(n=3, **kwargs)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    one = client.completions.create(n=1, **kwargs)
    assert one.choices[0].text == texts[0]                                   # choice i draws with seed + i
    assert client.completions.create(n=1, **{**kwargs, "seed": 1236}).choices[0].text == texts[2]
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == len("Once upon")
    chat = client.chat.completions.create(model="lib", messages=[{"role": "user", "content": "hey"}], n=2,
                                          max_tokens=5, seed=7)
    assert len(chat.choices) == 2 and all(c.message.role == "assistant" for c in chat.choices)


def test_streaming_n_choices_with_logprobs(client) -> None:
    kwargs = dict(model="lib", prompt="Zebra!", max_tokens=6, temperature=1.0, seed=5, n=2, logprobs=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        streamed = [t for c in mine if c.logprobs for t in c.logprobs.token_logprobs]
        assert streamed == choice.logprobs.token_logprobs
        assert mine[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12


def _sse(url: str, body: dict) -> list[dict]:
    """The JSON payloads of a streamed response."""
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_per_token_routing_arrives_with_the_tokens(served) -> None:
    """``routing.per_token`` streamed: the first chunk carries the prompt's routing, each later chunk the routing of
    the generated token fed back before it; their concatenation is the non-streamed response's ``tokens``, and the
    last chunk's summary is the non-streamed one."""
    body = {"model": "lib", "prompt": "Once upon", "max_tokens": 8, "temperature": 0, "routing": {"per_token": True}}
    whole = httpx.post(served.url + "/completions", json=body, timeout=60).json()
    chunks = _sse(served.url + "/completions", {**body, "stream": True})
    *parts, last = chunks
    assert last["choices"][0]["finish_reason"] == "length" and last["routing"] == whole["routing"]
    assert all(c["choices"][0]["finish_reason"] is None and c["routing"]["tokens"] for c in parts)
    streamed = [t for c in parts for t in c["routing"]["tokens"]]
    assert streamed == whole["routing"]["tokens"]
    prompt = whole["usage"]["prompt_tokens"]
    assert [t["position"] for t in parts[0]["routing"]["tokens"]] == list(range(prompt))       # with the 1st token
    assert [[t["position"] for t in c["routing"]["tokens"]] for c in parts[1:]] == [[prompt + k] for k in range(7)]
    assert "".join(c["choices"][0]["text"] for c in parts) == whole["choices"][0]["text"]
    plain = _sse(served.url + "/completions", {**body, "stream": True, "routing": {"per_token": False}})
    assert all("routing" not in c for c in plain[:-1]) and "tokens" not in plain[-1]["routing"]
    # chat, two choices interleaved: each choice's chunks carry its own tokens
    chat = {"model": "lib", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 5, "temperature": 0,
            "n": 2, "routing": {"per_token": True}}
    whole = httpx.post(served.url + "/chat/completions", json=chat, timeout=60).json()
    chunks = _sse(served.url + "/chat/completions", {**chat, "stream": True})
    for choice in whole["choices"]:
        mine = [c for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert [t for c in mine[:-1] for t in c.get("routing", {}).get("tokens", [])] == choice["routing"]["tokens"]
        assert mine[-1]["routing"]["tokens"] == choice["routing"]["tokens"]


def test_echo(client) -> None:
    r = client.completions.create(model="lib:base", prompt="Hello", max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model="lib:base", prompt="Hello", max_tokens=5, temperature=0)
    assert r.choices[0].text == "Hello" + plain.choices[0].text
    chunks = list(client.completions.create(model="lib:base", prompt="Hello", max_tokens=5, temperature=0,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_stop_token_ids(client, base) -> None:
    plain = client.completions.create(model="lib:base", prompt="2+2=", max_tokens=10, temperature=0).choices[0].text
    ids = base.tokenizer(plain, add_special_tokens=False)["input_ids"]
    stop = ids[3]
    r = client.completions.create(model="lib:base", prompt="2+2=", max_tokens=10, temperature=0,
                                  extra_body={"stop_token_ids": [stop]})
    assert r.choices[0].text == base.tokenizer.decode(ids[:ids.index(stop)])
    assert r.choices[0].finish_reason == "stop"


def test_json_object_and_json_schema(client, base) -> None:
    """The random tiny model writes endless strings, so a logit_bias towards '"' and '}' closes them: the output
    is still what the grammar allows, an object."""
    bias = {str(base.tokenizer.convert_tokens_to_ids(c)): 4.0 for c in '"}'}
    for seed in range(3):
        r = client.chat.completions.create(model="lib", messages=[{"role": "user", "content": "json"}], seed=seed,
                                           max_tokens=300, response_format={"type": "json_object"}, logit_bias=bias)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    free = client.chat.completions.create(model="lib", messages=[{"role": "user", "content": "json"}], seed=0,
                                          max_tokens=40, response_format={"type": "json_object"})
    assert free.choices[0].message.content.startswith("{")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    r = client.completions.create(model="lib:base", prompt="x", max_tokens=200, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "thing", "schema": schema, "strict": True}}})
    value = json.loads(r.choices[0].text)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)


# ------------------------------------------------------------------------------------------- endpoints
def test_metrics_tokenize_detokenize_version(client, served) -> None:
    r = client.completions.create(model="lib", prompt="Hello", max_tokens=5, temperature=0)
    root = served.url.removesuffix("/v1")
    text = httpx.get(root + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families.values() for s in f.samples}
    assert value["modlora_generation_tokens_total{}"] >= r.usage.completion_tokens
    assert value['modlora_requests_total{"finish_reason": "length"}'] >= 1
    assert value["modlora_time_to_first_token_seconds_count{}"] >= 1
    assert value["modlora_requests_waiting{}"] == 0 and "modlora_requests_running{}" in value
    assert value["modlora_decode_rows_total{}"] >= value["modlora_decode_steps_total{}"] >= 1
    masses = {k: v for k, v in value.items() if k.startswith("modlora_routing_mass_total")}
    assert set(masses) == {f'modlora_routing_mass_total{{"expert": "e{i}"}}' for i in range(3)}
    assert sum(masses.values()) == pytest.approx(value["modlora_routing_token_layers_total{}"], rel=1e-5)
    assert value["modlora_library_experts{}"] == 3 and "modlora_generation_tokens_per_second{}" in value
    tok = httpx.post(root + "/tokenize", json={"model": "lib", "prompt": "Hi there"}, timeout=30).json()
    assert tok["count"] == 8 and tok["max_model_len"] == 512
    assert httpx.post(root + "/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json() == {
        "prompt": "Hi there"}
    chat = httpx.post(root + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30).json()
    assert chat["count"] == client.chat.completions.create(model="lib:base", messages=[
        {"role": "user", "content": "hi"}], max_tokens=1).usage.prompt_tokens
    import modlora
    assert httpx.get(root + "/version", timeout=30).json() == {"version": modlora.__version__}


def test_load_and_unload_lora_adapter(workdir, tmp_path) -> None:  # noqa: F811
    """vLLM's request shapes; the adapter is imported with modlora import's checks and served at once."""
    shutil.copytree(workdir / "lib", tmp_path / "lib")
    library = ExpertLibrary(tmp_path / "lib")
    library.export("e1", tmp_path / "peft_e1")
    lm = load_base_model(str(workdir / "model"), device="cpu")
    wrong = make_tiny_llama(hidden=48)                                  # another width: modlora import refuses it
    library_of_other = random_adapter(wrong, SERVED_SPEC, seed=3, std=0.4)
    from modlora.library.adapters import write_adapter_files
    (tmp_path / "wrong").mkdir()
    write_adapter_files(library_of_other, tmp_path / "wrong")
    engine = Engine(lm, tmp_path / "lib", EngineOptions(max_batch=4, batch_wait_s=0.01)).start()
    try:
        with BackgroundServer(create_app(engine)) as off:
            r = httpx.post(off.url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"})
            assert r.status_code == 403 and "--allow-adapter-loading" in r.json()["error"]["message"]
        with BackgroundServer(create_app(engine, ServerOptions(adapter_loading=True))) as srv:
            client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
            r = httpx.post(srv.url + "/load_lora_adapter", json={"lora_name": "copy", "lora_path":
                                                                 str(tmp_path / "peft_e1")}, timeout=90)
            assert r.status_code == 200 and r.text == "Success: LoRA adapter 'copy' added successfully."
            same = [client.completions.create(model=f"lib:expert:{n}", prompt="Hello", max_tokens=6,
                                              temperature=0).choices[0].text for n in ("e1", "copy")]
            assert same[0] == same[1]
            assert ExpertLibrary(tmp_path / "lib").entry("copy").training["imported_from"] == str(tmp_path / "peft_e1")
            bad = [({"lora_name": "copy", "lora_path": str(tmp_path / "peft_e1")}, 400, "lora_name", "already"),
                   ({"lora_name": "w", "lora_path": str(tmp_path / "wrong")}, 400, "lora_path", "does not fit"),
                   ({"lora_name": "w", "lora_path": str(tmp_path / "missing")}, 400, "lora_path", "missing"),
                   ({"lora_name": "../up", "lora_path": str(tmp_path / "peft_e1")}, 400, "lora_name", "invalid"),
                   ({"lora_name": "w", "lora_path": 5}, 400, "lora_path", "string")]
            for body, status, param, needle in bad:
                r = httpx.post(srv.url + "/load_lora_adapter", json=body, timeout=30)
                assert r.status_code == status and r.json()["error"]["param"] == param, r.text
                assert needle in r.json()["error"]["message"], r.text
            assert "w" not in ExpertLibrary(tmp_path / "lib")
            r = httpx.post(srv.url + "/load_lora_adapter", timeout=90, json={
                "lora_name": "copy", "lora_path": str(tmp_path / "peft_e1"), "load_inplace": True, "tasks": ["t"]})
            assert r.status_code == 200 and ExpertLibrary(tmp_path / "lib").tasks("copy") == ["t"]
            r = httpx.post(srv.url + "/unload_lora_adapter", json={"lora_name": "copy", "lora_int_id": 1})
            assert r.status_code == 400 and "lora_int_id" in r.json()["error"]["message"]
            r = httpx.post(srv.url + "/unload_lora_adapter", json={"lora_name": "copy"}, timeout=90)
            assert r.status_code == 200 and r.text == "Success: LoRA adapter 'copy' removed successfully."
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="lib:expert:copy", prompt="Hello", max_tokens=2)
            r = httpx.post(srv.url + "/unload_lora_adapter", json={"lora_name": "copy"}, timeout=30)
            assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------- refusals
REFUSED = [  # (path, body fields, the field the 400 names, a needle)
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"logit_bias": {"100": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias.5", "less than or equal to 100"),
    ("/v1/completions", {"logit_bias": {"5": "1"}}, "logit_bias.5", "valid number"),
    ("/v1/completions", {"top_k": -2}, "top_k", "greater than or equal to -1"),
    ("/v1/completions", {"top_k": 1.5}, "top_k", "integer"),
    ("/v1/completions", {"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty", "greater than or equal to 0.001"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ("/v1/completions", {"stop_token_ids": [3, 100]}, "stop_token_ids", "stop_token_ids.1: 100 is not a token id"),
    ("/v1/completions", {"stop_token_ids": [True]}, "stop_token_ids.0", "integer"),
    ("/v1/completions", {"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"logprobs": True}, "logprobs", "integer"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens", "needs echo: true"),
    ("/v1/completions", {"max_tokens": -1, "echo": True}, "max_tokens", "greater than or equal to 0"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"best_of": 2}, "best_of", "unknown"),
    ("/v1/completions", {"prompt": [5, 100]}, "prompt", "prompt.1: 100 is not a token id"),
    ("/v1/completions", {"prompt": [[5], [6]]}, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": []}, "prompt", "the prompt is empty"),
    ("/v1/completions", {"response_format": {"type": "xml"}}, "response_format.type", "unsupported value"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema is given"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "Field required"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frobnicate"}}}}, "response_format.json_schema.schema", "frobnicate"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs", "boolean"),
    ("/v1/chat/completions", {"echo": True}, "echo", "unknown"),
    ("/tokenize", {"prompt": None}, "prompt", "prompt or messages"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens", "tokens.1: -1 is not a token id"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.0", "integer"),
]


@pytest.mark.parametrize(("path", "fields", "param", "needle"), REFUSED,
                         ids=[f"{p}-{'-'.join(f)}-{i}" for i, (p, f, _, _) in enumerate(REFUSED)])
def test_each_refused_field_is_named(served, path, fields, param, needle) -> None:
    base = {"model": "lib", "max_tokens": 3}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else (
        {"prompt": "Hello"} if "completions" in path else {})
    if path in ("/tokenize", "/detokenize"):
        base = {}
    root = served.url.removesuffix("/v1")
    with Records() as logs:
        r = httpx.post(root + path, json={**base, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert "\n" not in err["message"] and logs.tracebacks() == []
    ok = httpx.post(served.url + "/completions", json={"model": "lib", "prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_logprob_values_are_finite(client) -> None:
    r = client.completions.create(model="lib", prompt="query: x", max_tokens=5, temperature=1.0, seed=2, logprobs=20,
                                  extra_body={"top_k": 3, "min_p": 0.01})
    lp = r.choices[0].logprobs
    assert all(math.isfinite(v) for v in lp.token_logprobs) and all(len(t) >= 20 for t in lp.top_logprobs)


def test_cli_allow_adapter_loading_reaches_the_app(workdir, monkeypatch, capsys) -> None:  # noqa: F811
    import modlora.serve.server as server_mod
    from modlora.cli import main

    seen = {}
    monkeypatch.setattr(server_mod, "run_server", lambda config, host, port, announce: seen.update(config=config))
    assert main(["serve", str(workdir / "lib"), "--model", str(workdir / "model")]) == 0
    assert seen["config"].adapter_loading is False
    assert main(["serve", str(workdir / "lib"), "--model", str(workdir / "model"), "--allow-adapter-loading"]) == 0
    assert seen["config"].adapter_loading is True
