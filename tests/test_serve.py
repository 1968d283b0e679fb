"""``edgetta serve`` end to end, as a subprocess: network and file sources, checkpoints that
survive SIGKILL, bad frames, refusals before start, and the source parsers."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edgetta import Adapter
from edgetta.errors import FrameError
from edgetta.preprocess import to_rgb_frame
from edgetta.sources import mjpeg_parts, read_netpbm

ROOT = Path(__file__).resolve().parents[1]
NO_CV2 = "import sys; sys.modules['cv2'] = None\nfrom edgetta.cli import main\nsys.exit(main(sys.argv[1:]))"


def serve(*args, no_cv2=False, timeout=120, **kw):
    cmd = [sys.executable, "-c", NO_CV2] if no_cv2 else [sys.executable, "-m", "edgetta"]
    return subprocess.run(cmd + ["serve", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, **kw)


def summary(stderr):
    line = [l for l in stderr.splitlines() if l.startswith("summary: ")][-1]
    return json.loads(line[len("summary: "):])


class Serve:
    """``edgetta serve`` running in the background; its output lines collected by threads."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgetta", "serve", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        self.out, self.err = [], []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, l=lines: [l.append(x) for x in s],
                             daemon=True).start()

    def wait_for(self, cond, timeout=60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)
                if cond():
                    return
                pytest.fail(f"serve exited ({self.proc.returncode}): {''.join(self.err)[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"timed out; stderr: {''.join(self.err)[-3000:]}")

    def port(self, pattern):
        pat = re.compile(pattern)
        self.wait_for(lambda: any(pat.search(l) for l in self.err), timeout=30)
        return int(next(pat.search(l).group(1) for l in self.err if pat.search(l)))

    def records(self):
        return [json.loads(l) for l in list(self.out)]

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text, name):
    m = re.search(rf"^edgetta_{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no {name} in /metrics"
    return float(m.group(1))


class MJPEGServer:
    """A real MJPEG stream on 127.0.0.1: multipart/x-mixed-replace JPEG parts encoded by
    OpenCV, with one corrupt part per connection, closing each connection after ``per_conn``
    parts (a dropped stream, for the reconnect)."""

    def __init__(self, frames, per_conn=24):
        import cv2
        jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in frames]
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for i in range(per_conn):
                        body = os.urandom(300) if i == 5 else jpegs[i % len(jpegs)]
                        # some parts say their length, some leave it to the boundary
                        head = b"--frame\r\nContent-Type: image/jpeg\r\n"
                        if i % 2:
                            head += b"Content-Length: %d\r\n" % len(body)
                        self.wfile.write(head + b"\r\n" + body + b"\r\n")
                        time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_refused_before_start_with_one_line(tiny_bundle, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    (tampered / "inference.onnx").write_bytes(b"not a model")
    cases = [
        ((tmp_path / "nowhere", "--source", "demo"), "not found"),
        ((tampered, "--source", "demo"), "inference.onnx"),
        ((tiny_bundle, "--source", tmp_path / "missing.mp4"), "not found"),
        ((tiny_bundle, "--source", "demo", "--memory-budget", "50"), "from the bundle's profile"),
        ((tiny_bundle, "--source", "demo", "--batch", "0"), "--batch"),
    ]
    for args, needle in cases:
        r = serve(*args, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert needle in r.stderr and r.stdout == ""


def test_memory_budget_is_measured_when_the_bundle_has_no_profile(tiny_bundle, tmp_path):
    from edgetta.profile import MIB, measure_step
    m = measure_step(tiny_bundle, 64)
    assert m["peak_before_load"] <= m["peak_loaded"] <= m["peak_after_step"]
    assert m["rss_before_load"] < m["rss_loaded"]
    profile = json.loads((tiny_bundle / "manifest.json").read_text())["profile"]
    assert profile["batch"] == 64
    assert 0.7 < m["peak_after_step"] / MIB / profile["adaptation_peak_mib"] < 1.4

    # the profile in the bundle is for batch 64: another batch is measured
    r = serve(tiny_bundle, "--source", "demo", "--batch", "16", "--memory-budget", "40", timeout=120)
    assert r.returncode == 2 and "(measured)" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_demo_stream_prints_adapted_beside_no_adaptation_accuracy(tiny_bundle, corrupted_frames,
                                                                  tmp_path):
    images, labels = corrupted_frames
    out = tmp_path / "predictions.jsonl"
    r = serve(tiny_bundle, "--source", "demo", "--limit", 96, "--batch", 32, "--output", out)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [x["frame"] for x in recs] == list(range(96))
    assert {"timestamp", "class", "class_index", "confidence", "adapted", "predict_ms"} <= set(recs[0])
    assert all(x["adapted"] for x in recs) and [x["batch"] for x in recs[::32]] == [1, 2, 3]
    s = summary(r.stderr)
    assert s["frames"] == 96 and s["adapted_batches"] == 3 and s["labelled"] == 96
    # both accuracies measured: adapted from the emitted predictions, the other by the
    # warmed-up model itself
    adapted = np.mean([x["class_index"] == labels[i] for i, x in enumerate(recs)])
    source = np.mean(Adapter.load(tiny_bundle).step(images[:96], adapt=False).argmax(1) == labels[:96])
    assert s["accuracy"] == pytest.approx(adapted) and s["accuracy_no_adaptation"] == pytest.approx(source)
    assert (f"accuracy on 96 labelled frames: adapted {100 * adapted:.1f}%, "
            f"no adaptation {100 * source:.1f}%") in r.stderr
    assert re.search(r"latency: predict [\d.]+ ms per frame .*adaptation [\d.]+ ms per batch", r.stderr)


def test_mjpeg_stream_with_drops_metrics_preview_and_sigterm_checkpoint(tiny_bundle,
                                                                        corrupted_frames, tmp_path):
    import cv2
    images, _ = corrupted_frames
    stream = MJPEGServer(images[:24])
    state = tmp_path / "state"
    s = Serve(tiny_bundle, "--source", stream.url, "--batch", 8, "--http", 0, "--preview", 0,
              "--reconnect-delay", 0.05, "--state-dir", state, "--collapse-window", 0)
    try:
        http = s.port(r"http://127\.0\.0\.1:(\d+)/metrics")
        preview = s.port(r"preview on http://127\.0\.0\.1:(\d+)/")
        s.wait_for(lambda: len(s.out) >= 60)  # 23 good frames per connection: reconnected twice
        metrics = get(f"http://127.0.0.1:{http}/metrics")
        assert metric(metrics, "frames_total") >= 60
        assert metric(metrics, "adapted_batches_total") >= 7
        assert metric(metrics, "reconnects_total") >= 2
        assert metric(metrics, 'skipped_frames_total{kind="corrupt"}') >= 2
        assert metric(metrics, 'skipped_frames_total{kind="nan"}') == 0
        assert metric(metrics, "peak_resident_memory_bytes") > 10e6
        assert metric(metrics, "frames_per_second") > 0
        assert "# TYPE edgetta_frames counter" in metrics
        health = json.loads(get(f"http://127.0.0.1:{http}/health"))
        assert health["status"] == "ok" and health["frames"] >= 60
        latest = json.loads(get(f"http://127.0.0.1:{http}/predictions"))
        assert latest["latest"]["frame"] >= 59 and len(latest["predictions"]) >= 60
        with urllib.request.urlopen(f"http://127.0.0.1:{preview}/", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            part = next(mjpeg_parts(r, b"edgettaframe"))
        img = cv2.imdecode(np.frombuffer(part, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and min(img.shape[:2]) >= 256

        other = serve(tiny_bundle, "--source", "demo", "--state-dir", state, timeout=60)
        assert other.returncode == 2 and "another 'edgetta serve' is using" in other.stderr

        assert s.stop(signal.SIGTERM) == 0
        done = summary("".join(s.err))
        assert done["skipped"]["corrupt"] >= 2 and done["reconnects"] >= 2
        assert "warning: skipped a frame (corrupt)" in "".join(s.err)
        assert "".join(s.err).count("(corrupt)") == 1  # logged once per kind
        recs = s.records()
        assert len(recs) == done["frames"] and all(0 <= x["confidence"] <= 1 for x in recs)
        with np.load(state / "state.npz") as d:
            assert int(d["steps"]) == done["adaptation_steps"] == done["adapted_batches"]
        adapted = [x for x in recs if x["adapted"]]
        assert -(-len(adapted) // 8) == done["adapted_batches"]  # every frame marked adapted was
    finally:
        s.cleanup()
        stream.close()


def write_video(path, frames):
    import cv2
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 64))
    for f in frames:
        w.write(cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2BGR), (64, 64)))
    w.release()
    return path


def test_video_file(tiny_bundle, corrupted_frames, tmp_path):
    video = write_video(tmp_path / "clip.avi", corrupted_frames[0][:40])
    r = serve(tiny_bundle, "--source", video, "--batch", 8, "--collapse-window", 0)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in r.stdout.splitlines()]
    assert [x["frame"] for x in recs] == list(range(40))
    assert summary(r.stderr)["adapted_batches"] == 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_ffmpeg_mjpeg_stream_server(tiny_bundle, corrupted_frames, tmp_path):
    """ffmpeg's own MJPEG server (it says application/octet-stream; the parts say the rest).
    serve may start first: it retries until ffmpeg listens."""
    video = write_video(tmp_path / "clip.avi", corrupted_frames[0][:45])
    url = f"http://127.0.0.1:{free_port()}/"
    ff = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-i", str(video),
                           "-f", "mpjpeg", "-listen", "1", url],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = serve(tiny_bundle, "--source", url, "--limit", 30, "--batch", 8, "--collapse-window", 0,
                  "--reconnect-delay", 0.2, "--reconnect-max-delay", 0.5, timeout=60)
        assert r.returncode == 0, r.stderr
        frames = [json.loads(l)["frame"] for l in r.stdout.splitlines()]
        # a live source: the newest frame is predicted; any frame not taken in time is dropped
        # and counted, never queued
        assert len(frames) == 30 and frames == sorted(set(frames))
        assert frames[-1] + 1 - len(frames) == summary(r.stderr)["dropped_frames"]
    finally:
        ff.kill()
        ff.wait(timeout=30)


