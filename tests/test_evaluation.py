"""Rank classification, SNI generation metrics, results files and routing accuracy."""

from __future__ import annotations

import gzip
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from modlora.errors import DataError, RoutingError
from modlora.evaluation.generation import evaluate_sni as run_sni
from modlora.evaluation.generation import (
    exact_match,
    greedy_generate,
    load_sni_task,
    normalize_answer,
    rouge_l,
    score_generations,
)
from modlora.evaluation.rank_classification import (
    ChoiceExample,
    OptionScore,
    _length_chunks,
    choice_correctness,
    evaluate_choice_tasks,
    load_choice_task,
    parse_choice_row,
    score_choices,
    split_context_continuation,
)
from modlora.evaluation.results import (
    EvalRun,
    RoutingAccuracy,
    TaskScores,
    load_results,
    results_table,
    routing_accuracy,
    save_results,
    seeded_subset,
)

from .conftest import make_tiny_llama

# --------------------------------------------------------------------------------------------------- helpers


class BigramLM(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: logits[t] = table[input_ids[t]].

    Log-likelihoods are therefore known in closed form; it returns an (empty) DynamicCache like an HF model.
    """

    def __init__(self, table: torch.Tensor, eos_token_id: int | None = None) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                logits_to_keep=0):
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        cache = (cache if cache is not None else DynamicCache()) if use_cache else None
        return SimpleNamespace(logits=logits, cache=cache)


def bigram_loglik(table: torch.Tensor, ctx: list[int], cont: list[int]) -> float:
    logp = torch.log_softmax(table.double(), dim=-1)
    seq = ctx + cont
    return float(sum(logp[seq[len(ctx) + t - 1], seq[len(ctx) + t]] for t in range(len(cont))))


def naive_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Reference: one unbatched full forward over context + continuation, summed continuation log-probs."""
    ctx, cont, _ = split_context_continuation(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) + t - 1, cont[t]] for t in range(len(cont))))


class MergingTokenizer:
    """Toy tokenizer: characters, except that "ab" is one token (so it merges across a boundary "a|b")."""

    vocab = {"ab": 0, "a": 1, "b": 2, " ": 3, "c": 4}
    bos_token_id = None
    eos_token_id = 4
    pad_token_id = 4

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(0)
                i += 2
            else:
                ids.append(self.vocab[text[i]])
                i += 1
        return {"input_ids": ids}


EXAMPLES = [
    ChoiceExample(("Question: what is it?\nAnswer: ",), ("yes", "no way", "maybe so"), 0),
    ChoiceExample(("Hi",), (" a", " bb"), 1),
    ChoiceExample(("Sarah beat Maria so Maria", "Sarah beat Maria so Sarah"), (" lost.",), 0),
    ChoiceExample(("A much longer context, to check that left padding of contexts works",),
                  (" x", " yy", " zzz", " w w w w"), 2),
    ChoiceExample(("Single",), (" only option",), 0),
]

# ---------------------------------------------------------------------------------------- rank classification


def test_split_context_continuation_moves_whitespace(char_tokenizer):
    ctx, cont, scored = split_context_continuation(char_tokenizer, "Q?\nAnswer: ", "yes")
    assert scored == " yes"
    assert char_tokenizer.decode(ctx) == "Q?\nAnswer:"
    assert char_tokenizer.decode(cont) == " yes"


