"""`vision-gpt serve`: the OpenAI-compatible server. The engine's rules without a server first (settings, images,
batching, streaming), then a real Ray Serve server on 127.0.0.1 with a tiny model, through the `openai` client and
`huggingface_hub`'s InferenceClient."""

import base64
import concurrent.futures
import io
import json
import socket
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from vision_gpt.serving.engine import CaptionEngine
from vision_gpt.serving.protocol import OpenAIError, parse_request
from vision_gpt.serving.settings import ServeLimits, ServeOptions

from .conftest import random_images, tiny_model

API_KEY = "test-key"


def data_url(image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(image=None, text=None, url=None):
    content = []
    if image is not None or url is not None:
        content.append({"type": "image_url", "image_url": {"url": url or data_url(image)}})
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def body(image=None, text=None, url=None, **fields):
    return {"model": "tiny", "messages": messages(image, text, url), **fields}


def generated_text(model, processor, images, prompts=None, **kwargs):
    """What the server must reply: the new tokens, decoded without special tokens, stripped."""
    inputs = processor(images=images, text=prompts) if prompts else processor(images=images)
    sequences = model.generate(**inputs, **kwargs)
    start = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
    return [text.strip() for text in processor.tokenizer.batch_decode(sequences[:, start:], skip_special_tokens=True)]


@pytest.fixture(scope="module")
def engine(processor):
    model = tiny_model(fusion="cross_attention")
    model.generation_config.max_new_tokens = 6
    model.generation_config.num_beams = 3
    return CaptionEngine(model, processor, ServeLimits(max_image_pixels=1_000_000))


def run_jobs(engine, jobs):
    events = []
    engine.run(jobs, events.append)
    replies = {id(job): reply for kind, job, reply in (e for e in events if e[0] == "done")}
    deltas = {id(job): {} for job in jobs}
    for kind, job, *rest in events:
        if kind == "delta":
            deltas[id(job)][rest[0]] = deltas[id(job)].get(rest[0], "") + rest[1]
    assert not [e for e in events if e[0] == "error"]
    return [replies[id(job)] for job in jobs], [deltas[id(job)] for job in jobs]


# ----- decoding settings ---------------------------------------------------------------------------------------------


def test_settings_a_request_leaves_out_come_from_the_generation_config(engine):
    image = random_images(1)[0]
    default = engine.decoding_for(parse_request(body(image)))
    assert (default.num_beams, default.do_sample, default.max_new_tokens) == (3, False, 6)
    greedy = engine.decoding_for(parse_request(body(image, temperature=0, max_tokens=4)))
    assert (greedy.num_beams, greedy.do_sample, greedy.max_new_tokens) == (1, False, 4)
    sampled = engine.decoding_for(parse_request(body(image, temperature=0.7, seed=3, n=2)))
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.n, sampled.seed) == (True, 0.7, 1.0, 2, 3)
    beams = engine.decoding_for(parse_request(body(image, use_beam_search=True, best_of=4, n=2)))
    assert (beams.num_beams, beams.n, beams.do_sample) == (4, 2, False)
    assert engine.decoding_for(parse_request(body(image, max_completion_tokens=5))).max_new_tokens == 5


@pytest.mark.parametrize("fields, status, message", [
    ({"n": 9}, 400, "'n' is 9; this server returns at most 8"),
    ({"max_tokens": 257}, 400, "'max_tokens' is 257; this server generates at most 256"),
    ({"max_tokens": 0}, 400, "Invalid 'max_tokens'"),
    ({"max_tokens": 96}, 400, "decoder reads 96 positions and the prompt takes 1: ask for at most 95 tokens"),
    ({"temperature": 3}, 400, "Invalid 'temperature'"),
    ({"tools": [{"type": "function"}]}, 400, "does not support 'tools'"),
    ({"logprobs": True}, 400, "does not support 'logprobs'"),
    ({"max_tokens": 4, "max_completion_tokens": 4}, 400, "not both"),
    ({"use_beam_search": True, "best_of": 2, "n": 3}, 400, "set 'best_of' to at least 3"),
    ({"best_of": 3}, 400, "set 'use_beam_search' too"),
    ({"use_beam_search": True, "temperature": 0.5}, 400, "Beam search does not sample"),
    ({"n": 4}, 400, "set 'use_beam_search' with 'best_of' of at least 4, or sample"),
    ({"stop": ["x" * 65]}, 400, "'stop' takes up to 4 non-empty strings of at most 64 characters"),
    ({"seed": 2**64}, 400, "Invalid 'seed'"),
    ({"top_k": 5, "temperature": 0}, 400, "'top_k' applies to sampling"),
    ({"text": "<image> a photo of"}, 400, "The text holds '<image>'"),
])
def test_settings_out_of_bounds_are_refused_by_name(engine, fields, status, message):
    text = fields.pop("text", None)
    with pytest.raises(OpenAIError, match=message) as caught:
        engine.job_for(parse_request(body(random_images(1)[0], text, **fields)))
    assert caught.value.status == status and caught.value.body()["error"]["message"]