def test_unreachable_stream_backs_off_then_gives_up(tiny_bundle):
    r = serve(tiny_bundle, "--source", f"http://127.0.0.1:{free_port()}/", "--reconnect-delay", 0.05,
              "--reconnect-max-delay", 0.1, "--reconnect-attempts", 3, timeout=60)
    assert r.returncode == 1
    delays = re.findall(r"reconnecting in ([\d.]+)s \(attempt (\d)/3\)", r.stderr)
    assert delays == [("0.05", "1"), ("0.10", "2"), ("0.10", "3")]  # doubling, bounded
    assert "gave up after 3 reconnect attempts" in r.stderr


def test_sigkill_mid_stream_then_restart_resumes_the_last_checkpoint(tiny_bundle, tmp_path):
    state = tmp_path / "state"
    path = state / "state.npz"
    reader = Adapter.load(tiny_bundle)
    s = Serve(tiny_bundle, "--source", "demo", "--loop", "--batch", 8, "--checkpoint-every", 1,
              "--state-dir", state, "--collapse-window", 0)
    loads = []
    try:
        def load_checkpoint():  # every checkpoint seen while it runs loads whole
            if path.exists():
                reader.resume(path)
                loads.append(reader.steps)
            return len(loads) >= 5 and loads[-1] >= 4

        s.wait_for(load_checkpoint)
        s.proc.kill()  # SIGKILL: no handler, no final checkpoint
        s.proc.wait(timeout=30)
    finally:
        s.cleanup()
    reader.resume(path)
    last = reader.steps
    assert last >= max(loads) > 0

    r = serve(tiny_bundle, "--source", "demo", "--limit", 16, "--batch", 8, "--state-dir", state,
              "--collapse-window", 0)
    assert r.returncode == 0, r.stderr
    assert f"resumed the adapted state from {path} ({last} steps)" in r.stderr
    assert summary(r.stderr)["adaptation_steps"] == last + 2
    reader.resume(path)
    assert reader.steps == last + 2


