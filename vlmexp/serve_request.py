"""An OpenAI chat-completions request -> the engine sample local prediction takes, checked at the door.

`request_sample(body, cfg, marker)` gives {id, images, messages (HF chat), rendered}, as
`build_samples` makes; images come only as base64 data URLs, and their sizes are read from the image
headers and capped before any pixel is decoded. Every problem is a `RequestError` with the HTTP
status and the OpenAI `param` it concerns, which `exp serve` (vlmexp/serve.py) sends back as an
OpenAI-style error.
"""

from __future__ import annotations

import base64
import binascii
import io
from http import HTTPStatus

from PIL import Image

from vlmexp.config import Config
from vlmexp.prompts.render import Rendered

# Decoded pixels per request, all its images together: 40 MP is twenty 1920x1080 screenshots. A PNG of
# 12000 x 12000 flat pixels is only 594 KB on the wire but 144 MP (432 MB as RGB, 36 s to process).
MAX_PIXELS = 40_000_000


class RequestError(ValueError):
    """A request the client must fix; becomes an OpenAI-style error JSON with `status`."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def decode_image(url: str, cfg: Config, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, int]:
    """A data URL ("data:image/png;base64,...") -> (RGB PIL image resized as the run's samples are,
    pixels decoded). The size in the image's header is checked against `max_pixels` before any pixel
    is decoded."""
    from vlmexp.data import DataError, open_image
    from vlmexp.engine.samples import resize_image

    if not url.startswith("data:"):
        raise RequestError(
            f"image_url {url[:60]!r}: only base64 data URLs are accepted (data:image/png;base64,...); "
            "this server fetches nothing from the network",
            param="messages",
        )
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError(f"image data URL {header!r} is not base64-encoded", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError as e:  # PIL's own limit (2 x 89 MP) struck first
        raise RequestError(
            f"image in {header!r}: {e}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, param="messages"
        ) from None
    except (binascii.Error, OSError, ValueError) as e:
        raise RequestError(f"cannot decode the image in {header!r}: {e}", param="messages") from None
    if width * height > max_pixels:
        raise RequestError(
            f"image in {header!r} is {width}x{height} = {width * height / 1e6:.1f} MP, over the "
            f"{max_pixels / 1e6:g} MP left of this server's cap on decoded pixels per request "
            "(exp serve --max-pixels). Send it downscaled: the run resizes images itself",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            param="messages",
        )
    try:
        return resize_image(open_image(io.BytesIO(data)), cfg), width * height
    except DataError as e:
        raise RequestError(f"cannot decode the image in {header!r}: {e}", param="messages") from None


def request_sample(body: dict, cfg: Config, marker: str = "", max_pixels: int = MAX_PIXELS) -> dict:
    """OpenAI chat messages -> {id, images, messages (HF chat), rendered}, as `build_samples` makes.

    `max_pixels` bounds the decoded pixels of all the request's images together."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of chat messages", param="messages")
    hf, images, texts = [], [], {"system": [], "user": []}
    decoded = 0  # pixels of the request's images so far
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}]: role {role!r}; use system, user or assistant", param="messages"
            )
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(
                f"messages[{i}]: content must be a string or a list of parts", param="messages"
            )
        out = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.append({"type": "text", "text": str(part.get("text", ""))})
                texts.setdefault(role, []).append(str(part.get("text", "")))
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url", "") if isinstance(ref, dict) else str(ref or "")
                img, pixels = decode_image(url, cfg, max_pixels - decoded)
                images.append(img)
                decoded += pixels
                out.append({"type": "image"})
            else:
                raise RequestError(f"messages[{i}]: unsupported content part {kind!r}", param="messages")
        hf.append({"role": role, "content": out})
    if hf[-1]["role"] != "user":
        raise RequestError("the last message must be the user's (the image to classify)", param="messages")
    if not images:
        raise RequestError(
            "the request has no image: add an image_url part with a data URL", param="messages"
        )
    rendered = Rendered(
        system="\n".join(texts["system"]), user="\n".join(texts["user"]), answer="", marker=marker
    )
    return {"id": "request", "images": images, "messages": hf, "rendered": rendered}


def requested_choices(body: dict, labels: list[str]) -> list[str] | None:
    """The guided choice of a request (either vLLM spelling), checked against the run's labels."""
    structured = body.get("structured_outputs") or {}
    choices = body.get("guided_choice") or (
        structured.get("choice") if isinstance(structured, dict) else None
    )
    if choices is None:
        return None
    if not isinstance(choices, list) or not choices:
        raise RequestError("guided choice must be a non-empty list of labels", param="guided_choice")
    unknown = [c for c in choices if c not in labels]
    if unknown:
        raise RequestError(
            f"guided choice {unknown[:5]} are not labels of this run; its labels: {', '.join(labels)}",
            param="guided_choice",
        )
    return [str(c) for c in choices]
