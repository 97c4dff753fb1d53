"""Task images fetched from the configured Label Studio, and nowhere else.

A task names its image by URL (``/data/upload/1/x.jpg``, ``/data/local-files/?d=...``, or
Label Studio's own absolute address). Whoever can reach ``/labelstudio/predict`` chooses those
URLs, so the service fetches only from ``SSD_LABELSTUDIO_URL``'s origin (scheme, host and
port): a relative URL is resolved against it, and any URL that then names another origin is
refused before a connection is made. Redirects are not followed (a redirect is how a fetch would
leave the allowed origin). Each image is read under ``SSD_MAX_IMAGE_BYTES`` (its declared length
first, then as it streams), its bytes held against the request budget, and the whole fetch ends
at the request's deadline.

The token (``SSD_LABELSTUDIO_TOKEN``) goes only to that origin. Label Studio has two kinds: a
personal access token (a JWT refresh token), exchanged at ``/api/token/refresh/`` for an
access token sent as ``Bearer`` until shortly before it expires, and a legacy token sent as
``Token``. Project settings sent in ``setup`` (``hostname``, ``access_token``) never replace
either: they come from whoever calls ``setup``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import SecretStr

from ..budget import Reservation

REFRESH_PATH = "/api/token/refresh/"  # the trailing slash: Django redirects a POST without it
REFRESH_EARLY_S = 30.0  # an access token is renewed this long before it expires


class FetchError(Exception):
    """A task image that could not be fetched; the message names why."""


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of an http(s) URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: an http:// or https:// URL is needed")
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2].lower()}"


def _claims(token: str) -> dict | None:
    """A JWT's claims, read without verifying anything (Label Studio verifies them; this only
    tells the kind of token and when it expires), or None for a token that is no JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def is_refresh_token(token: str) -> bool:
    """A personal access token (a JWT of type refresh), not a legacy one."""
    claims = _claims(token)
    return claims is not None and claims.get("token_type") == "refresh"


class LabelStudio:
    """The one Label Studio the service fetches task images from."""

    def __init__(self, url: str, token: SecretStr | None, transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/") + "/"
        self.origin = origin_of(url)
        self._token = token.get_secret_value() if token is not None else None
        self._refresh = bool(self._token) and is_refresh_token(self._token)
        self._access: tuple[str, float] | None = None  # (token, monotonic expiry)
        self._lock = asyncio.Lock()
        self._http = httpx.AsyncClient(
            follow_redirects=False,
            transport=transport,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            # Identity: a compressed body would pass the byte limit only once inflated.
            headers={"User-Agent": "ssd-detector", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def resolve(self, value: object) -> str:
        """The absolute URL of a task's image, if it is on the configured Label Studio."""
        if not isinstance(value, str) or not value:
            raise FetchError("the task's image is not a URL")
        if len(value) > 8192:
            raise FetchError("the task's image URL is over 8192 characters")
        url = urljoin(self.url, value)
        try:
            same = origin_of(url) == self.origin
        except ValueError:
            same = False
        if not same:
            shown = value if len(value) <= 200 else value[:200] + "..."
            raise FetchError(
                f"{shown!r} is not on the configured Label Studio ({self.origin}, SSD_LABELSTUDIO_URL); "
                "the service fetches images from there only"
            )
        return url

    async def _authorization(self, renew: bool = False) -> dict[str, str]:
        if not self._token:
            return {}
        if not self._refresh:
            return {"Authorization": f"Token {self._token}"}
        async with self._lock:
            now = time.monotonic()
            if renew or self._access is None or self._access[1] <= now:
                self._access = await self._exchange(now)
            return {"Authorization": f"Bearer {self._access[0]}"}

    async def _exchange(self, now: float) -> tuple[str, float]:
        try:
            answer = await self._http.post(urljoin(self.url, REFRESH_PATH), json={"refresh": self._token})
        except httpx.HTTPError as exc:
            raise FetchError(f"Label Studio's token refresh failed: {exc!r}") from None
        if answer.status_code != 200:
            raise FetchError(
                f"Label Studio refused SSD_LABELSTUDIO_TOKEN at {REFRESH_PATH} ({answer.status_code}): "
                "the personal access token is expired or revoked"
            )
        try:
            access = answer.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise FetchError(f"Label Studio's {REFRESH_PATH} answered without an access token") from None
        claims = _claims(access) or {}
        lifetime = float(claims.get("exp", 0)) - time.time() if "exp" in claims else 300.0
        return access, now + max(0.0, lifetime - REFRESH_EARLY_S)

    async def fetch(self, url: str, limit: int, held: Reservation, due: float) -> bytes:
        """The image at ``url`` (``resolve``'s), at most ``limit`` bytes, by ``due`` (the event
        loop's clock)."""
        left = due - time.monotonic()
        if left <= 0:
            raise FetchError("no time left before the request's deadline to fetch the image")
        try:
            async with asyncio.timeout(left):
                data = await self._get(url, limit, held, due, await self._authorization())
                if data is None and self._refresh:  # an access token revoked early: once more
                    data = await self._get(url, limit, held, due, await self._authorization(renew=True))
        except TimeoutError:
            raise FetchError(f"fetching the image took past the request's deadline ({left:.1f} s)") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"fetching the image from Label Studio failed: {exc!r}") from None
        if data is None:
            raise FetchError("Label Studio answered 401: SSD_LABELSTUDIO_TOKEN is not accepted")
        return data

    async def _get(
        self, url: str, limit: int, held: Reservation, due: float, headers: dict[str, str]
    ) -> bytes | None:
        async with self._http.stream("GET", url, headers=headers) as answer:
            if answer.status_code == 401:
                return None
            if answer.is_redirect:
                raise FetchError(
                    f"Label Studio answered {answer.status_code} (a redirect to "
                    f"{answer.headers.get('location', '?')!r}); redirects are not followed"
                )
            if answer.status_code != 200:
                raise FetchError(f"Label Studio answered {answer.status_code} for the image")
            declared = answer.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise FetchError(
                    f"the image has {declared} bytes; the limit is {limit} (SSD_MAX_IMAGE_BYTES)"
                )
            chunks, size = [], 0
            async for chunk in answer.aiter_raw():
                size += len(chunk)
                if size > limit:
                    raise FetchError(f"the image is over the limit of {limit} bytes (SSD_MAX_IMAGE_BYTES)")
                await held.take(len(chunk), due)
                chunks.append(chunk)
            return b"".join(chunks)
