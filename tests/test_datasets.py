import pickle

import numpy as np
import pytest

from edgetta_export import datasets


def test_fashion_mnist_as_cifar_shape():
    try:
        x, y = datasets.fashion_mnist("test")
    except datasets.DatasetMissing:
        pytest.skip("dataset-fashion-mnist is not installed")
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    assert (x[:, :2] == 0).all() and (x[..., 0] == x[..., 2]).all()   # padded, channel repeated


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(datasets.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist("train", root=tmp_path)


def test_cifar10_python_layout(tmp_path):
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        expected.append((data, labels))
    x, y = datasets.cifar10(tmp_path, "train")
    assert x.shape == (20, 32, 32, 3) and y.shape == (20,)
    # channel-first rows of 1024 become HWC pixels
    first = expected[0][0][0]
    assert x[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]
    xt, yt = datasets.cifar10(tmp_path, "test")
    assert xt.shape == (4, 32, 32, 3) and yt.tolist() == expected[-1][1]


def test_cifar10c_layout(tmp_path):
    data = np.arange(5 * 3 * 32 * 32 * 3, dtype=np.int64).reshape(15, 32, 32, 3) % 256
    np.save(tmp_path / "fog.npy", data.astype(np.uint8))
    np.save(tmp_path / "labels.npy", np.arange(15) % 10)
    x, y = datasets.cifar10c(tmp_path, "fog", 2)
    assert x.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(x, data[3:6].astype(np.uint8))
    assert y.tolist() == [3, 4, 5]
    with pytest.raises(ValueError):
        datasets.cifar10c(tmp_path, "fog", 6)
    with pytest.raises(datasets.DatasetMissing):
        datasets.cifar10c(tmp_path, "snow", 1)


def test_truncated_idx_file_is_reported(tmp_path):
    import gzip
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        datasets.fashion_mnist("test", root=tmp_path)
