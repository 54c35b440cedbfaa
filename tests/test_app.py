"""`vision-gpt app`: captions, scores, limits and messages, then the real page in headless Chromium."""

import argparse
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from vision_gpt.app import EXAMPLES_DIR, Captioner, DecodingSettings, build_app, caption_request, register

from . import browser
from .conftest import random_images

gradio = pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(num_beams=3, num_captions=3, max_new_tokens=10)


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return Captioner.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The same saved model, loaded on its own: what the app's answers are checked against."""
    return AutoModel.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app-images")
    paths = []
    for i, image in enumerate(random_images(2, seed=21, size=(48, 64))):
        # PNG: lossless, so the page and the direct call see the same pixels.
        paths.append(folder / f"photo_{i}.png")
        image.save(paths[-1])
    return paths


def direct_beams(reference, processor, path, num_beams, num_return_sequences, max_new_tokens):
    """Captions and beam scores straight from `generate`, as the README shows it."""
    out = reference.generate(**processor(images=[str(path)]), num_beams=num_beams,
                             num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                             output_scores=True, return_dict_in_generate=True)
    return list(zip(processor.batch_decode(out.sequences), out.sequences_scores.tolist()))


def forward_average_log_prob(reference, processor, path, caption_ids):
    """A caption's average log-probability per generated token, from one forward pass (no generate involved)."""
    end = processor.tokenizer.eos_token_id
    ids = caption_ids.tolist()
    generated = ids[1:]
    if end in generated:
        generated = generated[: generated.index(end) + 1]  # up to and including the end token
    input_ids = torch.tensor([ids[: len(generated) + 1]])
    logits = reference(pixel_values=processor(images=[str(path)])["pixel_values"], input_ids=input_ids).logits
    log_probs = logits[0, :-1].log_softmax(-1).gather(-1, input_ids[0, 1:, None])[:, 0]
    return log_probs.mean().item()


# ----- captions and scores -----------------------------------------------------------------------------------------


def test_beam_captions_and_scores_are_generates(captioner, reference, processor, image_files):
    images, errors = captioner.load_inputs(image_files, "")
    assert errors == []
    results = captioner.caption([item.image for item in images], DecodingSettings(**SETTINGS))
    for path, captions in zip(image_files, results):
        expected = direct_beams(reference, processor, path, 3, 3, 10)
        assert [c.text for c in captions] == [text for text, _ in expected]
        assert [c.score for c in captions] == pytest.approx([score for _, score in expected], abs=1e-4)
    assert results[0][0].text != results[1][0].text, "the two images should get different captions"


def test_greedy_and_sampled_scores_are_the_models_average_token_log_prob(captioner, reference, processor,
                                                                        image_files):
    path = image_files[0]
    image = captioner.load_inputs([path], "")[0][0].image
    greedy = captioner.caption([image], DecodingSettings(num_beams=1, num_captions=1, max_new_tokens=8))[0]
    expected = reference.generate(**processor(images=[str(path)]), num_beams=1, do_sample=False, max_new_tokens=8)
    assert [c.text for c in greedy] == processor.batch_decode(expected)
    assert greedy[0].score == pytest.approx(forward_average_log_prob(reference, processor, path, expected[0]),
                                            abs=1e-4)

    settings = DecodingSettings(num_beams=1, num_captions=2, max_new_tokens=8, do_sample=True, temperature=1.7,
                                top_p=0.8, seed=3)
    sampled = captioner.caption([image], settings)[0]
    torch.manual_seed(3)
    expected = reference.generate(**processor(images=[str(path)]), do_sample=True, temperature=1.7, top_p=0.8,
                                  top_k=0, num_beams=1, num_return_sequences=2, max_new_tokens=8)
    assert [c.text for c in sampled] == processor.batch_decode(expected)
    for caption, ids in zip(sampled, expected):
        # Scored by the model itself (before temperature and top-p), as the page says.
        assert caption.score == pytest.approx(forward_average_log_prob(reference, processor, path, ids), abs=1e-4)


