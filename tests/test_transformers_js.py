"""transformers.js runs `vision-gpt export-onnx`'s cross-attention repo and captions as PyTorch does: `js/caption.mjs`
on Node, and the `--web-demo` page in headless Chromium.

Needs the pinned packages, `(cd js && npm ci --ignore-scripts)`, and Node 20 or Chromium with playwright (see
tests/browser.py).
"""

import functools
import http.server
import json
import shutil
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install 'vision-gpt[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install 'vision-gpt[onnx]'")

from . import browser  # noqa: E402
from .conftest import IMAGE_SIZE, random_images, tiny_model  # noqa: E402
from vision_gpt.cli import commands as cli  # noqa: E402
from vision_gpt.export.onnx import ONNXExportError, export_onnx, web_demo_sources  # noqa: E402

JS_DIR = Path(__file__).resolve().parents[1] / "js"
NPM_INSTALL = "(cd js && npm ci --ignore-scripts)"
MAX_NEW_TOKENS = 10

needs_packages = pytest.mark.skipif(not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir(),
                                    reason=f"transformers.js is not installed in js/node_modules: {NPM_INSTALL}")
needs_node = pytest.mark.skipif(shutil.which("node") is None,
                                reason="Node.js is not installed: apt-get install -y nodejs npm")
needs_browser = pytest.mark.skipif(browser.missing_browser_reason() is not None,
                                   reason=str(browser.missing_browser_reason()))


@pytest.fixture(scope="module")
def model():
    return tiny_model(fusion="cross_attention")


@pytest.fixture(scope="module")
def exported(model, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformers-js") / "tiny-vision-gpt"
    export_onnx(model, processor, folder, dtype="fp16", quantize="int8", overwrite=True)
    return folder


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    # At the model's input size, so no image is resized: transformers.js resizes with sharp's affine bilinear (the
    # canvas in a browser), PIL with an antialiasing filter, and on random pixels the two give different captions.
    folder = tmp_path_factory.mktemp("transformers-js-images")
    paths = []
    for i, image in enumerate(random_images(3, seed=1, size=(IMAGE_SIZE, IMAGE_SIZE))):
        paths.append(folder / f"image_{i}.png")  # lossless: Node reads the pixels PIL wrote
        image.save(paths[-1])
    return paths


def pytorch_captions(model, processor, paths):
    pixel_values = processor(images=[str(path) for path in paths])["pixel_values"]
    # The plain layers: the packed oneDNN ones round differently, and the export traces the plain ones.
    ids = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                         use_packed_linears=False)
    # What transformers.js's image-to-text pipeline returns: special tokens skipped, then trimmed.
    return [caption.strip() for caption in processor.batch_decode(ids, skip_special_tokens=True)]


def caption_js(folder, paths, *options):
    result = subprocess.run(
        ["node", str(JS_DIR / "caption.mjs"), str(folder), *map(str, paths),
         "--max-new-tokens", str(MAX_NEW_TOKENS), *options],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [answer["image"] for answer in answers] == [str(path) for path in paths]
    return [answer["caption"] for answer in answers]


@needs_packages
@needs_node
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_node_greedy_captions_equal_pytorch(model, processor, exported, image_files, dtype):
    expected = pytorch_captions(model, processor, image_files)
    # fp16 too on this tiny model: its float16 cache and weights round too little to change a greedy choice.
    assert caption_js(exported, image_files, "--dtype", dtype) == expected
    assert len(set(expected)) > 1  # the images lead to different captions: equality means something


@needs_packages
@needs_node
def test_node_q8_the_wasm_default_captions(exported, image_files, tmp_path):
    # A folder name that is no Hub model id (a space) is read as a path, not under env.localModelPath.
    folder = shutil.copytree(exported, tmp_path / "tiny vision-gpt")
    captions = caption_js(folder, image_files[:2], "--dtype", "q8")
    assert len(captions) == 2 and all(isinstance(caption, str) and caption for caption in captions)


@needs_packages
@needs_node
def test_node_refuses_a_prefix_export_with_the_reason(tmp_path, image_files):
    # A prefix model's export keeps its own config (model_type "vision_gpt"), which transformers.js does not know.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vision_gpt"}))
    result = subprocess.run(["node", str(JS_DIR / "caption.mjs"), str(tmp_path), str(image_files[0])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'fusion="cross_attention"' in result.stderr and "vision_gpt" in result.stderr


# ----- the --web-demo page in headless Chromium ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_demo(model, processor, tmp_path_factory):
    """`vision-gpt export-onnx MODEL OUT --quantize int8 --web-demo` of the cross-attention model: OUT."""
    model_dir = tmp_path_factory.mktemp("transformers-js-model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("transformers-js-web") / "demo"
    assert cli.main(["export-onnx", str(model_dir), str(out), "--quantize", "int8", "--web-demo"]) == 0
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serving(folder):
    """`python -m http.server --directory folder` on 127.0.0.1 in a thread; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def caption_in_page(page, paths):
    """Upload each image through the page's file input and read the caption it writes."""
    captions = []
    for path in paths:
        before = page.locator("#caption").get_attribute("data-done")
        page.locator("#image").set_input_files(str(path))
        page.wait_for_function("before => document.querySelector('#caption').dataset.done !== before", arg=before)
        status = page.locator("#status")
        assert "error" not in (status.get_attribute("class") or ""), status.text_content()
        captions.append(page.locator("#caption").text_content())
    return captions


@needs_packages
def test_web_demo_is_written_with_local_files_only(web_demo):
    page = (web_demo / "index.html").read_text()
    assert "const DTYPES = [\"q8\", \"fp32\"];" in page  # the graphs the export wrote, q8 first
    assert "https://" not in page.split("<script")[1]  # no CDN
    assert sorted(path.name for path in (web_demo / "web").iterdir()) == [
        "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm", "transformers.min.js"]


@needs_packages
@needs_browser
def test_web_demo_captions_equal_pytorch_in_chromium(model, processor, web_demo, image_files):
    expected = pytorch_captions(model, processor, image_files)
    with serving(web_demo) as url, browser.chromium() as chromium:
        page = chromium.new_page()
        page.set_default_timeout(60_000)
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{url}?dtype=fp32")
        page.wait_for_selector("body[data-ready=fp32]")
        page.fill("#max-new-tokens", str(MAX_NEW_TOKENS))
        assert caption_in_page(page, image_files) == expected
    assert all(request.startswith((url, "blob:", "data:")) for request in requests), requests


@needs_packages
@needs_browser
def test_web_demo_runs_q8_by_default_in_chromium(web_demo, image_files):
    with serving(web_demo) as url, browser.chromium() as chromium:
        page = chromium.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("body[data-ready=q8]")
        captions = caption_in_page(page, image_files[:1])
    assert captions[0]


def test_web_demo_of_a_prefix_model_is_refused_before_exporting(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["export-onnx", str(tiny_model_dir), str(tmp_path / "out"), "--web-demo"]) == 2
    assert "fusion='cross_attention'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_web_demo_without_node_modules_names_the_npm_command(model, tmp_path):
    shutil.copytree(JS_DIR / "web_demo", tmp_path / "js" / "web_demo")
    with pytest.raises(ONNXExportError, match=r"transformers\.min\.js .*\(cd js && npm ci --ignore-scripts\)"):
        web_demo_sources(model.config, js_dir=tmp_path / "js")
