"""Task data: Super-NaturalInstructions files, FLAN-style flat records, prompt formatting and batching.

Sources
-------
* **SNI task files** (``taskNNN_name.json`` or ``.json.gz``, the upstream schema: ``Definition`` (list of str),
  ``Instances: [{id, input, output: [..]}]``, ...) from a directory: :func:`load_sni_tasks`.
* **Flat records** ``{task_name, source, target[, split]}`` (the FLAN / mttl "flat" format) from JSONL files
  (:func:`load_flat_jsonl`) or from any Hugging Face ``datasets`` dataset (:func:`load_flat_dataset`).

Prompt template (one template, used for training *and* evaluation)
-----------------------------------------------------------------
With a chat template (SmolLM2-Instruct has one) the prompt is the tokenizer's chat rendering of one user message
``"{definition}\\n\\n{input}"`` with ``add_generation_prompt=True``; the target is ``"{output}{eos}"``. Without a chat
template: ``"{definition}\\n\\nInput: {input}\\nOutput:"`` and target ``" {output}{eos}"``. Prompts over
``max_prompt_tokens`` are cut as :class:`PromptLimits` ``truncate`` says: from the left (the end of the input and the
generation prompt are kept) or, with ``"input"``, at the end of the instance input (the definition is kept); targets
are cut to ``max_target_tokens``. The loss covers target tokens only.

Splits
------
Each task's instances are split 80/10/10 (configurable) by sorting on ``sha256(f"{seed}:{id}")``, so the split of an
instance depends only on its id and the seed, not on file order or on the other instances.

Every file is opened by :func:`modlora.io.open_regular_file` (symbolic links followed: data often lives in caches of
links): a FIFO, device or directory where a task file should be is refused with :class:`DataError` naming it, never
waited on.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from modlora.errors import DataError
from modlora.io import open_regular_file, parse_json, read_regular_file

if TYPE_CHECKING:  # torch loads with the first batch, not with the command line
    import torch

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Instance:
    """One example of a task: ``input`` text and one or more reference ``outputs``."""

    id: str
    input: str
    outputs: tuple[str, ...]


@dataclass
class Task:
    """A task: its name, instruction (``definition``) and instances."""

    name: str
    definition: str
    instances: list[Instance]
    category: str = ""
    source: str = ""
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.instances)


MAX_REPORTED_PROBLEMS = 5


@dataclass
class LoadReport:
    """What a lenient loader skipped: how many records, and the first few offending ones (each names its line or
    record, e.g. ``"line 7: invalid JSON"``)."""

    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def first_problem(self) -> str | None:
        return self.problems[0] if self.problems else None

    def add(self, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)

    def summary(self) -> str:
        """``"skipped 2 malformed record(s): line 3: invalid JSON; line 5: not valid UTF-8"`` ("" when none)."""
        if not self.skipped:
            return ""
        more = ", …" if self.skipped > len(self.problems) else ""
        return f"skipped {self.skipped} malformed record(s): " + "; ".join(self.problems) + more


@dataclass
class TaskLoad:
    """Tasks read from one source (``origin``: a file or dataset) and the :class:`LoadReport` of what was skipped
    there; a caller shows ``report.summary()`` to the user."""

    tasks: dict[str, Task]
    report: LoadReport
    origin: str


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenised, or None: a lone surrogate (from a JSON ``"\\ud800"`` escape, or from
    command-line bytes that are not UTF-8, which Python keeps as surrogates) makes tokenizers raise TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode text at character {exc.start} (a lone surrogate or non-UTF-8 bytes)"
    return None


def check_text(text: str, what: str) -> str:
    """``text`` unchanged when it can be tokenised, else :class:`DataError` naming ``what`` (e.g. ``"--prompt"``)."""
    problem = text_problem(text)
    if problem is not None:
        raise DataError(f"{what}: {problem}")
    return text


def default_data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The data root holding ``sni/`` and ``eval/``: ``path`` if given, else ``$MODLORA_DATA``, else ``../shared/data``
    (or ``shared/data``) relative to the working directory. Raises :class:`DataError` when it does not exist."""
    if path is not None:
        root = Path(path)
    elif os.environ.get("MODLORA_DATA"):
        root = Path(os.environ["MODLORA_DATA"])
    else:
        root = next((c for c in (Path("../shared/data"), Path("shared/data")) if c.is_dir()), Path("../shared/data"))
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist (pass --data / data_dir or set MODLORA_DATA)")
    return root.resolve()


