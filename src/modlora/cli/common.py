"""What every command shares: the console, argparse types that refuse bad values at parse time (numbers, devices,
paths to read and paths to write), the model, data and training argument groups, and the method flags generated from
the registry's ``Options`` dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from modlora.errors import ModloraError
from modlora.models import ATTENTION, DEFAULT_MODEL, check_device_name, target_request_problem
from modlora.reuse.methods import Registry
from modlora.reuse.methods.core import MethodOptions, ReuseMethod, TrainingDataOptions

console = Console(soft_wrap=True)


class UsageError(ModloraError):
    """A command-line option that does not fit the command (reported like an argparse error, exit status 2)."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the option at fault (``modlora build: error: argument
    --device: ...``), exit status 2; the usage itself is what ``--help`` shows."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ------------------------------------------------------------------------------------------- parse-time types
def _number(kind: Callable[[str], Any], text: str, ok: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def int_at_least(least: int) -> Callable[[str], int]:
    """An argparse type for integers >= ``least`` (a bound that lives with the value it checks, e.g.
    :attr:`modlora.data.PromptLimits.MIN_PROMPT_TOKENS`)."""
    return lambda text: _number(int, text, lambda v: v >= least, f"an integer >= {least}")


def nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: 0 < v < float("inf"), "a positive number")


def fraction(text: str) -> float:
    return _number(float, text, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def open_fraction(text: str) -> float:
    return _number(float, text, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")


def k_or_auto(text: str) -> int | str:
    """``--k``: 'auto' or an integer >= 1."""
    return text if text == "auto" else _number(int, text, lambda v: v >= 1, "an integer >= 1 or 'auto'")


def clusters_or_auto(text: str) -> int | str:
    """``cluster --k``: 'auto' or a number of clusters >= 2."""
    return text if text == "auto" else _number(int, text, lambda v: v >= 2, "an integer >= 2 or 'auto'")


def name_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of non-empty names (``--targets q_proj,v_proj``)."""
    names = tuple(t.strip() for t in text.split(","))
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def target_list(text: str) -> tuple[str, ...]:
    """``--targets``: ``attention``, ``all-linear`` or comma-separated layer names (checked against the model once
    it loads, :func:`modlora.models.target_layers`)."""
    names = name_list(text)
    if problem := target_request_problem(names):
        raise argparse.ArgumentTypeError(problem)
    return names


def device_name(text: str) -> str:
    """``--device``: a device by name (:data:`modlora.models.DEVICE_NAME_RE`); whether this machine has it is checked
    by :func:`check_device` before the model loads (torch is not imported while parsing)."""
    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_device(args: argparse.Namespace) -> None:
    """Refuse a ``--device`` this machine does not have (no CUDA, an index beyond its GPUs) before anything loads."""
    if getattr(args, "device", None) is not None:
        from modlora.models import resolve_device
        resolve_device(args.device)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(path: Path) -> str | None:
    """What is at ``path`` (links followed): 'a directory', 'a file', 'a FIFO', ...; None when nothing is."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror or exc}") from None
    return next((what for is_kind, what in _KINDS if is_kind(mode)), "a special file")


def input_file(text: str) -> Path:
    """A path to read: an existing regular file (a directory, FIFO or device is refused here, never waited on)."""
    path = Path(text)
    kind = _kind(path)
    if kind is None:
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if kind != "a file":
        raise argparse.ArgumentTypeError(f"{text} is {kind}, not a regular file")
    return path


def input_directory(text: str) -> Path:
    """A directory to read: it must exist and be a directory."""
    path = Path(text)
    kind = _kind(path)
    if kind != "a directory":
        raise argparse.ArgumentTypeError(f"{text}: no such directory" if kind is None
                                         else f"{text} is {kind}, not a directory")
    return path


def _creatable(path: Path, text: str) -> None:
    """``path`` can be created: its nearest existing folder is a directory this process may write into."""
    folder = path.absolute().parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {folder} is not writable")


def _output(text: str, want: str, refusal: str) -> Path:
    """A path to write: absent (and creatable) or already ``want`` ('a file', 'a directory'); anything else refused."""
    path = Path(text)
    kind = _kind(path)
    if kind is not None and kind != want:
        raise argparse.ArgumentTypeError(f"{text} is {kind}, {refusal}")
    _creatable(path, text)
    return path


def output_file(text: str) -> Path:
    """A file to write: absent (and creatable) or a regular file; a directory, FIFO or device there is refused."""
    return _output(text, "a file", "not a file to write")


def output_directory(text: str) -> Path:
    """A directory to write into: absent (and creatable) or a directory; a file or FIFO there is refused."""
    return _output(text, "a directory", "not a directory")


def directory_name(text: str) -> str:
    """One directory name (``--sni-split heldout``): no path separator, not ``.`` or ``..``."""
    if not text or "/" in text or os.sep in text or text in (".", "..") or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected one directory name (no '/', not '.' or '..'), got {text!r}")
    return text


def model_spec(text: str) -> str:
    """``--model``: the embedded default, an HF id, or a local path (absolute, ``./``, ``../``, ``~``, or anything that
    exists), which must be a ``.gguf`` file or a directory holding ``config.json``."""
    path = Path(text).expanduser()
    if not (text.startswith(("/", "./", "../", "~")) or text in (".", "..") or os.path.lexists(path)):
        return text   # an HF id (ORG/NAME) or the embedded default
    kind = _kind(path)
    if kind is None:
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory (an HF id has the form ORG/NAME)")
    if path.suffix == ".gguf":
        if kind != "a file":
            raise argparse.ArgumentTypeError(f"{text} is {kind}, not a GGUF file")
    elif kind != "a directory":
        raise argparse.ArgumentTypeError(f"{text} is {kind}, not a .gguf file or an HF model directory")
    elif _kind(path / "config.json") != "a file":
        raise argparse.ArgumentTypeError(f"{text} is not an HF model directory (no config.json file)")
    return text


def _wrap(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """An Options field's parser as an argparse type (its ValueError becomes a usage error)."""
    def parse(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


# ------------------------------------------------------------------------------------------------- model args
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", type=model_spec, default=DEFAULT_MODEL,
                   help=f"base model: {DEFAULT_MODEL!r} (embedded default), an HF id, a local HF directory or a "
                        ".gguf file")
    g.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:N, mps, xpu or xpu:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (default auto: float32 on CPU, bfloat16 on CUDA); bfloat16 is about 2x "
                        "faster on CPUs with AVX512-BF16/AMX")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")


def load_model(args: argparse.Namespace) -> Any:
    """The base model of ``--model/--device/--dtype``, after applying ``--threads`` (the device checked first)."""
    import torch

    from modlora.models import load_base_model
    check_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_base_model(args.model, device=args.device, dtype=args.dtype)


# -------------------------------------------------------------------------------------------------- data args
def add_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=input_directory, default=None,
                   help="data root holding sni/tasks, sni/heldout and eval/ (default $MODLORA_DATA or "
                        "../shared/data)")


