"""`vision-gpt serve`'s settings: the model and batching (`ServeOptions`), what one request may ask for
(`ServeLimits`), where the API key may come from. Plain values, importable without the serving libraries."""

from dataclasses import dataclass, field

MB = 1024 * 1024

# Where `vision-gpt serve` reads its API key when --api-key is not given.
API_KEY_ENV = "VISION_GPT_API_KEY"


@dataclass
class ServeLimits:
    """What one request may ask for. Beyond any of these a request gets a 400 or 413 that names the limit."""

    max_body_bytes: int = 20 * MB
    max_image_bytes: int = 10 * MB
    max_image_pixels: int | None = None  # None: PIL's decompression-bomb limit (about 89 million pixels)
    max_n: int = 8
    max_tokens: int = 256
    max_beams: int = 8
    max_queue: int = 128
    allow_url_images: bool = False
    url_timeout: float = 5.0


@dataclass
class ServeOptions:
    """Everything a replica needs to start: the model to load, its name, limits and batching."""

    model: str
    served_model_name: str | None = None
    runtime: str = "torch"
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    api_key: str | None = None
    max_batch_size: int = 8
    batch_timeout_ms: float = 100.0
    threads: int | None = None
    num_replicas: int = 1
    limits: ServeLimits = field(default_factory=ServeLimits)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