def test_split_context_continuation_handles_merge_across_boundary():
    tok = MergingTokenizer()
    ctx, cont, scored = split_context_continuation(tok, "ca", "b")
    assert tok("cab")["input_ids"] == [4, 0]  # the merge happens
    assert ctx == [4, 1] and cont == [2] and scored == "b"  # context kept as encode(context), continuation alone
    ctx, cont, _ = split_context_continuation(tok, "c ", "ab")  # no merge: plain split
    assert ctx == [4] and cont == [3, 0]


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_scores_equal_closed_form_loglik(prefix_reuse):
    torch.manual_seed(1)
    table = torch.randn(5, 5) * 2
    tok = MergingTokenizer()
    examples = [ChoiceExample(("c",), ("ab", " c", "a b c"), 1), ChoiceExample(("a", "b c"), (" ab",), 1),
                ChoiceExample(("cc ",), ("a", "b"), 0)]
    scores = score_choices(BigramLM(table), tok, examples, batch_size=2, prefix_reuse=prefix_reuse)
    for ex, opts in zip(examples, scores, strict=True):
        for (ctx, cont), got in zip(ex.options(), opts, strict=True):
            c_ids, k_ids, scored = split_context_continuation(tok, ctx, cont)
            assert got.loglik == pytest.approx(bigram_loglik(table, c_ids, k_ids), abs=1e-5)
            assert got.n_tokens == len(k_ids) and got.n_chars == len(scored)


@pytest.mark.parametrize("batch_size", [2, 16])
@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_batched_scores_match_naive_per_option_forward(tiny_llama, char_tokenizer, batch_size, prefix_reuse):
    scores = score_choices(tiny_llama, char_tokenizer, EXAMPLES, batch_size=batch_size, prefix_reuse=prefix_reuse)
    for ex, opts in zip(EXAMPLES, scores, strict=True):
        assert len(opts) == ex.n_options
        for (ctx, cont), got in zip(ex.options(), opts, strict=True):
            assert got.loglik == pytest.approx(naive_loglik(tiny_llama, char_tokenizer, ctx, cont), abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_length_chunks_partition_with_bounded_padding(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(v) for v in rng.integers(1, 60, size=int(rng.integers(1, 80)))]
    chunks = _length_chunks(lengths)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        longest, real = max(lengths[i] for i in c), sum(lengths[i] for i in c)
        assert lengths[c[0]] == longest
        assert len(c) <= 8 or longest * len(c) <= 1.25 * real


def test_prefix_reuse_equals_no_reuse_on_random_examples(char_tokenizer):
    model = make_tiny_llama(seed=3)
    rng = np.random.default_rng(0)
    letters = list("abcdefgh ")
    examples = []
    for _ in range(12):
        ctx = "".join(rng.choice(letters, size=int(rng.integers(1, 40))))
        conts = tuple(" " + "".join(rng.choice(letters, size=int(rng.integers(1, 12)))) for _ in range(int(rng.integers(2, 5))))
        examples.append(ChoiceExample((ctx,), conts, 0))
    a = score_choices(model, char_tokenizer, examples, batch_size=5, prefix_reuse=True)
    b = score_choices(model, char_tokenizer, examples, batch_size=5, prefix_reuse=False)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose([o.loglik for o in x], [o.loglik for o in y], atol=1e-4)


def test_add_bos_prepends_token(tiny_llama, char_tokenizer):
    ex = [ChoiceExample(("ab",), (" c", " d"), 0)]
    with_bos = score_choices(tiny_llama, char_tokenizer, ex, add_bos=True)[0]
    ids = [char_tokenizer.bos_token_id] + char_tokenizer("ab", add_special_tokens=False)["input_ids"]
    cont = char_tokenizer(" c", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama(input_ids=torch.tensor([ids + cont])).logits[0].double(), -1)
    expected = float(sum(logp[len(ids) + t - 1, cont[t]] for t in range(len(cont))))
    assert with_bos[0].loglik == pytest.approx(expected, abs=1e-4)


def test_acc_and_acc_norm_per_character():
    ex = [ChoiceExample(("q",), ("short", "a much longer option"), 1), ChoiceExample(("q",), ("x", "y"), 0)]
    scores = [[OptionScore(-5.0, 2, 5, False), OptionScore(-6.0, 5, 20, False)],  # acc picks 0, acc_norm picks 1
              [OptionScore(-1.0, 1, 1, True), OptionScore(-2.0, 1, 1, False)]]
    out = choice_correctness(ex, scores)
    assert out == {"acc": [0.0, 1.0], "acc_norm": [1.0, 1.0]}


def test_parse_rows_and_errors(tmp_path):
    ex = parse_choice_row({"query": "Q", "choices": ["a", "b"], "gold": 1}, delimiter="\nAnswer: ")
    assert ex.contexts == ("Q\nAnswer: ",) and ex.continuations == ("a", "b") and ex.gold == 1
    ex = parse_choice_row({"context_options": ["x so A", "x so B"], "continuation": "won.", "gold": 0})
    assert ex.options() == [("x so A", " won."), ("x so B", " won.")]
    with pytest.raises(DataError, match="gold"):
        parse_choice_row({"query": "Q", "choices": ["a"], "gold": 3})
    with pytest.raises(DataError, match="choices"):
        parse_choice_row({"query": "Q", "choices": "ab", "gold": 0})
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"nope": 1, "gold": 0}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2"):
        load_choice_task(path)
    with pytest.raises(DataError, match="not found"):
        load_choice_task(tmp_path / "missing.jsonl")