def data_root(args: argparse.Namespace) -> Path:
    """``--data`` (or the default data root); a directory of task files instead of a root gets a clear error."""
    from modlora.data import default_data_dir
    root = default_data_dir(args.data)
    if args.data is not None and not (root / "sni").is_dir() and not (root / "eval").is_dir():
        hint = " (it holds task files: pass the folder above sni/tasks)" if any(root.glob("*.json*")) else ""
        raise UsageError(f"--data {args.data}: not a data root with sni/ or eval/{hint}")
    return root


def add_task_source_args(p: argparse.ArgumentParser) -> None:
    add_data_arg(p)
    p.add_argument("--flat", type=input_file, default=None,
                   help="read tasks from a flat JSONL file {task_name, source, target} instead of SNI files")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA and optimisation (paper defaults)")
    g.add_argument("--rank", type=positive_int, default=4, help="LoRA rank r (default 4)")
    g.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha; scaling = alpha/r (default 16)")
    g.add_argument("--dropout", type=fraction, default=0.05, help="LoRA dropout (default 0.05)")
    g.add_argument("--targets", type=target_list, default=(ATTENTION,),
                   help="which linear layers LoRA adapts: 'attention' (default: the architecture's attention "
                        "projections, e.g. q_proj,k_proj,v_proj,o_proj for Llama, q_proj,k_proj,v_proj,dense for "
                        "Phi-2, qkv_proj,o_proj for Phi-3), 'all-linear' (every linear layer but the output layer), "
                        "or comma-separated layer names; checked against the model before training")
    g.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=positive_float, default=1.0, help="epochs over the training split (default 1)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="examples per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--warmup", type=fraction, default=0.06, help="linear warm-up fraction of steps (default 0.06)")
    g.add_argument("--eval-every", type=positive_int, default=None,
                   help="validate every N steps (default: 4 times per run)")
    g.add_argument("--max-examples", type=positive_int, default=None, help="cap on training examples per task")
    g.add_argument("--max-val", type=positive_int, default=32, help="validation examples per task (default 32)")
    from modlora.data import TRUNCATE_MODES, PromptLimits
    g.add_argument("--max-prompt-tokens", type=int_at_least(PromptLimits.MIN_PROMPT_TOKENS),
                   default=PromptLimits.max_prompt_tokens,
                   help=f"prompts longer than this are cut as --truncate says (default {PromptLimits.max_prompt_tokens})")
    g.add_argument("--truncate", choices=TRUNCATE_MODES, default=PromptLimits.truncate,
                   help="how a long prompt is cut: left (keep its last tokens; the task definition goes first) or "
                        f"input (keep the definition, cut the end of the instance input); default {PromptLimits.truncate}")
    g.add_argument("--max-target-tokens", type=int_at_least(PromptLimits.MIN_TARGET_TOKENS),
                   default=PromptLimits.max_target_tokens,
                   help=f"targets are cut to this length (default {PromptLimits.max_target_tokens})")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed for the split, sampling and initialisation (default 0)")
    from modlora.build.initialisation import DEFAULT_INIT, INIT_METHODS
    g.add_argument("--init", choices=INIT_METHODS, default=DEFAULT_INIT,
                   help="how each expert's A starts (B = 0): shared (one seeded draw for all), per-expert (a seed "
                        "per expert), eva (top principal directions of the expert's layer inputs, PEFT's EVA), "
                        f"gradient (top singular directions of its full-weight gradient); default {DEFAULT_INIT}")