# ----- images --------------------------------------------------------------------------------------------------------


def truncated_jpeg() -> str:
    buffer = io.BytesIO()
    random_images(1, size=(64, 64))[0].save(buffer, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()[:400]).decode()


def bomb_png() -> str:
    # 20000 x 20000 one-bit pixels: 400 million, compressed to a few kilobytes.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD_IMAGES = [
    ("data:image/png;base64,@@not-base64@@", "not valid base64"),
    ("data:image/png,rawbytes", "must be base64"),
    ("file:///etc/passwd", "never reads its own files"),
    ("/etc/passwd", "never reads its own files"),
    ("http://images.example/dog.jpg", "without --allow-url-images"),
]


@pytest.mark.parametrize("url, message", BAD_IMAGES)
def test_images_that_are_not_data_urls_or_not_images_are_named(engine, url, message):
    with pytest.raises(OpenAIError, match=message) as caught:
        engine.job_for(parse_request(body(url=url)))
    assert caught.value.status == 400 and caught.value.param == "messages[0].content[0]"


def test_url_images_when_allowed_are_fetched_from_public_addresses_only(engine):
    allowing = CaptionEngine(engine.model, engine.processor, ServeLimits(allow_url_images=True, url_timeout=2))
    for url in ("http://127.0.0.1:9/photo.jpg", "http://10.0.0.7/photo.jpg", "http://localhost/photo.jpg"):
        with pytest.raises(OpenAIError, match="private or local network") as caught:
            allowing.job_for(parse_request(body(url=url)))
        assert caught.value.status == 400


def test_truncated_and_oversized_images_are_refused_before_captioning(engine):
    with pytest.raises(OpenAIError, match="not a readable image") as caught:
        engine.job_for(parse_request(body(url=truncated_jpeg())))
    assert caught.value.code == "invalid_image"
    with pytest.raises(OpenAIError, match="too large to decode .*decompression bomb"):
        engine.job_for(parse_request(body(url=bomb_png())))
    with pytest.raises(OpenAIError, match="2000 x 600 pixels, more than the 1,000,000-pixel limit"):
        engine.job_for(parse_request(body(url=data_url(Image.new("RGB", (2000, 600))))))
    small = CaptionEngine(engine.model, engine.processor, ServeLimits(max_image_bytes=1000))
    with pytest.raises(OpenAIError, match="over the 1000 B limit|over the 0.977 KB limit") as caught:
        small.job_for(parse_request(body(random_images(1, size=(100, 100))[0])))
    assert caught.value.status == 413


def test_a_request_needs_exactly_one_image(engine):
    with pytest.raises(OpenAIError, match="hold no image"):
        engine.job_for(parse_request(body(text="a photo of")))
    two = parse_request({"model": "tiny", "messages": messages(random_images(1)[0]) + messages(random_images(1)[0])})
    with pytest.raises(OpenAIError, match="hold 2 images"):
        engine.job_for(two)


# ----- batching and streaming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"use_beam_search": True, "best_of": 3, "n": 2}, {}])
def test_a_batched_request_gets_the_reply_it_gets_alone(engine, fields):
    images = random_images(3, seed=41)
    jobs = [engine.job_for(parse_request(body(image, **fields))) for image in images]
    batched, _ = run_jobs(engine, jobs)
    for image, reply in zip(images, batched):
        alone, _ = run_jobs(engine, [engine.job_for(parse_request(body(image, **fields)))])
        assert reply.texts == alone[0].texts
    kwargs = {"num_beams": 1} if fields.get("temperature") == 0 else {"num_beams": 3}
    if fields.get("n"):
        kwargs["num_return_sequences"] = 2
    expected = generated_text(engine.model, engine.processor, images, max_new_tokens=6, **kwargs)
    assert [text for reply in batched for text in reply.texts] == expected


