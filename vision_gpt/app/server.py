"""`vision-gpt app`: a web page (Gradio) that captions images with a VisionGPT model.

    vision-gpt app --model user/vision-gpt-flickr8k            # then open http://127.0.0.1:7860
    vision-gpt app --model ./my-model --dtype bfloat16 --port 8000
    vision-gpt app --server http://127.0.0.1:8000/v1            # in front of `vision-gpt serve`

Upload one or more images (or paste image URLs, where the server has internet access), pick the decoding settings
(beams, caption length, sampling, temperature, top-p, how many captions) and press Caption. Every image gets its best
caption and the alternatives with their scores; greedy and sampled captions appear as they are written.

What keeps it safe to leave running: it listens on 127.0.0.1 unless told otherwise; uploads are capped (10 MB a file,
8 images a request, by default) by Gradio and checked again here; unreadable files get a one-line message, never a
stack trace; URL fetches time out after a few seconds and never reach this machine's own network; requests wait in a
bounded queue (128 by default, `--max-queue`) and the model, loaded once, captions `--concurrency` requests at a time
(one by default).

Gradio is an optional dependency (`pip install "vision-gpt[app]"`): this module imports it, and torch, only when an
app is built, so the rest of the command line works without it.
"""

import html
import logging
import os
import sys
import time
from pathlib import Path

from ..inference.remote_images import InputError, readable_size
from .captioner import MAX_BEAMS, MAX_CAPTIONS, MAX_NEW_TOKENS, Caption, Captioner, DecodingSettings, generate_kwargs

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLE_LABELS = {
    "shapes_1.jpg": "shapes: blue square, purple triangle",
    "shapes_7.jpg": "shapes: green star, purple square",
    "beach.jpg": "drawing: sailboat at the beach",
    "house.jpg": "drawing: house and tree",
}
# Requests that may wait for the model. Twice the 64-visitor burst the app is sized for, so a class or a shared link
# opening the page at once waits in line (Gradio shows each visitor their place) instead of being turned away. Still a
# bound: a waiting request holds little (its upload is already on disk), but beyond a couple of hundred the last in
# line would wait minutes on a CPU, and "busy, try again" is the better answer then.
DEFAULT_QUEUE_SIZE = 128


INTRO = """\
# vision-gpt captioner

Upload one or more images (or click an example below), choose how captions are decoded, and press **Caption**.
Each image gets its best caption first, then the alternatives. The **score** is the average log-probability per
token under the model: 0 would be certain, and the closer to 0, the more confident the model is. **Confidence** is
the same certainty as a probability (0-1), and **grounding** is how much the image raised the caption's probability
(near 0: the model would say it of any picture). Low values say which captions to check; a caption the model is
sure of can still be wrong.
"""

SETTINGS_HELP = """\
**Beams** > 1 runs beam search and shows the best beams. **Sampling** draws each caption at random instead (beams
are then not used): *temperature* above 1 makes captions more varied, *top-p* keeps only the most likely words that
make up that share of probability, and the same *seed* gives the same captions. With 1 beam and no sampling,
decoding is greedy and gives one caption. Sampled captions are scored with the model's own probabilities, before
temperature and top-p.
"""

CSS = """
.vg-results table { width: 100%; border-collapse: collapse; margin-bottom: 1em; }
.vg-results th, .vg-results td {
  text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--border-color-primary);
}
.vg-results td.vg-score { font-variant-numeric: tabular-nums; white-space: nowrap; }
.vg-results tr.vg-best td.vg-caption { font-weight: 600; }
.vg-errors li { color: var(--error-text-color, #b91c1c); }
"""


def render_results(results, names) -> str:
    """The captions as an HTML table per image (escaped: a caption is model output, not markup)."""
    if not results:
        return ""
    parts = ['<div class="vg-results">']
    for name, captions in zip(names, results):
        parts.append(f'<section class="vg-result" data-image="{html.escape(name)}"><h3>{html.escape(name)}</h3>')
        parts.append("<table><thead><tr><th>#</th><th>caption</th><th>score</th><th>confidence</th>"
                     "<th>grounding</th></tr></thead><tbody>")
        for rank, caption in enumerate(captions, 1):
            row_class = "vg-candidate vg-best" if rank == 1 else "vg-candidate"
            trust = "".join(f'<td class="vg-score vg-{name}">{"" if value is None else f"{value:.3f}"}</td>'
                            for name, value in (("confidence", caption.confidence),
                                                ("grounding", caption.grounding)))
            score = "" if caption.score is None else f"{caption.score:.3f}"
            parts.append(f'<tr class="{row_class}"><td>{rank}</td><td class="vg-caption">{html.escape(caption.text)}'
                         f'</td><td class="vg-score">{score}</td>{trust}</tr>')
        parts.append("</tbody></table></section>")
    parts.append("</div>")
    return "".join(parts)