def test_seeded_subset_is_fixed_and_sorted():
    a, b = seeded_subset(100, 10, seed=5), seeded_subset(100, 10, seed=5)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert seeded_subset(100, 10, seed=6) != a
    assert seeded_subset(5, 10) == [0, 1, 2, 3, 4] and seeded_subset(5, None) == list(range(5))
    with pytest.raises(DataError):
        seeded_subset(5, 0)


def _write_eval_dir(root):
    ev = root / "eval"
    ev.mkdir(parents=True)
    rows = [{"query": f"Question: item {i}?", "choices": ["red", "green", "blue"], "gold": i % 3} for i in range(7)]
    (ev / "arc_easy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wino = [{"context_options": [f"A{i} or B so A", f"A{i} or B so B"], "continuation": "won.", "gold": i % 2}
            for i in range(5)]
    (ev / "winogrande.jsonl").write_text("\n".join(json.dumps(r) for r in wino) + "\n")
    return root


def test_evaluate_choice_tasks_end_to_end_and_json_round_trip(tiny_llama, char_tokenizer, tmp_path):
    data = _write_eval_dir(tmp_path / "data")
    seen = []
    run = evaluate_choice_tasks(tiny_llama, char_tokenizer, ["arc_easy", "winogrande"], data_dir=data, limit=4,
                                batch_size=3, method="m", on_task_done=lambda t, s: seen.append(t))
    assert seen == ["arc_easy", "winogrande"]
    assert run.tasks["arc_easy"].n == 4 and run.tasks["winogrande"].n == 4
    examples = load_choice_task(data / "eval" / "arc_easy.jsonl", "\nAnswer: ", limit=4)
    expected = choice_correctness(examples, score_choices(tiny_llama, char_tokenizer, examples, batch_size=1))
    assert run.tasks["arc_easy"].metrics["acc"] == pytest.approx(np.mean(expected["acc"]))
    assert run.tasks["arc_easy"].stderr["acc"] == pytest.approx(np.std(expected["acc"], ddof=1) / 2)
    path = save_results(run, tmp_path / "out" / "r.json")
    back = load_results(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.average()["acc"] == pytest.approx(np.mean([run.tasks[t].metrics["acc"] for t in run.tasks]))
    with pytest.raises(DataError, match="unknown rank-classification task"):
        evaluate_choice_tasks(tiny_llama, char_tokenizer, ["nope"], data_dir=data)


# ------------------------------------------------------------------------------------------------- generation


def _naive_greedy(model, tokenizer, prompt: str, max_new_tokens: int, eos: int | None) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_matches_unbatched_naive(tiny_llama, char_tokenizer, use_cache):
    prompts = ["Hello there", "a", "A longer prompt: left padding matters"]
    got = greedy_generate(tiny_llama, char_tokenizer, prompts, max_new_tokens=5, batch_size=3, use_cache=use_cache)
    for p, g in zip(prompts, got, strict=True):
        assert g == _naive_greedy(tiny_llama, char_tokenizer, p, 5, char_tokenizer.eos_token_id)


def test_greedy_stops_at_eos_and_stop_strings(char_tokenizer):
    vocab = len(char_tokenizer)
    ids = {c: char_tokenizer.convert_tokens_to_ids(c) for c in "abcd"}
    eos = char_tokenizer.eos_token_id
    table = torch.full((vocab, vocab), -10.0)
    table[:, ids["a"]] = 5.0  # any token -> "a"
    table[ids["a"], ids["b"]] = 10.0  # a -> b -> c -> eos
    table[ids["b"], ids["c"]] = 10.0
    table[ids["c"], eos] = 10.0
    table[ids["d"], ids["d"]] = 20.0  # d -> d forever
    model = BigramLM(table)
    out = greedy_generate(model, char_tokenizer, ["x", "d", "c"], max_new_tokens=8, batch_size=3)
    assert out == ["abc", "dddddddd", ""]
    out = greedy_generate(model, char_tokenizer, ["x", "d"], max_new_tokens=8, stop_strings=["bc", "ddd"])
    assert out == ["abc", "ddd"]


def test_normalize_and_exact_match_follow_sni():
    assert normalize_answer("  The Cat, sat!  ") == "the cat sat"
    assert normalize_answer("The cat", remove_articles=True) == "cat"
    assert exact_match("Yes.", ["no", "YES"]) == 1.0
    assert exact_match("the answer", ["answer"]) == 0.0  # SNI keeps articles
    assert exact_match("the answer", ["answer"], remove_articles=True) == 1.0


def _lcs(a: list[str], b: list[str]) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def _rouge_l_by_hand(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def test_rouge_l_matches_lcs_and_rouge_score():
    from rouge_score import rouge_scorer

    pairs = [("the quick brown fox", "the brown dog and fox"), ("a b c d", "x y z"), ("cat", "cat"),
             ("police killed the gunman", "the gunman kill police")]
    for pred, ref in pairs:
        assert rouge_l(pred, [ref]) == pytest.approx(
            rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure)
    for pred, ref in pairs[:3]:  # no stemming differences in these
        assert rouge_l(pred, [ref]) == pytest.approx(_rouge_l_by_hand(pred, ref))
    assert rouge_l("the quick brown fox", ["nothing here", "quick brown fox"]) == pytest.approx(
        _rouge_l_by_hand("the quick brown fox", "quick brown fox"))  # max over references
    scores = score_generations(["  Yes! ", "no"], [["yes"], ["maybe", "No."]])
    assert scores["exact_match"] == [1.0, 1.0] and scores["rougeL"] == [1.0, 1.0]


def _write_sni(path, n=6):
    task = {"Definition": ["Repeat the word."], "Instances": [{"id": f"t-{i}", "input": f"w{i}", "output": [f"w{i}"]}
                                                             for i in range(n)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(task).encode()))


def test_load_sni_task_and_errors(tmp_path):
    _write_sni(tmp_path / "task1_x.json.gz")
    task = load_sni_task(tmp_path / "task1_x.json.gz", limit=3, seed=0)
    assert task.name == "task1_x" and task.definition == "Repeat the word." and len(task.instances) == 3
    assert [i.id for i in task.instances] == [f"t-{j}" for j in seeded_subset(6, 3, 0)]
    (tmp_path / "bad.json").write_text(json.dumps({"Definition": "d", "Instances": [{"input": "x"}]}))
    with pytest.raises(DataError, match="instance 0"):
        load_sni_task(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text("{")
    with pytest.raises(DataError, match="not valid"):
        load_sni_task(tmp_path / "bad2.json")


def test_evaluate_sni_end_to_end(tiny_llama, char_tokenizer, tmp_path):
    _write_sni(tmp_path / "sni" / "heldout" / "task1_x.json.gz")
    _write_sni(tmp_path / "sni" / "heldout" / "task2_y.json.gz", n=3)
    prompts = []

    def fmt(definition, text):
        prompts.append(text)
        return f"{definition} {text} ->"

    run = run_sni(tiny_llama, char_tokenizer, data_dir=tmp_path, limit=2, max_new_tokens=3, format_prompt=fmt)
    assert set(run.tasks) == {"task1_x", "task2_y"} and all(s.n == 2 for s in run.tasks.values())
    assert len(prompts) == 4
    for s in run.tasks.values():
        assert 0.0 <= s.metrics["rougeL"] <= 1.0 and s.metrics["exact_match"] in (0.0, 0.5, 1.0)
    default = run_sni(tiny_llama, char_tokenizer, ["task2_y"], data_dir=tmp_path, limit=1, max_new_tokens=2)
    assert default.tasks["task2_y"].n == 1


# ------------------------------------------------------------------------------------------ results + routing


def test_task_scores_and_table():
    s = TaskScores.from_per_example({"acc": [1, 0, 1, 1]}, wall_s=2.0)
    assert s.metrics["acc"] == 0.75 and s.stderr["acc"] == pytest.approx(math.sqrt(0.25 / 4)) and s.n == 4
    with pytest.raises(DataError):
        TaskScores.from_per_example({"a": [1], "b": [1, 2]})
    run = EvalRun(method="m", model="x", tasks={"t": s})
    table = results_table([run])
    assert table.row_count == 2


def test_load_results_errors(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_results(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"schema": "other"}')
    with pytest.raises(DataError, match="schema"):
        load_results(tmp_path / "b.json")


def test_routing_accuracy():
    per_layer = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (L=2, n=2, E=2)
    out = routing_accuracy({"layers.0.q": per_layer[0], "layers.1.q": per_layer[1]}, [0, 1])
    assert out.per_layer == {"layers.0.q": 1.0, "layers.1.q": 0.5} and out.n == 2
    assert out.overall == 1.0  # example 0: mean mass (0.5, 0.5) -> argmax 0 (ties: first) is right; example 1 right
    w = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert routing_accuracy({"all": w}, np.array([0, 1, 1])).overall == pytest.approx(2 / 3)
    with pytest.raises(RoutingError, match="labels"):
        routing_accuracy({"all": w}, np.array([0, 1]))
    with pytest.raises(RoutingError, match=r"\[0, 2\)"):
        routing_accuracy({"all": w}, np.array([0, 1, 2]))
    with pytest.raises(RoutingError, match="integer"):
        routing_accuracy({"all": w}, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(RoutingError, match="no routing weights"):
        routing_accuracy({}, np.array([0]))


def test_routing_accuracy_top2_own_mass_and_chance_against_brute_force():
    rng = np.random.default_rng(0)
    layers = {f"layers.{i}.q": rng.dirichlet(np.ones(5), size=40) for i in range(3)}
    truth = rng.integers(0, 5, size=40)
    out = routing_accuracy(layers, truth)
    mean = np.mean(list(layers.values()), axis=0)
    top2 = [t in np.argsort(-row, kind="stable")[:2] for row, t in zip(mean, truth, strict=True)]
    assert out.top2 == pytest.approx(np.mean(top2))
    assert out.own_mass == pytest.approx(np.mean([row[t] / row.sum() for row, t in zip(mean, truth, strict=True)]))
    assert out.experts == 5 and out.chance == pytest.approx(0.2)
    tied = routing_accuracy({"all": np.array([[0.0, 0.5, 0.5, 0.0]])}, np.array([0]))
    assert tied.top2 == 0.0 and tied.own_mass == 0.0          # a tie never counts for the own expert
    assert RoutingAccuracy.from_dict(out.to_dict()) == out
    old = RoutingAccuracy.from_dict({"overall": 0.5, "per_layer": {}, "n": 2})   # results written before the fields
    assert math.isnan(old.top2) and old.experts == 0 and math.isnan(old.chance)
