"""A client of an OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, `transformers serve`):
messages in, text out. Images travel inside the messages as base64 data: URLs (`image_part`), the
OpenAI format every one of these servers reads. Many requests are kept in flight by a thread pool;
a request that fails on the network or with a server-side status (429, 5xx) is retried with
exponential backoff; each has a timeout. A server that stays unreachable is one UAEError saying how
many requests were done, and the answers received before it are handed back with it
(`RemoteError.done`), so that a caller can keep them.

    client = ChatClient("http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct")
    texts = client.complete_many([[{"role": "user", "content": [text_part("..."), image_part(im)]}]])
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Sequence

import requests

from uae.errors import UAEError

logger = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # worth another try: overloaded or restarting


class RemoteError(UAEError):
    """The server could not answer. `done`: {request index: text} of the requests answered before."""

    def __init__(self, message: str, done: dict[int, str] | None = None):
        super().__init__(message)
        self.done = dict(done or {})


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image, max_side: int | None = None) -> dict:
    """A PIL image as a message part: a PNG data: URL, its longest side at most `max_side` (never
    enlarged; None: as it is)."""
    im = image.convert("RGB")
    if max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return {"type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")}}


def _first_line(text: str, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line[:limit]


class ChatClient:
    """Chat completions of one model on one server. `sampling`: the request's sampling fields
    (temperature, max_tokens, seed, ...), sent with every request as given. `api_key_env`: the
    environment variable whose value, when set, is sent as the bearer token."""

    def __init__(self, base_url: str, model: str | None = None, *, sampling: dict | None = None,
                 concurrency: int = 8, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                 api_key_env: str = "OPENAI_API_KEY", setting: str = "--judge"):
        self.base_url = base_url.rstrip("/")
        self.sampling = dict(sampling or {})
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.setting = setting
        key = os.environ.get(api_key_env)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()
        self.model = model or self._only_model()

    def _session(self) -> requests.Session:
        # one session (its connection pool) per thread: requests' Session is not promised thread-safe
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _request(self, method: str, path: str, **kwargs) -> dict:
        """One call with retries; the JSON answer, or a RemoteError naming the server and the reason."""
        url = f"{self.base_url}{path}"
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._session().request(method, url, headers=self.headers, timeout=self.timeout_s, **kwargs)
            except requests.Timeout:
                why = f"no answer within {self.timeout_s:g} s"
                continue
            except requests.ConnectionError as e:
                why = f"cannot connect ({type(e).__name__})"
                continue
            if r.status_code in RETRY_STATUS:
                why = f"HTTP {r.status_code}: {_first_line(r.text)}"
                continue
            if r.status_code >= 400:  # the request itself is at fault: another try gives the same
                raise RemoteError(f"{self.setting} {self.base_url} refused the request: HTTP {r.status_code}: "
                                  f"{_first_line(r.text)}")
            try:
                return r.json()
            except ValueError:
                why = f"an answer that is not JSON: {_first_line(r.text)}"
        raise RemoteError(f"{self.setting} {self.base_url}: {why} after {self.retries + 1} attempt(s)")

    def _only_model(self) -> str:
        """The server's one model (GET /models), when no model is named."""
        data = self._request("GET", "/models").get("data") or []
        ids = [m.get("id") for m in data if isinstance(m, dict) and m.get("id")]
        if len(ids) != 1:
            raise UAEError(f"{self.setting} {self.base_url} serves {len(ids)} models ({', '.join(ids[:5]) or 'none'}): "
                           "name one with --remote_model")
        return ids[0]

    def complete(self, messages: list[dict]) -> str:
        """The assistant's text for one conversation."""
        data = self._request("POST", "/chat/completions",
                             json={"model": self.model, "messages": messages, **self.sampling})
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RemoteError(f"{self.setting} {self.base_url}: an answer without choices[0].message.content "
                              f"({_first_line(str(data))})") from None
        return content if isinstance(content, str) else ""

    def complete_many(self, conversations: Sequence[list[dict]],
                      on_done: Callable[[int], None] | None = None) -> list[str]:
        """Each conversation's text, `concurrency` requests in flight, in the order given.
        `on_done(n)`: called in this thread as answers arrive (n of them), e.g. a progress bar.
        A request that fails for good stops the rest: RemoteError with the answers done so far."""
        out: dict[int, str] = {}
        pending = {}
        todo = iter(enumerate(conversations))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            def submit_next() -> None:
                for i, conv in todo:
                    pending[pool.submit(self.complete, conv)] = i
                    return

            for _ in range(self.concurrency):
                submit_next()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    i = pending.pop(f)
                    try:
                        out[i] = f.result()
                    except RemoteError as e:
                        for other in pending:
                            other.cancel()
                        for other, j in list(pending.items()):  # already running: keep what finishes
                            if not other.cancelled() and other.exception() is None:
                                out[j] = other.result()
                        raise RemoteError(f"{e}; {len(out)} of {len(conversations)} request(s) done",
                                          done=out) from None
                    if on_done:
                        on_done(1)
                    submit_next()
        return [out[i] for i in range(len(conversations))]

    def settings(self) -> dict:
        """What an answer depends on: the server, the model and the sampling fields."""
        return {"server": self.base_url, "model": self.model, "sampling": self.sampling}
