"""The expert library: a directory of PEFT adapters plus a JSON manifest.

Layout::

    LIB/
      library.json                     manifest (format, version, base model identity, experts, files' checksums)
      .lock                            flock(2) lock file serialising writers across processes
      experts/<name>/adapter_config.json
      experts/<name>/adapter_model.safetensors
      artifacts/<kind>/<name>.safetensors   per-expert auxiliary tensors (e.g. Arrow prototypes)
      meta/<key>.json                  library-level JSON artifacts (e.g. the MBC clustering)

Every write is atomic: an expert directory is written to a temporary sibling, fsync'ed and renamed into place, and
only then is the manifest replaced (temp file + fsync + rename) under the lock. A crash at any point leaves a
library that opens and holds every expert whose manifest entry was written; an expert directory without a manifest
entry (a crash between the two renames) is ignored and overwritten by the next write of that name.
Readers load an expert under a shared ``flock`` of the same lock file, so a reader racing a writer that overwrites
an expert sees either the old or the new version, never a mix or a missing file (see :meth:`ExpertLibrary.get`).
The manifest's ``base_model`` also records the base model's linear-layer shapes, so that imports and ``verify``
check every expert's tensors against the base without loading it.
Every file is read through :func:`~modlora.io.read_regular_file` and the lock file opened through
:func:`~modlora.io.open_regular_file`: a symbolic link, FIFO or device where a library file should be is refused with
an error naming it, never followed out of the library or waited on.
No pickle anywhere: tensors are safetensors, metadata is JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from modlora import __version__
from modlora.errors import AdapterError, BaseModelMismatchError, LibraryError
from modlora.io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    file_lock,
    parse_json,
    read_regular_file,
    sha256_file,
    shared_file_lock,
)
from modlora.library.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_KEY_RE,
    LoraAdapter,
    LoraSpec,
    adapter_from_weights,
    adapter_problems,
    load_adapter,
    output_directory,
    parse_adapter_config,
    write_adapter_files,
)
from modlora.models import BaseModelInfo

MANIFEST = "library.json"
FORMAT = "modlora-library"
FORMAT_VERSION = 1
LOCK = ".lock"
EXPERTS_DIR = "experts"
ARTIFACTS_DIR = "artifacts"
META_DIR = "meta"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,127}$")
_MANIFEST_FIELDS = {"format", "version", "modlora_version", "base_model", "description", "created", "experts"}
_EXPERT_FIELDS = {"name": str, "tasks": list, "lora": dict, "training": dict, "metrics": dict,
                  "created": (int, float), "files": dict, "num_parameters": int, "modules": int}


@contextlib.contextmanager
def library_lock(root: Path, *, shared: bool = False) -> Iterator[bool]:
    """The lock of the library at ``root``: exclusive for a writer (:func:`~modlora.io.file_lock`), shared for a
    reader (:func:`~modlora.io.shared_file_lock`; yields False in a read-only library). A lock file that cannot be
    used (a symbolic link, FIFO, directory) raises :class:`LibraryError` naming it."""
    with contextlib.ExitStack() as stack:
        try:
            locked = stack.enter_context(shared_file_lock(root / LOCK) if shared else file_lock(root / LOCK))
        except OSError as exc:
            raise LibraryError(f"{root / LOCK}: cannot lock the library ({exc.strerror or exc})") from None
        yield locked is not False


def check_name(name: Any, what: str = "expert name") -> str:
    """Validate an expert/artifact name: letters, digits, ``_ . + -``; no path separators, no ``..``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise LibraryError(f"invalid {what} {name!r}: use letters, digits, '_', '.', '+', '-' (no '/', no '..')")
    return name


