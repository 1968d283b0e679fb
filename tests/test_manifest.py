"""The bundle contract: an edited, escaping or malformed manifest is refused in one line.

Every case goes through ``Bundle.open`` and through ``edgetta adapt``, which must print one
``error: ...`` line and exit 2, never a traceback."""
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetta import Bundle, BundleError
from edgetta.cli import main
from edgetta.manifest import Manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def resign(bundle: Path, manifest, raw: bytes | None = None) -> None:
    """Write ``manifest`` (or ``raw`` bytes) with a matching manifest.sha256, as only a
    re-export would, so that a test reaches the checks behind the hash."""
    data = raw if raw is not None else json.dumps(manifest).encode()
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")


@pytest.fixture()
def bundle(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture()
def original(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def refused(bundle: Path, capsys, match: str) -> str:
    """Bundle.open and 'edgetta adapt' both refuse ``bundle`` with one line containing ``match``."""
    with pytest.raises(BundleError) as e:
        Bundle.open(bundle)
    msg = str(e.value)
    assert match in msg and "\n" not in msg, msg
    capsys.readouterr()
    assert main(["adapt", str(bundle), "--limit", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    return msg


@pytest.mark.parametrize("lr", [0.009, 1e308])
def test_an_edited_manifest_is_refused_by_its_hash(bundle, original, lr, capsys):
    m = copy.deepcopy(original)
    m["adaptation"]["lr"] = lr
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    refused(bundle, capsys, "does not match manifest.sha256")


def test_missing_or_malformed_hash_file_is_refused(bundle, capsys):
    (bundle / "manifest.sha256").write_text("deadbeef  manifest.json\n")
    refused(bundle, capsys, "expected '<sha256>  manifest.json'")
    (bundle / "manifest.sha256").unlink()
    refused(bundle, capsys, "manifest.sha256 is missing")


def test_a_pinned_hash_must_match(bundle):
    b = Bundle.open(bundle)
    assert Bundle.open(bundle, expected_sha256=b.manifest_sha256).manifest == b.manifest
    with pytest.raises(BundleError, match="is not the pinned"):
        Bundle.open(bundle, expected_sha256="0" * 64)


@pytest.mark.parametrize("field,value,match", [
    (("adaptation", "lr"), 1e308, "adaptation.lr must be a number in (0.0, 1.0]"),
    (("adaptation", "lr"), 0, "adaptation.lr must be"),
    (("adaptation", "lr"), "0.005", "adaptation.lr must be"),
    (("adaptation", "momentum"), 1.0, "adaptation.momentum must be"),
    (("adaptation", "batch_size"), 0, "adaptation.batch_size must be an integer in [1, 4096]"),
    (("adaptation", "batch_size"), True, "adaptation.batch_size must be"),
    (("adaptation", "bn_momentum"), -0.1, "adaptation.bn_momentum must be"),
    (("input", "std"), [0.35, 0.0, 0.35], "input.std.1 must be"),
    (("input", "shape"), [3, 32, 100000], "input.shape must be [3, H, W]"),
])
def test_numbers_out_of_bounds_are_refused_even_when_signed(bundle, original, field, value, match, capsys):
    m = copy.deepcopy(original)
    m[field[0]][field[1]] = value
    resign(bundle, m)
    refused(bundle, capsys, match)


def test_paths_that_leave_the_bundle_are_refused(bundle, original, tmp_path, capsys):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    entry = {"sha256": hashlib.sha256(b"secret").hexdigest(), "bytes": 6}
    for name in ("../outside.bin", str(outside), "./meta_init.npz", "a/../../outside.bin", "C:\\x"):
        m = copy.deepcopy(original)
        m["files"][name] = entry
        resign(bundle, m)
        refused(bundle, capsys, "is not a plain relative path inside the bundle")
    # a graph file the manifest names must be a listed, hashed file
    shutil.copy(bundle / "inference.onnx", bundle / "other.onnx")
    m = copy.deepcopy(original)
    m["graphs"]["portable_step"]["file"] = "other.onnx"
    resign(bundle, m)
    refused(bundle, capsys, "graphs.portable_step.file \"other.onnx\" is not a listed, hashed file")
    m["graphs"]["portable_step"]["file"] = "../outside.onnx"
    resign(bundle, m)
    refused(bundle, capsys, "graphs.portable_step.file \"../outside.onnx\" is not a plain relative path")


def test_symlinks_are_refused(bundle, original, tmp_path, capsys):
    resign(bundle, original)
    target = tmp_path / "elsewhere.npz"
    shutil.move(bundle / "meta_init.npz", target)
    os.symlink(target, bundle / "meta_init.npz")   # same bytes, same hash: still refused
    refused(bundle, capsys, "meta_init.npz is a symlink")
    (bundle / "meta_init.npz").unlink()
    shutil.move(target, bundle / "meta_init.npz")
    Bundle.open(bundle)
    # a symlinked manifest too
    shutil.move(bundle / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", bundle / "manifest.json")
    refused(bundle, capsys, "is not a regular file")


def _malformed(original: dict) -> list[tuple[str, bytes]]:
    def edit(f) -> bytes:
        m = copy.deepcopy(original)
        f(m)
        return json.dumps(m).encode()
    return [
        ("not valid JSON", b"{\"schema_version\": 1,"),
        ("not valid JSON", b"\xff\xfe not utf-8"),
        ("not valid JSON", b"[" * 100_000 + b"]" * 100_000),
        ("top level must be an object", b"[1, 2, 3]"),
        ("manifest schema null is not supported", edit(lambda m: m.pop("schema_version"))),
        ("files is missing", edit(lambda m: m.pop("files"))),
        ("sha256 must be 64 lowercase hex digits", edit(lambda m: m["files"]["inference.onnx"].update(sha256="xyz"))),
        ("bytes must be an integer", edit(lambda m: m["files"]["checkpoint"].update(bytes=-1))),
        ("class_names must be a list of 1 or more", edit(lambda m: m.update(class_names=[]))),
        ("trainable must be a list", edit(lambda m: m.update(trainable="model.metas.0"))),
        ("adaptation must be an object", edit(lambda m: m.update(adaptation=[0.005]))),
        ("graphs.training.file is missing", edit(lambda m: m["graphs"]["training"].pop("file"))),
        ("running_stats must map one batch statistic", edit(lambda m: m["running_stats"].popitem())),
        ("input.mean.0 must be",  # 1e999 parses as an infinite float
         edit(lambda m: m["input"].update(mean=["BIG", 0, 0])).replace(b'"BIG"', b"1e999")),
        ("not valid JSON: NaN is not a JSON number",
         json.dumps({**original, "adaptation": {**original["adaptation"], "lr": float("nan")}}).encode()),
    ]


def test_malformed_manifests_give_one_line_each(bundle, original, capsys):
    for match, raw in _malformed(original):
        resign(bundle, None, raw=raw)
        refused(bundle, capsys, match)


def test_exported_manifest_is_typed_and_cli_refuses_in_one_line(bundle, original):
    m = Bundle.open(bundle).manifest
    assert isinstance(m, Manifest) and m.adaptation.lr == original["adaptation"]["lr"]
    assert m.graphs.facts == "graph_facts.json" and m.graphs.facts in m.files
    assert m.profile is not None and m.profile.engine == "ort-training"
    # the exporter's writer refuses what the device would refuse
    bad = copy.deepcopy(original)
    bad["adaptation"]["lr"] = 2.0
    with pytest.raises(BundleError, match="adaptation.lr"):
        write_manifest(bundle, bad)
    assert Bundle.open(bundle).manifest == m   # and wrote nothing
    # one real process, as a user runs it
    (bundle / "manifest.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "-m", "edgetta", "adapt", str(bundle), "--limit", "8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
