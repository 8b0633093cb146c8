"""Time the routing page's colouring of a long completion in headless chromium, for a small and a large library.

For each library size E (random rank-4 experts on a tiny random Llama, 2048 positions) the script serves the library,
asks the API for a greedy completion of ``--max-tokens`` tokens with ``routing.per_token``, opens the page at ``/``
and times the page's own ``renderCompletion`` over that recorded telemetry (``performance.now()`` around building
every token's span and the layout that follows), ``--repeats`` times; it prints the median and the largest.

    python benchmarks/page_render.py --experts 4,256 --max-tokens 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modlora.library.adapters import LoraSpec, random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.serve import BackgroundServer, Engine, EngineOptions, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import make_char_tokenizer  # noqa: E402

RENDER = """
const [prompt, text, routing, repeats] = arguments;
const column = document.createElement("div");
column.className = "column";
column.append(document.createElement("p"), document.createElement("div"), document.createElement("p"));
column.children[0].className = "note"; column.children[1].className = "tokens";
document.getElementById("columns").replaceChildren(column);
const times = [];
for (let i = 0; i < repeats; i++) { renderCompletion(column, prompt, text, routing); times.push(Number(column.dataset.renderMs)); }
return times;
"""


def library(root: Path, experts: int) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=2,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    model.save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    lm = load_base_model(str(root / "model"), device="cpu")
    lib = ExpertLibrary.create(root / "lib", lm.info)
    spec = LoraSpec(rank=4, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))
    for i in range(experts):
        lib.add(f"expert{i:03d}", random_adapter(lm.model, spec, seed=i, std=0.4), tasks=[f"task{i}"])
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", default="4,256", help="library sizes, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        for experts in (int(e) for e in args.experts.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                root = library(Path(tmp), experts)
                lm = load_base_model(str(root / "model"), device="cpu")
                engine = Engine(lm, root / "lib", EngineOptions()).start()
                try:
                    with BackgroundServer(create_app(engine)) as srv:
                        prompt = "Once upon a time"
                        r = httpx.post(srv.url + "/completions", timeout=600, json={
                            "model": "lib:arrow", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                            "routing": {"per_token": True}}).json()
                        tel, text = r["routing"], r["choices"][0]["text"]
                        driver.get(srv.url.removesuffix("/v1") + "/")
                        times = driver.execute_script(RENDER, prompt, text, tel, args.repeats)
                finally:
                    engine.stop()
            n = sum(t["source"] == "completion" for t in tel["tokens"])
            print(f"E={experts}: {r['usage']['completion_tokens']} tokens generated ({len(tel['tokens'])} routed: "
                  f"{len(tel['tokens']) - n} prompt + {n} completion), top-{len(tel['top_experts'])} telemetry; "
                  f"render median {statistics.median(times):.1f} ms, max {max(times):.1f} ms over {len(times)}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