def _fuzz_folder(folder: Path) -> dict:
    """Good and bad frames interleaved; returns the expected skip counts and good frames."""
    import cv2
    rng = np.random.default_rng(0)
    folder.mkdir()
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    good = {
        "a.ppm": b"P6\n# a comment\n32 32\n255\n" + img.tobytes(),
        "c.pgm": b"P5 32 32 255\n" + img[..., 0].tobytes(),
    }
    for name, data in good.items():
        (folder / name).write_bytes(data)
    cv2.imwrite(str(folder / "e.png"), img)
    cv2.imwrite(str(folder / "g_rgba.png"), np.dstack([img, img[..., :1]]))
    cv2.imwrite(str(folder / "i_grey.jpg"), img[..., 0])
    cv2.imwrite(str(folder / "k_big.png"), rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    np.save(folder / "m.npy", img)
    np.save(folder / "o_grey.npy", img[..., 0])
    np.save(folder / "q_rgba.npy", np.dstack([img, img[..., :1]]))
    np.save(folder / "s_float.npy", img.astype(np.float32))
    bad = {
        "b_random.jpg": rng.bytes(2000), "d_random.png": rng.bytes(700), "f_random.npy": rng.bytes(500),
        "h_truncated.ppm": b"P6\n32 32\n255\n" + img.tobytes()[:1000], "j_zero.png": b"",
        "l_zero.npy": b"", "n_random.bmp": rng.bytes(64),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    nan = img.astype(np.float32)
    nan[3, 4, 1] = np.nan
    np.save(folder / "p_nan.npy", nan)
    np.save(folder / "r_5ch.npy", np.zeros((32, 32, 5), np.uint8))
    np.save(folder / "t_flat.npy", np.zeros(100, np.uint8))
    np.save(folder / "u_empty.npy", np.zeros((0, 32, 3), np.uint8))
    np.save(folder / "v_object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "notes.txt").write_text("not a frame: ignored")
    return {"skipped": {"corrupt": 6, "empty": 3, "nan": 1, "shape": 2}, "good": 10}


def test_fuzzed_folder_is_skipped_and_counted_and_the_stream_goes_on(tiny_bundle, tmp_path):
    expect = _fuzz_folder(tmp_path / "frames")
    r = serve(tiny_bundle, "--source", tmp_path / "frames", "--batch", 4, "--collapse-window", 0)
    assert r.returncode == 0, r.stderr
    s = summary(r.stderr)
    assert s["skipped"] == expect["skipped"], r.stderr
    assert s["frames"] == expect["good"] == len(r.stdout.splitlines())
    for kind in expect["skipped"]:
        assert r.stderr.count(f"warning: skipped a frame ({kind})") == 1
    assert "Traceback" not in r.stderr


def test_without_opencv_folders_arrays_and_mjpeg_work_and_capture_says_how_to_install(tiny_bundle,
                                                                                      tmp_path):
    expect = _fuzz_folder(tmp_path / "frames")
    r = serve(tiny_bundle, "--source", tmp_path / "frames", "--batch", 4, "--collapse-window", 0,
              no_cv2=True)
    assert r.returncode == 0, r.stderr
    s = summary(r.stderr)
    assert s["frames"] == expect["good"] and s["skipped"] == expect["skipped"]  # Pillow decodes
    frames = np.random.default_rng(1).integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", frames)
    r = serve(tiny_bundle, "--source", tmp_path / "frames.npy", "--batch", 4, no_cv2=True)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 12, r.stderr
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 100)
    for args in (("--source", tmp_path / "clip.mp4"), ("--source", "0"),
                 ("--source", "rtsp://127.0.0.1:9/x")):
        r = serve(tiny_bundle, *args, no_cv2=True, timeout=60)
        assert r.returncode == 2 and "pip install 'edgetta[capture]'" in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1


def test_frame_parsers():
    assert to_rgb_frame(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert to_rgb_frame(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    assert to_rgb_frame(np.full((4, 5, 3), 300.0)).max() == 255
    for bad, kind in ((np.full((2, 2, 3), np.inf), "nan"), (np.zeros((0, 5, 3)), "empty"),
                      (np.zeros((4, 5, 2)), "shape"), ("x", "shape"),
                      (np.zeros((4, 5, 3), complex), "shape")):
        with pytest.raises(FrameError) as e:
            to_rgb_frame(bad)
        assert e.value.kind == kind
    ascii_pgm = read_netpbm(b"P2\n2 1\n15\n0 15\n")
    assert ascii_pgm.shape == (1, 2, 1) and ascii_pgm[0, :, 0].tolist() == [0, 255]
    sixteen = read_netpbm(b"P6 1 1 65535\n" + np.array([65535, 0, 32768], ">u2").tobytes())
    assert sixteen[0, 0].tolist() == [255, 0, 128]
    with pytest.raises(FrameError):
        read_netpbm(b"P6 1 1")
    import io
    body = b"--b\r\nContent-Type: image/jpeg\r\n\r\nAAA\r\n--b\r\nContent-Length: 2\r\n\r\nBB\r\n--b\r\n\r\n"
    assert list(mjpeg_parts(io.BufferedReader(io.BytesIO(body), 4), b"b", chunk=3)) == [b"AAA", b"BB"]
