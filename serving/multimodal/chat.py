"""OpenAI chat messages with image parts -> the chat template's messages plus the images in order.

Content parts `{"type": "text", "text": ...}` and `{"type": "image_url", "image_url": {"url": ...}}`
(OpenAI's) become transformers' `{"type": "text", "text": ...}` and `{"type": "image"}`, which the
multimodal chat templates render as the model's image placeholder. The offline `LLM.chat` also
takes `{"type": "image_pil", "image_pil": <PIL image>}` (vLLM's), and training data
`{"type": "image", "image": <path or URL>}` (transformers' and TRL's).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


IMAGE_PARTS = ("image_url", "image_pil", "image")


def count_images(messages: Sequence[dict[str, Any]]) -> int:
    """Image parts in the messages (counted before anything is fetched)."""
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if (part if isinstance(part, dict) else part.model_dump()).get("type") in IMAGE_PARTS
    )


def split_images(
    messages: Sequence[dict[str, Any]], fetch: Callable[[str], bytes]
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(template messages, images in order: bytes fetched from their URLs, or PIL images as given)."""
    converted, images = [], []
    for message in messages:
        content = message.get("content")
        if content is None or isinstance(content, str):
            converted.append(dict(message))
            continue
        parts = []
        for part in content:
            part = part if isinstance(part, dict) else part.model_dump(exclude_none=True)
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text") or ""})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError("an image_url content part needs image_url.url")
                images.append(fetch(url))
                parts.append({"type": "image"})
            elif kind in ("image_pil", "image"):  # an image object, or (type "image") a path or URL to fetch
                image = part.get(kind)
                images.append(fetch(image) if isinstance(image, str) else image)
                parts.append({"type": "image"})
            else:
                raise ValueError(f"message content of type {kind!r} is not supported (text, image_url)")
        if all(p["type"] == "text" for p in parts):  # text-only templates expect a string
            converted.append({**message, "content": "".join(p["text"] for p in parts)})
        else:
            converted.append({**message, "content": parts})
    return converted, images
