"""The routing page at ``/`` in a real browser (Debian's chromium, driven by selenium through chromedriver), and the
per-token routing telemetry it shows (``routing.per_token``; those tests need no browser).

The browser tests skip, saying why, where chromium or chromedriver is not installed (``make test`` installs them
where apt can). ``MODLORA_PAGE_SCREENSHOT=docs/routing_page.png pytest tests/test_page_browser.py`` also saves the
page's screenshot (the README's).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from modlora.library.adapters import random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.serve import BackgroundServer, Engine, EngineOptions, ServerOptions, create_app

from .conftest import SERVED_SPEC, save_served_library

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
API_KEY = "page-test-key"
PROMPT = "The cat sat on"
MAX_TOKENS = 10


def _missing_browser() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install Debian's {package} (make test does where apt-get can)"
    return None


needs_browser = pytest.mark.skipif(_missing_browser() is not None, reason=str(_missing_browser()))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model (weights scaled up so greedy text varies) and a library of 3 random experts."""
    return save_served_library(tmp_path_factory.mktemp("page"), ("summarise", "translate", "arithmetic"),
                               lambda i: {"best_val_loss": 1.5 + i / 7, "steps": 100})


def _serve(workdir: Path, api_key: str | None = None):
    lm = load_base_model(str(workdir / "model"), device="cpu")
    engine = Engine(lm, workdir / "lib", EngineOptions(max_batch=8, batch_wait_s=0.02, poll_s=0.02)).start()
    return engine, BackgroundServer(create_app(engine, ServerOptions(api_key=api_key)))


@pytest.fixture(scope="module")
def server(workdir: Path):
    engine, srv = _serve(workdir)
    with srv:
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def keyed_server(workdir: Path):
    engine, srv = _serve(workdir, api_key=API_KEY)
    with srv:
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _root(srv: BackgroundServer) -> str:
    return srv.url.removesuffix("/v1")


def _completion(srv: BackgroundServer, model: str, prompt: str, key: str | None = None, **routing) -> dict:
    """The same request the page makes, without streaming, through the API."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "routing": {"per_token": True, **routing}}
    r = httpx.post(srv.url + "/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------ per-token telemetry
def test_per_token_telemetry_averages_to_the_request_summary(server) -> None:
    """Each group's mean weight over the request is the mean over its tokens of their own mean weights, and the
    tokens read are the prompt, then every generated token but the last (never fed back)."""
    r = _completion(server, "lib", PROMPT, top_k=2)
    tel, text = r["routing"], r["choices"][0]["text"]
    tokens = tel["tokens"]
    assert [t["position"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens if t["source"] == "prompt") == PROMPT
    completion = [t for t in tokens if t["source"] == "completion"]
    assert len(completion) == r["usage"]["completion_tokens"] - 1 == MAX_TOKENS - 1
    assert text.startswith("".join(t["text"] for t in completion))
    for g, group in enumerate(tel["layer_groups"]):
        for e in group["top_experts"]:          # 3 experts, top 3: every token lists every expert it weighted
            mean = sum(next((x["mass"] for x in t["layer_groups"][g]["top_experts"] if x["expert"] == e["expert"]),
                            0.0) for t in tokens) / len(tokens)
            assert mean == pytest.approx(e["mass"], abs=2e-5)
        assert sum(t["layer_groups"][g]["entropy"] for t in tokens) / len(tokens) == pytest.approx(group["entropy"],
                                                                                                   abs=2e-5)
    for t in tokens:                            # top-2 Arrow: at most log 2 nats per layer
        assert 0 <= t["entropy"] <= math.log(2) + 1e-6
        assert sum(e["mass"] for e in t["top_experts"]) == pytest.approx(1.0, abs=1e-4)


def test_per_token_telemetry_of_fixed_routers(server) -> None:
    one = _completion(server, "lib:expert:e1", "Hi")["routing"]["tokens"]
    assert one and all(t["top_experts"] == [{"expert": "e1", "mass": 1.0}] and t["entropy"] == 0 for t in one)
    merged = _completion(server, "lib:mu", "Hi")["routing"]          # μ: one merged adapter, no per-token routing
    assert merged["merged_experts"] == ["e0", "e1", "e2"] and "tokens" not in merged
    plain = httpx.post(server.url + "/completions", json={"model": "lib", "prompt": "Hi", "max_tokens": 2},
                       timeout=60).json()["routing"]
    assert "tokens" not in plain                # only when asked


def test_page_is_served_with_a_strict_policy(server) -> None:
    r = httpx.get(_root(server) + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "<script src=\"/static/page.js\"" in r.text and "http" not in r.text.lower().replace("http-equiv", "")
    assert httpx.get(_root(server) + "/static/page.js", timeout=10).headers["content-type"].startswith("text/javascript")
    assert httpx.get(_root(server) + "/static/..%2Fpage.py", timeout=10).status_code == 404
    lib = httpx.get(server.url + "/library", timeout=10).json()
    assert [e["name"] for e in lib["experts"]][:3] == ["e0", "e1", "e2"]
    assert lib["experts"][0]["tasks"] == ["summarise"] and lib["experts"][0]["rank"] == 4
    assert lib["default_router"] == "arrow" and "mu-delta" in lib["routers"]


# ------------------------------------------------------------------------------------------ in the browser
def _open(browser, srv: BackgroundServer, rows: int | None = 3) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(_root(srv) + "/")
    if rows:
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#experts tbody tr")) >= rows)


def _run(browser, prompt: str, models: list[str], max_tokens: int = MAX_TOKENS) -> list:
    """Type ``prompt``, pick ``models`` for the columns, run and wait for every column's result."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    runs = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-runs") or 0)
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    for c in range(3):
        Select(browser.find_element(By.ID, f"router-{c}")).select_by_value(models[c] if c < len(models) else "")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 60).until(
        lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-runs") or 0) == runs + 1)
    return browser.find_elements(By.CSS_SELECTOR, "#columns .column")


def _background(browser, element) -> str:
    return browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor", element)


def _tooltip_weights(browser) -> dict[tuple[str, str], float]:
    """The hover box's weights: (layers, or "" for the token overall, expert) -> mass as shown (3 decimals)."""
    from selenium.webdriver.common.by import By

    out = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "#tooltip tr.weight"):
        layers = row.get_attribute("data-layers") or ""
        out[(layers, row.get_attribute("data-expert"))] = float(row.find_elements(By.TAG_NAME, "td")[1].text)
    return out


