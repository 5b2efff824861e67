"""`prefkd serve`: a teacher behind the OpenAI completions API as vLLM serves it, backed by transformers and prefkd's
batched sampler, for CPUs, tests and users without vLLM.

The protocol subset is what prefkd's client (`teacher_client.py`) uses, with vLLM's field names:
- `GET /v1/models`: the one served model (`id`, `max_model_len`; `identity`, prefkd's, names the weights);
- `POST /v1/completions` with `prompt` as token ids (a list, or a list of lists) or text, `max_tokens`,
  `temperature`, `top_p`, `top_k` and `stop_token_ids` (vLLM's extensions), `seed`, `n`, `logprobs`, `echo`,
  `return_token_ids` and `return_tokens_as_token_ids` (vLLM's); sampling stops at the model's end tokens and at
  `stop_token_ids`. Scoring a given text is `echo: true, max_tokens: 0, logprobs: k`: the log-prob of each prompt
  token under the model, the first one null;
- `GET /v1/prefkd/tokenizer`: the tokenizer's files, so that a client needs nothing beyond the URL.

Concurrent requests are gathered for `batch_wait_ms` into one batch (per sampling setting). A request's `seed`
seeds each of its prompts' samples, its `n` choices taking seed, seed + 1, ...; each sample has its own random
stream, so it does not depend on what else is in the batch (samples differ from vLLM's for the same seed). Log-probs
are the model's own distribution (temperature 1, no top-k/p), as vLLM's default `raw_logprobs`. Anything else
(streaming, stop strings, penalties, beam search, echo with generation) is refused with the OpenAI error shape,
HTTP 400. The server listens on 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import queue
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefkd.cache import model_identity
from prefkd.config import opt
from prefkd.console import console
from prefkd.data.chat import Renderer
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError, PrefkdError
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.models import load_model, load_tokenizer, resolve_device

INSTALL = "pip install 'prefkd[serve]'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeRun:
    model: str = opt("", "model path or hub id of the served causal LM")
    host: str = opt("127.0.0.1", "interface to listen on; 127.0.0.1 (loopback) unless the teacher must be reached "
                                 "from other machines (then set api_key_env)")
    port: int = opt(8000, "port to listen on")
    served_model_name: str = opt("", "the model's name in /v1/models and requests; empty = model as given")
    api_key_env: str = opt("", "name of an environment variable holding a key that requests must send as "
                               "'Authorization: Bearer KEY'; empty = no key")
    dtype: str = opt("float32", "dtype of the weights: float32, bfloat16, float16 or auto")
    device: str = opt("auto", "auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = opt(False, "allow a hub model's own code to run")
    max_batch: int = opt(32, "sequences sampled or scored in one batch")
    batch_wait_ms: float = opt(5.0, "how long the queue gathers concurrent requests into one batch")
    max_logprobs: int = opt(20, "largest `logprobs` a request may ask for (vLLM's --max-logprobs)")


class RequestError(Exception):
    """A request the server refuses: the OpenAI error shape with this status."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