def default_sni_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """``<data root>/sni/tasks``: the SNI training tasks."""
    return default_data_dir(path) / "sni" / "tasks"


def _cannot_read(path: Path, exc: BaseException) -> DataError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return DataError(f"{path}: cannot read file ({reason})")


def _read_json_file(path: Path) -> Any:
    try:
        raw = read_regular_file(path, follow_symlinks=True)
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:   # gzip.BadGzipFile is an OSError; a bad deflate stream zlib.error
        raise _cannot_read(path, exc) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    try:
        return parse_json(text)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def task_name_from_path(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def load_sni_task(path: str | os.PathLike[str], *, strict: bool = False, max_input_chars: int = 200_000) -> Task:
    """Read one SNI task file. Bad instances are skipped (counted in ``Task.skipped``) unless ``strict``."""
    path = Path(path)
    raw = _read_json_file(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with 'Definition' and 'Instances'")
    definition = raw.get("Definition")
    if isinstance(definition, list) and all(isinstance(d, str) for d in definition) and definition:
        definition = " ".join(definition)
    if not isinstance(definition, str) or not definition.strip():
        raise DataError(f"{path}: field 'Definition' is missing or not text")
    check_text(definition, f"{path}: field 'Definition'")
    instances = raw.get("Instances")
    if not isinstance(instances, list):
        raise DataError(f"{path}: field 'Instances' is missing or not a list")
    report = LoadReport()
    out: list[Instance] = []
    seen: set[str] = set()
    for i, inst in enumerate(instances):
        problem = _instance_problem(inst, max_input_chars)
        if problem is None and str(inst["id"]) in seen:
            problem = f"duplicate id {inst['id']!r}"
        if problem is not None:
            if strict:
                raise DataError(f"{path}: Instances[{i}]: {problem}")
            report.add(f"Instances[{i}]: {problem}")
            continue
        seen.add(str(inst["id"]))
        out.append(Instance(str(inst["id"]), inst["input"], tuple(o for o in inst["output"] if o.strip())))
    if not out:
        raise DataError(f"{path}: no usable instances ({report.skipped} skipped; first problem: {report.first_problem})")
    cats = raw.get("Categories") or []
    srcs = raw.get("Source") or []
    return Task(name=task_name_from_path(path), definition=definition.strip(), instances=out,
                category=cats[0] if isinstance(cats, list) and cats and isinstance(cats[0], str) else "",
                source=srcs[0] if isinstance(srcs, list) and srcs and isinstance(srcs[0], str) else "",
                skipped=report.skipped)


def _instance_problem(inst: Any, max_input_chars: int) -> str | None:
    if not isinstance(inst, dict):
        return "not an object"
    if not isinstance(inst.get("id"), (str, int)):
        return "field 'id' missing"
    if not isinstance(inst.get("input"), str):
        return "field 'input' missing or not text"
    if (problem := text_problem(inst["input"])) is not None:
        return f"field 'input' is {problem}"
    if len(inst["input"]) > max_input_chars:
        return f"field 'input' longer than {max_input_chars} characters"
    outputs = inst.get("output")
    if isinstance(outputs, str):
        return "field 'output' must be a list of strings"
    if not isinstance(outputs, list) or not any(isinstance(o, str) and o.strip() for o in outputs):
        return "field 'output' is empty"
    if not all(isinstance(o, str) for o in outputs):
        return "field 'output' holds non-text items"
    if any(text_problem(o) for o in outputs):
        return "field 'output' holds invalid Unicode text"
    return None


def sni_task_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Map task name → file for every ``*.json`` / ``*.json.gz`` in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"SNI task directory not found: {directory} (set --data or MODLORA_DATA)")
    files = sorted(list(directory.glob("*.json")) + list(directory.glob("*.json.gz")))
    return {task_name_from_path(p): p for p in files}


def load_sni_tasks(directory: str | os.PathLike[str], names: Iterable[str] | None = None, *,
                   strict: bool = False) -> dict[str, Task]:
    """Load the named SNI tasks (all when ``names`` is None) from a directory."""
    files = sni_task_files(directory)
    wanted = list(files) if names is None else list(names)
    missing = [n for n in wanted if n not in files]
    if missing:
        raise DataError(f"task(s) not found in {directory}: {', '.join(missing[:5])}")
    return {n: load_sni_task(files[n], strict=strict) for n in wanted}


def load_flat_records(records: Iterable[Mapping[str, Any]], *, origin: str, strict: bool = False,
                      definition: str = "") -> dict[str, Task]:
    """Group flat records ``{task_name, source, target[, split]}`` into tasks (ids: ``{task_name}-{index}``)."""
    return group_flat_records(((f"record {i}", rec) for i, rec in enumerate(records)), origin=origin, strict=strict,
                              definition=definition).tasks


def group_flat_records(records: Iterable[tuple[str, Any]], *, origin: str, strict: bool = False,
                       definition: str = "", report: LoadReport | None = None) -> TaskLoad:
    """Group ``(where, record)`` pairs into tasks; ``where`` (e.g. ``"line 7"``) names a record in messages and the
    :class:`LoadReport`, which continues ``report`` when given (problems found while reading the records)."""
    tasks: dict[str, Task] = {}
    report = report if report is not None else LoadReport()
    for i, (where, rec) in enumerate(records):
        problem = None
        if not isinstance(rec, Mapping):
            problem = "not an object"
        else:
            for key in ("task_name", "source", "target"):
                if not isinstance(rec.get(key), str) or (key != "source" and not rec[key].strip()):
                    problem = f"field {key!r} missing or empty"
                    break
                if (bad := text_problem(rec[key])) is not None:
                    problem = f"field {key!r} is {bad}"
                    break
        if problem is not None:
            if strict:
                raise DataError(f"{origin}: {where}: {problem}")
            report.add(f"{where}: {problem}")
            continue
        task = tasks.setdefault(rec["task_name"], Task(rec["task_name"], definition, []))
        rid = str(rec.get("id", f"{rec['task_name']}-{i}"))
        task.instances.append(Instance(rid, rec["source"], (rec["target"],)))
    if not tasks:
        raise DataError(f"{origin}: no usable records ({report.summary() or 'the source is empty'})")
    for t in tasks.values():
        t.skipped = report.skipped
    return TaskLoad(tasks, report, origin)


def load_flat_jsonl(path: str | os.PathLike[str], *, strict: bool = False) -> dict[str, Task]:
    """The tasks of :func:`read_flat_jsonl` (each task's ``skipped`` is the file's count of skipped lines)."""
    return read_flat_jsonl(path, strict=strict).tasks


def read_flat_jsonl(path: str | os.PathLike[str], *, strict: bool = False) -> TaskLoad:
    """Read flat records from a JSONL file (``.gz`` too), one JSON object per line.

    A malformed line (invalid JSON or UTF-8, too deeply nested, not an object, missing fields) is skipped and
    counted in the returned :class:`LoadReport` with its 1-based line number, unless ``strict`` (then it raises
    :class:`DataError` naming the line). Only that line is lost: a non-UTF-8 line does not reject the file."""
    path = Path(path)
    report = LoadReport()

    def records() -> Iterator[tuple[str, Any]]:
        try:
            raw = os.fdopen(open_regular_file(path, follow_symlinks=True), "rb")
        except OSError as exc:
            raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from None
        fh = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
        with raw, fh:
            lineno = 0
            while True:
                try:
                    line = fh.readline()
                except (OSError, EOFError, zlib.error) as exc:
                    raise DataError(f"{path}: cannot read past line {lineno} ({exc})") from None
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", parse_json(line.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    if strict:
                        raise DataError(f"{path}: line {lineno}: not valid UTF-8 at byte {exc.start}") from None
                    report.add(f"line {lineno}: not valid UTF-8")
                except ValueError as exc:
                    if strict:
                        raise DataError(f"{path}: line {lineno}: {exc}") from None
                    report.add(f"line {lineno}: {exc}")

    return group_flat_records(records(), origin=str(path), strict=strict, report=report)


def load_flat_dataset(dataset: Any, *, split: str | None = None, strict: bool = False, **load_kwargs: Any
                      ) -> dict[str, Task]:
    """Read flat records from a Hugging Face ``datasets`` object, or a name/path given to ``datasets.load_dataset``."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise DataError("reading Hugging Face datasets needs `pip install modlora[datasets]`") from exc
    if isinstance(dataset, str):
        dataset = datasets.load_dataset(dataset, split=split, **load_kwargs)
    elif isinstance(dataset, datasets.DatasetDict):
        if split is None:
            raise DataError(f"dataset has splits {list(dataset)}: choose one with split=")
        dataset = dataset[split]
    return load_flat_records(iter(dataset), origin=f"dataset {getattr(dataset, 'info', None) and dataset.info.dataset_name}",
                             strict=strict)


def split_instances(task: Task, *, seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
                    ) -> dict[str, list[Instance]]:
    """Deterministic train/validation/test split by seeded hash of instance ids (see module docstring)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = sorted(task.instances, key=lambda x: hashlib.sha256(f"{seed}:{x.id}".encode()).hexdigest())
    n = len(order)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def take(instances: Sequence[Instance], limit: int | None) -> list[Instance]:
    """The first ``limit`` instances (split order is already a seeded shuffle)."""
    return list(instances if limit is None else instances[:limit])


# ----------------------------------------------------------------------------------------------------------------
# Prompt formatting and tokenisation


@dataclass
class EncodedExample:
    """Token ids of one example: ``prompt_ids`` then ``target_ids`` (loss only on the target)."""

    task: str
    prompt_ids: list[int]
    target_ids: list[int]
    instance_id: str = ""
    references: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)

    def labelled(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` (T,) each, labels ``-100`` on the prompt: the few-shot format of LoraHub and
        PhatGOOSE."""
        import torch

        ids = torch.tensor(self.prompt_ids + self.target_ids, device=device)
        labels = torch.full_like(ids, -100)
        labels[len(self.prompt_ids):] = ids[len(self.prompt_ids):]
        return ids, labels


Truncate = Literal["left", "input"]
TRUNCATE_MODES: tuple[Truncate, ...] = ("left", "input")


@dataclass(frozen=True)
class PromptLimits:
    """The token caps of prompts and targets and how a long prompt is cut: one value, checked once, carried from
    the build into every expert's training record and back into evaluation and the data-using routers.

    ``truncate``: ``"left"`` keeps a long prompt's last tokens (the task definition goes first); ``"input"`` keeps
    the whole definition and cuts the end of the instance input instead. ``MIN_PROMPT_TOKENS`` /
    ``MIN_TARGET_TOKENS`` are the smallest caps accepted (the chat header alone takes several tokens)."""

    max_prompt_tokens: int = 384
    max_target_tokens: int = 128
    truncate: Truncate = "left"

    MIN_PROMPT_TOKENS: ClassVar[int] = 8
    MIN_TARGET_TOKENS: ClassVar[int] = 1
    RECORD_KEYS: ClassVar[tuple[str, ...]] = ("max_prompt_tokens", "max_target_tokens", "truncate")

    def __post_init__(self) -> None:
        for name, least in (("max_prompt_tokens", self.MIN_PROMPT_TOKENS),
                            ("max_target_tokens", self.MIN_TARGET_TOKENS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DataError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.truncate not in TRUNCATE_MODES:
            raise DataError(f"truncate must be one of {', '.join(TRUNCATE_MODES)}, got {self.truncate!r}")

    def formatter(self, tokenizer: Any) -> PromptFormatter:
        return PromptFormatter(tokenizer, self)

    def record(self) -> dict[str, Any]:
        """The fields as an expert's training record holds them (the one writer of these keys)."""
        return {k: getattr(self, k) for k in self.RECORD_KEYS}

    @classmethod
    def from_record(cls, training: Mapping[str, Any]) -> PromptLimits:
        """The limits an expert was trained with, from its training record (the one reader); a key the record lacks
        (experts trained before it was kept) takes the default it was trained with."""
        try:
            return cls(**{k: training[k] for k in cls.RECORD_KEYS if k in training})
        except (TypeError, DataError) as exc:
            raise DataError(f"training record: {exc}") from None


@dataclass
class PromptFormatter:
    """Turns (definition, input, output) into token ids with the template described in the module docstring.

    A prompt over ``limits.max_prompt_tokens`` is cut as ``limits.truncate`` says: ``"left"`` keeps its last tokens
    (the chat header and the start of the task definition go first); ``"input"`` keeps the header and the whole
    definition and cuts the end of the instance input instead (the definition is cut from the left only when it
    alone does not fit); targets are cut to ``limits.max_target_tokens``. ``cut_prompts`` / ``cut_definitions``
    count the prompts this formatter cut, and those whose definition or header was cut."""

    tokenizer: Any
    limits: PromptLimits = PromptLimits()
    use_chat_template: bool | None = None
    cut_prompts: int = field(default=0, init=False)
    cut_definitions: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.use_chat_template is None:
            self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_text(self, definition: str, text: str) -> str:
        if self.use_chat_template:
            msg = [{"role": "user", "content": f"{definition}\n\n{text}" if definition else text}]
            return self.tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        head = f"{definition}\n\n" if definition else ""
        return f"{head}Input: {text}\nOutput:"

    def target_text(self, output: str) -> str:
        eos = self.tokenizer.eos_token or ""
        return f"{output}{eos}" if self.use_chat_template else f" {output}{eos}"

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, definition: str, text: str) -> list[int]:
        cap = self.limits.max_prompt_tokens
        ids = self._tokens(self.prompt_text(definition, text))
        if len(ids) <= cap:
            return ids
        self.cut_prompts += 1
        if self.limits.truncate == "input":
            text_ids = self._tokens(text)
            keep = len(text_ids) - (len(ids) - cap)
            while keep > 0:                      # re-tokenising the cut text can merge tokens: shrink until it fits
                shorter = self._tokens(self.prompt_text(definition, self.tokenizer.decode(text_ids[:keep])))
                if len(shorter) <= cap:
                    return shorter
                keep -= len(shorter) - cap
        self.cut_definitions += 1
        return ids[-cap:]

    def target_ids(self, output: str) -> list[int]:
        ids = self.tokenizer(self.target_text(output), add_special_tokens=False)["input_ids"]
        return ids[: self.limits.max_target_tokens]

    def encode(self, task: Task, inst: Instance) -> EncodedExample:
        return EncodedExample(task=task.name, prompt_ids=self.prompt_ids(task.definition, inst.input),
                              target_ids=self.target_ids(inst.outputs[0]), instance_id=inst.id,
                              references=inst.outputs)


def encode_tasks(formatter: PromptFormatter, tasks: Mapping[str, Task], split: str, *, max_per_task: int | None = None,
                 seed: int = 0) -> list[EncodedExample]:
    """Encode the ``split`` of each task (at most ``max_per_task`` examples each)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    out: list[EncodedExample] = []
    for task in tasks.values():
        for inst in take(split_instances(task, seed=seed)[split], max_per_task):
            out.append(formatter.encode(task, inst))
    return out


@dataclass
class Batch:
    """A right-padded batch. ``loss_mask[i, j]`` is True when position j predicts a target token (label at j+1)."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool
    tasks: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device), self.tasks)


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Right-pad examples into a :class:`Batch` (prompt + target per row)."""
    import torch

    if not examples:
        raise DataError("cannot collate an empty batch")
    width = max(e.length for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        seq = e.prompt_ids + e.target_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        # position p predicts token p+1: targets occupy [len(prompt), len(seq)), predicted from [len(prompt)-1, len(seq)-1)
        loss[i, len(e.prompt_ids) - 1: len(seq) - 1] = True
    return Batch(ids, att, loss, [e.task for e in examples])


def length_grouped_batches(examples: Sequence[EncodedExample], batch_size: int, *, seed: int = 0,
                           shuffle: bool = True, bucket_factor: int = 16) -> list[list[EncodedExample]]:
    """Batches of similar lengths (little padding): shuffle, sort within buckets of ``bucket_factor·batch_size``
    by length, cut into batches, shuffle the batch order."""
    if batch_size < 1:
        raise DataError("batch_size must be >= 1")
    rng = random.Random(seed)
    items = list(examples)
    if shuffle:
        rng.shuffle(items)
    bucket = batch_size * bucket_factor
    batches: list[list[EncodedExample]] = []
    for start in range(0, len(items), bucket):
        chunk = sorted(items[start:start + bucket], key=lambda e: e.length)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_fraction(batches: Sequence[Sequence[EncodedExample]]) -> float:
    """Share of padded positions over all batches (0 = no waste)."""
    total = sum(len(b) * max(e.length for e in b) for b in batches)
    real = sum(e.length for b in batches for e in b)
    return 1.0 - real / total if total else 0.0


def read_index(data_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The ``sni/index.json`` entries by task name, or {} when absent."""
    path = Path(data_dir) / "sni" / "index.json"
    if not os.path.lexists(path):
        return {}
    raw = _read_json_file(path)
    out: dict[str, dict[str, Any]] = {}
    for key in ("train_tasks", "heldout_tasks"):
        for entry in raw.get(key, []) if isinstance(raw, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("task"), str):
                out[entry["task"]] = {**entry, "split": "train" if key == "train_tasks" else "heldout"}
    return out