def render_status(errors, notes, summary: str = "", done: bool = True) -> str:
    """Problems with inputs (one line each) and notes about settings, as HTML. `done=False` marks an answer still
    being written (no `data-done` stamp yet)."""
    parts = []
    if summary:
        parts.append(f'<p class="vg-summary">{html.escape(summary)}</p>')
    if errors:
        items = "".join(f'<li class="vg-error">{html.escape(message)}</li>' for message in errors)
        parts.append(f'<ul class="vg-errors">{items}</ul>')
    if notes:
        items = "".join(f'<li class="vg-note">{html.escape(message)}</li>' for message in notes)
        parts.append(f'<ul class="vg-notes">{items}</ul>')
    if not done:
        return f'<div class="vg-status vg-writing">{"".join(parts)}</div>'
    # A fresh stamp per answer, so a page (or a test) can tell a new answer from an identical old one.
    return f'<div class="vg-status" data-done="{time.time_ns()}">{"".join(parts)}</div>'


def caption_request(captioner: Captioner, files, urls, num_beams, num_captions, max_new_tokens, do_sample,
                    temperature, top_p, seed):
    """
    The Caption button's handler, a generator: yields (status HTML, results HTML, gallery items) as the captions are
    written, then once more with the finished captions and their scores. Every failure becomes a message on the page;
    the traceback of an unexpected one goes to the server log only.
    """
    settings = DecodingSettings(num_beams=num_beams, num_captions=num_captions, max_new_tokens=max_new_tokens,
                                do_sample=do_sample, temperature=temperature, top_p=top_p, seed=int(seed or 0))
    try:
        images, errors = captioner.load_inputs(files, urls)
    except InputError as error:
        yield render_status([str(error)], []), "", []
        return
    if not images:
        if not errors:
            errors = ["Add an image first: upload a file, click an example, or paste an image URL."]
        yield render_status(errors, [], "Nothing to caption."), "", []
        return
    names = [item.name for item in images]
    plural = "s" if len(images) > 1 else ""
    try:
        started = time.perf_counter()
        for kind, payload in captioner.stream([item.image for item in images], settings):
            if kind == "partial":
                written = [[Caption(text, None) for text in texts] for texts in payload]
                yield (render_status(errors, [], f"Writing the caption{plural}...", done=False),
                       render_results(written, names), [])
            else:
                results, notes = payload
        elapsed = time.perf_counter() - started
    except InputError as error:  # a server in front of which the page runs refused the request
        yield render_status(errors + [str(error)], []), "", []
        return
    except Exception:
        logger.exception("captioning failed")
        failure = "Captioning failed because of an error in the server; its log has the details."
        yield render_status(errors + [failure], []), "", []
        return
    summary = f"Captioned {len(images)} image{plural} in {elapsed:.1f} s."
    gallery = [(item.preview, captions[0].text) for item, captions in zip(images, results)]
    yield render_status(errors, notes, summary), render_results(results, names), gallery