def test_prompts_and_settings_are_grouped_and_each_reply_is_its_own(engine):
    images = random_images(4, seed=42)
    requests = [body(images[0], temperature=0), body(images[1], text="a photo of", temperature=0),
                body(images[2], temperature=0, max_tokens=3), body(images[3], text="two", temperature=0)]
    replies, _ = run_jobs(engine, [engine.job_for(parse_request(r)) for r in requests])
    assert replies[0].texts == generated_text(engine.model, engine.processor, images[:1], max_new_tokens=6,
                                              num_beams=1)
    prompted = generated_text(engine.model, engine.processor, [images[1], images[3]], ["a photo of", "two"],
                              max_new_tokens=6, num_beams=1)
    assert [replies[1].texts[0], replies[3].texts[0]] == prompted
    assert replies[2].texts == generated_text(engine.model, engine.processor, images[2:3], max_new_tokens=3,
                                              num_beams=1)
    # Prompt tokens count the visual tokens, the start token and the prompt's text.
    assert replies[0].prompt_tokens == engine.num_visual_tokens + 1
    assert replies[1].prompt_tokens == engine.num_visual_tokens + 1 + len(engine.tokenizer("a photo of").input_ids)


def test_streamed_text_joins_to_the_reply_with_and_without_stop_strings(engine):
    images = random_images(3, seed=43)
    free, _ = run_jobs(engine, [engine.job_for(parse_request(body(images[0], temperature=0, stream=True)))])
    text = free[0].texts[0]
    stop = text[len(text) // 2:][:3]
    for fields in ({}, {"stop": stop}, {"n": 2}):
        jobs = [engine.job_for(parse_request(body(image, temperature=0, stream=True, **fields))) for image in images]
        replies, deltas = run_jobs(engine, jobs)
        for reply, streamed in zip(replies, deltas):
            assert [streamed.get(index, "") for index in range(len(reply.texts))] == reply.texts
    cut, _ = run_jobs(engine, [engine.job_for(parse_request(body(images[0], temperature=0, stop=stop)))])
    assert stop not in cut[0].texts[0] and text.startswith(cut[0].texts[0]) and cut[0].finish_reasons == ["stop"]


def test_trust_scores_come_with_each_choice_when_asked(engine):
    images = random_images(2, seed=46)
    plain, _ = run_jobs(engine, [engine.job_for(parse_request(body(images[0], temperature=0)))])
    assert plain[0].scores is None
    for fields, kwargs in (({"temperature": 0}, {"num_beams": 1}),
                           ({"use_beam_search": True, "best_of": 3, "n": 2}, {"num_beams": 3,
                                                                            "num_return_sequences": 2})):
        jobs = [engine.job_for(parse_request(body(image, return_caption_scores=True, stream=True, **fields)))
                for image in images]
        replies, _ = run_jobs(engine, jobs)
        expected = engine.model.generate(**engine.processor(images=images), max_new_tokens=6,
                                         output_caption_scores=True, **kwargs).caption_scores
        got = [score for reply in replies for score in reply.scores]
        assert [s["confidence"] for s in got] == pytest.approx(expected.confidence.tolist(), abs=1e-5)
        assert [s["grounding"] for s in got] == pytest.approx(expected.grounding.tolist(), abs=1e-5)


def test_a_text_stream_sends_only_text_that_cannot_change(tokenizer):
    from vision_gpt.inference.streaming import TextStream

    eos = [tokenizer.eos_token_id]
    tokens = tokenizer(" a \U0001F642 dog on the red sofa ")["input_ids"]
    stream = TextStream(tokenizer, eos)
    deltas = [stream.add(token) for token in tokens]
    assert "".join(deltas) == "a \U0001F642 dog on the red sofa" and not any("\ufffd" in d for d in deltas)
    assert stream.add(eos[0]) == "" and stream.finished and stream.add(tokens[0]) == ""
    # A stop string: its beginning waits for the next token; the caption ends before it, without the space.
    for stop in (" on the", "on the"):
        stream = TextStream(tokenizer, eos, stop=(stop,))
        sent = "".join(stream.add(token) for token in tokens)
        assert stream.finished and sent == "a \U0001F642 dog" and stream.rest("a \U0001F642 dog") == ""


def test_a_seed_gives_the_same_samples_alone_and_in_a_batch(engine):
    image, other = random_images(2, seed=44)
    job = lambda picture=image: engine.job_for(  # noqa: E731
        parse_request(body(picture, temperature=1.0, seed=5, n=2, top_k=0)))
    first, _ = run_jobs(engine, [job()])
    second, _ = run_jobs(engine, [job()])
    assert first[0].texts == second[0].texts and len(first[0].texts) == 2
    # Batched with the same request and another image with the same seed: each is drawn as if alone.
    together, _ = run_jobs(engine, [job(), job(other), job()])
    assert together[0].texts == together[2].texts == first[0].texts
    assert together[1].texts == run_jobs(engine, [job(other)])[0][0].texts


def test_a_chat_decoder_reads_the_messages_through_its_template(engine, processor):
    import copy

    from .test_processing import CHATML

    chat = copy.copy(processor)
    chat.tokenizer = copy.deepcopy(processor.tokenizer)
    chat.tokenizer.chat_template = CHATML
    # Cross-attention reads no image tokens, so a chat template cannot place the image: a 400 that says so.
    with pytest.raises(OpenAIError, match="cannot read these messages: .*image tokens") as caught:
        CaptionEngine(engine.model, chat).job_for(parse_request(body(random_images(1)[0], text="Hi")))
    assert caught.value.status == 400
    model = tiny_model(fusion="prefix", visual_tokens="queries", num_visual_tokens=4)
    model.generation_config.max_new_tokens = 6
    chat.use_image_tokens_of(model.config)
    chat_engine = CaptionEngine(model, chat)
    image = random_images(1, seed=45)[0]
    request = {"model": "tiny", "temperature": 0, "messages": [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                     {"type": "text", "text": "What is in the picture?"}]}]}
    job = chat_engine.job_for(parse_request(request))
    assert job.messages[1]["content"][0]["type"] == "image" and job.pixel_values is None
    replies, _ = run_jobs(chat_engine, [job])
    inputs = chat.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=6, num_beams=1)
    expected = chat.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert replies[0].texts == [expected]


