"""`vision-gpt app`: captions, scores, limits and messages, then the real page in headless Chromium."""

import html
import http.server
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from vision_gpt.app import server as app_module
from vision_gpt.app.server import (DEFAULT_QUEUE_SIZE, EXAMPLES_DIR, Captioner, DecodingSettings, build_app,
                                   caption_request, render_results)
from vision_gpt.cli import build_parser

from . import browser
from .conftest import random_images, tiny_model

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
    """Captions and beam scores straight from `generate`, as the docs show it."""
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


def test_greedy_and_sampled_captions_stream_as_they_are_written(captioner, image_files):
    images = [item.image for item in captioner.load_inputs(image_files, "")[0]]
    for settings in (DecodingSettings(num_beams=1, num_captions=1, max_new_tokens=12),
                     DecodingSettings(num_beams=1, num_captions=2, max_new_tokens=12, do_sample=True, seed=4)):
        updates = list(captioner.stream(images, settings, every=0))
        kinds = [kind for kind, _ in updates]
        assert kinds[-1] == "final" and kinds.count("partial") >= 2, kinds
        final = [[caption.text for caption in captions] for captions in updates[-1][1][0]]
        assert final == [[c.text for c in row] for row in captioner.run(images, settings)[0]]
        previous = None
        for _, texts in updates[:-1]:
            # Every update shows text the finished caption starts with, and never takes text back.
            for row_now, row_final in zip(texts, final):
                assert all(done.strip().startswith(now) for now, done in zip(row_now, row_final))
            if previous is not None:
                assert all(now.startswith(before) for row_now, row_before in zip(texts, previous)
                           for now, before in zip(row_now, row_before))
            previous = texts
    # Beam search's captions are known only at the end: one answer, no partial ones.
    assert [kind for kind, _ in captioner.stream(images, DecodingSettings(**SETTINGS), every=0)] == ["final"]


def test_the_caption_button_shows_the_captions_while_they_are_written(captioner, image_files):
    class EveryStep(Captioner):  # the page updates at most every 0.1 s; a tiny model is faster than that
        def stream(self, images, settings, every=0.1):
            yield from super().stream(images, settings, every=0)

    answers = list(caption_request(EveryStep(captioner.model, captioner.processor), image_files[:1], "", 1, 1, 12,
                                   False, 1.0, 0.9, 0))
    assert len(answers) >= 3 and "Captioned 1 image" in answers[-1][0] and answers[-1][2]
    final = shown_captions(answers[-1][1])
    for status, results, gallery in answers[:-1]:
        assert "Writing the caption" in status and "data-done" not in status and gallery == []
        (name, (text,)), = shown_captions(results).items()
        assert final[name][0].strip().startswith(text)


def test_captions_carry_the_trust_scores_of_their_text(captioner, reference, processor, image_files):
    from vision_gpt.inference.trust import score_texts

    images, _ = captioner.load_inputs(image_files, "")
    results = captioner.caption([item.image for item in images], DecodingSettings(**SETTINGS))
    for path, captions in zip(image_files, results):
        pixel_values = processor(images=[str(path)] * len(captions))["pixel_values"]
        # Cut at max_new_tokens or not: the one scoring of the written text with the end token where it ended.
        ended = [processor.tokenizer.eos_token_id in ids for ids in reference.generate(
            **processor(images=[str(path)]), num_beams=3, num_return_sequences=3, max_new_tokens=10)[:, 1:].tolist()]
        again = score_texts(reference, processor, pixel_values, [c.text for c in captions],
                            [not end for end in ended])
        assert [c.confidence for c in captions] == pytest.approx(again.confidence.tolist(), abs=1e-4)
        assert [c.grounding for c in captions] == pytest.approx(again.grounding.tolist(), abs=1e-4)
    page = render_results(results, ["a.png", "b.png"])
    assert "<th>confidence</th><th>grounding</th>" in page and f"{results[0][0].grounding:.3f}" in page


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
    """The Caption button's handler with short settings; returns its last answer (status HTML, results HTML,
    gallery)."""
    return list(caption_request(captioner, files, urls, 2, 2, 4, False, 1.0, 0.9, 0))[-1]


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
    assert "Could not fetch http://images.example.invalid/dog.jpg" in status and "send the file instead" in status
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


def app_args(*argv):
    return build_parser().parse_args(["app", *argv])


def test_app_subcommand_defaults_are_safe():
    args = app_args("--model", "some/model")
    assert (args.host, args.share, args.max_upload_mb, args.max_images, args.dtype) == (
        "127.0.0.1", False, 10, 8, "float32")
    assert (args.max_queue, args.concurrency) == (DEFAULT_QUEUE_SIZE, None) and DEFAULT_QUEUE_SIZE >= 64
    assert args.func.__name__ == "run"
    args = app_args("--model", "m", "--max_upload_mb", "2", "--dtype", "bfloat16", "--no-urls")
    assert (args.max_upload_mb, args.dtype, args.no_urls) == (2, "bfloat16", True)


