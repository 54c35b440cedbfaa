"""Images that arrive as bytes or addresses rather than files: fetching http(s) URLs within a size limit and a
timeout, never into private networks, and decoding bytes into a PIL image within a pixel limit. Shared by the web
app and the OpenAI-compatible server."""

import ipaddress
import socket
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

MB = 1024 * 1024


class InputError(ValueError):
    """An input that is refused: too large, too many, an unreadable file, an unreachable or forbidden URL."""


def image_from_bytes(data: bytes, name: str, max_pixels: int | None = None):
    """
    A PIL image from an encoded file's bytes, decoded in full, so that a truncated file fails here. `name` is how
    messages call it (a URL, a file name). An image of more than `max_pixels` pixels (default: PIL's decompression-bomb
    limit) is refused from its header, before any pixel is decoded.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    from ..modeling import ImageLoadError

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if limit is not None and width * height > limit:
            raise ImageLoadError(f"{_short(name)} is {width} x {height} pixels, more than the {limit:,}-pixel limit "
                                 "(a decompression bomb, or a photo to downscale first).")
        image.load()
    except Image.DecompressionBombError as error:  # PIL's own guard, from the header, beyond twice its limit
        raise ImageLoadError(f"{_short(name)} is too large to decode ({error}): a decompression bomb, or a photo to "
                             "downscale first.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        reason = "not an image PIL can read" if isinstance(error, UnidentifiedImageError) else str(error)
        raise ImageLoadError(f"{_short(name)} is not a readable image ({reason}).") from None
    return image


def fetch_url(url: str, *, max_bytes: int, timeout: float, allow_private: bool = False) -> bytes:
    """
    Download `url` (http or https) within `timeout` seconds and `max_bytes`. Addresses in private or local networks
    are refused unless `allow_private` (a public server that fetched them would let clients probe its own network),
    and so are redirects to them. Offline, this fails at once (or after the timeout) with an `InputError` that says
    to send the file instead, never a hang.
    """
    future = _url_pool().submit(_download, url, max_bytes, timeout, allow_private)
    try:
        # Socket timeouts bound each read, not the whole download, and name lookups have none: cap everything.
        return future.result(timeout=timeout + 1)
    except FutureTimeout:
        raise InputError(f"Fetching {_short(url)} took longer than {timeout:g} s. This server may have no internet "
                         "access; download the image and send the file instead.") from None


_URL_POOL = None
_URL_POOL_LOCK = threading.Lock()


def _url_pool() -> ThreadPoolExecutor:
    # A shared pool, not one per request: leaving a `with ThreadPoolExecutor()` block waits for a stuck download.
    global _URL_POOL
    with _URL_POOL_LOCK:
        if _URL_POOL is None:
            _URL_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vision-gpt-url")
        return _URL_POOL


def readable_size(num_bytes: int) -> str:
    return f"{num_bytes / MB:.3g} MB" if num_bytes >= MB else f"{num_bytes / 1024:.3g} KB"


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _check_url(url: str, allow_private: bool) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{_short(url)} is not an http:// or https:// address.")
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 443)}
    except OSError as error:
        raise InputError(f"Could not fetch {_short(url)}: the host name did not resolve ({error.strerror or error}). "
                         "This server may have no internet access; download the image and send the file instead.") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise InputError(f"{_short(url)} points into a private or local network ({address}); this server only "
                             "fetches public addresses.")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to addresses that the first URL would have been allowed to use."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_url(newurl, self.allow_private)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    _check_url(url, allow_private)
    opener = urllib.request.build_opener(_CheckedRedirects(allow_private))
    request = urllib.request.Request(url, headers={"User-Agent": "vision-gpt"})
    deadline = time.monotonic() + timeout
    too_big = InputError(f"{_short(url)} is larger than the {readable_size(max_bytes)} limit.")
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise too_big
            chunks, received = [], 0
            while chunk := response.read(64 * 1024):
                received += len(chunk)
                if received > max_bytes:
                    raise too_big
                if time.monotonic() > deadline:
                    raise InputError(f"Fetching {_short(url)} took longer than {timeout:g} s.")
                chunks.append(chunk)
    except InputError:
        raise
    except Exception as error:  # URLError, HTTPError, socket timeouts, TLS errors: the reason is what matters
        reason = getattr(error, "reason", None) or error
        raise InputError(f"Could not fetch {_short(url)}: {reason}. This server may have no internet access; "
                         "download the image and send the file instead.") from None
    return b"".join(chunks)
