"""Per-expert training cost on a GPU, for planning large library builds.

Builds a randomly initialised model from a config directory (training speed does not depend on the weight values,
so no weights need to travel to the GPU machine), encodes real SNI tasks with the training template, and times
60 optimizer steps of ``train_expert`` at two prompt lengths and two batch sizes (bf16 on CUDA)::

    python benchmarks/gpu_expert_cost.py --config-dir CONFIG_AND_TOKENIZER_DIR --sni-dir DIR_WITH_TASK_FILES

The numbers in docs/training.md (benchmarks/results/gpu_train_h100.log) came from this script on one H100, with the
SmolLM2-135M config/tokenizer files from the modlora model cache and four SNI task files.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from modlora.build.training import TrainConfig, train_expert
from modlora.data import PromptLimits, encode_tasks, load_sni_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-dir", required=True, help="directory with config.json and tokenizer files")
    ap.add_argument("--sni-dir", required=True, help="directory with a few SNI task files")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = AutoConfig.from_pretrained(args.config_dir)
    tok = AutoTokenizer.from_pretrained(args.config_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    tasks = load_sni_tasks(args.sni_dir)
    out = {}
    for max_prompt, max_target in ((256, 64), (384, 128)):
        fmt = PromptLimits(max_prompt, max_target).formatter(tok)
        examples = encode_tasks(fmt, tasks, "train", max_per_task=200)
        for bs in (8, 32):
            train_expert(model, examples[:64], pad_id=tok.pad_token_id, config=TrainConfig(steps=3, batch_size=bs),
                         progress=False)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = train_expert(model, examples, pad_id=tok.pad_token_id,
                               config=TrainConfig(steps=args.steps, batch_size=bs, eval_every=10**6), progress=False)
            wall = time.perf_counter() - t0
            m = res.metrics
            out[f"prompt{max_prompt}_bs{bs}"] = {"tokens_per_s": m["tokens_per_second"],
                                                 "s_per_step": m["train_seconds"] / args.steps,
                                                 "tokens_per_step": m["train_tokens"] / args.steps, "wall_s": wall}
            print(max_prompt, bs, out[f"prompt{max_prompt}_bs{bs}"], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
