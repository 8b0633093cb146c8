"""A study's configuration: :class:`StudyConfig` (read from the JSON configs in ``benchmarks/configs``), its rows
``[library, method(, {options})]`` and their keys (:func:`row_key`), and the library kinds it can build
(:data:`LIBRARIES`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modlora.build.clustering import read_label_file
from modlora.build.clustering.choices import DEFAULT_FEATURES, Features
from modlora.build.initialisation import DEFAULT_INIT, InitMethod, check_init, check_init_fits
from modlora.build.strategies import BuildConfig
from modlora.build.training import TrainConfig
from modlora.data import PromptLimits, Truncate
from modlora.errors import ModloraError
from modlora.io import parse_json, read_regular_file
from modlora.library.adapters import DEFAULT_TARGET_MODULES, LoraSpec
from modlora.library.shared_expert import DEFAULT_SHARE_MODE, SHARE_MODES, ShareMode
from modlora.models import DEFAULT_MODEL
from modlora.reuse.methods import REGISTRY
from modlora.reuse.methods.arrow import ArrowOptions
from modlora.reuse.methods.core import MethodOptions, TrainingDataOptions

LORAHUB_ROW = "lorahub"  # the few-shot row: not a zero-shot reuse method, so not in the registry


@dataclass
class StudyConfig:
    """Everything a study run needs; ``from_json`` reads the shipped configs in ``benchmarks/configs``."""

    name: str = "study"
    model: str = DEFAULT_MODEL
    dtype: str | None = None
    train_tasks: list[str] = field(default_factory=list)
    steps_per_task: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    max_examples: int | None = None
    max_prompt_tokens: int = 256
    max_target_tokens: int = 64
    truncate: Truncate = "left"
    """How a prompt over ``max_prompt_tokens`` is cut, in training and evaluation (:class:`modlora.data.PromptLimits`)."""
    max_val: int = 16
    libraries: list[str] = field(default_factory=lambda: ["private", "mbc"])
    k: int | str = 3
    stage1_fraction: float = 0.4
    mbc_reuses_private: bool = True
    skills: int = 4
    mhr_heads: int = 2
    allocation_lr: float = 1e-2
    share_fraction: float = 0.2
    share_mode: ShareMode = DEFAULT_SHARE_MODE
    rows: list[list[Any]] = field(default_factory=lambda: [["-", "base"], ["private", "mu"], ["private", "arrow"],
                                                           ["private", "oracle"], ["mbc", "mu"], ["mbc", "arrow"]])
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"arrow": {"top_k": ArrowOptions.top_k}})
    """Options by method name for every row of that method (a row's own options win); by default Arrow's top-k, at
    its :class:`~modlora.reuse.methods.arrow.ArrowOptions` default."""
    heldout_tasks: list[str] | None = None
    """Held-out tasks: SNI test tasks (``sni/heldout``) or pool tasks (``sni/tasks``) that no library trains on
    (``None``: every SNI test task)."""
    heldout_groups: str | None = None
    """A label file (JSON ``{task: group}`` or CSV) grouping the held-out tasks, e.g. ``related`` / ``unrelated``
    to the training tasks: each group gets its own paired differences (``None``: one group)."""
    heldout_limit: int = 5
    indist_limit: int = 5
    max_new_tokens: int = 32
    gen_batch_size: int = 8
    choice_tasks: list[str] = field(default_factory=list)
    choice_limit: int | None = None
    choice_batch_size: int = 16
    choice_rows: list[str] | None = None
    """Row keys (:func:`row_key`, e.g. ``"private/arrow"``) scored on the benchmarks; ``None``: every row."""
    examples_per_expert: int = 16
    task_families: str | None = None
    """A label file (JSON ``{task: family}`` or CSV ``task,family``) to score every clustered library's partition
    of the training tasks against: adjusted Rand index and purity (``None``: the number of clusters only)."""
    lorahub_shots: int = 5
    lorahub_budget: int = 40
    seed: int = 0
    init: InitMethod = DEFAULT_INIT
    """How every expert's A starts (:mod:`modlora.build.initialisation`; Poly/MHR skills always start from seeds)."""
    lora_rank: int = 4
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """The layers LoRA adapts: ``["attention"]`` (the architecture's attention projections), ``["all-linear"]`` or
    layer names (:func:`modlora.models.target_layers`); with ``lora_*`` the experts' :class:`LoraSpec`."""

    @classmethod
    def from_json(cls, path: str | Path) -> StudyConfig:
        try:
            raw = parse_json(read_regular_file(path, follow_symlinks=True))
        except (OSError, ValueError) as exc:
            raise ModloraError(f"{path}: cannot read study config ({exc})") from None
        return cls.from_mapping(raw, path)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], path: str | Path) -> StudyConfig:
        """The config of a JSON object read from ``path``: unknown settings refused, ``task_families`` taken
        relative to the config's folder, then :meth:`validate`."""
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ModloraError(f"{path}: unknown study setting(s): {', '.join(unknown)}")
        raw = dict(raw)
        for key in ("task_families", "heldout_groups"):
            if raw.get(key):
                raw[key] = str(Path(path).parent / raw[key])
        cfg = cls(**raw)
        cfg.validate(str(path))
        return cfg

    def validate(self, source: str = "study config") -> None:
        """Check every row's method and options and that ``choice_rows`` names rows of the config, before any
        model loads (ModloraError naming ``source`` and the row), and ``share_mode``."""
        if self.share_mode not in SHARE_MODES:
            raise ModloraError(f"{source}: share_mode must be one of {', '.join(SHARE_MODES)}, got "
                               f"{self.share_mode!r}")
        try:
            self.lora.to_dict()  # validates the LoRA settings
            self.limits.record()  # validates the prompt limits
            check_init(self.init)
            for name in self.libraries:
                check_init_fits(self.init, name)
        except ModloraError as exc:
            raise ModloraError(f"{source}: {exc}") from None
        for row in self.rows:
            try:
                self.row_options(row, Path("."))
            except ModloraError as exc:
                raise ModloraError(f"{source}: row {row}: {exc}") from None
        for key in ("task_families", "heldout_groups"):
            if getattr(self, key) is not None:
                try:
                    read_label_file(getattr(self, key))
                except ModloraError as exc:
                    raise ModloraError(f"{source}: {key}: {exc}") from None
        trained = sorted(set(self.heldout_tasks or ()) & set(self.train_tasks))
        if trained:
            raise ModloraError(f"{source}: heldout_tasks {', '.join(trained)} are training tasks of the study")
        if self.choice_rows is not None:
            keys = {row_key(row) for row in self.rows}
            unknown = [key for key in self.choice_rows if key not in keys]
            if unknown:
                raise ModloraError(f"{source}: choice_rows {', '.join(unknown)} are not rows of the study "
                                   f"(rows: {', '.join(sorted(keys))})")

    @property
    def lora(self) -> LoraSpec:
        if not isinstance(self.targets, list):
            raise ModloraError(f"targets must be a list of layer names, ['attention'] or ['all-linear'], got "
                               f"{self.targets!r}")
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.targets))

    @property
    def limits(self) -> PromptLimits:
        return PromptLimits(self.max_prompt_tokens, self.max_target_tokens, self.truncate)

    def scores_choice(self, row: Sequence[Any]) -> bool:
        """Whether ``row`` is scored on the benchmarks (``choice_tasks`` and, if set, ``choice_rows``)."""
        return bool(self.choice_tasks) and (self.choice_rows is None or row_key(row) in self.choice_rows)

    def row_options(self, row: Sequence[Any], data_dir: Path) -> MethodOptions | None:
        """The validated options of a ``[library, method(, {options})]`` row: the method's defaults, then
        ``method_options[method]``, then the row's own; data-reading methods get the training-task directory and
        ``examples_per_expert``. ``None`` for the LoraHub row."""
        if not 2 <= len(row) <= 3 or (len(row) == 3 and not isinstance(row[2], Mapping)):
            raise ModloraError("a row is [library, method] or [library, method, {option: value}]")
        if row[1] == LORAHUB_ROW:
            return None
        method = REGISTRY.get(row[1])
        values: dict[str, Any] = {}
        if issubclass(method.Options, TrainingDataOptions):
            values = {"task_dir": str(data_dir / "sni" / "tasks"), "examples_per_expert": self.examples_per_expert}
        values |= dict(self.method_options.get(method.name, {})) | (dict(row[2]) if len(row) == 3 else {})
        return method.options_from(values)

    def build_config(self, device: str | None, data_dir: Path) -> BuildConfig:
        return BuildConfig(model=self.model, device=device, dtype=self.dtype, data_dir=str(data_dir / "sni" / "tasks"),
                           lora=self.lora, train=TrainConfig(steps=self.steps_per_task, batch_size=self.batch_size, lr=self.lr,
                                             seed=self.seed),
                           max_examples=self.max_examples, max_val=self.max_val, limits=self.limits, init=self.init)