def error_body(message: str, kind: str, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


# ---- the engine: one thread owns the model, batches what the queue gathered --------------------------------------

@dataclass
class _Work:
    kind: str  # "sample" or "score"
    ids: list[int]  # the prompt (sample) or the whole sequence (score)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    sampling: SamplingConfig | None = None
    stops: tuple[int, ...] = ()
    seed: int = 0
    top: int = 0  # alternatives per position in top_logprobs


class Engine:
    """The model and its tokenizer, served by one worker thread: requests' work items wait in a queue, which is
    drained for `wait` seconds into batches of up to `max_batch`."""

    def __init__(self, cfg: ServeRun):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        self.model = load_model(cfg.model, cfg.trust_remote_code, cfg.dtype).to(resolve_device(cfg.device)).eval()
        self.device = next(self.model.parameters()).device
        self.stops = Renderer(self.tokenizer).stop_ids_for(self.model)
        config = self.model.config
        self.context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.identity = model_identity(cfg.model)
        self.queue: queue.Queue[_Work | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="prefkd-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, items: list[_Work]) -> None:
        for item in items:
            self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            items = [first]
            deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
            while len(items) < self.cfg.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # stop after this batch
                    break
                items.append(item)
            try:
                self._run(items)
            except Exception as e:  # noqa: BLE001 - whatever broke, the requests get an answer
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(e)

    def _run(self, items: list[_Work]) -> None:
        groups: dict[tuple, list[_Work]] = {}
        for item in items:
            key = ("score",) if item.kind == "score" else ("sample", tuple(vars(item.sampling).items()), item.stops)
            groups.setdefault(key, []).append(item)
        for key, group in groups.items():
            if key[0] == "score":
                for item, result in zip(group, self.score([i.ids for i in group], max(i.top for i in group)),
                                        strict=True):
                    item.future.set_result(result)
                continue
            gens = [torch.Generator().manual_seed(i.seed) for i in group]
            samples = sample_responses(self.model, [i.ids for i in group], group[0].sampling,
                                       self.tokenizer.pad_token_id, group[0].stops, generators=gens)
            for item, sample in zip(group, samples, strict=True):
                item.future.set_result(sample)

    @torch.no_grad()
    def score(self, seqs: list[list[int]], top: int) -> list[tuple[list[float | None], list[dict[int, float] | None]]]:
        """Per sequence: the log-prob of each token given the ones before it (None for the first), and the `top`
        likeliest tokens at each position with the actual one, as {id: log-prob}. One padded forward per batch, as
        `logprobs.text_logprobs` computes (float32 log-softmax)."""
        out = []
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(seqs), self.cfg.max_batch):
            chunk = seqs[start: start + self.cfg.max_batch]
            batch = collate([Example(s[:1], s[1:]) for s in chunk], pad)
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device)).logits
            for row, s in enumerate(chunk):
                lp = torch.log_softmax(logits[row, : len(s) - 1].float(), dim=-1)
                target = torch.tensor(s[1:], device=lp.device)
                chosen = lp.gather(-1, target[:, None]).squeeze(-1).tolist() if len(s) > 1 else []
                tops: list[dict[int, float] | None] = [None]
                if top:
                    values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
                    for t, c in enumerate(chosen):
                        tops.append({s[t + 1]: c, **dict(zip(ids[t].tolist(), values[t].tolist(), strict=True))})
                else:
                    tops += [{s[t + 1]: c} for t, c in enumerate(chosen)]
                out.append(([None, *chosen], tops))
        return out


# ---- requests ------------------------------------------------------------------------------------------------

_DEFAULTS_REFUSED = {  # field: the value that means "off"; anything else is refused
    "stream": False, "use_beam_search": False, "suffix": None, "logit_bias": None, "prompt_logprobs": None,
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0,
    "ignore_eos": False, "best_of": None, "prompt_embeds": None, "allowed_token_ids": None, "logprob_token_ids": None,
    "response_format": None, "structured_outputs": None,
}


