"""A client of an OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, `transformers serve`):
messages in, a Completion out (the text, why it stopped, its token count, the seed sent). Images travel inside the messages as base64 data: URLs (`image_part`), the
OpenAI format every one of these servers reads. Many requests are kept in flight by a thread pool;
a request that fails on the network or with a server-side status (429, 5xx) is retried with
exponential backoff; each has a timeout. A server that stays unreachable is one UAEError saying how
many requests were done, and the answers received before it are handed back with it
(`RemoteError.done`), so that a caller can keep them.

    client = ChatClient("http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct")
    texts = client.complete_many([[{"role": "user", "content": [text_part("..."), image_part(im)]}]])
    full = client.chat_many(conversations, seeds=[0, 1, ...])  # Completion: text, finish_reason, tokens, seed

`transformers_serve(model)` starts a local `transformers serve` of one model (the tests' and
bench/caption_throughput.py's real server).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import requests

from uae.errors import UAEError

logger = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # worth another try: overloaded or restarting


@dataclass(frozen=True)
class Completion:
    """One answer: the text; the server's finish_reason ("stop": it ended, "length": cut by
    max_tokens, None: not given); its usage.completion_tokens (None: not given); the seed sent with
    the request (None: none; whether the server honours it is the server's: vLLM and
    `transformers serve` read it)."""

    text: str
    finish_reason: str | None = None
    tokens: int | None = None
    seed: int | None = None

    @property
    def truncated(self) -> bool | None:
        """Cut by max_tokens (None: the server did not say why it stopped)."""
        return None if self.finish_reason is None else self.finish_reason == "length"


class RemoteError(UAEError):
    """The server could not answer. `done`: {request index: answer} of the requests answered before
    (text from complete_many, Completion from chat_many)."""

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

    def chat(self, messages: list[dict], seed: int | None = None) -> Completion:
        """The assistant's answer to one conversation; `seed`: sent as the request's seed (it
        overrides one in `sampling`)."""
        body = {"model": self.model, "messages": messages, **self.sampling, **({} if seed is None else {"seed": seed})}
        data = self._request("POST", "/chat/completions", json=body)
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RemoteError(f"{self.setting} {self.base_url}: an answer without choices[0].message.content "
                              f"({_first_line(str(data))})") from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        return Completion(content if isinstance(content, str) else "", reason if isinstance(reason, str) else None,
                          tokens if isinstance(tokens, int) else None, body.get("seed"))

    def complete(self, messages: list[dict]) -> str:
        """The assistant's text for one conversation."""
        return self.chat(messages).text

    def chat_many(self, conversations: Sequence[list[dict]], seeds: Sequence[int] | None = None,
                  on_done: Callable[[int], None] | None = None) -> list[Completion]:
        """Each conversation's answer (with `seeds`: each request's seed), `concurrency` requests in
        flight, in the order given. `on_done(n)`: called in this thread as answers arrive (n of them),
        e.g. a progress bar. A request that fails for good stops the rest: RemoteError with the
        answers done so far."""
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
        out: dict[int, Completion] = {}
        pending = {}
        todo = iter(enumerate(conversations))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            def submit_next() -> None:
                for i, conv in todo:
                    pending[pool.submit(self.chat, conv, None if seeds is None else seeds[i])] = i
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

    def complete_many(self, conversations: Sequence[list[dict]],
                      on_done: Callable[[int], None] | None = None) -> list[str]:
        """chat_many's texts (RemoteError.done: texts too)."""
        try:
            return [c.text for c in self.chat_many(conversations, on_done=on_done)]
        except RemoteError as e:
            raise RemoteError(str(e), done={i: c.text for i, c in e.done.items()}) from None

    def settings(self) -> dict:
        """What an answer depends on: the server, the model and the sampling fields."""
        return {"server": self.base_url, "model": self.model, "sampling": self.sampling}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the system's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(model: str | os.PathLike, log: str | os.PathLike, *, device: str = "auto",
                       env: dict | None = None, extra: Sequence[str] = (), ready_timeout_s: float = 120.0
                       ) -> Iterator[str]:
    """`transformers serve MODEL` (transformers[serving]) on 127.0.0.1 at a free port, its output
    in `log`, `env` added to this process's environment; yields the base URL
    (http://127.0.0.1:PORT/v1) once GET /health answers, and stops the server on exit. A server
    that exits or stays unready is a UAEError with the end of its log."""
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        raise UAEError("the `transformers` command is not installed: pip install 'transformers[serving]'")
    port = free_port()
    cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", device, *extra, str(model)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else \
                    f"not ready within {ready_timeout_s:g} s"
                tail = Path(log).read_text(errors="replace")[-2000:]
                raise UAEError(f"transformers serve {model} {why}; the end of {log}:\n{tail}")
            time.sleep(0.25)
        logger.info("transformers serve %s on port %d", model, port)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
