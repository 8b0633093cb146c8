"""LoRA adapters in memory and on disk, in PEFT's adapter format.

A LoRA expert adds, to each adapted linear layer ``y = W x`` (``W``: out × in), the low-rank
update ``ΔW = s · B A`` with ``A``: (r × in), ``B``: (out × r) and scaling ``s = alpha / r``.
On disk an adapter is a PEFT directory: ``adapter_config.json`` + ``adapter_model.safetensors``
whose keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``; such a
directory loads with ``peft.PeftModel.from_pretrained``. A PEFT config is read as PEFT would apply
it or refused naming the field (:func:`parse_adapter_config`): an rsLoRA adapter (``use_rslora``,
``s = alpha / √r``) becomes the plain adapter with ``alpha · √r``, which computes the same ``ΔW``.

In memory, :class:`LoraAdapter` maps each *module path* of the base causal LM (for example
``model.layers.0.self_attn.q_proj``) to its ``A`` and ``B`` factors.

Which layers a new adapter covers is a request resolved against the model (:func:`resolve_spec`, through
:func:`modlora.models.target_layers`): ``attention`` (the default: the architecture's attention projections),
``all-linear``, or layer names. A fused projection (Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's
``query_key_value``, GPT-2's ``c_attn``) is one linear layer and gets one LoRA, as in PEFT. A GPT-2 ``Conv1D`` layer
is loaded as a linear layer (:func:`modlora.models.linear_from_conv1d`), so ``A`` (r, in) and ``B`` (out, r) have
PEFT's shapes for it and ``ΔW`` is merged as for any linear layer; the spec records ``fan_in_fan_out`` so the
written config tells PEFT the checkpoint's layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save

from modlora.errors import AdapterError, ModelLoadError, ModloraError
from modlora.io import atomic_directory, atomic_write_bytes, parse_json, read_regular_file
from modlora.models import ATTENTION, TARGET_KEYWORDS, hub_id, target_layers, target_request_problem

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGET_MODULES = (ATTENTION,)
"""The default request: the architecture's attention projections (:func:`modlora.models.target_layers`)."""
MAX_RANK = 4096
MAX_ALPHA = 1e6
MAX_FEATURES = 1 << 20
PEFT_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    """Hyper-parameters of a LoRA adapter (the paper's defaults: r=4, alpha=16, dropout=0.05).

    ``target_modules``: layer names, or a request still to be resolved against a model (``("attention",)``, the
    default, or ``("all-linear",)``; :func:`resolve_spec`). ``fan_in_fan_out``: the adapted layers are ``Conv1D``
    layers in the checkpoint (GPT-2); it changes nothing in modlora's arithmetic (those layers are loaded as linear
    layers) and is written to the PEFT config."""

    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"LoRA field 'r' (rank) must be an integer in [1, {MAX_RANK}], got {self.rank!r}")
        if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha)
                or abs(self.alpha) > MAX_ALPHA):
            raise AdapterError(f"LoRA field 'lora_alpha' must be a finite number of magnitude at most {MAX_ALPHA:g}, "
                               f"got {self.alpha!r}")
        if (not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool)
                or not 0.0 <= float(self.dropout) < 1.0):
            raise AdapterError(f"LoRA field 'lora_dropout' must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AdapterError(f"LoRA field 'target_modules' must be a non-empty list of names, got {self.target_modules!r}")
        if problem := target_request_problem(self.target_modules):
            raise AdapterError(f"LoRA field 'target_modules': {problem}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise AdapterError(f"LoRA field 'fan_in_fan_out' must be true or false, got {self.fan_in_fan_out!r}")
        object.__setattr__(self, "target_modules", tuple(sorted(set(self.target_modules))))  # canonical order

    @property
    def resolved(self) -> bool:
        """Whether ``target_modules`` names layers (not a request such as ``attention`` still to resolve)."""
        return not set(self.target_modules) & set(TARGET_KEYWORDS)

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor applied to ``B A``."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        """PEFT's field names; ``fan_in_fan_out`` only when true (records written before it stay the same)."""
        return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.target_modules)} | ({"fan_in_fan_out": True} if self.fan_in_fan_out else {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSpec:
        tm = d.get("target_modules", DEFAULT_TARGET_MODULES)
        if isinstance(tm, str):
            tm = [tm]
        if not isinstance(tm, (list, tuple)):
            raise AdapterError(f"LoRA field 'target_modules' must be a list of names, got {tm!r}")
        return cls(rank=d.get("r", 4), alpha=d.get("lora_alpha", 16.0),
                   dropout=d.get("lora_dropout", 0.0), target_modules=tuple(tm),
                   fan_in_fan_out=d.get("fan_in_fan_out") or False)


@dataclass
class LoraAdapter:
    """The factors of one LoRA expert, keyed by module path in the base model.

    ``A[m]``: (r, in_features), ``B[m]``: (out_features, r); ``ΔW[m] = spec.scaling · B[m] @ A[m]``. A spec whose
    targets are still a request (``attention``, ``all-linear``) is given the layer names of the factors.
    """

    spec: LoraSpec
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    base_model_name: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.spec.resolved and self.A:   # a request (``attention``): the factors say which layers it became
            self.spec = dataclasses.replace(self.spec, target_modules=tuple({m.rsplit(".", 1)[-1] for m in self.A}))
        self.validate()

    @property
    def modules(self) -> list[str]:
        """Sorted module paths this adapter modifies."""
        return sorted(self.A)

    def validate(self, name: str = "adapter") -> None:
        """Check that factors pair up, have the spec's rank and are finite."""
        if set(self.A) != set(self.B):
            missing = sorted(set(self.A) ^ set(self.B))[:3]
            raise AdapterError(f"{name}: lora_A and lora_B cover different modules (e.g. {missing})")
        if not self.A:
            raise AdapterError(f"{name}: adapter has no LoRA weights")
        for m in self.A:
            a, b = self.A[m], self.B[m]
            if a.ndim != 2 or b.ndim != 2:
                raise AdapterError(f"{name}: module {m}: lora_A/lora_B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
            if a.shape[0] != self.spec.rank or b.shape[1] != self.spec.rank:
                raise AdapterError(
                    f"{name}: module {m}: rank mismatch, config r={self.spec.rank} but lora_A is "
                    f"{tuple(a.shape)} and lora_B is {tuple(b.shape)}")
            if max(a.shape[1], b.shape[0]) > MAX_FEATURES:
                raise AdapterError(f"{name}: module {m}: absurd feature size {tuple(a.shape)} / {tuple(b.shape)}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"{name}: module {m}: weights contain NaN or Inf")

    def delta_weight(self, module: str) -> torch.Tensor:
        """Dense ``ΔW = s · B A`` (out × in) for one module. For references and merging only."""
        return self.spec.scaling * (self.B[module].float() @ self.A[module].float())

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.A.values()) + sum(t.numel() for t in self.B.values())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraAdapter:
        conv = {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()}
        convb = {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()}
        return LoraAdapter(self.spec, conv, convb, self.base_model_name, dict(self.extra_config))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's saved key names (each its own storage: safetensors refuses shared memory, e.g. one
        factor reused by two modules)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for m in self.modules:
            for which, factors in (("A", self.A), ("B", self.B)):
                t = factors[m].detach().float().contiguous().cpu()
                if t.untyped_storage().data_ptr() in seen:
                    t = t.clone()
                seen.add(t.untyped_storage().data_ptr())
                out[f"{PEFT_PREFIX}{m}.lora_{which}.weight"] = t
        return out

    def peft_config(self) -> dict[str, Any]:
        """An ``adapter_config.json`` dict that ``peft.LoraConfig`` accepts; ``base_model_name_or_path`` is the
        base's Hub id where it has one (:func:`modlora.models.hub_id`: the default model's GGUF names its origin
        ``HuggingFaceTB/SmolLM2-135M-Instruct``), so ``AutoPeftModelForCausalLM`` finds the base."""
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": hub_id(self.base_model_name) or self.base_model_name,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": self.spec.dropout,
            "target_modules": sorted(self.spec.target_modules),
            "bias": "none",
            "fan_in_fan_out": self.spec.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        cfg.update(self.extra_config)
        return cfg

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write a PEFT adapter directory atomically; returns its path. An existing ``directory`` is refused unless
        ``overwrite``, and even then only an empty directory or another adapter directory is replaced."""
        directory = Path(directory)
        with output_directory(directory, overwrite=overwrite, error=AdapterError) as tmp:
            write_adapter_files(self, tmp)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, name: str | None = None) -> LoraAdapter:
        """Read and validate a PEFT LoRA adapter directory."""
        return load_adapter(directory, name=name)


@contextlib.contextmanager
def output_directory(directory: Path, *, overwrite: bool, error: type[ModloraError]) -> Iterator[Path]:
    """:func:`~modlora.io.atomic_directory` for an adapter written where the user asked (``--out``): an existing
    path raises ``error`` unless ``overwrite``, and ``overwrite`` replaces only an empty directory or an adapter
    directory (one holding ``adapter_config.json``), never a file or another directory's contents."""
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise error(f"{directory} already exists (pass overwrite / --overwrite to replace it)")
        if directory.is_symlink() or not directory.is_dir():
            raise error(f"{directory} exists and is not a directory; refusing to replace it")
        if any(directory.iterdir()) and not (directory / ADAPTER_CONFIG).is_file():
            raise error(f"{directory} is a non-empty directory that does not hold an adapter; refusing to replace it")
    try:
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            yield tmp
    except FileExistsError:
        raise error(f"{directory} already exists (created meanwhile; pass overwrite to replace it)") from None
    except (NotADirectoryError, PermissionError, IsADirectoryError) as exc:
        raise error(f"cannot write {directory}: {exc.strerror or exc}") from None


def write_adapter_files(adapter: LoraAdapter, directory: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing directory."""
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter.peft_config(), indent=2, sort_keys=True) + "\n")
    # serialise in memory and write through atomic_write_bytes: save_file creates the file owner-only (0600)
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, save(adapter.peft_state_dict(), metadata={"format": "pt"}))


def _peft_lora_fields() -> set[str]:
    """The fields ``peft.LoraConfig`` defines (an adapter_config.json may hold only these)."""
    from peft import LoraConfig
    return {f.name for f in dataclasses.fields(LoraConfig)}


#: ``adapter_config.json`` fields that describe the adapter or only its training (nothing in ``ΔW`` once trained)
_DESCRIPTIVE_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "ensure_weight_tying"})
#: the fields modlora applies, as PEFT does (``target_modules`` as layer names, ``use_rslora`` as ``α·√r``,
#: ``fan_in_fan_out`` as the layout of the checkpoint's layers, which PEFT sets from the layer type in any case)
_APPLIED_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights",
                             "fan_in_fan_out"})
#: initialisations that leave the base weights and LoRA's forward as they are (PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA
#: move part of the base weights into the adapter; MiCA is a LoRA variant): only these can be applied to the base
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal"})
#: every other field changes what the adapter computes unless it holds its "off" value: this one, or None, false,
#: "" and an empty list or object
_OFF_VALUES = {"bias": "none"}
_LAYER_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


def _is_off(field_name: str, value: Any) -> bool:
    if field_name in _OFF_VALUES:
        return value == _OFF_VALUES[field_name]
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def read_adapter_config(directory: Path, name: str) -> tuple[LoraSpec, dict[str, Any]]:
    """Parse and validate ``adapter_config.json``; returns the spec and the raw dict. The file may be a symbolic
    link (a Hugging Face cache snapshot links into its blobs) but must be a regular file."""
    path = directory / ADAPTER_CONFIG
    return parse_adapter_config(_read_adapter_file(path, name), path, name)


def _read_adapter_file(path: Path, name: str) -> bytes:
    """The bytes of one adapter file (a symbolic link is followed, a Hugging Face cache snapshot links into its
    blobs, but the file must be regular); :class:`AdapterError` naming the expert and the file otherwise."""
    try:
        return read_regular_file(path, follow_symlinks=True)
    except FileNotFoundError:
        raise AdapterError(f"{name}: missing {path}") from None
    except OSError as exc:
        raise AdapterError(f"{name}: cannot read {path} ({exc.strerror or exc})") from None


def parse_adapter_config(data: bytes, path: Path, name: str) -> tuple[LoraSpec, dict[str, Any]]:
    """Validate the bytes of ``adapter_config.json`` (read from ``path``) as PEFT would apply them: ``r``,
    ``lora_alpha``, ``lora_dropout``, ``target_modules`` (a list of layer names; PEFT's regular-expression string
    and path suffixes are refused) and ``use_rslora`` (scaling ``α/√r``: the spec gets ``α·√r``) are applied; fields
    that only describe the adapter or its training are accepted; every other field must hold its "off" value, or the
    adapter is refused naming it (DoRA, per-module ranks, layer subsets, biases, saved modules, initialisations
    that change the base weights, other LoRA variants). Returns the spec and the raw dict."""
    try:
        raw = parse_json(data)
    except ValueError as exc:
        raise AdapterError(f"{name}: {path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{name}: {path} must hold a JSON object")
    unexpected = sorted(set(raw) - _peft_lora_fields())
    if unexpected:
        raise AdapterError(f"{name}: {path}: unexpected field(s) {unexpected[:5]} (not LoraConfig fields)")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{name}: {path}: field 'peft_type' is {peft_type!r}; only LORA adapters are supported")
    for field_name, value in sorted(raw.items()):
        if field_name not in _DESCRIPTIVE_FIELDS and field_name not in _APPLIED_FIELDS and not _is_off(field_name, value):
            raise AdapterError(f"{name}: {path}: field {field_name!r} is {_short(value)}: modlora applies plain LoRA "
                               "and would compute something other than PEFT; refusing the adapter")
    init = raw.get("init_lora_weights", True)
    if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() in _PLAIN_INITS)):
        raise AdapterError(f"{name}: {path}: field 'init_lora_weights' is {_short(init)}: that initialisation changes "
                           "the base model's weights or LoRA's forward, so the adapter does not apply to the base as is")
    rslora = raw.get("use_rslora", False)
    if rslora is not None and not isinstance(rslora, bool):
        raise AdapterError(f"{name}: {path}: field 'use_rslora' must be true or false, got {_short(rslora)}")
    fan_in_fan_out = raw.get("fan_in_fan_out", False)
    if fan_in_fan_out is not None and not isinstance(fan_in_fan_out, bool):
        raise AdapterError(f"{name}: {path}: field 'fan_in_fan_out' must be true or false, got {_short(fan_in_fan_out)}")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(f"{name}: {path}: field 'target_modules' is the string {_short(targets)}, which PEFT "
                           "matches as a regular expression against whole module paths; list the layer names instead")
    if isinstance(targets, list) and not all(isinstance(t, str) and _LAYER_NAME_RE.match(t) and t != ATTENTION
                                             for t in targets):
        raise AdapterError(f"{name}: {path}: field 'target_modules' must list layer names such as 'q_proj' (no '.' "
                           f"paths or patterns), got {_short(targets)}")
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{name}: {path}: field 'base_model_name_or_path' must be a string, got {base!r}")
    try:
        spec = LoraSpec.from_dict(raw)
        if rslora:   # PEFT scales by α/√r: the same ΔW as plain LoRA with α·√r
            spec = dataclasses.replace(spec, alpha=spec.alpha * math.sqrt(spec.rank))
    except AdapterError as exc:
        raise AdapterError(f"{name}: {path}: {exc}{' (use_rslora: α·√r)' if rslora else ''}") from None
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{name}: {path}: bad field type ({exc})") from None
    return spec, raw


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def load_adapter(directory: str | os.PathLike[str], *, name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA directory; every problem raises :class:`AdapterError` naming the file. Its files may be
    symbolic links (see :func:`read_adapter_config`) but must be regular files."""
    directory = Path(directory)
    name = name or directory.name
    spec, raw = read_adapter_config(directory, name)
    wpath = directory / ADAPTER_WEIGHTS
    return adapter_from_weights(spec, raw, _read_adapter_file(wpath, name), wpath, name)


def adapter_from_weights(spec: LoraSpec, config: Mapping[str, Any], weights: bytes, wpath: Path, name: str
                         ) -> LoraAdapter:
    """Build a validated adapter from a parsed config and the bytes of ``adapter_model.safetensors`` (read from
    ``wpath``). Tensors must be floating point; they are held as float32."""
    try:
        tensors = load_safetensors_bytes(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise AdapterError(f"{name}: cannot read {wpath}: {exc}") from None
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        mt = PEFT_KEY_RE.match(key)
        if mt is None:
            raise AdapterError(f"{name}: {wpath}: unexpected tensor key {key!r}")
        if not t.is_floating_point():
            raise AdapterError(f"{name}: {wpath}: tensor {key!r} has dtype {t.dtype}; LoRA weights must be floating "
                               "point")
        (A if mt["which"] == "A" else B)[mt["module"]] = t.float()
    try:
        return LoraAdapter(spec, A, B, config.get("base_model_name_or_path"))
    except AdapterError as exc:
        raise AdapterError(f"{name}: {wpath}: {exc}") from None


def adapter_problems(adapter: LoraAdapter, base_shapes: Mapping[str, tuple[int, int]] | None) -> list[str]:
    """What a later command would trip over, one message per problem (empty: consistent).

    * every tensor's module is listed in the config's ``target_modules`` (by its last name component; PEFT ignores
      tensors of other modules), and every ``target_modules`` name matches some tensor;
    * with ``base_shapes`` (module path → (out_features, in_features) of the base model's linear layers): every
      module exists in the base model and has ``A`` (r, in) and ``B`` (out, r) of its shape, and every base linear
      layer that ``target_modules`` names has its tensors.
    """
    problems: list[str] = []
    targets = set(adapter.spec.target_modules)
    leaves = {m.rsplit(".", 1)[-1] for m in adapter.modules}
    stray = sorted(m for m in adapter.modules if m.rsplit(".", 1)[-1] not in targets)
    if stray:
        problems.append(f"tensors for module(s) {stray[:3]} whose names are not in the config's target_modules "
                        f"{sorted(targets)}")
    unused = sorted(targets - leaves)
    if unused:
        problems.append(f"config target_modules {unused} match no tensor")
    if base_shapes is None:
        return problems
    for m in adapter.modules:
        shape = base_shapes.get(m)
        if shape is None:
            problems.append(f"module {m} does not exist in the base model (no linear layer of that name)")
            continue
        out_f, in_f = shape
        a, b = adapter.A[m], adapter.B[m]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            problems.append(f"module {m}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                            f"layer ({out_f} out × {in_f} in: expected A (r, {in_f}) and B ({out_f}, r))")
    missing = sorted(m for m in base_shapes if m.rsplit(".", 1)[-1] in targets and m not in adapter.A)
    if missing:
        problems.append(f"no tensors for {len(missing)} base layer(s) that target_modules names, e.g. {missing[:3]}")
    return problems


def adapted_modules(model: torch.nn.Module, target_modules: Iterable[str]) -> list[str]:
    """Module paths of the linear layers a ``target_modules`` request adapts in ``model`` (layer names, matched by
    the last component of the path, or ``attention`` / ``all-linear``; :func:`modlora.models.target_layers`);
    :class:`AdapterError` listing the model's linear layers when a name matches none."""
    try:
        return list(target_layers(model, tuple(target_modules)).modules)
    except ModelLoadError as exc:
        raise AdapterError(str(exc)) from None


def resolve_spec(model: torch.nn.Module, spec: LoraSpec) -> LoraSpec:
    """``spec`` with ``target_modules`` resolved against ``model`` to the layer names it adapts there and
    ``fan_in_fan_out`` set from those layers (:func:`modlora.models.target_layers`); :class:`AdapterError` listing
    the model's linear layers when the request names a layer the model does not have. Call it before training."""
    try:
        layers = target_layers(model, spec.target_modules)
    except ModelLoadError as exc:
        raise AdapterError(str(exc)) from None
    return dataclasses.replace(spec, target_modules=layers.names, fan_in_fan_out=layers.fan_in_fan_out)


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, adapter: LoraAdapter, weight: float = 1.0, *, name: str = "adapter") -> None:
    """In place: ``W[m] += weight · s · B A`` for every module of the adapter (``weight=-1`` undoes it).

    Every ``ΔW`` is checked (shape, and finite in the weights' dtype) before any weight changes, so a refused
    adapter (:class:`AdapterError` naming ``name`` and the module) leaves the model untouched."""
    modules = dict(model.named_modules())
    for apply in (False, True):     # check every module first (ΔW recomputed, not kept: it can be large), then apply
        for m in adapter.modules:
            lin = modules.get(m)
            if not isinstance(lin, torch.nn.Linear):
                raise AdapterError(f"{name}: module {m!r} is not a linear layer of the model")
            dw = adapter.delta_weight(m)
            if dw.shape != lin.weight.shape:
                raise AdapterError(f"{name}: module {m!r}: ΔW shape {tuple(dw.shape)} != weight "
                                   f"{tuple(lin.weight.shape)}")
            dw = dw.to(device=lin.weight.device, dtype=lin.weight.dtype)
            if apply:
                lin.weight.add_(dw, alpha=weight)
            elif not torch.isfinite(dw * weight).all():
                raise AdapterError(f"{name}: module {m!r}: ΔW = s·B·A is not finite in {lin.weight.dtype} (weights "
                                   "too large)")


@dataclass
class MergedWeights:
    """An adapter merged into a model's weights, with the original weights of its modules kept (on the CPU) so that
    :meth:`restore` puts them back bit-exactly (subtracting ΔW again would be exact only up to float rounding)."""

    model: torch.nn.Module
    originals: dict[str, torch.Tensor]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the original weights back (idempotent)."""
        modules = dict(self.model.named_modules())
        for m, weight in self.originals.items():
            modules[m].weight.copy_(weight)
        self.originals = {}


def merge_adapter_restorably(model: torch.nn.Module, adapter: LoraAdapter, *, name: str = "adapter"
                             ) -> MergedWeights:
    """:func:`merge_adapter` (``W[m] += s · B A``, checked first), keeping the original weights for a bit-exact
    :meth:`MergedWeights.restore`."""
    modules = dict(model.named_modules())
    originals = {m: modules[m].weight.detach().to("cpu", copy=True) for m in adapter.modules
                 if isinstance(modules.get(m), torch.nn.Linear)}
    merge_adapter(model, adapter, name=name)
    return MergedWeights(model, originals)


@contextlib.contextmanager
def adapter_merged(model: torch.nn.Module, adapter: LoraAdapter, *, name: str = "adapter"
                   ) -> Iterator[torch.nn.Module]:
    """``model`` with ``adapter`` merged into its weights for the ``with`` block, restored bit-exactly after."""
    merged = merge_adapter_restorably(model, adapter, name=name)
    try:
        yield model
    finally:
        merged.restore()


def random_adapter(model: torch.nn.Module, spec: LoraSpec, *, seed: int = 0, std: float = 0.02,
                   base_model_name: str | None = None) -> LoraAdapter:
    """An adapter with Gaussian A and B for every targeted linear layer (tests and benchmarks)."""
    spec = resolve_spec(model, spec)
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name in adapted_modules(model, spec.target_modules):
        lin = dict(model.named_modules())[name]
        A[name] = torch.randn(spec.rank, lin.in_features, generator=g) * std
        B[name] = torch.randn(lin.out_features, spec.rank, generator=g) * std
    return LoraAdapter(spec, A, B, base_model_name)