def lora_spec(args: argparse.Namespace) -> Any:
    from modlora.library.adapters import LoraSpec
    return LoraSpec(rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=tuple(args.targets))


def prompt_limits(args: argparse.Namespace) -> Any:
    """The :class:`modlora.data.PromptLimits` of ``--max-prompt-tokens``, ``--max-target-tokens`` and ``--truncate``
    (each already checked against its bound by its argparse type)."""
    from modlora.data import PromptLimits
    return PromptLimits(args.max_prompt_tokens, args.max_target_tokens, args.truncate)


def train_config(args: argparse.Namespace) -> Any:
    from modlora.build.training import TrainConfig
    return TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, warmup_ratio=args.warmup, eval_every=args.eval_every, seed=args.seed)


def task_dir(args: argparse.Namespace) -> str | None:
    """The SNI training-task directory of ``--data`` (``None`` with ``--flat``)."""
    return None if getattr(args, "flat", None) else str(data_root(args) / "sni" / "tasks")


def check_task_names(names: Sequence[str], known: Sequence[str], where: str) -> None:
    """Refuse unknown task names up front, suggesting the closest known ones."""
    missing = [n for n in names if n not in set(known)]
    if missing:
        hints = []
        for n in missing[:5]:
            close = difflib.get_close_matches(n, known, n=2, cutoff=0.6)
            hints.append(f"{n}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise UsageError(f"unknown task(s) in {where}: {', '.join(hints)}")


LOCATION_HELP = ("a library directory, or a location: file://, hf://ORG/REPO[@REVISION], or any fsspec URL "
                 "(s3://, gs://, memory://, ...); remote libraries are read-only and download experts lazily")


def add_library_arg(p: argparse.ArgumentParser, *, option: bool = False, writes: bool = False,
                    help: str | None = None) -> None:
    """The library argument (positional ``library``, or ``--library`` with ``option``). A command that only reads it
    accepts any location of :mod:`modlora.library.location` and ``--revision``; one that ``writes`` needs a local directory."""
    text = help or ("library directory" if writes else LOCATION_HELP)
    if option:
        p.add_argument("--library", default=None, help=text)
    else:
        p.add_argument("library", help=text)
    if not writes:
        p.add_argument("--revision", default=None,
                       help="revision of an hf:// library: a branch, tag or commit (default: the URL's, else main)")


def open_library(location: str | os.PathLike[str], revision: str | None = None, *, writes: bool = False) -> Any:
    """The library a command works on: ``open_library(location, revision=...)``. A command that changes the
    library (``writes``) is refused a remote location up front, with the way to get a local copy."""
    from modlora.library import remote
    from modlora.library.location import is_url
    if writes and is_url(os.fspath(location)) and not os.fspath(location).startswith("file://"):
        raise UsageError(f"{location} is a remote library, which is read-only: `modlora pull {location} DIR` makes a "
                         "local copy to change")
    return remote.open_library(location, revision=revision)


# ----------------------------------------------------------------------------- method flags from the registry
#: Option fields whose flag names what they route: a bare ``--top-k`` / ``--temperature`` means sampling elsewhere.
ROUTING_FLAGS = {"top_k": "--route-top-k", "temperature": "--route-temperature"}


def option_flag(field_name: str) -> str:
    """The flag of a method option field: ``drop_rate`` → ``--drop-rate``, ``top_k`` → ``--route-top-k``."""
    return ROUTING_FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def _option_fields(methods: Sequence[type[ReuseMethod]]) -> dict[str, list[tuple[type[ReuseMethod], Any]]]:
    out: dict[str, list[tuple[type[ReuseMethod], Any]]] = {}
    for m in methods:
        for f in dataclasses.fields(m.Options):
            if f.metadata.get("cli", {}).get("flag", True):
                out.setdefault(f.name, []).append((m, f))
    return out


def _describe_default(value: Any) -> str:
    if value is None or value == ():
        return "-"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_method_args(p: argparse.ArgumentParser, registry: Registry, methods: Sequence[str], *,
                    default: str | None, help: str, required: bool = False) -> None:
    """``--method`` over ``methods`` and one flag per option field of their ``Options`` (:func:`option_flag`; a
    field shared by several methods is one flag; its help lists the methods and their defaults)."""
    classes = [registry.get(n) for n in methods]
    g = p.add_argument_group("method (see `modlora.reuse.methods`)")
    g.add_argument("--method", choices=list(methods), default=default, required=required, help=help,
                   metavar="METHOD")
    for name, owners in sorted(_option_fields(classes).items(), key=lambda item: option_flag(item[0])):
        f0 = owners[0][1]
        cli = dict(f0.metadata.get("cli", {}))
        defaults = {m.name: _describe_default(f.default) for m, f in owners}
        where = ", ".join(defaults) if len(owners) < len(classes) else "all methods"
        if len(set(defaults.values())) == 1:
            shown = f"default {next(iter(defaults.values()))}"
        else:
            shown = "default " + "; ".join(f"{m} {d}" for m, d in defaults.items())
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS,
                                  "help": f"{f0.metadata.get('help', '')} [{where}; {shown}]"}
        if isinstance(f0.default, bool):
            kwargs["action"] = "store_true"
        else:
            if "type" in cli:
                kwargs["type"] = _wrap(cli["type"])
            for key in ("choices", "nargs", "metavar"):
                if key in cli:
                    kwargs[key] = cli[key]
        g.add_argument(option_flag(name), dest=name, **kwargs)


def method_options(args: argparse.Namespace, registry: Registry, name: str, given_from: Sequence[str]
                   ) -> MethodOptions:
    """The chosen method's validated options from the flags given on the command line.

    ``given_from``: every method the command offers (their flags are all defined); a flag of another method that
    does not apply to ``name`` is refused rather than ignored."""
    method = registry.get(name)
    own = {f.name for f in dataclasses.fields(method.Options)}
    values: dict[str, Any] = {}
    for field_name, owners in _option_fields([registry.get(n) for n in given_from]).items():
        if not hasattr(args, field_name):
            continue
        if field_name not in own:
            users = ", ".join(m.name for m, _ in owners)
            raise UsageError(f"{option_flag(field_name)} does not apply to {name!r} (it is an option of: "
                             f"{users})")
        value = getattr(args, field_name)
        values[field_name] = tuple(value) if isinstance(value, list) else value
    if issubclass(method.Options, TrainingDataOptions):
        values["task_dir"] = str(data_root(args) / "sni" / "tasks")
    return method.options_from(values)