def test_bfloat16_model_captions_with_finite_scores(tiny_model_dir, image_files):
    fast = Captioner.from_pretrained(str(tiny_model_dir), dtype="bfloat16")
    assert fast.model.dtype == torch.bfloat16
    image = fast.load_inputs(image_files[:1], "")[0][0].image
    for settings in (DecodingSettings(**SETTINGS), DecodingSettings(num_beams=1, num_captions=1, max_new_tokens=6)):
        captions = fast.caption([image], settings)[0]
        assert captions[0].text and all(-100 < c.score <= 0 for c in captions)


def test_sampling_repeats_under_the_same_seed_only(captioner, image_files):
    image = captioner.load_inputs(image_files[:1], "")[0][0].image

    def sample(seed):
        settings = DecodingSettings(num_beams=1, num_captions=3, max_new_tokens=8, do_sample=True, temperature=1.5,
                                    seed=seed)
        return [c.text for c in captioner.caption([image], settings)[0]]

    first = sample(1)
    assert len(first) == 3
    assert sample(1) == first
    assert sample(2) != first


def test_impossible_settings_are_adjusted_with_a_note(captioner, image_files):
    image = captioner.load_inputs(image_files[:1], "")[0][0].image
    results, notes = captioner.run([image], DecodingSettings(num_beams=1, num_captions=4, max_new_tokens=4))
    assert len(results[0]) == 1 and "Greedy decoding" in notes[0]
    results, notes = captioner.run([image], DecodingSettings(num_beams=2, num_captions=5, max_new_tokens=4))
    assert len(results[0]) == 2 and "at most 2 captions" in notes[0]
    results, notes = captioner.run([image], DecodingSettings(num_beams=3, num_captions=2, max_new_tokens=4,
                                                             do_sample=True))
    assert len(results[0]) == 2 and "Beams setting is not used" in notes[0]


# ----- inputs and their limits -------------------------------------------------------------------------------------


def request(captioner, files, urls=""):
    """The Caption button's handler with short settings; returns (status HTML, results HTML, gallery)."""
    return caption_request(captioner, files, urls, 2, 2, 4, False, 1.0, 0.9, 0)


def test_bad_files_get_one_line_messages_and_good_ones_are_still_captioned(captioner, image_files, tmp_path):
    broken, empty, text = tmp_path / "broken.jpg", tmp_path / "empty.png", tmp_path / "notes.png"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a JPEG header and nothing after it
    empty.write_bytes(b"")
    text.write_text("not a picture")
    status, results, gallery = request(captioner, [str(broken), str(image_files[0]), str(empty), str(text)])
    assert "broken.jpg" in status and "empty.png" in status and "empty (0 bytes)" in status
    assert "notes.png" in status and "not an image" in status
    assert str(tmp_path) not in status, "messages name the file the user uploaded, not the server's copy"
    assert "Traceback" not in status
    assert 'data-image="photo_0.png"' in results and len(gallery) == 1


def test_oversized_files_and_too_many_images_are_refused(captioner, image_files, tmp_path):
    small = Captioner(captioner.model, captioner.processor, max_upload_mb=0.001, max_images=2)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x00" * 2048)  # the size is checked before anything is decoded
    status, results, _ = request(small, [str(big)])
    assert "big.png is 2 KB; the limit is 1.02 KB per file" in status and results == ""
    status, _, _ = request(small, [str(image_files[0])] * 3)
    assert "3 images were given; this app captions at most 2 at a time" in status
    status, _, _ = request(small, [])
    assert "Add an image first" in status


def test_urls_offline_private_or_not_http_get_a_clear_message_fast(captioner):
    started = time.perf_counter()
    status, results, _ = request(captioner, [], "http://images.example.invalid/dog.jpg")
    assert time.perf_counter() - started < 7
    assert "Could not fetch http://images.example.invalid/dog.jpg" in status and "upload it instead" in status
    assert results == ""
    status, _, _ = request(captioner, [], "http://127.0.0.1:9/cat.png\nfile:///etc/passwd")
    assert "private or local network (127.0.0.1)" in status
    assert "file:///etc/passwd is not an http:// or https:// address" in status