@dataclass
class ExpertEntry:
    """Manifest record of one expert."""

    name: str
    tasks: list[str]
    lora: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    num_parameters: int = 0
    modules: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": self.tasks, "lora": self.lora, "training": self.training,
                "metrics": self.metrics, "created": self.created, "files": self.files,
                "num_parameters": self.num_parameters, "modules": self.modules}

    @classmethod
    def from_dict(cls, key: str, d: Any, where: str) -> ExpertEntry:
        if not isinstance(d, dict):
            raise LibraryError(f"{where}: experts[{key!r}] must be an object")
        unexpected = sorted(set(d) - set(_EXPERT_FIELDS))
        if unexpected:
            raise LibraryError(f"{where}: expert {key!r}: unexpected field(s) {unexpected}")
        for fname, ftype in _EXPERT_FIELDS.items():
            if fname not in d:
                raise LibraryError(f"{where}: expert {key!r}: missing field {fname!r}")
            if not isinstance(d[fname], ftype) or isinstance(d[fname], bool):
                raise LibraryError(f"{where}: expert {key!r}: field {fname!r} has the wrong type "
                                   f"({type(d[fname]).__name__})")
        if d["name"] != key:
            raise LibraryError(f"{where}: expert {key!r}: field 'name' is {d['name']!r}")
        check_name(key)
        if not all(isinstance(t, str) for t in d["tasks"]):
            raise LibraryError(f"{where}: expert {key!r}: field 'tasks' must be a list of strings")
        if set(d["files"]) != {ADAPTER_CONFIG, ADAPTER_WEIGHTS} or not all(
                isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in d["files"].values()):
            raise LibraryError(f"{where}: expert {key!r}: field 'files' must map the two adapter files to sha256 digests")
        try:
            LoraSpec.from_dict(d["lora"])
        except (AdapterError, TypeError) as exc:
            raise LibraryError(f"{where}: expert {key!r}: field 'lora': {exc}") from None
        if not math.isfinite(d["created"]) or d["num_parameters"] < 0 or d["modules"] < 0:
            raise LibraryError(f"{where}: expert {key!r}: fields 'created'/'num_parameters'/'modules' out of range")
        return cls(**{k: d[k] for k in _EXPERT_FIELDS})


@dataclass
class VerifyProblem:
    expert: str
    problem: str


