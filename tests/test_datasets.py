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


def test_image_folder_reads_png_and_jpeg_by_class(tmp_path):
    from PIL import Image
    colours = {"b_red": (220, 20, 20), "a_blue": (20, 20, 220)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i, suffix in enumerate((".png", ".JPG", ".jpeg")):
            Image.new("RGB", (40, 24), rgb).save(tmp_path / name / f"{i}{suffix}")
        (tmp_path / name / "notes.txt").write_text("not an image")
    Image.new("L", (8, 8), 128).save(tmp_path / "a_blue" / "grey.png")  # greyscale: converted to RGB
    x, y, classes = datasets.image_folder(tmp_path, 16)
    assert classes == ("a_blue", "b_red")  # sorted subfolder names
    assert x.shape == (7, 16, 16, 3) and x.dtype == np.uint8 and y.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert abs(int(x[4, 8, 8, 0]) - 220) <= 3 and abs(int(x[0, 8, 8, 2]) - 220) <= 3  # JPEG is lossy
    assert (x[3] == 128).all()
    (tmp_path / "a_blue" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        datasets.image_folder(tmp_path, 16)


def test_image_folder_needs_class_subfolders(tmp_path):
    with pytest.raises(datasets.DatasetMissing, match="not found"):
        datasets.image_folder(tmp_path / "nope", 32)
    (tmp_path / "only").mkdir()
    with pytest.raises(datasets.DatasetMissing, match="one subfolder per class"):
        datasets.image_folder(tmp_path, 32)


def test_holdout_keeps_every_class_on_both_sides():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    train, held = datasets.holdout(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(14))
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]  # a lone image stays in training
    assert (datasets.holdout(labels, 0.2, seed=0)[1] == held).all()