@pytest.fixture
def image_server(image_files):
    """A local web server over the test images, plus one that accepts connections and never answers."""
    def handler(*args):
        return http.server.SimpleHTTPRequestHandler(*args, directory=str(image_files[0].parent))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", f"http://127.0.0.1:{silent.getsockname()[1]}"
    finally:
        server.shutdown()
        server.server_close()
        silent.close()


def test_urls_are_fetched_within_the_time_and_size_limits(captioner, image_files, image_server):
    served, silent = image_server
    local = Captioner(captioner.model, captioner.processor, allow_private_urls=True, url_timeout=1.0)
    status, results, _ = request(local, [], f"{served}/photo_0.png")
    by_upload = request(local, [str(image_files[0])])[1]
    assert "vg-error" not in status
    assert results.replace(f"{served}/photo_0.png", "photo_0.png") == by_upload

    started = time.perf_counter()
    status, _, _ = request(local, [], f"{silent}/slow.jpg")
    assert time.perf_counter() - started < 4
    assert "timed out" in status or "took longer than 1 s" in status

    tiny_limit = Captioner(captioner.model, captioner.processor, allow_private_urls=True, max_upload_mb=0.001)
    status, _, _ = request(tiny_limit, [], f"{served}/photo_0.png")
    assert "is larger than the 1.02 KB limit" in status


# ----- the page and the command --------------------------------------------------------------------------------------


def test_app_subcommand_defaults_are_safe():
    parser = argparse.ArgumentParser(prog="vision-gpt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app", "--model", "some/model"])
    assert (args.host, args.share, args.max_upload_mb, args.max_images, args.dtype) == (
        "127.0.0.1", False, 10, 8, "float32")
    assert args.func.__name__ == "run"
    args = parser.parse_args(["app", "--model", "m", "--max_upload_mb", "2", "--dtype", "bfloat16", "--no-urls"])
    assert (args.max_upload_mb, args.dtype, args.no_urls) == (2, "bfloat16", True)


def test_page_has_a_bounded_queue_and_shipped_examples(captioner):
    demo = build_app(captioner=captioner, queue_size=5)
    assert demo._queue.max_size == 5 and demo._queue.default_concurrency_limit == 1
    examples = sorted(EXAMPLES_DIR.glob("*.jpg"))
    assert len(examples) >= 3 and all(path.stat().st_size < 50_000 for path in examples)
    assert demo.captioner.load_inputs(examples, "")[1] == [], "every shipped example is a readable image"