class ExpertLibrary:
    """A library of LoRA experts on disk (see the module docstring for the layout and guarantees)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._cache: dict[str, LoraAdapter] = {}
        self._manifest = self._read_manifest()

    # -- creation / opening -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], base_model: BaseModelInfo, *, exist_ok: bool = False,
               description: str = "") -> ExpertLibrary:
        """Create an empty library for ``base_model`` (or open an existing one for the same base if ``exist_ok``)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LibraryError(f"{path}: exists and is not a directory, so it cannot hold a library")
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise LibraryError(f"{path}: a library already exists here")
            lib = cls(path)
            lib.check_base_model(base_model)
            lib.record_linear_shapes(base_model)
            return lib
        if path.exists() and any(p.name != LOCK for p in path.iterdir()):
            raise LibraryError(f"{path}: directory exists and is not an empty library")
        try:
            path.mkdir(parents=True, exist_ok=True)
            with library_lock(path):
                if not (path / MANIFEST).exists():
                    atomic_write_json(path / MANIFEST, {
                        "format": FORMAT, "version": FORMAT_VERSION, "modlora_version": __version__,
                        "base_model": base_model.to_dict(), "description": description,
                        "created": time.time(), "experts": {}})
        except (NotADirectoryError, FileExistsError, PermissionError) as exc:
            raise LibraryError(f"{path}: cannot create a library here ({exc.strerror or exc})") from None
        return cls(path)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], base_model: BaseModelInfo) -> ExpertLibrary:
        return cls.create(path, base_model, exist_ok=True)

    def _read_manifest(self) -> dict[str, Any]:
        mpath = self.path / MANIFEST
        if self.path.exists() and not self.path.is_dir():
            raise LibraryError(f"{self.path}: is a file, not a library directory")
        if not self.path.is_dir():
            raise LibraryError(f"{self.path}: library directory not found")
        try:
            raw = parse_json(read_regular_file(mpath))
        except FileNotFoundError:
            raise LibraryError(f"{self.path}: not a modlora library (no {MANIFEST})") from None
        except IsADirectoryError:
            raise LibraryError(f"{mpath}: is a directory, not a manifest file") from None
        except OSError as exc:
            raise LibraryError(f"{mpath}: cannot read the manifest ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise LibraryError(f"{mpath}: manifest is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise LibraryError(f"{mpath}: manifest must be a JSON object")
        unexpected = sorted(set(raw) - _MANIFEST_FIELDS)
        if unexpected:
            raise LibraryError(f"{mpath}: unexpected manifest field(s) {unexpected}")
        if raw.get("format") != FORMAT:
            raise LibraryError(f"{mpath}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("version") != FORMAT_VERSION:
            raise LibraryError(f"{mpath}: field 'version' is {raw.get('version')!r}; this modlora reads version "
                               f"{FORMAT_VERSION}")
        try:
            base = BaseModelInfo.from_dict(raw.get("base_model"))
        except ValueError as exc:
            raise LibraryError(f"{mpath}: field 'base_model': {exc}") from None
        experts = raw.get("experts")
        if not isinstance(experts, dict):
            raise LibraryError(f"{mpath}: field 'experts' must be an object")
        entries = {}
        for key, val in experts.items():
            try:
                check_name(key)
            except LibraryError as exc:
                raise LibraryError(f"{mpath}: field 'experts': {exc}") from None
            entries[key] = ExpertEntry.from_dict(key, val, str(mpath))
        return {"raw": raw, "base": base, "entries": entries}

    def reload(self) -> None:
        """Re-read the manifest (other processes may have added experts)."""
        self._manifest = self._read_manifest()
        self._cache = {k: v for k, v in self._cache.items() if k in self._manifest["entries"]}

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def base_model(self) -> BaseModelInfo:
        return self._manifest["base"]

    @property
    def entries(self) -> dict[str, ExpertEntry]:
        return dict(self._manifest["entries"])

    def expert_names(self) -> list[str]:
        return sorted(self._manifest["entries"])

    def __len__(self) -> int:
        return len(self._manifest["entries"])

    def __contains__(self, name: object) -> bool:
        return name in self._manifest["entries"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.expert_names())

    def entry(self, name: str) -> ExpertEntry:
        try:
            return self._manifest["entries"][name]
        except KeyError:
            raise LibraryError(f"{self.path}: no expert named {name!r}") from None

    def tasks(self, name: str) -> list[str]:
        return list(self.entry(name).tasks)

    def task_to_expert(self) -> dict[str, str]:
        """Map each task to the expert trained on it (the last one listed wins if several)."""
        return {t: e.name for e in self._manifest["entries"].values() for t in e.tasks}

    def expert_dir(self, name: str) -> Path:
        check_name(name)
        return self.path / EXPERTS_DIR / name

    def _safe_file(self, name: str, fname: str) -> Path:
        """Path of an expert file, refusing symbolic links and anything resolving outside the library."""
        path = self.expert_dir(name) / fname
        root = self.path.resolve()
        for p in (self.expert_dir(name), path):
            if p.is_symlink():
                raise LibraryError(f"expert {name!r}: {p} is a symbolic link; refusing to follow it")
        if root not in path.resolve().parents:
            raise LibraryError(f"expert {name!r}: {path} resolves outside the library")
        return path

    def get(self, name: str) -> LoraAdapter:
        """Load (lazily, then cached) and validate one expert's adapter; checks the files' checksums.

        Concurrent writers never show a reader a mix of versions: the files are read under the library's shared
        lock (writers hold it exclusively while they swap an expert's directory and rewrite the manifest), their
        bytes are checked against the manifest's checksums and parsed from those same bytes. When this object's
        manifest is older than the files, the manifest is re-read (under the same lock) and the new version is
        returned. Without a usable lock file (a read-only library) a mismatch is retried a few times."""
        if name in self._cache:
            return self._cache[name]
        adapter = self._parse_expert(name, *self._read_expert_files(name))
        self._cache[name] = adapter
        return adapter

    def _parse_expert(self, name: str, config: bytes, weights: bytes) -> LoraAdapter:
        cpath, wpath = self.expert_dir(name) / ADAPTER_CONFIG, self.expert_dir(name) / ADAPTER_WEIGHTS
        try:
            spec, raw = parse_adapter_config(config, cpath, f"expert {name!r}")
            return adapter_from_weights(spec, raw, weights, wpath, f"expert {name!r}")
        except AdapterError as exc:
            raise LibraryError(str(exc)) from None

    def _read_expert_files(self, name: str, attempts: int = 20) -> tuple[bytes, bytes]:
        """The bytes of an expert's config and weights files, matching the manifest's checksums (see :meth:`get`);
        reloads the manifest when it is older than the files."""
        problem = ""
        for attempt in range(attempts):
            with library_lock(self.path, shared=True) as locked:
                entry = self.entry(name)
                data: dict[str, bytes] = {}
                for fname, digest in entry.files.items():
                    path = self._safe_file(name, fname)
                    try:
                        data[fname] = read_regular_file(path)
                    except FileNotFoundError:
                        problem = f"missing file {path}"
                        break
                    except (IsADirectoryError, PermissionError, OSError) as exc:
                        raise LibraryError(f"expert {name!r}: cannot read {path} ({exc.strerror or exc})") from None
                    if hashlib.sha256(data[fname]).hexdigest() != digest:
                        problem = (f"{path} does not match its checksum in the manifest (modified or truncated); "
                                   "run `modlora verify`")
                        break
                else:
                    return data[ADAPTER_CONFIG], data[ADAPTER_WEIGHTS]
                before = entry.files
                self.reload()      # a newer manifest may describe the files we read
                if name not in self._manifest["entries"]:
                    raise LibraryError(f"{self.path}: expert {name!r} was removed meanwhile")
                if locked and self.entry(name).files == before:
                    break          # under the lock nothing moved: the files really are damaged
            if not locked:
                time.sleep(0.005 * (attempt + 1))
        raise LibraryError(f"expert {name!r}: {problem}")

    def experts(self, names: Iterable[str] | None = None) -> dict[str, LoraAdapter]:
        """``{name: adapter}`` for the given (default: all) experts."""
        return {n: self.get(n) for n in (self.expert_names() if names is None else names)}

    def check_base_model(self, info: BaseModelInfo) -> None:
        """Raise :class:`BaseModelMismatchError` when ``info`` is not this library's base model (weights or
        tokenizer)."""
        if not self.base_model.same_tokenizer(info):
            raise BaseModelMismatchError(
                f"{self.path}: library was built with tokenizer {self.base_model.tokenizer} but the model given has "
                f"tokenizer {info.tokenizer}: prompts would be tokenised differently from training")
        if not self.base_model.same_weights(info):
            raise BaseModelMismatchError(
                f"{self.path}: library was built for base model {self.base_model.name!r} "
                f"(shapes {self.base_model.shapes_hash}, weights {self.base_model.weights_checksum}) but the model "
                f"given is {info.name!r} (shapes {info.shapes_hash}, weights {info.weights_checksum})")

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]] | None:
        """The base model's linear-layer shapes (module path → (out, in)) recorded in the manifest, or None for a
        library written before they were recorded (they are added the next time it is opened with its model)."""
        return dict(self.base_model.linear_shapes) or None

    def record_linear_shapes(self, info: BaseModelInfo) -> None:
        """Store ``info.linear_shapes`` in a library that lacks them (only for the same base model)."""
        if self.base_model.linear_shapes or not info.linear_shapes or not self.base_model.same_weights(info):
            return
        with library_lock(self.path):
            self.reload()
            if self.base_model.linear_shapes:
                return
            base = self.base_model.with_linear_shapes(info.linear_shapes)
            raw = {**self._manifest["raw"], "base_model": base.to_dict()}
            atomic_write_json(self.path / MANIFEST, raw)
            self._manifest = {**self._manifest, "raw": raw, "base": base}

    def expert_problems(self, name: str, adapter: LoraAdapter) -> list[str]:
        """What is inconsistent between an adapter and this library: :func:`~modlora.library.adapters.adapter_problems`
        against the recorded base shapes or, in a library without them, against the shapes of the other stored
        experts' modules (read from their safetensors headers)."""
        shapes = self.linear_shapes
        if shapes is not None:
            return adapter_problems(adapter, shapes)
        stored = self._stored_shapes(exclude=name)
        known = {m: s for m, s in stored.items() if m in adapter.A}
        return [p for p in adapter_problems(adapter, known) if "does not exist" not in p and "no tensors" not in p]

    def _stored_shapes(self, exclude: str) -> dict[str, tuple[int, int]]:
        """(out, in) of every module some stored expert (other than ``exclude``) adapts, from its weights file;
        unreadable files are skipped (verify reports them)."""
        out: dict[str, tuple[int, int]] = {}
        for other in self.expert_names():
            if other == exclude:
                continue
            try:
                tensors = load_safetensors_bytes(read_regular_file(self._safe_file(other, ADAPTER_WEIGHTS)))
            except (SafetensorError, OSError, ValueError, LibraryError):
                continue
            for key, tensor in tensors.items():
                mt = PEFT_KEY_RE.match(key)
                if mt is None or tensor.ndim != 2:
                    continue
                out_f, in_f = out.get(mt["module"], (0, 0))
                out[mt["module"]] = (tensor.shape[0], in_f) if mt["which"] == "B" else (out_f, tensor.shape[1])
        return {m: s for m, s in out.items() if 0 not in s}

    # -- writes -------------------------------------------------------------------------------------------------
    def add(self, name: str, adapter: LoraAdapter, *, tasks: Iterable[str] = (), training: Mapping[str, Any] | None = None,
            metrics: Mapping[str, Any] | None = None, base_model: BaseModelInfo | None = None,
            overwrite: bool = False) -> ExpertEntry:
        """Add an expert atomically. Raises if the name exists (unless ``overwrite``) or the base model differs."""
        check_name(name)
        if base_model is not None:
            self.check_base_model(base_model)
            self.record_linear_shapes(base_model)
        adapter.validate(f"expert {name!r}")
        problems = self.expert_problems(name, adapter)
        if problems:
            raise LibraryError(f"expert {name!r} does not fit this library's base model {self.base_model.name!r}: "
                               + "; ".join(problems))
        target = self.expert_dir(name)
        with library_lock(self.path):
            self.reload()
            if name in self._manifest["entries"] and not overwrite:
                raise LibraryError(f"{self.path}: expert {name!r} already exists (remove it first or pass overwrite)")
            adapter = LoraAdapter(adapter.spec, adapter.A, adapter.B, self.base_model.name, adapter.extra_config)
            with atomic_directory(target, overwrite=True) as tmp:
                write_adapter_files(adapter, tmp)
                files = {f: sha256_file(tmp / f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
            entry = ExpertEntry(name=name, tasks=list(tasks), lora=adapter.spec.to_dict(),
                                training=_jsonable(dict(training or {})), metrics=_jsonable(dict(metrics or {})),
                                created=time.time(), files=files, num_parameters=adapter.num_parameters(),
                                modules=len(adapter.modules))
            self._write_entries({**self._manifest["entries"], name: entry})
            self._drop_artifacts(name)
        self._cache.pop(name, None)
        return entry

    def import_adapter(self, directory: str | os.PathLike[str], name: str, *, tasks: Iterable[str] = (),
                       overwrite: bool = False, force_base: bool = False) -> ExpertEntry:
        """Import an existing PEFT LoRA adapter directory as an expert.

        The config is read as PEFT applies it or refused naming the field
        (:func:`~modlora.library.adapters.parse_adapter_config`; an rsLoRA adapter is stored as the plain adapter with
        ``lora_alpha·√r``, the same ``ΔW``), ``r`` must not exceed any adapted layer's width, and every module's
        tensors are checked against the base model's linear shapes (see :meth:`add`). An adapter
        whose ``base_model_name_or_path`` names another model is refused with :class:`BaseModelMismatchError` unless
        ``force_base`` (names match when equal after dropping the hub organisation / directory part, case and a
        trailing quantisation tag such as ``-Q4_1``); the stored copy then names this library's base and
        ``training["imported_base"]`` keeps the declared one."""
        try:
            adapter = load_adapter(directory, name=f"adapter {directory}")
        except AdapterError as exc:
            raise LibraryError(str(exc)) from None
        for m in adapter.modules:
            width = min(adapter.A[m].shape[1], adapter.B[m].shape[0])
            if adapter.spec.rank > width:
                raise LibraryError(f"{Path(directory) / ADAPTER_CONFIG}: field 'r' is {adapter.spec.rank}, more than "
                                   f"the width of layer {m} ({adapter.B[m].shape[0]} out × {adapter.A[m].shape[1]} in)")
        training: dict[str, Any] = {"imported_from": str(directory)}
        declared = adapter.base_model_name
        if declared and not same_model_name(declared, self.base_model.name):
            if not force_base:
                raise BaseModelMismatchError(
                    f"{Path(directory) / ADAPTER_CONFIG}: field 'base_model_name_or_path' is {declared!r} but the "
                    f"library {self.path} is for {self.base_model.name!r}; pass force_base (--force-base) to import "
                    "it anyway")
            training["imported_base"] = declared
        return self.add(name, adapter, tasks=tasks, training=training, overwrite=overwrite)

    def export(self, name: str, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Copy one expert out as a standalone PEFT adapter directory (atomically; the bytes written are the ones
        checked against the manifest). An existing ``directory`` is refused unless ``overwrite`` (which replaces
        only an empty or adapter directory)."""
        config, weights = self._read_expert_files(name)
        self._parse_expert(name, config, weights)   # validates what is written
        directory = Path(directory)
        with output_directory(directory, overwrite=overwrite, error=LibraryError) as tmp:
            (tmp / ADAPTER_CONFIG).write_bytes(config)
            (tmp / ADAPTER_WEIGHTS).write_bytes(weights)
        return directory

    def remove(self, name: str) -> None:
        """Remove an expert: manifest entry first (atomic), then its files and artifacts."""
        with library_lock(self.path):
            self.reload()
            if name not in self._manifest["entries"]:
                raise LibraryError(f"{self.path}: no expert named {name!r}")
            entries = dict(self._manifest["entries"])
            del entries[name]
            self._write_entries(entries)
            shutil.rmtree(self.expert_dir(name), ignore_errors=True)
            self._drop_artifacts(name)
        self._cache.pop(name, None)

    def register(self, entries: Iterable[ExpertEntry]) -> None:
        """Record experts whose files are already in place under ``experts/<name>/`` (e.g. pulled from a shared
        library): each file is checked against its entry's checksum, then the manifest is written once, under the
        lock. Entries of the same names are replaced."""
        entries = list(entries)
        with library_lock(self.path):
            self.reload()
            for e in entries:
                check_name(e.name)
                for fname, digest in e.files.items():
                    path = self._safe_file(e.name, fname)
                    try:
                        matches = sha256_file(path) == digest
                    except OSError:
                        matches = False
                    if not matches:
                        raise LibraryError(f"expert {e.name!r}: {path} is missing or does not match its checksum")
            self._write_entries({**self._manifest["entries"], **{e.name: e for e in entries}})
        for e in entries:
            self._cache.pop(e.name, None)

    def clean_incomplete(self) -> list[str]:
        """Remove what interrupted writes left (temporary directories, expert directories without a manifest
        entry). Runs under the writers' lock, so it never touches a write in progress. Returns what was removed."""
        removed: list[str] = []
        edir = self.path / EXPERTS_DIR
        with library_lock(self.path):
            self.reload()
            if edir.is_dir():
                for d in sorted(edir.iterdir()):
                    if d.name.startswith(".") or d.name not in self._manifest["entries"]:
                        shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                        removed.append(d.name)
        return removed

    def _write_entries(self, entries: dict[str, ExpertEntry]) -> None:
        raw = dict(self._manifest["raw"])
        raw["experts"] = {k: entries[k].to_dict() for k in sorted(entries)}
        raw["modlora_version"] = __version__
        atomic_write_json(self.path / MANIFEST, raw)
        self._manifest = {"raw": raw, "base": self._manifest["base"], "entries": dict(entries)}

    # -- artifacts ----------------------------------------------------------------------------------------------
    def _artifact_path(self, expert: str, kind: str) -> Path:
        check_name(expert)
        if not isinstance(kind, str) or not KIND_RE.match(kind) or ".." in kind:
            raise LibraryError(f"invalid artifact kind {kind!r}")
        return self.path / ARTIFACTS_DIR / kind / f"{expert}.safetensors"

    def load_artifact(self, expert: str, kind: str) -> dict[str, torch.Tensor] | None:
        """Tensors stored for ``expert`` under ``kind``, or None when absent, stale (expert re-written since) or not a
        regular file (a damaged cache entry is recomputed, never trusted)."""
        path = self._artifact_path(expert, kind)
        if expert not in self:
            return None
        try:
            data = read_regular_file(path)
            tensors = load_safetensors_bytes(data)
            fresh = _safetensors_metadata(data).get("expert_sha256") == self.entry(expert).files[ADAPTER_WEIGHTS]
        except (SafetensorError, OSError, ValueError):
            return None
        return tensors if fresh else None

    def save_artifact(self, expert: str, kind: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store per-expert tensors (atomically), tied to the expert's current weights checksum."""
        path = self._artifact_path(expert, kind)
        meta = {"expert_sha256": self.entry(expert).files[ADAPTER_WEIGHTS], "kind": kind}
        from safetensors.torch import save as save_bytes
        data = save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
        atomic_write_bytes(path, data)

    def missing_artifacts(self, kind: str, names: Iterable[str] | None = None) -> list[str]:
        """Experts that have no (fresh) artifact of ``kind``: the ones to compute incrementally."""
        return [n for n in (self.expert_names() if names is None else names) if self.load_artifact(n, kind) is None]

    def _drop_artifacts(self, expert: str) -> None:
        adir = self.path / ARTIFACTS_DIR
        if adir.is_dir():
            for kind_dir in adir.iterdir():
                (kind_dir / f"{expert}.safetensors").unlink(missing_ok=True)

    def save_meta(self, key: str, obj: Any) -> Path:
        """Store a library-level JSON document (e.g. a clustering) atomically under ``meta/<key>.json``."""
        check_name(key, "meta key")
        path = self.path / META_DIR / f"{key}.json"
        atomic_write_json(path, obj)
        return path

    def load_meta(self, key: str) -> Any | None:
        check_name(key, "meta key")
        path = self.path / META_DIR / f"{key}.json"
        try:
            return parse_json(read_regular_file(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LibraryError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise LibraryError(f"{path}: not valid JSON ({exc})") from None

    # -- verification -------------------------------------------------------------------------------------------
    def verify(self) -> list[VerifyProblem]:
        """Check everything later commands rely on; returns the problems (empty: the library is sound).

        Per expert: its files exist and match the manifest's checksums; the config parses; the tensors load, are
        floating point, finite, and pair up (``A`` (r, in), ``B`` (out, r)); the manifest's ``lora`` fields,
        ``num_parameters`` and ``modules`` agree with the files; the config's ``base_model_name_or_path`` names this
        library's base; ``target_modules`` agree with the tensors; every module exists in the base model with
        matching shapes (:meth:`expert_problems`). Library-wide: leftover temporary or unlisted directories.
        In a library written before base shapes were recorded (:attr:`linear_shapes` is None) experts are checked
        against each other's shapes only; callers should say so."""
        problems: list[VerifyProblem] = []
        self._cache.clear()
        for name in self.expert_names():
            try:
                adapter = self.get(name)
            except LibraryError as exc:
                problems.append(VerifyProblem(name, str(exc)))
                continue
            problems.extend(VerifyProblem(name, p) for p in self._entry_problems(name, adapter))
        edir = self.path / EXPERTS_DIR
        if edir.is_dir():
            for d in sorted(edir.iterdir()):
                if d.name.startswith("."):
                    problems.append(VerifyProblem(d.name, f"leftover temporary directory {d} (interrupted write)"))
                elif d.name not in self:
                    problems.append(VerifyProblem(d.name, f"directory {d} has no manifest entry (interrupted write)"))
        return problems

    def _entry_problems(self, name: str, adapter: LoraAdapter) -> list[str]:
        """Disagreements between a loaded expert, its manifest entry and the base model (see :meth:`verify`)."""
        entry = self.entry(name)
        mpath = self.path / MANIFEST
        cpath = self.expert_dir(name) / ADAPTER_CONFIG
        out: list[str] = []
        recorded = LoraSpec.from_dict(entry.lora)
        for field_name, want, have in (("r", recorded.rank, adapter.spec.rank),
                                       ("lora_alpha", recorded.alpha, adapter.spec.alpha),
                                       ("lora_dropout", recorded.dropout, adapter.spec.dropout),
                                       ("target_modules", recorded.target_modules, adapter.spec.target_modules)):
            if want != have:
                out.append(f"{mpath}: experts[{name!r}].lora.{field_name} is {want!r} but {cpath} has {have!r}")
        if entry.num_parameters != adapter.num_parameters():
            out.append(f"{mpath}: experts[{name!r}].num_parameters is {entry.num_parameters} but the tensors hold "
                       f"{adapter.num_parameters()}")
        if entry.modules != len(adapter.modules):
            out.append(f"{mpath}: experts[{name!r}].modules is {entry.modules} but the tensors cover "
                       f"{len(adapter.modules)} modules")
        if adapter.base_model_name and not same_model_name(adapter.base_model_name, self.base_model.name):
            out.append(f"{cpath}: field 'base_model_name_or_path' is {adapter.base_model_name!r}, not this library's "
                       f"base {self.base_model.name!r}")
        wpath = self.expert_dir(name) / ADAPTER_WEIGHTS
        out.extend(f"{wpath}: {p}" for p in self.expert_problems(name, adapter))
        return out

    def size_bytes(self, name: str) -> int:
        """Bytes of an expert's two files on disk."""
        total = 0
        for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            path = self.expert_dir(name) / fname
            try:
                total += path.stat().st_size
            except OSError as exc:
                raise LibraryError(f"expert {name!r}: cannot read {path} ({exc.strerror or exc}); run "
                                   "`modlora verify`") from None
        return total


_QUANT_TAG = re.compile(r"[-._](?:i?q\d\w*|f16|bf16|fp16|f32|fp32|gguf|awq|gptq|int[48])$", re.IGNORECASE)


def same_model_name(a: str, b: str) -> bool:
    """Whether two base-model names refer to the same model: equal after keeping the last path / hub component,
    lower-casing and dropping a trailing quantisation tag (``HuggingFaceTB/SmolLM2-135M-Instruct`` and
    ``SmolLM2-135M-Instruct-Q4_1`` match; ``meta-llama/Llama-2-7b-hf`` and either do not)."""
    def key(name: str) -> str:
        base = name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
        base = base.removesuffix(".gguf")
        while (stripped := _QUANT_TAG.sub("", base)) != base:
            base = stripped
        return base
    return key(a) == key(b)


def _safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of safetensors bytes that loaded (an 8-byte little-endian header length, then the
    header's JSON)."""
    header = parse_json(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _jsonable(obj: Any) -> Any:
    """Convert to plain JSON types (floats stay floats; NaN/Inf become None); raises for non-serialisable values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, (torch.Tensor,)) and obj.numel() == 1:
        return _jsonable(obj.item())
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    raise LibraryError(f"value of type {type(obj).__name__} cannot be stored in the manifest")

