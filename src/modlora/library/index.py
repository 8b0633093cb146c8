"""The file index of a shared library, and the relative paths and checks of a library's files.

A shared library has the local layout (``library.json``, ``experts/<name>/`` PEFT adapter directories,
``artifacts/<kind>/<expert>.safetensors``, ``meta/<key>.json``) plus

* ``files.json``, the file index ``{"format": "modlora-remote-index", "version": 1, "manifest_sha256": S,
  "files": {relative path: {"sha256": H, "size": N}}}``, where S is the SHA-256 of the ``library.json`` bytes the
  index belongs to (null before a first push completes). Expert files are checked against the manifest's
  checksums; artifacts and meta files only against an index whose S matches the manifest that was read (any other
  index is ignored, and its artifacts are recomputed locally);
* ``README.md``, the library card (:mod:`~modlora.library.card`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from modlora.io import parse_json, sha256_file
from modlora.library.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from modlora.library.location import RemoteLocation
from modlora.library.store import ARTIFACTS_DIR, EXPERTS_DIR, KIND_RE, META_DIR, NAME_RE

INDEX = "files.json"
INDEX_FORMAT = "modlora-remote-index"
INDEX_VERSION = 1
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileRecord:
    """SHA-256 (hex) and size (bytes) of one file of a library."""

    sha256: str
    size: int


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 (hex) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def index_bytes(manifest: bytes | None, files: dict[str, FileRecord]) -> bytes:
    """The ``files.json`` document for ``files``, belonging to the manifest bytes ``manifest`` (None: no manifest
    yet)."""
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
           "manifest_sha256": sha256_bytes(manifest) if manifest is not None else None,
           "files": {rel: {"sha256": r.sha256, "size": r.size} for rel, r in sorted(files.items())}}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def read_index(location: RemoteLocation, manifest: bytes | None) -> dict[str, FileRecord]:
    """The remote index's records when it belongs to ``manifest`` (by SHA-256), else ``{}`` (absent, from another
    push, or malformed: nothing in it is trusted)."""
    data = location.read_bytes(INDEX)
    if data is None:
        return {}
    try:
        doc = parse_json(data)
        if (doc.get("format") != INDEX_FORMAT or doc.get("version") != INDEX_VERSION
                or doc.get("manifest_sha256") != (sha256_bytes(manifest) if manifest is not None else None)):
            return {}
        records = {}
        for rel, rec in doc["files"].items():
            if (not isinstance(rel, str) or not _safe_relative(rel) or not isinstance(rec.get("sha256"), str)
                    or not _SHA256_RE.match(rec["sha256"]) or not isinstance(rec.get("size"), int)):
                return {}
            records[rel] = FileRecord(rec["sha256"], rec["size"])
        return records
    except (ValueError, AttributeError, KeyError, TypeError):
        return {}


def _safe_relative(rel: str) -> bool:
    """A library file's relative path: ``experts/<name>/<file>``, ``artifacts/<kind>/<name>.safetensors`` or
    ``meta/<key>.json``, whose name, kind and key are ones the library itself accepts (no hidden file, no ``..``)."""
    def ok(pattern: re.Pattern[str], name: str) -> bool:
        return bool(pattern.match(name)) and ".." not in name

    parts = rel.split("/")
    return ((len(parts) == 3 and parts[0] == EXPERTS_DIR and ok(NAME_RE, parts[1])
             and parts[2] in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
            or (len(parts) == 3 and parts[0] == ARTIFACTS_DIR and ok(KIND_RE, parts[1])
                and parts[2].endswith(".safetensors") and ok(NAME_RE, parts[2].removesuffix(".safetensors")))
            or (len(parts) == 2 and parts[0] == META_DIR and parts[1].endswith(".json")
                and ok(NAME_RE, parts[1].removesuffix(".json"))))


def expert_files(name: str) -> list[str]:
    """The relative paths of expert ``name``'s two files (adapter config and weights)."""
    return [f"{EXPERTS_DIR}/{name}/{f}" for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]


def file_matches(path: Path, digest: str) -> bool:
    """True when ``path`` is a regular file (not a symlink) whose SHA-256 is ``digest``."""
    return path.is_file() and not path.is_symlink() and sha256_file(path) == digest

