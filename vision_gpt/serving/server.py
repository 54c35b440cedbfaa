"""`vision-gpt serve`: an OpenAI-compatible HTTP server for a VisionGPT model, on Ray Serve.

    vision-gpt serve user/vision-gpt-flickr8k                      # http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":
        "user/vision-gpt-flickr8k", "messages": [{"role": "user", "content": [{"type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64,..."}}]}]}'

The deployment is a FastAPI app behind Ray Serve's proxy. Each request is read and checked on its own (its image
decoded within limits, its decoding settings resolved), so a bad request is answered alone with an OpenAI-style
error; the requests that pass wait for `@serve.batch` to gather up to `max_batch_size` of them (at most
`batch_timeout_ms`), and `CaptionEngine.run` captions them with one `generate` call per group of equal settings, on a
worker thread, while the event loop streams each request's tokens as they come.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health` (no key needed), `GET /metrics` (Prometheus
text: requests, batches and their sizes; the key, where set, as for /v1).
"""

import asyncio
import hmac
import json
import logging
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import CaptionEngine, Job
from .settings import ServeOptions
from .protocol import OpenAIError, chunk, completion, new_id, parse_request, usage

logger = logging.getLogger("vision_gpt.serve")


api = FastAPI(title="vision-gpt", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # An unknown route or method, in OpenAI's shape too.
    return await _openai_error(request, OpenAIError(error.status_code, f"{request.method} {request.url.path}: "
                                                                       f"{error.detail}"))


# Defined before the deployment class: Ray Serve serializes that class, with what it uses, when it is decorated.
class _Release:
    """Counts one request in flight on `server` until called; calling it again does nothing."""

    def __init__(self, server):
        self.server, self.done = server, False
        server.in_flight += 1

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.server.in_flight -= 1


@serve.deployment(name="VisionGPTServer")
@serve.ingress(api)
class VisionGPTServer:
    """One replica: a loaded model, its batch queue, and the HTTP routes."""

    def __init__(self, options: ServeOptions):
        import torch

        # A Ray worker starts with OMP_NUM_THREADS=1 (its one reserved CPU); generation wants the cores, shared by the
        # replicas on the machine.
        torch.set_num_threads(options.threads or max(1, (os.cpu_count() or 1) // options.num_replicas))
        self.options = options
        self.limits = options.limits
        self.engine = CaptionEngine.from_pretrained(
            options.model, limits=options.limits, dtype=options.dtype, device=options.device,
            runtime=options.runtime, trust_remote_code=options.trust_remote_code)
        self._generate.set_max_batch_size(options.max_batch_size)
        self._generate.set_batch_wait_timeout_s(options.batch_timeout_ms / 1000)
        # One generation at a time: each already uses every core; a second would only slow both.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-gpt-generate")
        self.in_flight = 0
        self.counters = {"requests": 0, "requests_rejected": 0, "batches": 0, "batched_requests": 0,
                         "largest_batch": 0}
        logger.info("serving %s as %r: batches of up to %d, %g ms wait", options.model, options.name,
                    options.max_batch_size, options.batch_timeout_ms)

    # ----- checks ------------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise OpenAIError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key", type="authentication_error")

    async def _read_body(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        too_big = OpenAIError(413, f"The request body is over the {limit // (1024 * 1024)} MB limit "
                                   "(--max-body-mb).", code="request_too_large")
        if length and length.isdigit() and int(length) > limit:
            raise too_big
        received = bytearray()
        async for piece in request.stream():
            received += piece
            if len(received) > limit:
                raise too_big
        try:
            return json.loads(received)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OpenAIError(400, f"The request body is not valid JSON: {error}.") from None

    # ----- routes ------------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.options.name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.options.name, "object": "model", "created": 0,
                                            "owned_by": "vision-gpt"}]}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        self._authorize(request)
        lines = []
        for name, value in self.counters.items():
            kind = "gauge" if name == "largest_batch" else "counter"
            lines += [f"# TYPE vision_gpt_{name} {kind}", f"vision_gpt_{name} {value}"]
        lines += ["# TYPE vision_gpt_in_flight gauge", f"vision_gpt_in_flight {self.in_flight}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await self._read_body(request)
        parsed = parse_request(body)
        if parsed.model != self.options.name:
            raise OpenAIError(404, f"The model '{parsed.model}' does not exist: this server serves "
                                   f"'{self.options.name}' (GET /v1/models).", param="model",
                              code="model_not_found")
        if self.in_flight >= self.limits.max_queue:
            self.counters["requests_rejected"] += 1
            raise OpenAIError(429, f"The server is busy: {self.in_flight} requests are waiting or running "
                                   f"(--max-queue {self.limits.max_queue}). Retry shortly.",
                              code="rate_limit_exceeded", type="rate_limit_error")
        # Counted from here (no await between the check and the count), released exactly once however it ends.
        release = _Release(self)
        try:
            # Reading the image is CPU work too: off the event loop, which keeps streaming other requests.
            job = await asyncio.get_running_loop().run_in_executor(None, self.engine.job_for, parsed)
        except BaseException:
            release()
            raise
        job.request_id, job.created, job.model = new_id(), int(time.time()), self.options.name
        job.include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        self.counters["requests"] += 1
        if job.stream:
            events = self._stream(job, release)
            # A client that leaves before the stream starts never runs its `finally`: release when it is dropped.
            weakref.finalize(events, release)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            return await self._complete(job)
        finally:
            release()

    async def _complete(self, job: Job) -> dict:
        async for events in self._generate(job):
            for kind, _, *rest in events:
                if kind == "error":
                    raise rest[0]
                if kind == "done":
                    reply = rest[0]
                    return completion(job.request_id, job.model, reply.texts, reply.finish_reasons,
                                      reply.prompt_tokens, reply.completion_tokens, reply.scores)
        raise OpenAIError(500, "Generation ended without a reply.", type="server_error")

    async def _stream(self, job: Job, release):
        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        try:
            for index in range(job.decoding.n):
                yield sse(chunk(job.request_id, job.model, job.created, index, {"role": "assistant", "content": ""}))
            async for events in self._generate(job):
                for kind, _, *rest in events:
                    if kind == "delta":
                        index, text = rest
                        yield sse(chunk(job.request_id, job.model, job.created, index, {"content": text}))
                    elif kind == "error":
                        yield sse(rest[0].body())
                        return
                    elif kind == "done":
                        reply = rest[0]
                        for index, reason in enumerate(reply.finish_reasons):
                            yield sse(chunk(job.request_id, job.model, job.created, index, {}, reason,
                                            scores=reply.scores[index] if reply.scores else None))
                        if job.include_usage:
                            yield sse(chunk(job.request_id, job.model, job.created, 0, {}, choices=False,
                                            usage_counts=usage(reply.prompt_tokens, reply.completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            release()

    # ----- batching ----------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate(self, jobs: list[Job]):
        """Gathered requests, captioned together; yields, per step, each request's events (a list, maybe empty), and
        `StopIteration` for a request that is finished."""
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(jobs)
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(jobs))
        logger.info("batch of %d request(s)", len(jobs))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        position = {id(job): index for index, job in enumerate(jobs)}

        def emit(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def work() -> None:
            try:
                self.engine.run(jobs, emit)
            finally:
                emit(None)

        worker = loop.run_in_executor(self._executor, work)
        finished = [False] * len(jobs)
        running = True
        while running:
            pending = [await queue.get()]
            while not queue.empty():
                pending.append(queue.get_nowait())
            step = [[] for _ in jobs]
            for event in pending:
                if event is None:
                    running = False
                    continue
                step[position[id(event[1])]].append(event)
            ends = [any(event[0] in ("done", "error") for event in events) for events in step]
            yield [StopIteration if finished[index] else events for index, events in enumerate(step)]
            for index, ended in enumerate(ends):
                finished[index] = finished[index] or ended
        await worker
        if not all(finished):
            # Every request gets an answer: one the engine did not finish is an error, not a hang.
            yield [StopIteration if done else [("error", job, OpenAIError(500, "Generation ended early.",
                                                                            type="server_error"))]
                   for done, job in zip(finished, jobs)]


def build_app(options: ServeOptions):
    """The Ray Serve application for `options`: `num_replicas` replicas, each with its own model and batch queue,
    each admitting what its queue limit allows (the proxy spreads requests over them)."""
    admitted = options.limits.max_queue + options.max_batch_size
    return VisionGPTServer.options(num_replicas=options.num_replicas, max_ongoing_requests=admitted).bind(options)


def run(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
        blocking: bool = True):
    """Start Ray (a local one unless RAY_ADDRESS names a cluster), Serve's HTTP proxy on `host:port`, and the app."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING, configure_logging=True)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(options), name="vision-gpt", route_prefix="/", blocking=False)
    print(f"Serving {options.model} as {options.name!r} at http://{host}:{port}/v1 (OpenAI-compatible; "
          f"batches of up to {options.max_batch_size}, {options.batch_timeout_ms:g} ms wait). Ctrl+C stops it.",
          flush=True)
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return None