@needs_browser
def test_page_colours_every_token_as_the_api_routes_it(server, browser, workdir) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server)
    columns = _run(browser, PROMPT, ["lib:arrow", "lib:expert:e1", "lib:mu-delta"])
    assert [c.get_attribute("data-model") for c in columns] == ["lib:arrow", "lib:expert:e1", "lib:mu-delta"]
    assert browser.find_element(By.ID, "top-k").get_attribute("value") == ""      # the server's default top-k
    api = _completion(server, "lib:arrow", PROMPT)
    tokens = api["routing"]["tokens"]
    spans = columns[0].find_elements(By.CSS_SELECTOR, ".tok")
    assert [s.get_attribute("textContent") for s in spans] == [t["text"] for t in tokens]
    tail = columns[0].find_elements(By.CSS_SELECTOR, "[data-unrouted]")
    shown = "".join(s.get_attribute("textContent") for s in spans[len(PROMPT):]) + "".join(
        t.get_attribute("textContent") for t in tail)
    assert shown == api["choices"][0]["text"]
    # coloured as the stream went: the prompt with the first chunk, generated token k with chunk k + 1 (when it was
    # fed back), all before the final chunk (the summary), which brought no colour of its own
    chunks = [int(s.get_attribute("data-chunk")) for s in spans]
    final = int(columns[0].get_attribute("data-chunks"))
    assert chunks == [1] * len(PROMPT) + list(range(2, MAX_TOKENS + 1)) and final == MAX_TOKENS + 1
    swatches = {e.get_attribute("data-expert"): _background(browser, e.find_element(By.CSS_SELECTOR, ".swatch"))
                for e in browser.find_elements(By.CSS_SELECTOR, "#legend .legend-item[data-expert]")}
    for span, t in zip(spans, tokens, strict=True):
        first, *rest = t["top_experts"]
        assert span.get_attribute("data-expert") == first["expert"]
        assert not rest or first["mass"] - rest[0]["mass"] > 1e-6     # no tie: one colour
        assert _background(browser, span) == swatches[first["expert"]]
        ActionChains(browser).move_to_element(span).perform()
        WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "tooltip").is_displayed())
        want = {("", e["expert"]): e["mass"] for e in t["top_experts"]} | {
            (g["layers"], e["expert"]): e["mass"] for g in t["layer_groups"] for e in g["top_experts"]}
        got = _tooltip_weights(browser)
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) <= 5.1e-4 for k in want)
        assert f"entropy {t['entropy']:.3f}" in browser.find_element(By.ID, "tooltip").text
    # one expert: every token in its colour; μ-delta: equal weights, shown as ties
    assert {s.get_attribute("data-expert") for s in columns[1].find_elements(By.CSS_SELECTOR, ".tok")} == {"e1"}
    ties = [s.get_attribute("class").split() for s in columns[2].find_elements(By.CSS_SELECTOR, ".tok")]
    assert ties and all("tie" in c for c in ties)
    shot = os.environ.get("MODLORA_PAGE_SCREENSHOT")
    if shot:
        ActionChains(browser).move_to_element(spans[len(PROMPT) + 2]).perform()
        browser.save_screenshot(shot)
    # live library: an expert added while the page is open is listed without a reload
    lm = load_base_model(str(workdir / "model"), device="cpu")
    ExpertLibrary(workdir / "lib").add("e3", random_adapter(lm.model, SERVED_SPEC, seed=3, std=0.4), tasks=["qa"])
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#experts tbody tr")) == 4)
    assert "lib:expert:e3" in [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#router-0 option")]


@needs_browser
def test_page_shows_markup_in_prompts_as_text(server, browser) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, server)
    hostile = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b>'
    columns = _run(browser, hostile, ["lib:arrow"], max_tokens=4)
    text = columns[0].find_element(By.CSS_SELECTOR, ".tokens").get_attribute("textContent")
    assert text.startswith(hostile)
    assert browser.execute_script("return window.pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#columns img, #columns script, #columns b")
    time.sleep(0.3)                             # an <img onerror> would have fired by now
    assert browser.execute_script("return window.pwned === undefined")


@needs_browser
def test_page_calls_need_the_api_key(keyed_server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, keyed_server, rows=None)
    WebDriverWait(browser, 30).until(lambda d: "API key" in d.find_element(By.ID, "status").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#experts tbody tr")
    assert httpx.get(keyed_server.url + "/library", timeout=10).status_code == 401
    browser.find_element(By.ID, "api-key").send_keys("wrong" + Keys.TAB)
    time.sleep(0.5)
    assert not browser.find_elements(By.CSS_SELECTOR, "#experts tbody tr")
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(API_KEY + Keys.TAB)
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#experts tbody tr")) >= 3)
    columns = _run(browser, "Hi", ["lib:arrow"], max_tokens=3)
    assert columns[0].find_elements(By.CSS_SELECTOR, ".tok")
    assert not columns[0].find_elements(By.CSS_SELECTOR, ".error")
