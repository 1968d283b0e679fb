"""Sources: limits on everything from outside (checked before decoding or loading), the MJPEG
parser's bounds, escaping of remote bytes, and the capture thread."""
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from edgetta.errors import FrameError, SourceError
from edgetta.sources import (FrameReader, Limits, SkippedFrame, Source, decode_image, mjpeg_parts,
                             open_source, printable, read_image_file, read_netpbm)
from edgetta.streams import load_stream
from edgetta.system import peak_rss_bytes


def png_header_only(w, h):
    """A PNG whose IHDR declares w x h, with one tiny compressed row: a decompression bomb's
    header (decoding it would allocate w*h*3 bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (w * 3 + 1))) + chunk(b"IEND", b""))


def jpeg(img):
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_image_dimensions_are_checked_before_decoding():
    before = peak_rss_bytes()
    t = time.perf_counter()
    with pytest.raises(FrameError) as e:
        decode_image(png_header_only(30000, 30000), "bomb.png")
    assert e.value.kind == "too_large" and "not decoded" in str(e.value)
    assert time.perf_counter() - t < 1.0
    assert peak_rss_bytes() - before < 50 * 2**20  # decoding would take 2.5 GiB
    with pytest.raises(FrameError) as e:
        decode_image(png_header_only(200, 100), "small.png", Limits(max_pixels=10_000))
    assert e.value.kind == "too_large"
    with pytest.raises(FrameError) as e:
        read_netpbm(b"P6 30000 30000 255\n" + b"\x00" * 10)
    assert e.value.kind == "too_large"
    yy, xx = np.mgrid[:24, :40]
    img = np.stack([yy * 10, xx * 6, 255 - xx * 6], -1).astype(np.uint8)  # smooth: JPEG keeps it
    out = decode_image(jpeg(img), "ok.jpg")
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 4
    for data, kind in ((b"", "empty"), (b"\xff\xd8\xff" + bytes(100), "corrupt"),
                       (jpeg(img)[:200], "corrupt"), (b"P6 2 2 255\n\x00", "corrupt")):
        with pytest.raises(FrameError) as e:
            decode_image(data, "x")
        assert e.value.kind == kind, data[:10]


def test_npy_frames_in_folders_are_checked_by_their_header(tmp_path):
    np.save(tmp_path / "ok.npy", np.zeros((8, 8, 3), np.uint8))
    assert read_image_file(tmp_path / "ok.npy").shape == (8, 8, 3)
    # header claims a huge array; the file holds 128 bytes
    big = tmp_path / "claims.npy"
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (100000, 100000, 3)})
        f.write(b"\x00" * 128)
    with pytest.raises(FrameError, match="header claims") as e:
        read_image_file(big)
    assert e.value.kind == "corrupt"
    np.save(tmp_path / "huge.npy", np.zeros((300, 300, 3), np.uint8))
    with pytest.raises(FrameError) as e:
        read_image_file(tmp_path / "huge.npy", Limits(max_pixels=1000))
    assert e.value.kind == "too_large"


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays,needle", [
    ({"images": np.zeros((), np.uint8)}, "expected images"),
    ({"images": np.zeros((0, 8, 8, 3), np.uint8)}, "no images"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.zeros(0, np.int64)}, "0 labels for 4 images"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "3 labels for 4 images"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.array([0, 1, -1, 2])}, "out of range"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.zeros(4, np.float32)}, "integer"),
    ({"images": np.array(["a", "b"])}, "integer or float"),
    ({"frames": np.zeros((4, 8, 8, 3), np.uint8)}, "no 'images'"),
])
def test_npz_streams_are_refused_with_one_line(tmp_path, arrays, needle):
    path = write_npz(tmp_path / "s.npz", **arrays)
    with pytest.raises(SourceError, match=needle) as e:
        load_stream(path)
    assert "\n" not in str(e.value)


def test_npz_whose_header_claims_terabytes_is_refused_before_loading(tmp_path):
    import zipfile
    path = tmp_path / "claims.npz"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": (1000000, 1000, 1000, 3)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images.npy", buf.getvalue() + b"\x00" * 64)
    before = peak_rss_bytes()
    with pytest.raises(SourceError, match="header claims 3,000,000,000,000 bytes"):
        load_stream(path)
    assert peak_rss_bytes() - before < 50 * 2**20
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(SourceError, match="not a readable .npz"):
        load_stream(tmp_path / "bad.npz")


def test_labels_out_of_the_models_range_are_refused():
    from edgetta.streams import check_labels
    with pytest.raises(SourceError, match="label 10 of image 1 is out of range .the model has 10"):
        check_labels(np.array([0, 10, 3]), 3, "s", n_classes=10)
    assert check_labels(np.array([0, 9], np.int32), 2, "s", 10).dtype == np.int64


class Drip(io.RawIOBase):
    """A stream that returns ``data`` a few bytes per read, advancing a fake clock."""

    def __init__(self, data, per_read, clock, seconds_per_read):
        self.data, self.per_read, self.clock, self.dt = data, per_read, clock, seconds_per_read

    def read(self, n=-1):
        self.clock[0] += self.dt
        out, self.data = self.data[:self.per_read], self.data[self.per_read:]
        return out


def test_mjpeg_parser_bounds():
    part = b"--b\r\nContent-Type: image/jpeg\r\n\r\nAAA\r\n"
    body = part + b"--b\r\nContent-Length: 2\r\n\r\nBB\r\n--b\r\n\r\n"
    assert list(mjpeg_parts(io.BufferedReader(io.BytesIO(body), 4), b"b", chunk=3)) == [b"AAA", b"BB"]
    # a part that claims 1 TB: refused before reading it
    huge = b"--b\r\nContent-Length: 1000000000000\r\n\r\n" + b"x" * 100
    with pytest.raises(SourceError, match="exceeds"):
        list(mjpeg_parts(io.BytesIO(huge), b"b"))
    # garbage with no boundary: refused once the cap is crossed, not buffered forever
    with pytest.raises(SourceError, match="without a boundary"):
        list(mjpeg_parts(io.BytesIO(b"x" * 5000), b"b", chunk=100, max_part_bytes=1000))
    with pytest.raises(SourceError, match="part headers"):
        list(mjpeg_parts(io.BytesIO(b"--b\r\n" + b"h" * 10000), b"b", max_header_bytes=100))
    # one byte every 2 s: no complete frame within the deadline
    clock = [0.0]
    drip = Drip(part * 100, 1, clock, 2.0)
    parts = mjpeg_parts(drip, b"b", frame_timeout=10.0, clock=lambda: clock[0])
    with pytest.raises(SourceError, match="no complete frame in 10 s"):
        next(parts)
    # the same bytes fast: every frame arrives
    clock = [0.0]
    fast = Drip(part * 3 + b"--b\r\n", 7, clock, 0.001)
    assert list(mjpeg_parts(fast, b"b", frame_timeout=10.0, clock=lambda: clock[0])) == [b"AAA"] * 3


def test_remote_bytes_are_escaped_for_logs():
    s = printable(b"bad\x1b[2J\r\nline\x00\xff" + b"x" * 500, limit=40)
    assert all(32 <= ord(c) < 127 for c in s) and len(s) <= 43
    assert "\\x1b" in s and "\\r\\n" not in s and "\\x0d" in s


def test_reader_keeps_the_newest_live_frame_and_every_file_frame():
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(50)]
    bad = SkippedFrame("corrupt", "x")
    skipped = []
    files = FrameReader(Source("f", lambda: iter([frames[0], bad, *frames[1:]])), threading.Event(),
                        queue_size=2, on_skip=skipped.append).start()
    got = []
    while not files.done:
        d = files.get(0.5)
        if d is not None:
            got.append((d.position, int(d.frame[0, 0, 0])))
            time.sleep(0.002)
    assert got == [(0, 0)] + [(i + 1, i) for i in range(1, 50)] and skipped == [bad]
    assert files.dropped == 0

    def live_frames():
        for f in frames:
            time.sleep(0.002)
            yield f
    live = FrameReader(Source("cam", live_frames, live=True), threading.Event()).start()
    got = []
    while not live.done:
        d = live.get(0.5)
        if d is not None:
            got.append(int(d.frame[0, 0, 0]))
            time.sleep(0.02)  # slower than the source: frames are dropped, never queued
    assert got[-1] == 49 and got == sorted(got)
    assert live.dropped == 50 - len(got) > 0


def test_reader_passes_on_a_source_error():
    def failing():
        yield np.zeros((4, 4, 3), np.uint8)
        raise SourceError("gone")
    r = FrameReader(Source("s", failing), threading.Event()).start()
    assert r.get(2.0) is not None
    assert r.get(2.0) is None and r.done and str(r.error) == "gone"


def test_folder_without_pillow_is_refused_in_one_line(tmp_path, monkeypatch):
    import sys
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(SourceError, match="needs Pillow") as e:
        open_source(str(tmp_path))
    assert "\n" not in str(e.value)