def build_app(model_path_or_id=None, *, captioner: Captioner | None = None, dtype: str = "float32",
              device: str = "auto", runtime: str = "torch", trust_remote_code: bool = False,
              max_upload_mb: float = 10, max_images: int = 8, allow_urls: bool = True,
              allow_private_urls: bool = False, url_timeout: float = 5.0, queue_size: int = DEFAULT_QUEUE_SIZE,
              concurrency: int | None = None):
    """
    Build the captioning page for a model folder or Hub id (loaded once, here), or for a ready `captioner`.
    Returns a `gradio.Blocks` with its queue set up; start it with `launch(demo, ...)`, which applies the upload limit.
    `concurrency` requests are captioned at once (default: one, or the given captioner's `concurrency`), and up to
    `queue_size` more wait in line; a request beyond that is refused with Gradio's "busy, try again" message.

    Example:

    ```python
    >>> demo = build_app("user/vision-gpt-flickr8k", dtype="bfloat16")
    >>> launch(demo, host="127.0.0.1", port=7860)
    ```"""
    # Gradio's usage analytics would phone home on launch; a self-hosted captioner has no reason to.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    if queue_size < 1:
        raise ValueError(f"queue_size must be at least 1 (requests waiting for the model), got {queue_size}.")
    if captioner is None:
        if model_path_or_id is None:
            raise ValueError("build_app needs a model folder or Hub id (or a `captioner`).")
        captioner = Captioner.from_pretrained(model_path_or_id, dtype=dtype, device=device, runtime=runtime,
                                              trust_remote_code=trust_remote_code, max_upload_mb=max_upload_mb,
                                              max_images=max_images,
                                              allow_urls=allow_urls, allow_private_urls=allow_private_urls,
                                              url_timeout=url_timeout, concurrency=concurrency or 1)
    elif concurrency is not None and concurrency != captioner.concurrency:
        raise ValueError(f"build_app got concurrency={concurrency}, but its captioner runs {captioner.concurrency} "
                         f"generation(s) at a time: build the Captioner with concurrency={concurrency} instead.")
    concurrency = captioner.concurrency
    defaults = captioner.default_settings
    limits = (f"Model: {captioner.description}. Up to "
              f"{captioner.max_images} images at a time, {readable_size(captioner.max_upload_bytes)} each. When others are "
              f"captioning, your request waits in line (up to {queue_size} can wait); if the line is full, the page "
              "says the app is busy: try again in a minute.")

    with gr.Blocks(title="vision-gpt captioner", analytics_enabled=False,
                   # Uploads are deleted an hour after they arrive, so a long-running server does not fill its disk.
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO + "\n" + limits)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                                elem_id="images")
                urls = gr.Textbox(label="Image URLs (one per line)", lines=2, visible=captioner.allow_urls,
                                  placeholder="https://example.com/photo.jpg", elem_id="urls")
                examples = sorted(EXAMPLES_DIR.glob("*.jpg"))
                if examples:
                    gr.Examples(examples=[[[str(path)]] for path in examples], inputs=[files],
                                example_labels=[EXAMPLE_LABELS.get(path.name, path.stem) for path in examples],
                                label="Examples (click one, then Caption)")
                with gr.Accordion("Decoding settings", open=True):
                    num_beams = gr.Slider(1, MAX_BEAMS, value=defaults.num_beams, step=1, label="Beams",
                                          elem_id="num-beams")
                    num_captions = gr.Slider(1, MAX_CAPTIONS, value=defaults.num_captions, step=1,
                                             label="Captions per image", elem_id="num-captions")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=defaults.max_new_tokens, step=1,
                                               label="Max new tokens", elem_id="max-new-tokens")
                    do_sample = gr.Checkbox(value=False, label="Sampling", elem_id="do-sample")
                    with gr.Row():
                        temperature = gr.Slider(0.1, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                                                interactive=False, elem_id="temperature")
                        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p",
                                          interactive=False, elem_id="top-p")
                        seed = gr.Number(value=defaults.seed, precision=0, label="Seed", interactive=False,
                                         elem_id="seed")
                    gr.Markdown(SETTINGS_HELP)
                with gr.Row():
                    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    gr.ClearButton([files, urls], value="Clear", elem_id="clear-button")
            with gr.Column(scale=1):
                status = gr.HTML(elem_id="status")
                results = gr.HTML(elem_id="captions")
                gallery = gr.Gallery(label="Captioned images", columns=4, height="auto", object_fit="contain",
                                     preview=False, allow_preview=True, elem_id="gallery")

        # Sampling-only settings are greyed out until sampling is on, so it is clear they do nothing otherwise.
        do_sample.change(lambda on: [gr.update(interactive=on)] * 3, inputs=do_sample,
                         outputs=[temperature, top_p, seed], queue=False)
        def caption(*values):  # a generator function, so that Gradio streams what it yields to the page
            yield from caption_request(captioner, *values)

        button.click(caption,
                     inputs=[files, urls, num_beams, num_captions, max_new_tokens, do_sample, temperature, top_p, seed],
                     outputs=[status, results, gallery], api_name="caption", concurrency_limit=concurrency)

    # A bounded line behind the `concurrency` captions in progress. When it is full, Gradio refuses the request with
    # its own text, which no public setting changes: the page shows "This application is currently busy. Please try
    # again." and gradio_client raises QueueError("Queue is full! Please try again.").
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    demo.captioner = captioner
    demo.max_upload_bytes = captioner.max_upload_bytes
    return demo


