"""The teacher behind an OpenAI-compatible completions server (`vllm serve` or `prefkd serve`): `teacher.url`.

Sequence-level methods need from the teacher only samples and the log-probabilities of given responses, which an
inference server gives through the completions API as vLLM serves it:
- sampling: `prompt` as the teacher's token ids, `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`,
  `stop_token_ids` (the teacher's end tokens), `return_token_ids` (the sample's ids; older vLLM: the ids from
  `logprobs.tokens` with `return_tokens_as_token_ids`). One request per prompt, prompt i seeded with the batch's
  seed + i, so a prompt's sample does not depend on the batch; requests run `concurrency` at a time, and the
  server batches them;
- scoring: `echo: true, max_tokens: 0, logprobs: 1` on prompt + response ids: `logprobs.token_logprobs` holds
  each token's log-prob (the first null); a response's log-prob is the sum over its tokens. Up to `SCORE_BATCH`
  sequences go in one request (`prompt` as a list of lists). The teacher's samples are scored this way too, not
  with the log-probs returned with the sample: those are the raw distribution or the processed one (temperature,
  top-p) depending on the vLLM version and its `--logprobs-mode`, while DPKD needs log p(y) at temperature 1.

The client needs the teacher's tokenizer: `prefkd serve` sends its files (`/v1/prefkd/tokenizer`); against vLLM,
`teacher.tokenizer` names it (default: the served model's name, as a hub id). Connection errors, timeouts and 5xx
replies are retried `retries` times with exponential backoff; a server that stays down ends the run with `teacher
server URL: why` (train.py adds where the last checkpoint is, for `--resume`). A malformed reply is an error at
once, naming what is wrong.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from prefkd.config import opt
from prefkd.errors import ConfigError, PrefkdError
from prefkd.generation import SamplingConfig
from prefkd.models import load_tokenizer
from prefkd.vllm_backend import response_ids

SCORE_BATCH = 16  # sequences per scoring request
BACKOFF = 0.5  # seconds before the first retry; doubled each time, at most MAX_BACKOFF
MAX_BACKOFF = 30.0


@dataclass
class ServerConfig:
    url: str = opt("", "an OpenAI-compatible completions server of the teacher (http://HOST:PORT/v1: `vllm serve` "
                       "or `prefkd serve`), instead of loading teacher.path; sequence-level methods and the sample "
                       "caches only", keyed=False)
    model: str = opt("", "the served model's name on teacher.url; empty = the server's only model")
    tokenizer: str = opt("", "the teacher's tokenizer (hub id or path) when the server does not send it (vLLM); "
                             "empty = prefkd serve's own, else the served model's name as a hub id")
    api_key_env: str = opt("", "name of the environment variable holding the server's API key (sent as a Bearer "
                               "token); empty = none", keyed=False)
    concurrency: int = opt(8, "requests in flight at once to teacher.url", keyed=False)
    retries: int = opt(5, "retries of a request after a connection error, a timeout or a 5xx reply, with "
                          "exponential backoff from 0.5 s", keyed=False)
    timeout: float = opt(300.0, "seconds one request to teacher.url may take", keyed=False)


class TeacherServerError(PrefkdError):
    """The teacher server failed, or replied with something the client cannot read."""


class TeacherServer:
    """A teacher on a server: `sample` (a `cache.Sampler`) and `score`, in the teacher's own tokens.

    It answers what code written for a local teacher reads of one: `config` (its context, as
    `max_position_embeddings`) and `generation_config.eos_token_id` (for `Renderer.stop_ids_for`)."""

    def __init__(self, cfg: ServerConfig, trust_remote_code: bool = False):
        import httpx  # a core dependency; imported here so that runs without teacher.url never pay for it

        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher.url={cfg.url!r} must be an http(s) URL, e.g. http://127.0.0.1:8000/v1")
        if cfg.concurrency < 1 or cfg.retries < 0 or cfg.timeout <= 0:
            raise ConfigError("teacher.concurrency must be >= 1, teacher.retries >= 0 and teacher.timeout > 0")
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"teacher.api_key_env={cfg.api_key_env}, but that environment variable is not "
                                  "set")
            headers["Authorization"] = f"Bearer {key}"
        self._httpx = httpx
        self.client = httpx.Client(timeout=cfg.timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=cfg.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="prefkd-teacher")
        models = self._get("/models")
        self.name, card = self._choose_model(models)
        self.context = card.get("max_model_len") if isinstance(card.get("max_model_len"), int) else None
        # What the cache and run keys know the teacher by: prefkd serve names its weights; vLLM its model's name.
        self.identity = f"server:{card.get('identity') or self.name}"
        self.tokenizer, eos = self._tokenizer(trust_remote_code)
        self.config = SimpleNamespace(max_position_embeddings=self.context)
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    # ---- set-up ------------------------------------------------------------------------------------------------

    def _choose_model(self, reply: object) -> tuple[str, dict]:
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise self._error("malformed reply to GET /models: no list of models with ids under 'data'")
        names = [m["id"] for m in data]
        if self.cfg.model:
            if self.cfg.model not in names:
                raise self._error(f"serves {', '.join(names) or 'no model'}, not teacher.model={self.cfg.model}")
            return self.cfg.model, data[names.index(self.cfg.model)]
        if len(names) != 1:
            raise self._error(f"serves {len(names)} models ({', '.join(names)}); choose one with teacher.model=NAME")
        return names[0], data[0]

    def _tokenizer(self, trust_remote_code: bool):
        """(the teacher's tokenizer, the end ids of its generation config or None)."""
        if self.cfg.tokenizer:
            return load_tokenizer(self.cfg.tokenizer, trust_remote_code), None
        reply = self._get("/prefkd/tokenizer", missing_ok=True)
        if reply is None:  # not prefkd serve: the served name as a hub id (vLLM serves hub ids by their name)
            try:
                return load_tokenizer(self.name, trust_remote_code), None
            except PrefkdError as e:
                raise ConfigError(f"teacher server {self.url} does not send its tokenizer and '{self.name}' is not "
                                  f"one ({e}); set teacher.tokenizer=ID_OR_PATH") from None
        files = reply.get("files") if isinstance(reply, dict) else None
        if not isinstance(files, dict) or not files:
            raise self._error("malformed reply to GET /prefkd/tokenizer: no 'files'")
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                    raise self._error(f"malformed reply to GET /prefkd/tokenizer: bad file name {name!r}")
                try:
                    (Path(tmp) / name).write_bytes(base64.b64decode(data, validate=True))
                except (ValueError, TypeError):
                    raise self._error(f"malformed reply to GET /prefkd/tokenizer: {name} is not base64") from None
            tokenizer = load_tokenizer(tmp, trust_remote_code=False)
        return tokenizer, reply.get("generation_eos_token_id")

    # ---- the two operations ------------------------------------------------------------------------------------

    def sample(self, prompt_ids: list[list[int]], sampling: SamplingConfig, pad_id: int | None,
               eos_id: int | Sequence[int], seed: int | None = None) -> list[list[int]]:
        """One response per prompt, ending with an end token unless cut by length (`cache.Sampler`). Without a
        seed, one is drawn from torch's generator, so a seeded run (and its resume) asks for the same samples."""
        if sampling.no_repeat_ngram_size:
            raise ConfigError("sampling.no_repeat_ngram_size has no equivalent on a completions server; set it to 0")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        stops = [eos_id] if isinstance(eos_id, int) else list(eos_id)
        prompts = self._fit(prompt_ids, sampling.max_new_tokens)
        greedy = sampling.temperature <= 0
        bodies = [{"model": self.name, "prompt": p, "max_tokens": sampling.max_new_tokens, "n": 1,
                   "temperature": 0.0 if greedy else sampling.temperature,
                   "top_p": 1.0 if greedy else sampling.top_p,
                   "top_k": -1 if greedy or sampling.top_k <= 0 else sampling.top_k, "seed": seed + i,
                   "stop_token_ids": stops, "logprobs": 0, "return_token_ids": True,
                   "return_tokens_as_token_ids": True, "skip_special_tokens": True}
                  for i, p in enumerate(prompts)]
        replies = list(self.pool.map(lambda b: self._post("/completions", b), bodies))
        return [response_ids(*self._sampled(r), stops) for r in replies]

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        """log p(response | prompt) of each pair, summed over the response's tokens (0 for an empty response)."""
        todo = [i for i, r in enumerate(responses) if r]
        seqs = [prompts[i] + responses[i] for i in todo]
        chunks = [list(range(s, min(s + SCORE_BATCH, len(seqs)))) for s in range(0, len(seqs), SCORE_BATCH)]

        def one(chunk: list[int]) -> list[list[float | None]]:
            body = {"model": self.name, "prompt": [seqs[k] for k in chunk], "echo": True, "max_tokens": 0,
                    "logprobs": 1, "temperature": 0.0, "return_token_ids": True, "return_tokens_as_token_ids": True}
            return self._echoed(self._post("/completions", body), [seqs[k] for k in chunk])

        out = [0.0] * len(responses)
        for chunk, lps in zip(chunks, self.pool.map(one, chunks), strict=True):
            for k, token_lps in zip(chunk, lps, strict=True):
                i = todo[k]
                tail = token_lps[len(token_lps) - len(responses[i]):]
                if any(x is None for x in tail):
                    raise self._error("malformed reply: a response token has a null log-prob")
                out[i] = float(sum(tail))
        return out

    def pair_logps(self, prompts: list[list[int]], y_t: list[list[int]], y_s: list[list[list[int]]],
                   known_t: list[float | None], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`methods.dpkd.teacher_logps` on the server: (log p(y_t) [B], log p(y_s) [K * B]), y_t scored only where
        `known_t` has no value."""
        b = len(prompts)
        need_t = [i for i, x in enumerate(known_t) if x is None]
        flat = [y for ys in y_s for y in ys]
        scores = self.score([prompts[i] for i in need_t] + prompts * len(y_s), [y_t[i] for i in need_t] + flat)
        p_t = [x for x in known_t]
        for i, s in zip(need_t, scores[: len(need_t)], strict=True):
            p_t[i] = s
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
        return as_tensor(p_t), as_tensor(scores[len(need_t):]).view(len(y_s) * b)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()

    # ---- replies -----------------------------------------------------------------------------------------------

    def _fit(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Prompts cut from the left to fit the server's context with `max_new_tokens`, as local sampling does."""
        if not self.context:
            return prompts
        room = self.context - max_new_tokens
        if room <= 0:
            raise ConfigError(f"sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                              f"teacher's {self.context} positions")
        return [p[-room:] if len(p) > room else p for p in prompts]

    def _choices(self, reply: object, n: int) -> list[dict]:
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, dict) for c in choices):
            got = len(choices) if isinstance(choices, list) else "no"
            raise self._error(f"malformed reply: {got} choices for {n} prompts")
        return sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)

    def _sampled(self, reply: object) -> tuple[list[int], str | None]:
        choice = self._choices(reply, 1)[0]
        ids = choice.get("token_ids")
        if ids is None:  # vLLM before return_token_ids: the ids from the tokens "token_id:N"
            tokens = (choice.get("logprobs") or {}).get("tokens") if isinstance(choice.get("logprobs"), dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, str) and t.startswith("token_id:")
                                                       for t in tokens):
                raise self._error("malformed reply: a sample without token_ids (nor logprobs tokens as token ids); "
                                  "is it an OpenAI-compatible server that takes token ids, such as vLLM?")
            try:
                ids = [int(t.split(":", 1)[1]) for t in tokens]
            except ValueError:
                raise self._error("malformed reply: a token that is not 'token_id:N'") from None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise self._error("malformed reply: token_ids is not a list of ids")
        if any(t < 0 for t in ids):
            raise self._error("malformed reply: a negative token id")
        finish = choice.get("finish_reason")
        return ids, finish if isinstance(finish, str) else None

    def _echoed(self, reply: object, seqs: list[list[int]]) -> list[list[float | None]]:
        out = []
        for k, (choice, seq) in enumerate(zip(self._choices(reply, len(seqs)), seqs, strict=True)):
            logprobs = choice.get("logprobs")
            lps = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
            if not isinstance(lps, list) or not all(x is None or (isinstance(x, (int, float))
                                                                  and not isinstance(x, bool)) for x in lps):
                raise self._error(f"malformed reply: choice {k} has no list of logprobs.token_logprobs")
            if len(lps) != len(seq):
                raise self._error(f"malformed reply: choice {k} scores {len(lps)} tokens of the {len(seq)} sent")
            echoed = choice.get("prompt_token_ids")
            if echoed is not None and echoed != seq:
                raise self._error(f"choice {k} scored other tokens than those sent (does the server add a BOS to "
                                  "token-id prompts?)")
            out.append(lps)
        return out

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def _error(self, why: str) -> TeacherServerError:
        return TeacherServerError(f"teacher server {self.url}: {why}")

    def _get(self, path: str, missing_ok: bool = False) -> object:
        return self._request("GET", path, None, missing_ok)

    def _post(self, path: str, body: dict) -> object:
        return self._request("POST", path, body, False)

    def _request(self, method: str, path: str, body: dict | None, missing_ok: bool) -> object:
        httpx = self._httpx
        why = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(BACKOFF * 2 ** (attempt - 1), MAX_BACKOFF))
            try:
                reply = self.client.request(method, self.url + path, json=body)
            except httpx.TimeoutException:
                why = f"no reply within teacher.timeout={self.cfg.timeout:g} s"
                continue
            except httpx.TransportError as e:
                why = _transport_why(e)
                continue
            if reply.status_code >= 500:
                why = f"HTTP {reply.status_code}: {_message(reply)}"
                continue
            if reply.status_code == 404 and missing_ok:
                return None
            if reply.status_code >= 400:
                raise self._error(f"{method} {path}: HTTP {reply.status_code}: {_message(reply)}")
            try:
                return reply.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise self._error(f"{method} {path}: the reply is not JSON (it begins {reply.text[:60]!r}); is the "
                                  "URL an OpenAI-compatible server's /v1?") from None
        tries = self.cfg.retries + 1
        raise self._error(f"{why} ({tries} {'try' if tries == 1 else 'tries'}; teacher.retries="
                          f"{self.cfg.retries})")


def _transport_why(e: Exception) -> str:
    name = type(e).__name__
    if name == "ConnectError":
        return "cannot connect (is the server running, and is the URL right?)"
    if name in ("RemoteProtocolError", "ReadError"):
        return f"the connection broke off mid-reply ({str(e) or name})"
    return f"{name}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _message(reply) -> str:
    """The server's error message (OpenAI shape, or vLLM's older {"message"}), else the start of the body."""
    try:
        data = reply.json()
    except ValueError:
        return reply.text[:200].strip() or reply.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(data.get("message"), str):
            return data["message"]
    return json.dumps(data)[:200]


def connect(cfg: ServerConfig, trust_remote_code: bool = False) -> TeacherServer:
    return TeacherServer(cfg, trust_remote_code)
