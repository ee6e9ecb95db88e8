"""Backend for OpenAI-compatible inference servers (vLLM, SGLang, TGI, TensorRT-LLM, llama.cpp, ``transformers serve``).

Generation: one request per prompt, to ``/completions`` (``api="completions"``, the default: the prompt text
exactly as the HF backend sees it) or ``/chat/completions`` (``api="chat"``: the prompt as one user message;
the server applies the model's chat template). ``temperature`` 0 is greedy; row i of a call is sent with
``seed = seed * 1_000_003 + i`` (the HF backend's per-row seed), so sampled rows are reproducible on servers
that honour ``seed``. Stop strings go to the server and are applied again here, so texts are cut as the HF
backend cuts them.

Log-likelihood: the legacy completions echo, as lm-eval's ``local-completions`` model asks for it: ``prompt =
context + continuation``, ``echo=true``, ``logprobs=1``, ``max_tokens=1``; the server answers the
log-probability of every prompt token (``choices[0].logprobs.token_logprobs``) and the continuation's are summed.
Which prompt tokens are the continuation's:

* with a local ``tokenizer`` (the served model's): the last ``len(continuation ids)`` prompt tokens, split as
  lm-eval and the HF backend split them (`encode_pair`); the server's prompt-token count
  (``usage.prompt_tokens``) must equal the local one, else the server tokenizes differently and it is an error;
* without: the tokens whose ``text_offset`` lies at or after the end of the context (exact whenever the
  context/continuation boundary is a token boundary, as it is for " A" / " yes" after ``Answer:``).

A server that does not echo prompt log-probabilities (``transformers serve`` ignores ``echo``/``logprobs``)
raises `ServerCapabilityError` on the first log-likelihood request, naming the request fields, what came back,
and the strategies that only generate (they work with such a server).

Requests run on ``concurrency`` threads; connection errors, timeouts and HTTP 408/409/429/5xx are retried
``retries`` times with exponential backoff (``backoff * 2**attempt`` seconds, jittered, capped at 30 s, at
least the server's ``Retry-After``); each attempt is limited to ``timeout`` seconds. Other HTTP errors (400:
a bad request) fail at once with the server's message.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from clinmega.evaluation.backends.base import cut_at_stop, encode_pair, move_trailing_space

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_DELAY = 30.0
APIS = ("completions", "chat")
ECHO_FIELDS = {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}


class ServerError(RuntimeError):
    """The server could not be reached or kept failing (after the retries), or rejected a request."""

    exit_code = 1


class ServerCapabilityError(ValueError):
    """The server cannot return what a strategy needs (a user error: pick another server or strategy)."""


def generation_strategies() -> list[str]:
    from clinmega.evaluation.strategies import PRESETS

    return [name for name, s in PRESETS.items() if s.scoring == "generate"]


def api_base(endpoint: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is used as given."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"served.endpoint {endpoint!r}: expected an http(s) URL such as http://localhost:8000/v1")
    return endpoint.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")


class OpenAIBackend:
    """The `Backend` protocol over HTTP (see the module docstring)."""

    def __init__(self, endpoint: str, model: str, tokenizer: Any = None, api: str = "completions",
                 concurrency: int = 8, timeout: float = 300.0, retries: int = 5, backoff: float = 1.0,
                 api_key: str | None = None):
        import httpx

        if api not in APIS:
            raise ValueError(f"served.api {api!r} is not one of {APIS}")
        if not model:
            raise ValueError("served.model (--model) is required with --backend openai: the name the server serves")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("served.concurrency >= 1, served.retries >= 0, served.timeout > 0, served.backoff >= 0 required")
        self.base, self.model, self.tokenizer, self.api = api_base(endpoint), model, tokenizer, api
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base, timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self.progress: Callable[[str, int, int], None] | None = None  # (what, done, total) after each request
        self._echo_checked = False

    @classmethod
    def from_keys(cls, keys: Any, tokenizer_dir: str | None = None) -> "OpenAIBackend":
        """From the ``served.*`` keys (`clinmega.evaluation.cli.ServedKeys`) and an optional tokenizer folder."""
        tokenizer = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        return cls(keys.endpoint, keys.model, tokenizer=tokenizer, api=keys.api, concurrency=keys.concurrency,
                   timeout=keys.timeout, retries=keys.retries, backoff=keys.backoff,
                   api_key=os.environ.get(keys.api_key_env) if keys.api_key_env else None)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------------------------ requests
    def post(self, route: str, body: dict) -> dict:
        """POST ``body`` to ``route`` with the retry policy; the decoded JSON answer."""
        import httpx

        url = f"{self.base}/{route}"
        for attempt in range(self.retries + 1):
            wait = 0.0
            try:
                response = self.client.post(route, json=body)
            except httpx.TransportError as err:  # refused/reset connections, timeouts
                failure = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise ServerError(f"POST {url}: the answer is not JSON: {response.text[:200]!r}") from None
                failure = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise ServerError(f"POST {url} (fields {sorted(body)}) was refused: {failure}")
                wait = _retry_after(response.headers.get("retry-after"))
            if attempt == self.retries:
                raise ServerError(f"POST {url} failed {attempt + 1} times; last: {failure}")
            delay = min(MAX_DELAY, self.backoff * 2 ** attempt) * (1 + 0.25 * random.random())
            time.sleep(max(delay, min(wait, 2 * MAX_DELAY)))
        raise AssertionError("unreachable")

    def _map(self, what: str, fn: Callable[[int], Any], n: int) -> list:
        """``[fn(0), ..., fn(n-1)]`` on the thread pool, progress reported as requests finish."""
        results: list = [None] * n
        if n == 0:
            return results
        with ThreadPoolExecutor(max_workers=min(self.concurrency, n)) as pool:
            futures = {pool.submit(fn, i): i for i in range(n)}
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                if self.progress is not None:
                    self.progress(what, done, n)
        return results

    # ----------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = ()) -> list[str]:
        if max_new_tokens <= 0:
            return [""] * len(prompts)

        def one(i: int) -> str:
            body: dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature,
                                    "seed": seed * 1_000_003 + i}
            if temperature > 0 and top_p < 1.0:
                body["top_p"] = top_p
            if stop:
                body["stop"] = list(stop)
            if self.api == "chat":
                answer = self.post("chat/completions", {**body, "messages": [{"role": "user", "content": prompts[i]}]})
                text = _field(answer, ("choices", 0, "message", "content"), "chat/completions")
            else:
                answer = self.post("completions", {**body, "prompt": prompts[i]})
                text = _field(answer, ("choices", 0, "text"), "completions")
            return cut_at_stop(text or "", stop)

        return self._map("generations", one, len(prompts))

    # ------------------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        unique = list(dict.fromkeys(requests))  # choice-shuffle variants repeat requests
        if not unique:
            return []
        first = self._loglikelihood_one(unique[0])  # checks the server echoes before the pool starts
        rest = self._map("log-likelihood requests", lambda i: self._loglikelihood_one(unique[i + 1]), len(unique) - 1)
        values = dict(zip(unique, [first, *rest]))
        return [values[r] for r in requests]

    def check_loglikelihood(self) -> None:
        """Raise `ServerCapabilityError` now if the server does not echo prompt log-probabilities."""
        self._loglikelihood_one(("Question: Is this a test?\nAnswer:", " yes"))

    def _loglikelihood_one(self, request: tuple[str, str]) -> float:
        context, continuation = move_trailing_space(*request)
        body = {"model": self.model, "prompt": context + continuation, **ECHO_FIELDS}
        answer = self.post("completions", body)
        logprobs = (answer.get("choices") or [{}])[0].get("logprobs") if isinstance(answer, dict) else None
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(values, list) or not values:
            raise ServerCapabilityError(
                f"{self.base}/completions with model={self.model!r} answered a log-likelihood request "
                f"(fields echo=true, logprobs=1, max_tokens=1) without prompt log-probabilities: "
                f"choices[0].logprobs is {logprobs!r}, so this server does not support echo=true with logprobs. "
                f"Log-likelihood strategies (zero_shot, few_shot, option_text, choice_shuffle, ...) need a server "
                f"that does (vLLM, SGLang, llama-cpp-python); the generation strategies work with this one: "
                f"{', '.join(generation_strategies())}")
        n_generated = int((answer.get("usage") or {}).get("completion_tokens", 1))
        n_prompt = len(values) - n_generated
        if self.tokenizer is not None:
            ctx_ids, cont_ids = encode_pair(self.tokenizer.encode, *request)
            server_count = (answer.get("usage") or {}).get("prompt_tokens")
            if server_count is not None and server_count != len(ctx_ids) + len(cont_ids):
                raise ServerCapabilityError(
                    f"{self.base} tokenizes {context + continuation!r} into {server_count} tokens, the local "
                    f"tokenizer into {len(ctx_ids) + len(cont_ids)}: --tokenizer must be the served model's "
                    f"(or leave it out to split the prompt at the context's end by text_offset)")
            picked = values[n_prompt - len(cont_ids):n_prompt]
        else:
            offsets = logprobs.get("text_offset")
            if not isinstance(offsets, list) or len(offsets) != len(values):
                raise ServerCapabilityError(
                    f"{self.base}/completions echoed token_logprobs without a matching text_offset list; give "
                    f"--tokenizer (the served model's) so the continuation tokens are counted locally")
            picked = [v for v, o in zip(values[:n_prompt], offsets[:n_prompt]) if o >= len(context)]
        if not picked or any(v is None for v in picked):
            raise ServerError(f"{self.base}/completions: no log-probability for the continuation {continuation!r} "
                              f"of the echoed prompt (token_logprobs {values[:n_prompt]!r})")
        return float(sum(picked))


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return 0.0


def _field(answer: Any, path: tuple, route: str) -> Any:
    node = answer
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{route}: the answer has no {'.'.join(map(str, path))}: {str(answer)[:300]}") from None
    return node