# ----- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["serve"], "serve needs a MODEL"),
    (["serve", "a", "--model", "b"], "MODEL is 'a' but --model is 'b'"),
    (["serve", "m", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    (["serve", "m", "--batch-timeout", "-1"], "--batch-timeout must be a number of at least 0"),
])
def test_serve_flags_are_checked_before_anything_starts(argv, message, capsys):
    from vision_gpt.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_flags_become_the_servers_options(monkeypatch):
    from vision_gpt.cli.commands import build_parser
    from vision_gpt.cli.serve import options_from

    monkeypatch.setenv("VISION_GPT_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "./m", "--served-model-name", "cap", "--max-batch-size", "16",
                                      "--batch-timeout", "25", "--max-image-mb", "2", "--allow-url-images"])
    options = options_from(args)
    assert (options.model, options.name, options.api_key, options.max_batch_size, options.batch_timeout_ms) == (
        "./m", "cap", "from-env", 16, 25.0)
    assert options.limits.max_image_bytes == 2 * 2**20 and options.limits.allow_url_images
    assert (args.host, args.port) == ("127.0.0.1", 8000)


# ----- the server ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, processor):
    """A Ray Serve server on 127.0.0.1 with a tiny model (greedy by default), an API key and a 1 MB body limit."""
    pytest.importorskip("ray.serve")
    from ray import serve

    from vision_gpt.serving.server import run

    folder = tmp_path_factory.mktemp("served-model")
    model = tiny_model(fusion="cross_attention")
    model.generation_config.max_new_tokens = 6
    model.generation_config.num_beams = 1
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    port = free_port()
    options = ServeOptions(model=str(folder), served_model_name="tiny", api_key=API_KEY, max_batch_size=8,
                           batch_timeout_ms=50, threads=2,
                           limits=ServeLimits(max_body_bytes=2**20, max_image_pixels=1_000_000))
    run(options, port=port, num_cpus=2, blocking=False)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "model": model, "processor": processor, "folder": str(folder)}
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()


