"""Image URLs -> bytes, as vLLM fetches them: `data:` URLs, http(s) with a timeout and a size
cap, and local files only under an allowed folder (`--allowed-local-media-path`)."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_FETCH_TIMEOUT_S = 600.0  # bounds on the settings
MAX_IMAGE_BYTES_LIMIT = 1 << 30


class MediaFetcher:
    """`fetch(url)` -> the bytes it names; ValueError (said to the client) for anything refused or unreadable."""

    def __init__(
        self,
        allowed_local_media_path: str | Path | None = None,
        *,
        timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ):
        if not 0 < timeout_s <= MAX_FETCH_TIMEOUT_S:
            raise ValueError(f"the image fetch timeout must be in (0, {MAX_FETCH_TIMEOUT_S}] s, got {timeout_s}")
        if not 0 < max_bytes <= MAX_IMAGE_BYTES_LIMIT:
            raise ValueError(f"the image size cap must be in (0, {MAX_IMAGE_BYTES_LIMIT}] bytes, got {max_bytes}")
        self.local_root = None if allowed_local_media_path is None else Path(allowed_local_media_path).resolve()
        if self.local_root is not None and not self.local_root.is_dir():
            raise ValueError(f"--allowed-local-media-path {allowed_local_media_path} is not a folder")
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def fetch(self, url: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._data(url)
        if scheme in ("http", "https"):
            return self._http(url)
        if scheme == "file":
            return self._file(url)
        raise ValueError(f"unsupported image URL scheme {scheme!r}: use data:, http(s): or file:")

    def _checked(self, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise ValueError(f"the image is larger than {self.max_bytes} bytes")
        return data

    def _data(self, url: str) -> bytes:
        header, sep, payload = url[len("data:"):].partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError("a data: image URL must be base64 encoded (data:<type>;base64,<data>)")
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise ValueError(f"the image is larger than {self.max_bytes} bytes")
        try:
            return self._checked(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"the data: image URL is not valid base64: {e}") from None

    def _http(self, url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310 - scheme checked
                return self._checked(response.read(self.max_bytes + 1))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - network errors of every kind
            raise ValueError(f"cannot fetch the image {url}: {e}") from None

    def _file(self, url: str) -> bytes:
        if self.local_root is None:
            raise ValueError("local image files are refused (the server was started without "
                             "--allowed-local-media-path)")
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
        if not path.is_relative_to(self.local_root):
            raise ValueError(f"the image file {path} is outside --allowed-local-media-path")
        if not path.is_file():
            raise ValueError(f"no image file {path}")
        if path.stat().st_size > self.max_bytes:
            raise ValueError(f"the image is larger than {self.max_bytes} bytes")
        return path.read_bytes()
