import math

import cv2
import numpy as np
import pytest
from scipy.ndimage import zoom as scipy_zoom

from edgetta_export import corruptions as C
from edgetta_export.corruptions import CORRUPTIONS, corrupt, corrupt_dataset, save_grid

# every type except the purely deterministic ones draws random numbers
RANDOM_TYPES = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
                "snow", "frost", "fog", "elastic_transform")


@pytest.fixture(scope="module")
def images():
    return C.synthetic_pattern(8)


@pytest.fixture(scope="module")
def outputs(images):
    """corrupt(images, name, s, seed=0) for every type and severity, computed once."""
    return {(n, s): corrupt(images, n, s, seed=0) for n in CORRUPTIONS for s in range(1, 6)}


def mad(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def corr(a, b):
    """Mean over images of the Pearson correlation between two batches."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return float(((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))).mean())


def test_order_and_names():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression")
    assert set(C.PARAMS) == set(CORRUPTIONS)
    assert all(len(C.PARAMS[n]) == 5 for n in CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_type_and_severity_runs(name, images, outputs):
    for s in range(1, 6):
        out = outputs[name, s]
        assert out.dtype == np.uint8 and out.shape == images.shape
        assert mad(out, images) > 0.5, f"{name} s{s} left the images (almost) unchanged"


def test_single_image_matches_batch_of_one(images):
    for name in CORRUPTIONS:
        single = corrupt(images[3], name, 3, seed=5)
        assert single.shape == (32, 32, 3) and single.dtype == np.uint8
        np.testing.assert_array_equal(single, corrupt(images[3:4], name, 3, seed=5)[0])


def test_input_is_not_modified(images):
    before = images.copy()
    for name in CORRUPTIONS:
        corrupt(images, name, 5)
    np.testing.assert_array_equal(images, before)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic(name, images, outputs):
    again = corrupt(images, name, 5, seed=0)
    assert again.tobytes() == outputs[name, 5].tobytes()


@pytest.mark.parametrize("name", RANDOM_TYPES)
def test_seed_changes_random_types(name, images, outputs):
    assert corrupt(images, name, 5, seed=1).tobytes() != outputs[name, 5].tobytes()


def test_seed_irrelevant_for_deterministic_types(images, outputs):
    for name in set(CORRUPTIONS) - set(RANDOM_TYPES):
        np.testing.assert_array_equal(corrupt(images, name, 2, seed=9), outputs[name, 2])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_grows(name, images, outputs):
    s1, s5 = outputs[name, 1], outputs[name, 5]
    if name == "frost":
        # Frost is a blend a*x + b*frost with (a, b) = (1, .2) .. (.75, .45): at severity 1 the
        # added frost brightens (and clips) bright images, at 5 the image is also dimmed, so the
        # mean absolute difference is not reliably ordered. The frost's share of the picture
        # does grow, so the correlation with the clean image must drop.
        assert corr(s5, images) < corr(s1, images) - 0.02
    elif name == "elastic_transform":
        # CIFAR-10's elastic parameters shrink the random affine jitter (2.56 px at severity 1,
        # 0.96 px at 5) while the elastic displacement grows from none: on 32x32 images the
        # jitter dominates, so severity 1 moves pixels further than severity 5. Both distort.
        assert mad(s1, images) > mad(s5, images) > 5
    else:
        assert mad(s5, images) > mad(s1, images)


@pytest.mark.parametrize("bad", [
    dict(name="gaussian_blurr"), dict(severity=0), dict(severity=6), dict(severity=2.0),
    dict(images=np.zeros((2, 32, 32, 3), np.float32)),
    dict(images=np.zeros((2, 28, 28, 3), np.uint8)),
    dict(images=np.zeros((2, 32, 32), np.uint8)),
    dict(images=np.zeros((2, 32, 32, 1), np.uint8)),
    dict(images=np.zeros((1, 2, 32, 32, 3), np.uint8)),
    dict(seed=-1),
])
def test_bad_input_raises(bad):
    args = dict(images=np.zeros((2, 32, 32, 3), np.uint8), name="fog", severity=3, seed=0)
    args.update(bad)
    with pytest.raises(ValueError):
        corrupt(**args)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="gaussian_noise.*jpeg_compression"):
        corrupt(np.zeros((1, 32, 32, 3), np.uint8), "nope", 1)


def test_glass_swaps_equal_the_sequential_loop():
    """The wavefront schedule gives exactly the original's result for the same displacements."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    rows = cols = np.arange(31, 1, -1)
    delta = rng.integers(-1, 1, size=(3, 30, 30, 2))
    ref = img.copy()
    for n in range(3):
        for a, h in enumerate(rows):
            for b, w in enumerate(cols):
                hp, wp = h + delta[n, a, b, 0], w + delta[n, a, b, 1]
                ref[n, h, w], ref[n, hp, wp] = ref[n, hp, wp].copy(), ref[n, h, w].copy()
    fast = img.reshape(3, 32 * 32, 3).copy()
    C._glass_swaps(fast, 32, rows, cols, delta)
    np.testing.assert_array_equal(fast.reshape(img.shape), ref)


def test_clipped_zoom_matches_scipy_zoom():
    x = np.random.default_rng(1).random((32, 32, 3))
    for z in (1.01, 1.06, 1.13, 1.25, 1.75, 2.25):
        ch = math.ceil(32 / z)
        top = (32 - ch) // 2
        ref = scipy_zoom(x[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (ref.shape[0] - 32) // 2
        ref = ref[trim:trim + 32, trim:trim + 32]
        np.testing.assert_allclose(C._clipped_zoom(x[None], z)[0], ref, atol=1e-5)


def test_motion_kernel_is_imagemagicks_streak():
    # angle 0: taps at (i, 0), i = 0..2*ceil(radius), weights a one-sided normalised Gaussian
    kernel, anchor = C._motion_kernel(6, 2, 0.0)
    w = np.exp(-np.arange(13) ** 2 / 8.0)
    assert anchor == (0, 0) and kernel.shape == (1, 13)
    np.testing.assert_allclose(kernel[0], w / w.sum(), rtol=1e-5)
    kernel, anchor = C._motion_kernel(6, 2, 45.0)
    assert np.isclose(kernel.sum(), 1) and kernel.shape[0] == kernel.shape[1] > 1


def test_brightness_matches_hsv_value_shift(images):
    ref = []
    for im in images:
        hsv = cv2.cvtColor(im.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
        hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
        ref.append(np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1) * 255)
    diff = np.abs(np.stack(ref) - corrupt(images, "brightness", 5).astype(np.float32))
    assert diff.max() <= 1.01


def test_cache(tmp_path, images, monkeypatch):
    first = corrupt_dataset(images, "shot_noise", 2, seed=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(first, corrupt(images, "shot_noise", 2, seed=3))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1, files  # no stray temporary file
    assert files[0].startswith("shot_noise_s2_seed3_") and files[0].endswith(".npy")
    assert len(files[0]) == len("shot_noise_s2_seed3_") + 12 + len(".npy")

    def boom(*a, **k):
        raise AssertionError("corrupt() called although the result is cached")
    monkeypatch.setattr(C, "corrupt", boom)
    np.testing.assert_array_equal(
        corrupt_dataset(images, "shot_noise", 2, seed=3, cache_dir=tmp_path), first)
    # a single image hashes like a batch of one but comes back in its own shape
    monkeypatch.undo()
    one = corrupt_dataset(images[0], "fog", 1, cache_dir=tmp_path)
    assert one.shape == (32, 32, 3)
    assert corrupt_dataset(images[:1], "fog", 1, cache_dir=tmp_path).shape == (1, 32, 32, 3)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".npy")]


def test_cache_key_depends_on_images_and_args(tmp_path, images):
    corrupt_dataset(images, "contrast", 1, cache_dir=tmp_path)
    corrupt_dataset(images[:4], "contrast", 1, cache_dir=tmp_path)
    corrupt_dataset(images, "contrast", 2, cache_dir=tmp_path)
    corrupt_dataset(images, "contrast", 1, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 4


def test_cache_failed_write_leaves_no_temp_file(tmp_path, images, monkeypatch):
    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(C.os, "replace", fail)
    with pytest.raises(OSError):
        corrupt_dataset(images, "contrast", 1, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_grid(tmp_path, images):
    path = tmp_path / "grid.png"
    save_grid(images, path, scale=2)
    img = cv2.imread(str(path))
    assert img is not None and img.ndim == 3
    h, w = img.shape[:2]
    # 15 rows and 6 columns of 64 px cells, plus labels
    assert h >= 15 * 64 and w >= 6 * 64 and h > w


def test_cli_grid(tmp_path, images):
    npy = tmp_path / "imgs.npy"
    np.save(npy, images[:2])
    out = tmp_path / "cli.png"
    C.main(["grid", "--out", str(out), "--npy", str(npy), "--scale", "1"])
    assert cv2.imread(str(out)) is not None