def _int(body: dict, key: str, default, low: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise RequestError(f"'{key}' must be an integer{f' >= {low}' if low is not None else ''}, not {value!r}")
    return value


def _float(body: dict, key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{key}' must be a number, not {value!r}")
    return float(value)


class Server:
    """The HTTP side: request checks, work items for the engine, vLLM's response shape."""

    def __init__(self, cfg: ServeRun, engine: Engine):
        self.cfg, self.engine = cfg, engine
        self.name = cfg.served_model_name or cfg.model
        self.key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not self.key:
            raise ConfigError(f"api_key_env={cfg.api_key_env}, but that environment variable is not set")
        self.created = int(time.time())
        self._tokenizer_files = self._read_tokenizer_files()

    def _read_tokenizer_files(self) -> dict[str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.tokenizer.save_pretrained(tmp)
            return {p.name: base64.b64encode(p.read_bytes()).decode("ascii") for p in sorted(Path(tmp).iterdir())
                    if p.is_file()}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "prefkd", "root": self.cfg.model, "parent": None,
                                            "max_model_len": self.engine.context, "identity": self.engine.identity}]}

    def tokenizer(self) -> dict:
        eos = getattr(self.engine.model.generation_config, "eos_token_id", None)
        return {"files": self._tokenizer_files, "generation_eos_token_id": eos,
                "stop_token_ids": list(self.engine.stops)}

    def authorized(self, header: str | None) -> bool:
        return self.key is None or header == f"Bearer {self.key}"

    async def completions(self, body: object) -> dict:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, self.name):
            raise RequestError(f"The model `{model}` does not exist.", 404, "NotFoundError")
        for key, off in _DEFAULTS_REFUSED.items():
            if body.get(key, off) not in (off, None):
                raise RequestError(f"'{key}' is not supported by prefkd serve (leave it out); its subset: prompt as "
                                   "token ids or text, max_tokens, temperature, top_p, top_k, seed, n, logprobs, "
                                   "echo, stop_token_ids")
        if body.get("stop"):
            raise RequestError("'stop' strings are not supported by prefkd serve; use stop_token_ids")
        prompts = self._prompts(body)
        n = _int(body, "n", 1, low=1)
        max_tokens = _int(body, "max_tokens", 16, low=0)
        echo = bool(body.get("echo", False))
        top = _int(body, "logprobs", None, low=0)
        if top is not None and top > self.cfg.max_logprobs:
            raise RequestError(f"'logprobs' is {top}, more than this server's max_logprobs={self.cfg.max_logprobs}")
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        return_ids = bool(body.get("return_token_ids"))
        context = self.engine.context
        if echo:
            if max_tokens != 0:
                raise RequestError("echo with max_tokens > 0 is not supported by prefkd serve; score a text with "
                                   "echo=true, max_tokens=0, logprobs=k")
            if n != 1:
                raise RequestError("echo with n > 1 is not supported by prefkd serve")
            for p in prompts:
                if context and len(p) > context:
                    raise RequestError(f"a prompt of {len(p)} tokens is longer than the model's {context} positions")
            items = [_Work("score", p, top=top or 0) for p in prompts]
        else:
            if max_tokens == 0:
                raise RequestError("max_tokens=0 needs echo=true (scoring)")
            temperature = _float(body, "temperature", 1.0)
            top_p = _float(body, "top_p", 1.0)
            top_k = _int(body, "top_k", 0)
            if temperature < 0 or not 0 < top_p <= 1 or top_k < -1:
                raise RequestError("temperature must be >= 0, top_p in (0, 1], top_k >= -1")
            stops = body.get("stop_token_ids") or []
            if not isinstance(stops, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stops):
                raise RequestError("'stop_token_ids' must be a list of token ids")
            seed = _int(body, "seed", None)
            seed = random.getrandbits(62) if seed is None else seed
            items = []
            for p in prompts:
                room = max_tokens
                if context:
                    if len(p) >= context:
                        raise RequestError(f"a prompt of {len(p)} tokens leaves no room in the model's {context} "
                                           "positions")
                    room = min(max_tokens, context - len(p))
                sampling = SamplingConfig(temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                                          max_new_tokens=room, batch_size=self.cfg.max_batch)
                stop_ids = tuple(dict.fromkeys([*self.engine.stops, *stops]))
                items += [_Work("sample", p, sampling=sampling, stops=stop_ids, seed=seed + j) for j in range(n)]
        self.engine.submit(items)
        results = await asyncio.gather(*(asyncio.wrap_future(i.future) for i in items))
        if not echo and top is not None:  # the sampled tokens' log-probs: score prompt + sample
            scored = [_Work("score", i.ids + r, top=top) for i, r in zip(items, results, strict=True)]
            self.engine.submit(scored)
            scores = await asyncio.gather(*(asyncio.wrap_future(i.future) for i in scored))
        choices = []
        for k, (item, result) in enumerate(zip(items, results, strict=True)):
            if echo:
                lps, tops = result
                ids, choice = item.ids, {"finish_reason": "length", "stop_reason": None}
                text = "" if return_ids else self._decode(ids, body)
                logprobs = self._logprobs(ids, lps, tops, as_ids) if top is not None else None
            else:
                ids = result
                ended = bool(ids) and ids[-1] in item.stops
                choice = {"finish_reason": "stop" if ended else "length",
                          "stop_reason": ids[-1] if ended and ids[-1] not in self.engine.stops else None}
                text = self._decode(ids, body)
                logprobs = None
                if top is not None:
                    lps, tops = scores[k]
                    cut = len(item.ids)
                    logprobs = self._logprobs(ids, lps[cut:], tops[cut:], as_ids)
            choices.append({"index": k, "text": text, "logprobs": logprobs, **choice,
                            "prompt_token_ids": item.ids if return_ids else None,
                            "token_ids": (ids if not echo else []) if return_ids else None})
        n_prompt = sum(len(p) for p in prompts)
        n_out = 0 if echo else sum(len(r) for r in results)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

    def _prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        vocab = len(self.engine.tokenizer)
        special = body.get("add_special_tokens", True)

        def ids_of(p) -> list[int]:
            if isinstance(p, str):
                if not p:
                    raise RequestError("an empty prompt")
                return self.engine.tokenizer(p, add_special_tokens=bool(special))["input_ids"]
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                raise RequestError(f"a prompt of token ids must be a non-empty list of ids in [0, {vocab})")
            return list(p)

        if isinstance(prompt, str):
            return [ids_of(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [ids_of(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, (list, str)) for p in prompt):
            return [ids_of(p) for p in prompt]
        raise RequestError("'prompt' must be text, a list of token ids, or a list of either")

    def _decode(self, ids: list[int], body: dict) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=bool(body.get("skip_special_tokens", True)))

    def _logprobs(self, ids: list[int], lps: list[float | None], tops: list[dict | None], as_ids: bool) -> dict:
        name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: self.engine.tokenizer.decode([t]))
        tokens = [name(t) for t in ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"text_offset": offsets, "token_logprobs": [None if x is None else max(x, -9999.0) for x in lps],
                "tokens": tokens,
                "top_logprobs": [None if d is None else {name(t): max(v, -9999.0) for t, v in d.items()}
                                 for d in tops]}


