"""The library as the engine serves it: immutable snapshots of its experts and the pool of loaded expert versions.

When ``library.json`` changes (mtime, size, inode) the pool re-reads it and loads the new or re-written experts
(their files are checked against the manifest's SHA-256; an expert that fails is left out and logged). The result
is a new immutable :class:`Snapshot`. Each request is bound to the snapshot current when it was admitted, by expert
*versions* (``name@sha``), so a request never sees an expert appear, change or vanish mid-generation: the pool
keeps every version a request still pins. Arrow prototypes come from the library's artifact cache (written
atomically for a new expert only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modlora.errors import LibraryError, ModloraError
from modlora.library.adapters import LoraAdapter
from modlora.library.store import ExpertLibrary
from modlora.reuse.methods import Registry
from modlora.serve import routing as rt
from modlora.serve.requests import RequestError

log = logging.getLogger("modlora.serve")


@dataclass(frozen=True)
class ExpertVersion:
    """One expert as stored at one time: ``name`` and the SHA-256 of its weights file."""

    name: str
    sha256: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.sha256[:16]}"


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the library: its experts (sorted by name) and a generation counter."""

    generation: int
    experts: tuple[ExpertVersion, ...]
    skipped: tuple[str, ...] = ()           # experts left out (failed checksum or load), with the reason

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def version(self, name: str) -> ExpertVersion:
        """The version of expert ``name``; a 404 :class:`RequestError` when this snapshot has none."""
        for e in self.experts:
            if e.name == name:
                return e
        raise RequestError(f"unknown expert {name!r}; this library has {self.names()[:20]}",
                           status=404, code="model_not_found", param="model")

    def versions(self, names: Sequence[str]) -> dict[str, ExpertVersion]:
        """The versions of ``names`` (a request's ``routing.experts``), each named once."""
        if len(set(names)) != len(names):
            raise RequestError("routing.experts lists an expert twice", param="routing.experts")
        return {n: self.version(n) for n in names}


class ExpertPool:
    """The current :class:`Snapshot` and every loaded version (``adapters[key]``, Arrow ``prototypes[key]``), the
    combined adapters of static methods (also under ``adapters``), and how many admitted requests pin each key.
    ``lock`` guards all of it; it is the engine's admission lock."""

    def __init__(self, path: Path, lock: threading.Lock) -> None:
        self.path = path
        self.lock = lock
        self.snapshot = Snapshot(0, ())
        self.adapters: dict[str, LoraAdapter] = {}
        self.prototypes: dict[str, dict[str, torch.Tensor]] = {}
        self.pins: dict[str, int] = {}
        self._manifest_stat: tuple[int, int, int] | None = None

    def _manifest_changed(self) -> bool:
        try:
            st = os.stat(self.path / "library.json")
        except OSError:
            return False
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._manifest_stat:
            return False
        self._manifest_stat = key
        return True

    def refresh(self, force: bool = False) -> None:
        """Re-read the library if its manifest changed and publish a new snapshot (loads new versions only)."""
        if not self._manifest_changed() and not force:
            return
        try:
            library = ExpertLibrary(self.path)
        except LibraryError as exc:                   # a manifest being replaced or damaged: keep serving the old
            log.warning("library not re-read: %s", exc)
            return
        versions, skipped = [], []
        for name, entry in sorted(library.entries.items()):
            version = ExpertVersion(name, entry.files["adapter_model.safetensors"])
            if version.key not in self.adapters:    # (get() may re-read a newer manifest: take its version)
                try:
                    adapter = library.get(name)       # checks both files against the manifest's SHA-256
                    version = ExpertVersion(name, library.entry(name).files["adapter_model.safetensors"])
                    protos = _prototypes(library, name, adapter)
                except (LibraryError, ModloraError, OSError) as exc:
                    log.warning("expert %r not served: %s", name, exc)
                    skipped.append(f"{name}: {exc}")
                    continue
                with self.lock:
                    self.adapters[version.key] = adapter
                    self.prototypes[version.key] = protos
            versions.append(version)
        with self.lock:
            old = self.snapshot
            if tuple(versions) != old.experts or tuple(skipped) != old.skipped:
                self.snapshot = Snapshot(old.generation + 1, tuple(versions), tuple(skipped))
                log.info("library generation %d: %d experts", self.snapshot.generation, len(versions))

    def pin(self, keys: Iterable[str]) -> None:
        """Count one more request that uses ``keys`` (the caller holds ``lock``)."""
        for key in keys:
            self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, keys: Iterable[str]) -> None:
        """A request that used ``keys`` left."""
        with self.lock:
            for key in keys:
                self.pins[key] -= 1
                if self.pins[key] <= 0:
                    del self.pins[key]

    def prune(self) -> tuple[str, ...]:
        """Drop every loaded key that neither the current snapshot nor an admitted request uses; the kept keys,
        sorted (the routed model's experts, global index i = the i-th key)."""
        with self.lock:
            keep = {v.key for v in self.snapshot.experts} | {k for k, n in self.pins.items() if n > 0}
            for key in set(self.adapters) - keep:
                del self.adapters[key]
                self.prototypes.pop(key, None)
            return tuple(sorted(keep))

    def combined(self, method: str, versions: Mapping[str, ExpertVersion], registry: Registry) -> str:
        """Pool key of the static ``method``'s combined adapter over ``versions`` (combined now unless pooled; the
        caller holds ``lock``). A :class:`RequestError` when the method refuses these experts."""
        key = f"{method}[" + hashlib.sha256("\0".join(sorted(v.key for v in versions.values())).encode()
                                             ).hexdigest()[:16] + "]"
        if key not in self.adapters:
            try:
                self.adapters[key] = rt.static_adapter(method, {n: self.adapters[v.key]
                                                                for n, v in versions.items()}, registry)
            except ModloraError as exc:
                raise RequestError(str(exc), param="model") from None
        return key


def _prototypes(library: ExpertLibrary, name: str, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The expert's Arrow prototypes from the library's artifact cache, computed and cached when absent or short."""
    protos = library.load_artifact(name, rt.ARROW_KIND)
    if protos is None or not set(adapter.A) <= set(protos):
        protos = rt.arrow_prototypes(name, adapter)
        try:
            library.save_artifact(name, rt.ARROW_KIND, protos)   # atomic write of a cache file
        except OSError as exc:                                     # e.g. a read-only library
            log.warning("Arrow prototypes of %r not cached: %s", name, exc)
    return protos
