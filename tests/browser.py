"""Helpers to drive `vision-gpt app` in a real headless Chromium: start the server, open pages, upload and caption.

The browser is Debian's Chromium (`apt-get install -y chromium`) driven by the Python `playwright` package; Playwright's
own browser download (`playwright install`) is never used, so nothing is fetched at test time.

Run as a script, it writes the docs' screenshot of the app captioning an example image:

    python -m tests.browser docs/images/app_screenshot.png
"""

import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
INSTALL_HINT = "apt-get install -y chromium && pip install playwright  (no `playwright install` needed)"
# Headless flags for a machine with a closed network: without the networking ones Chromium keeps trying (and
# failing) to reach Google's services at start. Playwright adds --headless and a fresh temporary profile itself.
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    """The system Chromium, or None when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or next((path for path in CHROMIUM_CANDIDATES if os.path.exists(path)), None)


def missing_browser_reason() -> str | None:
    """Why a browser test cannot run here (with the command that fixes it), or None when it can."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return f"the Python playwright package is not installed: {INSTALL_HINT}"
    if chromium_path() is None:
        return f"Chromium is not installed: {INSTALL_HINT}"
    return None


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (Gradio wants a number, not port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(demo):
    """Serve a page from `build_app` on 127.0.0.1 in a background thread; yields its URL, stops it afterwards."""
    from vision_gpt.app.server import launch

    url = launch(demo, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield url
    finally:
        demo.close()


@contextmanager
def chromium():
    """A headless Chromium (Playwright `Browser`), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_app(browser, url: str, width: int = 1280, height: int = 1000):
    """A new page (own cookies, own Gradio session) showing the app, ready for input."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#caption-button")
    return page


def set_slider(page, elem_id: str, value) -> None:
    """Type a value into a Gradio slider's number box, as a user would, and leave the box so it takes effect."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def upload(page, *paths) -> None:
    """Clear the image list and upload `paths` through the file input; returns once every file is listed."""
    page.click("#clear-button")
    page.locator("#images input[type=file]").set_input_files([str(path) for path in paths])
    for path in paths:
        # The file is listed (labelled with its name) once its upload has finished; captioning earlier would send
        # an incomplete list.
        page.locator("#images").get_by_label(Path(path).name, exact=True).first.wait_for()


def press_caption(page) -> None:
    """Press Caption and wait until the answer to this press is on the page (not the previous one)."""
    # Every finished answer stamps the status box with a fresh `data-done` value, even when its text repeats the last
    # one; the updates while captions are being written have none.
    stamp = page.locator("#status .vg-status")
    before = stamp.get_attribute("data-done") if stamp.count() else None
    page.click("#caption-button")
    page.wait_for_function(
        "before => { const s = document.querySelector('#status .vg-status');"
        " return s !== null && s.dataset.done !== undefined && s.dataset.done !== before; }", arg=before)


def read_results(page) -> dict[str, list[tuple[str, float]]]:
    """The captions on the page: {image name: [(caption, score), ...]}, best first."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#captions .vg-result')].map(section => [
                section.dataset.image,
                [...section.querySelectorAll('tr.vg-candidate')].map(row => [
                    row.querySelector('.vg-caption').textContent,
                    parseFloat(row.querySelector('.vg-score').textContent)])]))""")


def read_errors(page) -> list[str]:
    """The one-line messages about inputs that could not be captioned."""
    return [text.strip() for text in page.locator("#status .vg-error").all_inner_texts()]


def screenshot_example(output: str, model_dir: str | None = None) -> None:
    """Start the app, caption two example images and save a screenshot: with `model_dir` (e.g. the model that
    `vision-gpt demo` trained) on the shapes examples, else with a tiny random model."""
    from vision_gpt.app.server import EXAMPLES_DIR, Captioner, build_app
    from vision_gpt.assembly.build import build_tiny

    with tempfile.TemporaryDirectory() as folder:
        if model_dir:
            captioner = Captioner.from_pretrained(model_dir)
            captioner.name = "vision-gpt-demo/model"  # the folder `vision-gpt demo` writes
            examples = (EXAMPLES_DIR / "shapes_1.jpg", EXAMPLES_DIR / "shapes_7.jpg")
        else:
            # What `vision-gpt assemble --tiny` builds: random weights, so the captions are noise, but real layout.
            model, processor = build_tiny()
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            captioner = Captioner.from_pretrained(folder)
            captioner.name = "tiny-vision-gpt"  # a readable folder name, not this temporary one
            examples = (EXAMPLES_DIR / "beach.jpg", EXAMPLES_DIR / "shapes_1.jpg")
        demo = build_app(captioner=captioner)
        with running_app(demo) as url, chromium() as browser:
            page = open_app(browser, url, height=900)
            upload(page, *examples)
            set_slider(page, "max-new-tokens", 24)
            press_caption(page)
            page.screenshot(path=output, full_page=True)
    print(f"wrote {output}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    screenshot_example(sys.argv[1] if len(sys.argv) > 1 else "docs/images/app_screenshot.png",
                       sys.argv[2] if len(sys.argv) > 2 else None)