def row_key(row: Sequence[Any]) -> str:
    """``library/method`` (``method`` alone without a library), plus ``[opt=value,…]`` for a row's own options."""
    key = f"{row[0]}/{row[1]}" if row[0] != "-" else str(row[1])
    return key + ("[" + ",".join(f"{k}={v}" for k, v in sorted(row[2].items())) + "]" if len(row) == 3 else "")


MBC_FEATURES: dict[str, Features] = {"mbc": DEFAULT_FEATURES, "mbc-params": "params", "mbc-share": DEFAULT_FEATURES}
"""The MBC library kinds and the similarity each clusters on (:mod:`modlora.build.clustering`): ``mbc`` and ``mbc-share``
on the experts' updates ΔW (``delta``), ``mbc-params`` on the paper's flattened, sparsified parameters."""

LIBRARIES = ("private", "mbc", "mbc-params", "shared", "random", "semantic", "poly", "mhr", "mbc-share",
             "semantic-share")
"""Library kinds a study can build: the MBC kinds of :data:`MBC_FEATURES`; ``mbc-share`` / ``semantic-share`` are
MBC / semantic with ``--share`` (``share_fraction`` of the budget on a shared expert, ``share_mode`` warm or
residual); ``random`` copies the cluster sizes of ``mbc``; ``poly`` / ``mhr`` have ``skills`` skills (MHR:
``mhr_heads`` heads)."""