def launch(demo, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """
    Start the server for a page from `build_app`. With `block=False` it returns at once (tests, notebooks); stop it
    with `demo.close()`. Returns the local URL.
    """
    import gradio as gr

    _, local_url, share_url = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        # Gradio refuses bigger uploads before they reach our code; `Captioner.load_inputs` checks again.
        max_file_size=demo.max_upload_bytes,
        # Gradio runs handlers in a pool of 40 threads unless told otherwise; a larger --concurrency needs as many.
        max_threads=max(40, demo.captioner.concurrency),
        show_error=False,  # tracebacks stay in the server log
        enable_monitoring=False,
        mcp_server=False,
        ssr_mode=False,  # server-side rendering needs Node.js; the plain page needs nothing
        run_history=False,
        inbrowser=False,
        quiet=True,
        prevent_thread_lock=True,
        css=CSS,
        theme=gr.themes.Default(),
    )
    print(f"vision-gpt app: serving {demo.captioner.name} at {local_url}" + (f" and {share_url}" if share_url else ""),
          flush=True)
    if block:
        # Returns on Ctrl-C, after closing the server.
        demo.block_thread()
    return local_url


def run(args) -> int:
    """Load the model, build the page and serve it until Ctrl-C. Returns the exit status."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the app needs Gradio: pip install 'vision-gpt[app]'  (or: pip install gradio)", file=sys.stderr)
        return 2
    problems = [message for bad, message in (
        (args.max_upload_mb <= 0, f"--max-upload-mb must be positive, got {args.max_upload_mb:g}"),
        (args.max_images < 1, f"--max-images must be at least 1, got {args.max_images}"),
        (args.max_queue < 1, f"--max-queue must be at least 1 (requests that may wait), got {args.max_queue}"),
        (args.concurrency is not None and args.concurrency < 1,
         f"--concurrency must be at least 1 (requests captioned at once), got {args.concurrency}"),
        (bool(args.server) == bool(args.model), "give a model (--model) or a server to caption through (--server), "
                                                "not both" if args.server else "--model is required (or --server)"),
    ) if bad]
    if problems:
        for message in problems:
            print(f"error: {message}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the app", file=sys.stderr)
    if args.share:
        print("warning: --share publishes a public link; anyone who has it can use the app", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.server:
            from ..serving.settings import API_KEY_ENV
            from .remote import RemoteCaptioner

            print(f"connecting to {args.server} ...", flush=True)
            captioner = RemoteCaptioner(args.server, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                                        max_upload_mb=args.max_upload_mb, max_images=args.max_images,
                                        allow_urls=not args.no_urls, concurrency=args.concurrency or 8)
            demo = build_app(captioner=captioner, queue_size=args.max_queue)
        else:
            print(f"loading {args.model} ({args.dtype}) ...", flush=True)
            demo = build_app(args.model, dtype=args.dtype, device=args.device, runtime=args.runtime,
                             trust_remote_code=args.trust_remote_code, max_upload_mb=args.max_upload_mb,
                             max_images=args.max_images, allow_urls=not args.no_urls, queue_size=args.max_queue,
                             concurrency=args.concurrency or 1)
        launch(demo, host=args.host, port=args.port, share=args.share, block=True)
    except (OSError, ValueError, ImportError) as error:
        # transformers raises OSError for a missing folder, an unknown Hub id or no network; Gradio for a busy port;
        # ValueError and ImportError are ours (a dtype the runtime has no graphs for, the onnx extra missing).
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the server was up; once it is, `block_thread` handles it
        print("interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["Caption", "Captioner", "DecodingSettings", "build_app", "generate_kwargs", "launch", "run"]
