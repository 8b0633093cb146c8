"""Evaluation: zero-shot rank classification, held-out SNI generation, code pass@1, results files.

* :mod:`.rank_classification` — ARC / BoolQ / HellaSwag / OpenBookQA / PIQA / WinoGrande (``acc``, ``acc_norm``)
  with the shared context scored once and its KV cache reused for every option;
* :mod:`.generation` — greedy batched generation, SNI Rouge-L and exact match;
* :mod:`.code` — HumanEval / MBPP pass@1, the programs run in :mod:`.sandbox`;
* :mod:`.sandbox` — untrusted programs under bubblewrap isolation (subprocess fallback) and limits;
* :mod:`.indist` — a library's own tasks on their test split: Rouge-L, exact match, target loss, routing accuracy;
* :mod:`.results` — results JSON (``modlora-eval-v1``), typed routing telemetry, the table, seeded subsets.
"""

from modlora.evaluation.code import evaluate_code, extract_code
from modlora.evaluation.generation import (
    evaluate_sni,
    exact_match,
    generate_and_score,
    greedy_generate,
    normalize_answer,
    rouge_l,
)
from modlora.evaluation.indist import evaluate_indist, prompt_routing_accuracy
from modlora.evaluation.rank_classification import (
    CHOICE_TASKS,
    DEFAULT_CHOICE_TASKS,
    ChoiceExample,
    OptionScore,
    evaluate_choice_tasks,
    score_choices,
)
from modlora.evaluation.results import (
    EvalRun,
    RoutingAccuracy,
    RoutingTelemetry,
    TaskScores,
    load_results,
    results_table,
    routing_accuracy,
    save_results,
    seeded_subset,
)
from modlora.evaluation.sandbox import Sandbox, SandboxResult, run_program

__all__ = [
    "CHOICE_TASKS", "DEFAULT_CHOICE_TASKS", "ChoiceExample", "EvalRun", "OptionScore", "RoutingAccuracy",
    "RoutingTelemetry", "Sandbox", "SandboxResult", "TaskScores", "evaluate_choice_tasks", "evaluate_code",
    "evaluate_indist", "evaluate_sni", "exact_match", "extract_code", "generate_and_score", "greedy_generate",
    "load_results", "normalize_answer", "prompt_routing_accuracy", "results_table", "rouge_l", "routing_accuracy",
    "run_program", "save_results", "score_choices", "seeded_subset",
]