def client(server, key=API_KEY):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def post(server, payload: bytes, key=API_KEY) -> tuple[int, dict]:
    request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=payload, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_openai_client_gets_generates_caption(server):
    image = random_images(1, seed=51)[0]
    reply = client(server).chat.completions.create(model="tiny", messages=messages(image), temperature=0)
    expected = generated_text(server["model"], server["processor"], [image], max_new_tokens=6, num_beams=1)
    assert reply.choices[0].message.content == expected[0] and reply.model == "tiny"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == server["model"].null_image_embeds(1).shape[1] + 1
    assert reply.usage.completion_tokens >= 1
    scored = client(server).chat.completions.create(model="tiny", messages=messages(image), temperature=0,
                                                    extra_body={"return_caption_scores": True})
    expected_scores = server["model"].generate(**server["processor"](images=[image]), max_new_tokens=6, num_beams=1,
                                               output_caption_scores=True).caption_scores
    assert scored.choices[0].model_extra["confidence"] == pytest.approx(float(expected_scores.confidence[0]), abs=1e-5)
    assert scored.choices[0].model_extra["grounding"] == pytest.approx(float(expected_scores.grounding[0]), abs=1e-5)
    prompted = client(server).chat.completions.create(model="tiny", messages=messages(image, "a photo of"),
                                                      max_tokens=4, temperature=0)
    assert prompted.choices[0].message.content == generated_text(server["model"], server["processor"], [image],
                                                                 ["a photo of"], max_new_tokens=4, num_beams=1)[0]


def test_streamed_chunks_join_to_the_same_caption(server):
    image = random_images(1, seed=52)[0]
    whole = client(server).chat.completions.create(model="tiny", messages=messages(image), temperature=0)
    stream = client(server).chat.completions.create(model="tiny", messages=messages(image), temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # token by token
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_huggingface_hubs_inference_client_works_too(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    # The suite runs with HF_HUB_OFFLINE=1, which blocks every request huggingface_hub makes, this local one too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    image = random_images(1, seed=53)[0]
    hub = InferenceClient(base_url=server["url"] + "/v1", api_key=API_KEY)
    reply = hub.chat_completion(messages=messages(image), model="tiny", temperature=0)
    expected = client(server).chat.completions.create(model="tiny", messages=messages(image), temperature=0)
    assert reply.choices[0].message.content == expected.choices[0].message.content


def test_32_concurrent_clients_are_batched_and_each_gets_its_own_caption(server):
    images = random_images(32, seed=54)
    openai_client = client(server)

    def caption(image):
        return openai_client.chat.completions.create(model="tiny", messages=messages(image),
                                                     temperature=0).choices[0].message.content

    def metric(name):
        request = urllib.request.Request(server["url"] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(request) as response:
            lines = response.read().decode().splitlines()
        return float(next(line.split()[1] for line in lines if line.startswith(f"vision_gpt_{name} ")))

    batches, requests = metric("batches"), metric("batched_requests")
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(caption, images))
    assert metric("batched_requests") - requests == 32
    assert metric("batches") - batches < 32 and metric("largest_batch") > 1  # some shared a generate call
    expected = generated_text(server["model"], server["processor"], images, max_new_tokens=6, num_beams=1)
    assert together == expected
    assert [caption(image) for image in images[:3]] == expected[:3]  # and alone
    assert metric("in_flight") == 0  # every request, streamed or not, refused or not, was counted out


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server):
    image = random_images(1, seed=55)[0]
    good = json.dumps(body(image, temperature=0)).encode()
    cases = [
        (json.dumps(body(url="data:image/png;base64,@@@")).encode(), API_KEY, 400, "not valid base64"),
        (json.dumps(body(url=truncated_jpeg())).encode(), API_KEY, 400, "not a readable image"),
        (json.dumps(body(url=bomb_png())).encode(), API_KEY, 400, "decompression bomb"),
        (json.dumps(body(url="http://images.example/dog.jpg")).encode(), API_KEY, 400, "--allow-url-images"),
        (json.dumps(body(image, n=9)).encode(), API_KEY, 400, "at most 8 choices"),
        (json.dumps(body(text="a photo of")).encode(), API_KEY, 400, "hold no image"),
        (json.dumps({**body(image), "model": "gpt-4o"}).encode(), API_KEY, 404, "'gpt-4o' does not exist"),
        (good, "wrong-key", 401, "wrong API key"),
        (json.dumps(body(url="data:image/png;base64," + "A" * (2**20))).encode(), API_KEY, 413, "1 MB limit"),
        (b"{not json", API_KEY, 400, "not valid JSON"),
    ]
    for payload, key, status, message in cases:
        code, reply = post(server, payload, key)
        assert code == status and message in reply["error"]["message"], (status, reply)
        assert post(server, good)[0] == 200
    # A bad request in a stream is refused before any event, with its status.
    code, reply = post(server, json.dumps(body(url=truncated_jpeg(), stream=True)).encode())
    assert code == 400 and "not a readable image" in reply["error"]["message"]


def test_a_full_queue_answers_429_and_the_server_recovers(server):
    # A second app on the same Ray Serve, room for one request: of 8 sent at once, those that arrive while one is
    # being captioned are told to retry.
    from ray import serve

    from vision_gpt.serving.server import build_app

    options = ServeOptions(model=server["folder"], served_model_name="tiny", max_batch_size=1, threads=2,
                           limits=ServeLimits(max_queue=1))
    serve.run(build_app(options), name="busy", route_prefix="/busy", blocking=False)
    busy_server = {**server, "url": server["url"] + "/busy"}
    payload = json.dumps(body(random_images(1, seed=57)[0], temperature=0, max_tokens=90)).encode()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: post(busy_server, payload), range(8)))
    statuses = [code for code, _ in replies]
    assert set(statuses) == {200, 429}, statuses
    busy = next(reply for code, reply in replies if code == 429)
    assert busy["error"]["type"] == "rate_limit_error" and "--max-queue 1" in busy["error"]["message"]
    assert post(busy_server, payload)[0] == 200
    serve.delete("busy")


