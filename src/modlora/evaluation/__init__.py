"""Evaluation: zero-shot rank classification, held-out SNI generation, code pass@1, results files.

* :mod:`.rank_classification` — ARC / BoolQ / HellaSwag / OpenBookQA / PIQA / WinoGrande (``acc``, ``acc_norm``)
  with the shared context scored once and its KV cache reused for every option;
* :mod:`.generation` — greedy batched generation, SNI Rouge-L and exact match;
* :mod:`.code` — HumanEval / MBPP pass@1 with a bubblewrap sandbox (subprocess fallback);
* :mod:`.results` — results JSON (``modlora-eval-v1``), rich table, seeded subsets, routing accuracy.
"""

from modlora.evaluation.code import Sandbox, SandboxResult, evaluate_code, extract_code, run_program
from modlora.evaluation.generation import evaluate_sni, exact_match, greedy_generate, normalize_answer, rouge_l
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
    TaskScores,
    load_results,
    print_results,
    resolve_data_dir,
    routing_accuracy,
    save_results,
    seeded_subset,
)

__all__ = [
    "CHOICE_TASKS", "DEFAULT_CHOICE_TASKS", "ChoiceExample", "EvalRun", "OptionScore", "Sandbox", "SandboxResult",
    "TaskScores", "evaluate_choice_tasks", "evaluate_code", "evaluate_sni", "exact_match", "extract_code",
    "greedy_generate", "load_results", "normalize_answer", "print_results", "resolve_data_dir", "rouge_l",
    "routing_accuracy", "run_program", "save_results", "score_choices", "seeded_subset",
]
