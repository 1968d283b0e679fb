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
import urllib.error
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


class ScriptedServer:
    """An HTTP server on 127.0.0.1 whose GET handler is ``script(handler)``."""

    def __init__(self, script):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    script(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cam"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class MJPEGServer(ScriptedServer):
    """A real MJPEG stream on 127.0.0.1: multipart/x-mixed-replace JPEG parts encoded by
    OpenCV, with one corrupt part per connection, closing each connection after ``per_conn``
    parts (a dropped stream, for the reconnect)."""

    def __init__(self, frames, per_conn=24):
        import cv2
        jpegs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in frames]
        self.connections = 0

        def stream(h):
            self.connections += 1
            h.send_response(200)
            h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            h.end_headers()
            for i in range(per_conn):
                body = os.urandom(300) if i == 5 else jpegs[i % len(jpegs)]
                # some parts say their length, some leave it to the boundary
                head = b"--frame\r\nContent-Type: image/jpeg\r\n"
                if i % 2:
                    head += b"Content-Length: %d\r\n" % len(body)
                h.wfile.write(head + b"\r\n" + body + b"\r\n")
                time.sleep(0.01)

        super().__init__(stream)


def test_refused_before_start_with_one_line(tiny_bundle, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    (tampered / "inference.onnx").write_bytes(b"not a model")
    cases = [
        ((tmp_path / "nowhere", "--source", "demo"), "not found"),
        ((tampered, "--source", "demo"), "inference.onnx"),
        ((tiny_bundle, "--source", tmp_path / "missing.mp4"), "not found"),
        ((tiny_bundle, "--source", "demo", "--engine", "ort-training", "--memory-budget", "50"),
         "from the bundle's profile"),
        # serve adapts with the portable step by default: the profile (ort-training) does not apply
        ((tiny_bundle, "--source", "demo", "--memory-budget", "50"), "(measured)"),
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
        # a live source: the worker may be behind (those frames say "adapted": false)
        s.wait_for(lambda: metric(get(f"http://127.0.0.1:{http}/metrics"), "adapted_batches_total") >= 3)
        assert metric(metrics, "reconnects_total") >= 2
        assert metric(metrics, 'skipped_frames_total{kind="corrupt"}') >= 2
        assert metric(metrics, 'skipped_frames_total{kind="nan"}') == 0
        assert metric(metrics, "peak_resident_memory_bytes") > 10e6
        assert metric(metrics, "frames_per_second") > 0
        assert "# TYPE edgetta_frames_total counter" in metrics
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


# -- service behaviour: health, limits, hostile clients, full disk, bad state ----------------

def jpeg_bytes(seed=0):
    import io
    from PIL import Image
    img = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG")
    return out.getvalue()


def status_of(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_ready_fail_soon_after_the_camera_goes_away_and_metrics_parse(tiny_bundle):
    from prometheus_client.parser import text_string_to_metric_families
    jpg = jpeg_bytes()
    alive = threading.Event()
    alive.set()

    def camera(h):
        h.send_response(200)
        h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
        h.end_headers()
        while alive.is_set():
            h.wfile.write(b"--f\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
            time.sleep(0.04)

    cam = ScriptedServer(camera)
    s = Serve(tiny_bundle, "--source", cam.url, "--batch", 8, "--http", 0, "--stale-after", 3,
              "--frame-timeout", 2, "--reconnect-delay", 0.2, "--reconnect-attempts", 0)
    try:
        port = s.port(r"http://127\.0\.0\.1:(\d+)/metrics")
        s.wait_for(lambda: len(s.out) >= 40)
        assert status_of(f"http://127.0.0.1:{port}/health")[0] == 200
        code, body = status_of(f"http://127.0.0.1:{port}/ready")
        assert code == 200 and body["ready"] and body["reasons"] == []
        text = get(f"http://127.0.0.1:{port}/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["edgetta_frames"].type == "counter"
        assert fams["edgetta_frames"].samples[0].value >= 40
        for name in ("edgetta_predict_seconds", "edgetta_adapt_seconds", "edgetta_frame_latency_seconds"):
            assert fams[name].type == "histogram"
            buckets = [x for x in fams[name].samples if x.name.endswith("_bucket")]
            assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value > 0
            assert [b.value for b in buckets] == sorted(b.value for b in buckets)
        info = fams["edgetta_build_info"].samples[0]
        assert info.labels["engine"] in ("ort-training", "onnx") and info.labels["provider"] == "cpu"
        assert info.labels["version"]
        for name in ("edgetta_dropped_frames", "edgetta_checkpoint_failures", "edgetta_skipped_frames"):
            assert fams[name].type == "counter"
        assert "edgetta_resident_memory_bytes" in fams

        alive.clear()  # the camera goes away
        t0 = time.monotonic()
        code = 200
        while code == 200 and time.monotonic() - t0 < 20:
            time.sleep(0.2)
            code, body = status_of(f"http://127.0.0.1:{port}/health")
        assert code == 503 and time.monotonic() - t0 < 20, body
        assert any("no frame for" in r for r in body["reasons"])
        assert status_of(f"http://127.0.0.1:{port}/ready")[0] == 503
        s.wait_for(lambda: "the stream ended; reconnecting" in "".join(s.err), timeout=20)
        assert s.stop() == 0
    finally:
        s.cleanup()
        alive.clear()
        cam.close()


def test_hostile_streams_reconnect_with_escaped_warnings(tiny_bundle):
    """A part claiming 1 TB, garbage without a boundary, a byte at a time, a Content-Type full
    of control characters: each is a warning and a reconnect, never a hang or a traceback."""
    jpg = jpeg_bytes()
    conn = {"n": 0}

    def hostile(h):
        conn["n"] += 1
        kind = conn["n"] % 4
        h.send_response(200)
        if kind == 1:
            h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
            h.end_headers()
            h.wfile.write(b"--f\r\nContent-Length: 1000000000000\r\n\r\n" + b"x" * 1000)
            time.sleep(5)
        elif kind == 2:
            h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
            h.end_headers()
            for _ in range(40):
                h.wfile.write(os.urandom(1 << 16).replace(b"--f", b"xxx"))
        elif kind == 3:
            h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
            h.end_headers()
            for _ in range(8):  # a byte every 0.5 s: every read succeeds, no frame completes
                h.wfile.write(b"-")
                h.wfile.flush()
                time.sleep(0.5)
        else:
            h.send_header("Content-Type", "multipart/x-mixed-replace\x1b[31m;\x07 x=\x1b]0;pwned\x07")
            h.end_headers()
        h.wfile.write(b"--f\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n--f\r\n")

    srv = ScriptedServer(hostile)
    try:
        r = serve(tiny_bundle, "--source", srv.url, "--batch", 4, "--frame-timeout", 1.5,
                  "--max-part-mib", 1, "--reconnect-delay", 0.05, "--reconnect-max-delay", 0.1,
                  "--reconnect-attempts", 6, "--collapse-window", 0, timeout=90)
    finally:
        srv.close()
    assert r.returncode == 1 and "gave up after 6 reconnect attempts" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert "exceeds the 1,048,576-byte limit" in r.stderr
    assert "data without a boundary exceeds" in r.stderr
    assert "no complete frame in 1.5 s" in r.stderr
    assert "without a boundary (multipart/x-mixed-replace\\x1b[31m" in r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr


def test_decompression_bomb_and_oversized_files_are_skipped_cheaply(tiny_bundle, tmp_path):
    from test_sources import png_header_only
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a_bomb.png").write_bytes(png_header_only(30000, 30000))
    (folder / "b_ok.jpg").write_bytes(jpeg_bytes())
    (folder / "c_big.ppm").write_bytes(b"P6 3000 3000 255\n" + b"\x00" * (3000 * 3000 * 3))
    t = time.perf_counter()
    r = serve(tiny_bundle, "--source", folder, "--batch", 2, "--max-part-mib", 8,
              "--collapse-window", 0)
    assert r.returncode == 0, r.stderr
    s = summary(r.stderr)
    assert s["frames"] == 1 and s["skipped"] == {"too_large": 2}
    assert "warning: skipped a frame (too_large): a_bomb.png" in r.stderr
    assert time.perf_counter() - t < 60


def test_bad_label_files_are_refused_with_one_line(tiny_bundle, tmp_path):
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    cases = {"short.npz": dict(images=imgs, labels=np.zeros(3, np.int64)),
             "range.npz": dict(images=imgs, labels=np.array([0, 1, 2, 10])),
             "zero_d.npz": dict(images=np.zeros((), np.uint8)),
             "empty_labels.npz": dict(images=imgs, labels=np.zeros(0, np.int64))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        r = serve(tiny_bundle, "--source", tmp_path / name, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, \
            (name, r.stderr)
    r = serve(tiny_bundle, "--source", tmp_path / "range.npz", timeout=60)
    assert "label 10 of image 3 is out of range (the model has 10 classes)" in r.stderr


def thread_count(pid):
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def test_slow_and_idle_clients_cannot_exhaust_threads_or_handles(tiny_bundle):
    s = Serve(tiny_bundle, "--source", "demo", "--loop", "--fps", 50, "--batch", 16, "--http", 0,
              "--preview", 0, "--http-connections", 8, "--http-timeout", 2, "--preview-clients", 2,
              "--output", os.devnull)
    socks = []
    try:
        port = s.port(r"http://127\.0\.0\.1:(\d+)/metrics")
        preview = s.port(r"preview on http://127\.0\.0\.1:(\d+)/")
        base = thread_count(s.proc.pid)
        for _ in range(200):  # half-open requests: connect, send part of a request line, wait
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"GET /heal")
            socks.append(c)
        time.sleep(0.5)
        assert thread_count(s.proc.pid) <= base + 8 + 2
        fds = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
        assert fds < 100
        # the idle ones are dropped after --http-timeout; then /health answers at once
        time.sleep(3)
        t = time.perf_counter()
        assert status_of(f"http://127.0.0.1:{port}/health")[0] == 200
        assert time.perf_counter() - t < 1.0
        metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert metric(metrics, "http_refused_connections_total") >= 150
        # preview viewers are capped: two watch, the rest get 503 at once
        viewers = [urllib.request.urlopen(f"http://127.0.0.1:{preview}/", timeout=10) for _ in range(2)]
        for v in viewers:
            assert next(mjpeg_parts(v, b"edgettaframe"))[:2] == b"\xff\xd8"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{preview}/", timeout=10)
        assert e.value.code == 503
        for v in viewers:
            v.close()
        assert s.stop() == 0
    finally:
        for c in socks:
            c.close()
        s.cleanup()


def test_full_disk_checkpoint_fails_is_counted_and_serving_goes_on(tiny_bundle, tmp_path):
    """A real write failure from the kernel: the file-size limit (RLIMIT_FSIZE) of the serve
    process is below the size of one state file, so every checkpoint's write fails with EFBIG."""
    import resource
    state = tmp_path / "state"
    probe = tmp_path / "probe"
    Adapter.load(tiny_bundle).save(probe / "state.npz")
    limit = (probe / "state.npz").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = serve(tiny_bundle, "--source", "demo", "--limit", 64, "--batch", 8, "--checkpoint-every", 2,
              "--state-dir", state, "--collapse-window", 0, preexec_fn=small_files, timeout=120)
    assert r.returncode == 0, r.stderr
    s = summary(r.stderr)
    assert s["frames"] == 64 and s["adapted_batches"] == 8 and len(r.stdout.splitlines()) == 64
    assert s["checkpoints"] == 0 and s["checkpoint_failures"] == 5  # every 2 batches, and at the end
    assert "warning: checkpoint to" in r.stderr and "serving goes on" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in state.iterdir()) == ["lock"]  # no temp file, no partial state


def test_nan_state_is_refused_at_resume_and_serving_starts_from_the_bundle(tiny_bundle, tmp_path):
    state = tmp_path / "state"
    a = Adapter.load(tiny_bundle)
    a.save(state / "state.npz")
    with np.load(state / "state.npz") as d:
        arrays = {k: d[k] for k in d.files}
    name = next(k for k in arrays if k.startswith("t/"))
    arrays[name] = np.full_like(arrays[name], np.nan)
    np.savez(state / "state.npz", **arrays)
    r = serve(tiny_bundle, "--source", "demo", "--limit", 32, "--batch", 8, "--state-dir", state,
              "--collapse-window", 0)
    assert r.returncode == 0, r.stderr
    assert "non-finite" in r.stderr and "starting from the bundle's warmed-up state" in r.stderr
    recs = [json.loads(l) for l in r.stdout.splitlines()]  # strict JSON: no bare NaN
    assert len(recs) == 32 and all(0 <= x["confidence"] <= 1 for x in recs)
    s = summary(r.stderr)
    assert s["resumed_steps"] is None and s["adaptation_steps"] == 4
    b = Adapter.load(tiny_bundle)
    b.resume(state / "state.npz")  # the final checkpoint replaced the bad file with good state
    assert b.steps == 4


def test_service_runs_in_process(tiny_bundle, tmp_path):
    from edgetta.serve import ServeConfig, Service
    out = tmp_path / "out.jsonl"
    cfg = ServeConfig(bundle=str(tiny_bundle), source="demo", limit=40, batch=8, output=str(out))
    summ = Service(cfg).run(install_signals=False)
    assert summ.frames == 40 and summ.adapted_batches == 5 and summ.labelled == 40
    assert summ.latency_ms_p50 is not None and summ.max_output_gap_ms is not None
    assert len(out.read_text().splitlines()) == 40
    from edgetta.serve.config import Refused
    with pytest.raises(Refused, match="--batch"):
        ServeConfig(bundle=str(tiny_bundle), source="demo", batch=0).check()