def build_app(server: Server):
    """The ASGI app (Starlette: routes and JSON are all this needs)."""
    try:
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.base import BaseHTTPMiddleware
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError:
        raise PrefkdError(f"prefkd serve needs Starlette and uvicorn: {INSTALL}") from None

    def fail(message: str, status: int, kind: str) -> JSONResponse:
        return JSONResponse(error_body(message, kind, status), status_code=status)

    async def auth(request, call_next):
        if request.url.path.startswith("/v1") and not server.authorized(request.headers.get("authorization")):
            return fail("Unauthorized: send 'Authorization: Bearer KEY'", 401, "AuthenticationError")
        return await call_next(request)

    async def health(request):
        return JSONResponse({})

    async def models(request):
        return JSONResponse(server.models())

    async def tokenizer(request):
        return JSONResponse(server.tokenizer())

    async def completions(request):
        try:
            body = await request.json()
        except ValueError:
            return fail("the request body is not JSON", 400, "BadRequestError")
        try:
            return JSONResponse(await server.completions(body))
        except RequestError as e:
            return fail(str(e), e.status, e.kind)
        except Exception as e:  # noqa: BLE001 - the engine failed: a 500 in the OpenAI shape, the server stays up
            return fail(f"{type(e).__name__}: {e}", 500, "InternalServerError")

    async def not_found(request, exc):
        return fail(f"no route {request.method} {request.url.path}", getattr(exc, "status_code", 404),
                    "NotFoundError")

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/prefkd/tokenizer", tokenizer),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=auth)],
                     exception_handlers={404: not_found, 405: not_found})


def run_serve(cfg: ServeRun) -> None:
    if not cfg.model:
        raise ConfigError("set --model PATH (model=...): the model to serve")
    try:
        import uvicorn
    except ImportError:
        raise PrefkdError(f"prefkd serve needs Starlette and uvicorn: {INSTALL}") from None
    engine = Engine(cfg)
    server = Server(cfg, engine)
    app = build_app(server)
    if cfg.host not in LOOPBACK:
        console.print(f"prefkd serve: listening on {cfg.host}, beyond this machine"
                      + ("" if server.key else "; anyone who reaches it may use it (set api_key_env)"))
    console.print(f"prefkd serve: {server.name} on http://{_url_host(cfg.host)}:{cfg.port}/v1")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    finally:
        engine.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