def test_the_web_app_in_front_of_the_server_gets_and_streams_its_captions(server):
    pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")
    from vision_gpt.app.remote import RemoteCaptioner
    from vision_gpt.app.server import DecodingSettings, InputError, build_app

    remote = RemoteCaptioner(server["url"] + "/v1", api_key=API_KEY)
    assert remote.served_model == "tiny" and server["url"] in remote.description
    images = random_images(2, seed=58)
    for settings, kwargs in ((DecodingSettings(num_beams=1, num_captions=1, max_new_tokens=6), {"num_beams": 1}),
                             (DecodingSettings(num_beams=3, num_captions=2, max_new_tokens=6),
                              {"num_beams": 3, "num_return_sequences": 2})):
        updates = list(remote.stream(images, settings, every=0))
        results, notes = updates[-1][1]
        expected = generated_text(server["model"], server["processor"], images, max_new_tokens=6, **kwargs)
        assert [caption.text for row in results for caption in row] == expected
        scores = server["model"].generate(**server["processor"](images=images), max_new_tokens=6,
                                          output_caption_scores=True, **kwargs).caption_scores
        assert [c.confidence for row in results for c in row] == pytest.approx(scores.confidence.tolist(), abs=1e-5)
        assert all(c.score == pytest.approx(torch.tensor(c.confidence).log().item()) for row in results for c in row)
        if kwargs["num_beams"] == 1:  # greedy captions stream; each update is a start of the final text
            partial = [texts for kind, texts in updates if kind == "partial"]
            assert partial and all(done.text.startswith(now[0]) for texts in partial
                                   for now, done in zip(texts, [row[0] for row in results]))
    assert "`tiny`, served by" in build_app(captioner=remote).captioner.description
    remote.client.api_key = "wrong-key"
    with pytest.raises(InputError, match="The server refused the request: .*API key"):
        list(remote.stream(images[:1], DecodingSettings(num_beams=1, num_captions=1)))
    with pytest.raises(ValueError, match="Could not list the models of"):
        RemoteCaptioner(server["url"] + "/v1", api_key="wrong-key")


def test_models_and_health(server):
    models = client(server).models.list()
    assert [model.id for model in models.data] == ["tiny"]
    with urllib.request.urlopen(server["url"] + "/health") as response:  # no key needed
        assert json.loads(response.read())["status"] == "ok"
    for route in ("/v1/models", "/metrics"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(server["url"] + route)
        assert caught.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as caught:  # an unknown route, in OpenAI's error shape too
        urllib.request.urlopen(server["url"] + "/v1/completions")
    assert caught.value.code == 404 and "error" in json.loads(caught.value.read())


def test_sampling_with_a_seed_repeats_over_http(server):
    image = random_images(1, seed=56)[0]
    ask = lambda: client(server).chat.completions.create(  # noqa: E731
        model="tiny", messages=messages(image), temperature=0.9, seed=11, n=2)
    first, second = ask(), ask()
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len(first.choices) == 2
    torch.manual_seed(0)  # leave the global generator as other tests expect to find it
