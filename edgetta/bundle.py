"""A device bundle on disk: its manifest (``edgetta.manifest``), checked against its own hash and
against every file it lists.

``Bundle.open`` refuses, with one ``BundleError`` line: a missing or wrong ``manifest.sha256``; a
malformed manifest or one with a number out of bounds; a listed path that is absolute, holds
``..``, is a symlink or resolves outside the bundle; a graph file that is not listed and hashed;
and (by default) any listed file whose size or sha256 differs.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError
from .manifest import (MANIFEST, MANIFEST_HASH, MAX_MANIFEST_BYTES, SUPPORTED_SCHEMA, Manifest,
                       manifest_hash, read_manifest_hash)

__all__ = ["Bundle", "BundleError", "SUPPORTED_SCHEMA", "sha256_file"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _regular_file_inside(root: Path, name: str) -> Path:
    """``root/name`` if it is a regular file reached through no symlink and inside ``root``."""
    path = root / name
    real_root = root.resolve()
    walked = root
    for part in Path(name).parts:
        walked = walked / part
        try:
            st = os.lstat(walked)
        except FileNotFoundError:
            raise BundleError(f"{root}: file {name} listed in the manifest is missing") from None
        except OSError as e:
            raise BundleError(f"{root}: cannot read {name}: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{root}: {name} is a symlink; a bundle holds its files itself")
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise BundleError(f"{root}: {name} is not a regular file")
    if real_root not in path.resolve().parents:
        raise BundleError(f"{root}: {name} resolves outside the bundle")
    return path


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    manifest_sha256: str

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True,
             expected_sha256: str | None = None) -> "Bundle":
        """Read and validate ``manifest.json`` against ``manifest.sha256`` (and, if given, a
        hash pinned out of band); with ``verify`` check every listed file's size and sha256."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle {root} not found (expected a folder written by 'edgetta export')")
        mpath = root / MANIFEST
        try:
            if mpath.is_symlink() or (mpath.exists() and not mpath.is_file()):
                raise BundleError(f"{mpath} is not a regular file")
            if mpath.exists() and mpath.stat().st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
            data = mpath.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{root} is not a bundle: manifest.json is missing") from None
        except OSError as e:
            raise BundleError(f"{mpath}: {e.strerror or e}") from None
        digest = manifest_hash(data)
        recorded = read_manifest_hash(root / MANIFEST_HASH)
        if digest != recorded:
            raise BundleError(f"{root}: manifest.json does not match {MANIFEST_HASH}: the manifest was "
                              "edited after export; export the bundle again")
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise BundleError(f"{root}: manifest sha256 {digest[:16]}... is not the pinned "
                              f"{expected_sha256[:16]}...")
        try:
            manifest = Manifest.from_json(data)
        except BundleError as e:
            raise BundleError(f"{root}: {e}") from None
        for name, meta in manifest.files.items():
            fpath = _regular_file_inside(root, name)
            if not verify:
                continue
            size = fpath.stat().st_size
            if size != meta.bytes:
                raise BundleError(f"{root}: {name} has {size} bytes, the manifest says "
                                  f"{meta.bytes}: the bundle was modified or truncated")
            if sha256_file(fpath) != meta.sha256:
                raise BundleError(f"{root}: sha256 of {name} does not match the manifest: "
                                  "the bundle was modified or corrupted; export it again")
        return cls(root, manifest, digest)

    def file(self, name: str) -> Path:
        """Path of a file the manifest lists (any other name is refused)."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: {name} is not a file of this bundle")
        return self.path / name

    def initial_meta_state(self) -> dict[str, np.ndarray]:
        """The warmed-up meta parameters and running statistics the bundle ships."""
        m = self.manifest
        wanted = list(m.trainable) + list(m.kept_running_stats)
        try:
            with np.load(self.file(m.meta_init), allow_pickle=False) as init:
                state = {n: np.asarray(init[n], np.float32) for n in wanted}
        except KeyError as e:
            raise BundleError(f"{self.path}: {m.meta_init} holds no tensor {e}") from None
        except (OSError, ValueError) as e:
            raise BundleError(f"{self.path}: {m.meta_init} cannot be read: {e}") from None
        bad = [n for n, v in state.items() if not np.isfinite(v).all()]
        if bad:
            raise BundleError(f"{self.path}: {m.meta_init} holds non-finite values in {bad[0]}")
        return state

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest.input.resize

    @property
    def fingerprint(self) -> str:
        """Identifies the bundle's content (used to refuse resuming state from another one)."""
        files = self.manifest.files
        return hashlib.sha256("".join(files[n].sha256 for n in sorted(files)).encode()).hexdigest()[:16]
