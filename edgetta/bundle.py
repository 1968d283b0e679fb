"""A device bundle on disk: its manifest, checked against every file it lists."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_SCHEMA = 1
REQUIRED_FILES = ("inference.onnx", "training_model.onnx", "checkpoint")


class BundleError(Exception):
    """A bundle that cannot be used: missing, incomplete, tampered with, or too new."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Read ``manifest.json`` and (by default) check every file's size and sha256."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle {root} not found (expected a folder written by 'edgetta export')")
        mpath = root / "manifest.json"
        if not mpath.exists():
            raise BundleError(f"{root} is not a bundle: manifest.json is missing")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON: {e}") from None
        schema = manifest.get("schema_version")
        if schema != SUPPORTED_SCHEMA:
            raise BundleError(f"{root}: manifest schema {schema!r} is not supported "
                              f"(this edgetta reads schema {SUPPORTED_SCHEMA})")
        files = manifest.get("files", {})
        for name in REQUIRED_FILES:
            if name not in files:
                raise BundleError(f"{root}: manifest lists no {name}")
        if verify:
            for name, meta in files.items():
                fpath = root / name
                if not fpath.exists():
                    raise BundleError(f"{root}: file {name} listed in the manifest is missing")
                if fpath.stat().st_size != meta["bytes"]:
                    raise BundleError(f"{root}: {name} has {fpath.stat().st_size} bytes, the manifest "
                                      f"says {meta['bytes']}: the bundle was modified or truncated")
                if sha256_file(fpath) != meta["sha256"]:
                    raise BundleError(f"{root}: sha256 of {name} does not match the manifest: "
                                      "the bundle was modified or corrupted; export it again")
        return cls(root, manifest)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.manifest["input"]["resize"]
        return int(h), int(w)

    @property
    def fingerprint(self) -> str:
        """Identifies the bundle's content (used to refuse resuming state from another one)."""
        files = self.manifest["files"]
        return hashlib.sha256("".join(files[n]["sha256"] for n in sorted(files)).encode()).hexdigest()[:16]