@pytest.mark.parametrize("flags", [["--max-queue", "5", "--concurrency", "2"], ["--max_queue", "5", "--concurrency=2"]])
def test_app_command_passes_queue_flags_to_the_page(flags, monkeypatch):
    built = {}
    monkeypatch.setattr(app_module.logging, "basicConfig", lambda **kwargs: None)  # the server's log set-up
    monkeypatch.setattr(app_module, "build_app", lambda model, **kwargs: built.update(kwargs, model=model) or "demo")
    monkeypatch.setattr(app_module, "launch", lambda demo, **kwargs: built.update(launched=demo))
    args = app_args("--model", "some/model", *flags)
    assert args.func(args) == 0
    assert (built["queue_size"], built["concurrency"], built["launched"]) == (5, 2, "demo")


@pytest.mark.parametrize("flags, message", [
    (["--max-queue", "0"], "error: --max-queue must be at least 1 (requests that may wait), got 0"),
    (["--max_queue", "-3"], "error: --max-queue must be at least 1 (requests that may wait), got -3"),
    (["--concurrency", "0"], "error: --concurrency must be at least 1 (requests captioned at once), got 0"),
])
def test_app_command_refuses_bad_queue_flags_before_loading_the_model(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(app_module, "build_app", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    args = app_args("--model", "some/model", *flags)
    assert args.func(args) == 2
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize("flags, message", [
    (["--model", "some/model", "--server", "http://127.0.0.1:8000/v1"], "error: give a model (--model) or a server "
                                                                        "to caption through (--server), not both"),
    ([], "error: --model is required (or --server)"),
])
def test_app_command_takes_a_model_or_a_server(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(app_module, "build_app", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    args = app_args(*flags)
    assert args.func(args) == 2
    assert capsys.readouterr().err.strip() == message


def test_concurrency_reaches_the_caption_event_and_must_agree_with_the_captioner(captioner):
    def caption_limit(demo):
        return next(fn.concurrency_limit for fn in demo.fns.values() if fn.api_name == "caption")

    assert caption_limit(build_app(captioner=captioner)) == 1
    three = Captioner(captioner.model, captioner.processor, concurrency=3)
    assert caption_limit(build_app(captioner=three)) == 3
    assert caption_limit(build_app(captioner=three, concurrency=3)) == 3
    with pytest.raises(ValueError, match="build the Captioner with concurrency=2"):
        build_app(captioner=three, concurrency=2)
    with pytest.raises(ValueError, match="queue_size must be at least 1"):
        build_app(captioner=captioner, queue_size=0)
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        Captioner(captioner.model, captioner.processor, concurrency=0)


def test_concurrency_means_that_many_generations_at_once_and_sampling_alone(processor, image_files):
    model = tiny_model()
    captioner = Captioner(model, processor, concurrency=3)
    images = [item.image for item in captioner.load_inputs(image_files, "")[0]]
    greedy = DecodingSettings(num_beams=1, num_captions=1, max_new_tokens=6)
    sampled = [DecodingSettings(num_beams=1, num_captions=2, max_new_tokens=6, do_sample=True, temperature=1.5,
                                seed=seed) for seed in (1, 2, 3)]
    # (image, settings) for 6 greedy and 3 sampled requests, and what each gets when it is captioned alone.
    requests = [(images[i % 2], greedy) for i in range(6)] + [(images[0], settings) for settings in sampled]
    alone = [captioner.caption([image], settings)[0] for image, settings in requests]

    plain_generate, counter = model.generate, threading.Lock()
    running, peak = {"all": 0, "sampled": 0}, {"all": 0, "sampled": 0}

    def generate(**kwargs):
        kinds = ("all", "sampled") if kwargs["do_sample"] else ("all",)
        with counter:
            for kind in kinds:
                running[kind] += 1
                peak[kind] = max(peak[kind], running[kind])
        try:
            time.sleep(0.3)  # long enough for every other request to arrive, were it let in
            return plain_generate(**kwargs)
        finally:
            with counter:
                for kind in kinds:
                    running[kind] -= 1

    model.generate = generate  # this test's own model: an instance attribute shadows the method
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: captioner.caption([request[0]], request[1])[0], requests))
    assert peak == {"all": 3, "sampled": 1}
    # The same captions as one at a time: each sampled request drew from its own seed while others ran.
    for got, expected in zip(together, alone):
        assert [c.text for c in got] == [c.text for c in expected]
        assert [c.score for c in got] == pytest.approx([c.score for c in expected], abs=1e-5)


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


# ----- many visitors at once: the queue ------------------------------------------------------------------------------

BURST_SETTINGS = dict(num_beams=1, num_captions=1, max_new_tokens=4, do_sample=False, temperature=1.0, top_p=0.9,
                      seed=0)


def gradio_visitors(url, count):
    """`count` gradio_client clients, each its own visitor (own session); close them with `close()`."""
    from gradio_client import Client

    def visitor(_):
        # httpx's default 5 s timeout would count a join answered late by a busy two-core server as a failure; a
        # browser waits.
        return Client(url, verbose=False, analytics_enabled=False, download_files=False,
                      httpx_kwargs={"timeout": 120})

    with ThreadPoolExecutor(8) as pool:  # each client first reads the page's config: start them side by side
        return list(pool.map(visitor, range(count)))


def _upload(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def ask_caption(visitor, path, settings=BURST_SETTINGS):
    return visitor.predict([_upload(path)], "", *settings.values(), api_name="/caption")


def shown_captions(results_html: str) -> dict[str, list[str]]:
    """{image name: captions} from the results HTML that the page (and the API) receives."""
    sections = re.findall(r'<section class="vg-result" data-image="([^"]*)">(.*?)</section>', results_html)
    return {html.unescape(name): [html.unescape(text) for text in re.findall(r'<td class="vg-caption">(.*?)</td>',
                                                                            body)]
            for name, body in sections}


def test_fifty_visitors_at_once_all_wait_and_get_their_captions(captioner, reference, processor, image_files):
    count = 50
    expected = {path.name: processor.batch_decode(reference.generate(**processor(images=[str(path)]), num_beams=1,
                                                                     max_new_tokens=4))
                for path in image_files}
    demo = build_app(captioner=captioner)  # the defaults, as `vision-gpt app` starts
    with browser.running_app(demo) as url:
        visitors = gradio_visitors(url, count)
        together = threading.Barrier(count, timeout=60)

        def visit(i):
            path = image_files[i % len(image_files)]
            together.wait()  # every request is sent at once, as a burst of visitors would
            try:
                return path, ask_caption(visitors[i], path)
            except Exception as error:  # QueueError when refused; any failure is counted, not raised
                return path, error

        try:
            with ThreadPoolExecutor(count) as pool:
                answers = list(pool.map(visit, range(count)))
        finally:
            for visitor in visitors:
                visitor.close()
    failures = [f"{path.name}: {answer!r}" for path, answer in answers if isinstance(answer, Exception)]
    assert failures == [], f"{len(failures)} of {count} visitors failed: {failures[:3]}"
    for path, (status, results, _) in answers:
        assert "Captioned 1 image" in status
        assert shown_captions(results) == {path.name: expected[path.name]}
        assert expected[path.name][0].strip(), "a real caption, not an empty string"


class HeldCaptioner(Captioner):
    """Holds every request until `release` is set, so that a test can fill the queue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started, self.release = threading.Event(), threading.Event()

    def stream(self, images, settings, every=0.1):
        self.started.set()
        assert self.release.wait(60), "the test never released the held request"
        yield from super().stream(images, settings, every)


@pytest.fixture
def full_queue(captioner, image_files):
    """An app with --max-queue 1: one request captioning (held), one waiting. Yields (url, path); afterwards both
    must get their captions, since waiting is not refusing."""
    from gradio_client.utils import Status

    held = HeldCaptioner(captioner.model, captioner.processor)
    with browser.running_app(build_app(captioner=held, queue_size=1)) as url:
        first, second = visitors = gradio_visitors(url, 2)
        try:
            running = first.submit([_upload(image_files[0])], "", *BURST_SETTINGS.values(), api_name="/caption")
            assert held.started.wait(30)
            waiting = second.submit([_upload(image_files[1])], "", *BURST_SETTINGS.values(), api_name="/caption")
            deadline = time.monotonic() + 30
            while waiting.status().code != Status.IN_QUEUE:
                assert time.monotonic() < deadline, f"the second request never queued: {waiting.status()}"
                time.sleep(0.05)
            yield url, image_files[0]
            held.release.set()
            for job, path in ((running, image_files[0]), (waiting, image_files[1])):
                assert list(shown_captions(job.result(timeout=60)[1])) == [path.name]
        finally:
            held.release.set()
            for visitor in visitors:
                visitor.close()


def test_a_full_queue_refuses_one_more_api_request_with_try_again(full_queue):
    from gradio_client.utils import QueueError

    url, path = full_queue
    (late,) = gradio_visitors(url, 1)
    try:
        with pytest.raises(QueueError, match="Please try again"):
            ask_caption(late, path)
    finally:
        late.close()


def test_a_full_queue_tells_a_page_visitor_the_app_is_busy_and_to_try_again(live_app, full_queue):
    _, chromium = live_app  # its browser; the page is the full app's
    url, path = full_queue
    page = browser.open_app(chromium, url)
    assert "up to 1 can wait" in page.locator("body").inner_text()
    browser.upload(page, path)
    page.click("#caption-button")
    # Gradio's own words, shown as an error toast; the page's intro has already said what it means.
    toast = page.locator(".toast-body.error")
    toast.wait_for()
    assert "This application is currently busy. Please try again." in toast.inner_text()


def _keep_artifact(screenshot: Path) -> None:
    """With VISION_GPT_ARTIFACTS set (1, or a folder), also keep the screenshot where CI collects artifacts."""
    target = os.environ.get("VISION_GPT_ARTIFACTS")
    if not target or target == "0":
        return
    folder = REPO_ROOT / "artifacts" if target in ("1", "true", "yes") else Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, folder / "app_screenshot.png")
