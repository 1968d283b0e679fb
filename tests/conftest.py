from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(model_name: str = "wrn16_1", sparsity: float = 0.8, seed: int = 0,
                    cold: bool = False, backbone_norm: str | None = None) -> dict:
    """A small untrained checkpoint with ERK masks and (unless cold) non-trivial meta nets: the
    benchmarks' recipe (one for the project), with the tests' input normalization."""
    from benchmarks.common import untrained_checkpoint
    return untrained_checkpoint(model_name, sparsity, seed, cold=cold, normalization=(0.25, 0.35),
                                backbone_norm=backbone_norm)


@pytest.fixture(scope="session")
def tiny_ckpt():
    return make_checkpoint()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory):
    from edgetta_export.bundle import export_bundle
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_ckpt, out)
    return out


@pytest.fixture(scope="session")
def tiny_source_ckpt():
    """The paper's variant: the frozen backbone on its source statistics."""
    return make_checkpoint(backbone_norm="source")


@pytest.fixture(scope="session")
def tiny_source_bundle(tiny_source_ckpt, tmp_path_factory):
    from edgetta_export.bundle import export_bundle
    out = tmp_path_factory.mktemp("bundles") / "tiny_source"
    export_bundle(tiny_source_ckpt, out)
    return out


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory):
    from edgetta_export import checkpoint
    from edgetta_export.bundle import DEFAULT_CHECKPOINT, export_bundle
    out = tmp_path_factory.mktemp("bundles") / "default"
    export_bundle(checkpoint.load(DEFAULT_CHECKPOINT), out)
    return out


@pytest.fixture(scope="session")
def corrupted_frames():
    """Real corrupted images from the built-in demo stream (uint8 NHWC) and labels."""
    from edgetta.streams import load_stream
    s = load_stream("demo")
    return s.images, s.labels