def test_app_command_serves_on_localhost_and_stops_on_ctrl_c(tiny_model_dir):
    port = browser.free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    # `python -m vision_gpt.cli` is the `vision-gpt` entry point, without depending on the venv's bin/ being on PATH.
    command = [sys.executable, "-m", "vision_gpt.cli", "app", "--model", str(tiny_model_dir), "--port", str(port)]
    # A shell's background job (e.g. `.ci/run &`) starts with SIGINT ignored, and children inherit that: give the app
    # the default disposition, so that Ctrl-C reaches it as it would from a terminal.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        # The command prints its address once the server is up and the page is ready.
        while not any("vision-gpt app: serving" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the app did not start within 60 s:\n" + "".join(lines)
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert "vision-gpt captioner" in response.read().decode()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the app did not stop within 60 s of Ctrl-C:\n" + "".join(lines))
        reader.join(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines)
    assert process.returncode == 0, output
    assert f"at http://127.0.0.1:{port}/" in output


@pytest.fixture(scope="module")
def live_app(captioner):
    """The page served on 127.0.0.1 and a headless Chromium; both stopped at the end of the module."""
    reason = browser.missing_browser_reason()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    demo = build_app(captioner=captioner)
    with browser.running_app(demo) as url, browser.chromium() as chromium:
        yield url, chromium


def test_page_captions_an_upload_and_explains_a_broken_file(live_app, reference, processor, image_files, tmp_path):
    url, chromium = live_app
    page = browser.open_app(chromium, url)
    # The shipped examples work from the first visit: click one, press Caption.
    page.get_by_text("drawing: sailboat at the beach").click()
    page.locator("#images").get_by_label("beach.jpg", exact=True).wait_for()
    browser.press_caption(page)
    assert len(browser.read_results(page)["beach.jpg"]) == 3

    browser.upload(page, image_files[0])
    browser.set_slider(page, "num-beams", 4)
    browser.set_slider(page, "num-captions", 2)
    browser.set_slider(page, "max-new-tokens", 9)
    browser.press_caption(page)
    shown = browser.read_results(page)
    expected = direct_beams(reference, processor, image_files[0], num_beams=4, num_return_sequences=2,
                            max_new_tokens=9)
    assert list(shown) == ["photo_0.png"]
    assert [text for text, _ in shown["photo_0.png"]] == [text for text, _ in expected]
    # Scores are shown with three decimals.
    assert [score for _, score in shown["photo_0.png"]] == pytest.approx([s for _, s in expected], abs=6e-4)
    assert browser.read_errors(page) == []
    screenshot = tmp_path / "app_screenshot.png"
    page.screenshot(path=str(screenshot), full_page=True)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    browser.upload(page, broken)
    browser.press_caption(page)
    errors = browser.read_errors(page)
    assert len(errors) == 1 and errors[0].startswith("broken.jpg is not an image PIL can read")
    assert browser.read_results(page) == {}
    assert "Traceback" not in page.content()

    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 10_000
    _keep_artifact(screenshot)


def test_page_sampling_settings_reach_the_model(live_app, reference, processor, image_files):
    url, chromium = live_app
    page = browser.open_app(chromium, url)
    browser.upload(page, image_files[1])
    assert page.locator("#temperature input[type=number]").is_disabled(), "sampling-only settings start greyed out"
    page.locator("#do-sample input[type=checkbox]").check()
    browser.set_slider(page, "temperature", 1.3)
    page.locator("#seed input").fill("5")
    browser.set_slider(page, "num-captions", 2)
    browser.set_slider(page, "max-new-tokens", 8)
    browser.press_caption(page)
    torch.manual_seed(5)
    expected = reference.generate(**processor(images=[str(image_files[1])]), do_sample=True, temperature=1.3,
                                  top_p=0.9, top_k=0, num_beams=1, num_return_sequences=2, max_new_tokens=8)
    shown = browser.read_results(page)[image_files[1].name]
    assert [text for text, _ in shown] == processor.batch_decode(expected)
    assert "Beams setting is not used" in page.locator("#status").inner_text()


def test_two_visitors_at_once_both_get_their_captions(live_app, reference, processor, image_files):
    url, chromium = live_app
    pages = [browser.open_app(chromium, url) for _ in image_files]
    for page, path in zip(pages, image_files):
        browser.upload(page, path)
        browser.set_slider(page, "max-new-tokens", 10)
    stamps = [page.locator("#status .vg-status").count() for page in pages]
    assert stamps == [0, 0]
    for page in pages:  # both requests are in the queue before either answer arrives
        page.click("#caption-button")
    for page, path in zip(pages, image_files):
        page.wait_for_selector(f'#captions .vg-result[data-image="{path.name}"]')
        shown = browser.read_results(page)[path.name]
        assert [text for text, _ in shown] == [text for text, _ in direct_beams(reference, processor, path, 3, 3, 10)]


def test_uploads_over_the_limit_are_refused_by_the_server(live_app, tmp_path):
    url, _ = live_app
    big = tmp_path / "huge.jpg"
    big.write_bytes(b"\xff" * (10 * 1024 * 1024 + 1))
    boundary = "vision-gpt-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    upload = urllib.request.Request(f"{url}gradio_api/upload", data=body, method="POST",
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(upload, timeout=30)
    assert refused.value.code == 413


def _keep_artifact(screenshot: Path) -> None:
    """With VISION_GPT_ARTIFACTS set (1, or a folder), also keep the screenshot where CI collects artifacts."""
    target = os.environ.get("VISION_GPT_ARTIFACTS")
    if not target or target == "0":
        return
    folder = REPO_ROOT / "artifacts" if target in ("1", "true", "yes") else Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, folder / "app_screenshot.png")
