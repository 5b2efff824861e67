"""prefkd.serve: a real `prefkd serve` process on 127.0.0.1 answers vLLM's completions subset: scoring equals
`text_logprobs` of the local model, samples end at a stop token or max_tokens and do not depend on the batch,
unsupported requests get the OpenAI error shape, and nothing listens beyond loopback."""

import concurrent.futures

import httpx
import pytest
from support import start_server, stop_server, tiny_models

from prefkd.data.chat import Renderer
from prefkd.generation import SamplingConfig
from prefkd.logprobs import text_ids, text_logprobs
from prefkd.models import load_model
from prefkd.teacher_client import ServerConfig, TeacherServer

pytestmark = pytest.mark.slow  # one `prefkd serve` subprocess for the module (20 s to start on a busy 2-core machine)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("serve")
    files = tiny_models(root, tokenizer)
    proc, url = start_server(files["teacher"], root / "server.log")
    yield files, url, proc
    stop_server(proc)


def post(url, body):
    return httpx.post(f"{url}/completions", json=body, timeout=60)


def test_models_lists_the_one_served_model(served):
    files, url, _ = served
    data = httpx.get(f"{url}/models", timeout=10).json()["data"]
    assert [m["id"] for m in data] == [str(files["teacher"])]
    assert data[0]["max_model_len"] == 512 and data[0]["identity"].startswith(str(files["teacher"]) + "@")


def test_echo_scoring_equals_text_logprobs_of_the_local_model(served, tokenizer):
    files, url, _ = served
    model = load_model(str(files["teacher"]))
    renderer = Renderer(tokenizer)
    prompts = ["Tell me about the river.", "Who is Ada?", "x"]
    responses = ["It flows north.", " a leading space", ""]
    want = text_logprobs(model, tokenizer, prompts, responses)
    seqs, lengths = [], []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = renderer.with_bos(tokenizer(p, add_special_tokens=False)["input_ids"])
        r_ids = text_ids(tokenizer, r) + renderer.end_ids
        seqs.append(p_ids + r_ids)
        lengths.append(len(r_ids))
    reply = post(url, {"prompt": seqs, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0})
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for c, seq, n, w in zip(choices, seqs, lengths, want.tolist(), strict=True):
        lps = c["logprobs"]["token_logprobs"]
        assert len(lps) == len(seq) and lps[0] is None and all(isinstance(x, float) for x in lps[1:])
        assert sum(lps[-n:]) == pytest.approx(w, abs=1e-4)
        top = c["logprobs"]["top_logprobs"]
        assert top[0] is None and all(len(t) in (1, 2) for t in top[1:])  # the actual token and the top-1
    # the client's score() is the same numbers
    client = TeacherServer(ServerConfig(url=url))
    got = client.score([s[: len(s) - n] for s, n in zip(seqs, lengths, strict=True)],
                       [s[len(s) - n:] for s, n in zip(seqs, lengths, strict=True)])
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    client.close()


def test_samples_end_at_a_stop_token_or_max_tokens_and_do_not_depend_on_the_batch(served, tokenizer):
    _, url, _ = served
    renderer = Renderer(tokenizer)
    a = renderer.with_bos(tokenizer("Tell me about the river.", add_special_tokens=False)["input_ids"])
    b = renderer.with_bos(tokenizer("Who is Ada?", add_special_tokens=False)["input_ids"])
    body = {"max_tokens": 12, "temperature": 1.0, "seed": 7, "return_token_ids": True, "logprobs": 0}
    alone = post(url, {**body, "prompt": a}).json()["choices"]
    batch = post(url, {**body, "prompt": [b, a]}).json()["choices"]
    assert alone[0]["token_ids"] == batch[1]["token_ids"]  # a's sample is a's, whatever else is in the batch
    stops = set(renderer.stop_ids)
    for c in alone + batch:
        ids = c["token_ids"]
        if c["finish_reason"] == "stop":
            assert ids[-1] in stops and not stops & set(ids[:-1])
        else:
            assert c["finish_reason"] == "length" and len(ids) == 12 and not stops & set(ids)
        assert len(c["logprobs"]["token_logprobs"]) == len(ids)  # logprobs=0: the sampled tokens' own
    # stop_token_ids ends a sample at any listed token, kept as vLLM keeps it
    greedy = post(url, {"prompt": a, "max_tokens": 12, "temperature": 0, "return_token_ids": True}).json()
    first = greedy["choices"][0]["token_ids"][0]
    stopped = post(url, {"prompt": a, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
                         "stop_token_ids": [first]}).json()["choices"][0]
    assert stopped["token_ids"] == [first] and stopped["finish_reason"] == "stop"
    assert stopped["stop_reason"] in (first, None)
    # n choices per prompt, prompt-major as vLLM orders them
    many = post(url, {"prompt": [a, b], "n": 2, "max_tokens": 4, "seed": 3, "return_token_ids": True}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert [c["prompt_token_ids"] for c in many["choices"]] == [a, a, b, b]


def test_the_client_sampler_keeps_the_cache_contract(served, tokenizer):
    _, url, _ = served
    client = TeacherServer(ServerConfig(url=url, concurrency=3))
    renderer = Renderer(tokenizer)
    prompts = renderer.encode(["one", "two two", "three three three", "four"])
    cfg = SamplingConfig(max_new_tokens=6)
    first = client.sample(prompts, cfg, tokenizer.pad_token_id, renderer.stop_ids, seed=11)
    assert first == client.sample(prompts, cfg, tokenizer.pad_token_id, renderer.stop_ids, seed=11)
    # prompt i is seeded with seed + i: the tail of a batch is what a batch starting there draws
    assert first[2:] == client.sample(prompts[2:], cfg, tokenizer.pad_token_id, renderer.stop_ids, seed=13)
    for ids in first:
        assert len(ids) == 6 or ids[-1] in renderer.stop_ids
    client.close()


def test_the_tokenizer_travels_with_the_server(served, tokenizer):
    _, url, _ = served
    client = TeacherServer(ServerConfig(url=url))
    assert client.tokenizer.get_vocab() == tokenizer.get_vocab()
    text = "the river flows <|endoftext|> north"
    assert client.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert client.identity.startswith("server:") and client.context == 512
    client.close()


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": [1, 2], "stream": True}, 400, "'stream' is not supported"),
    ({"prompt": [1, 2], "stop": ["\n"]}, 400, "stop_token_ids"),
    ({"prompt": [1, 2], "echo": True, "max_tokens": 3}, 400, "echo with max_tokens > 0"),
    ({"prompt": [1, 2], "logprobs": 100}, 400, "max_logprobs=20"),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": [[]]}, 400, "non-empty list"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "needs echo=true"),
])
def test_unsupported_requests_get_the_openai_error_shape(served, body, status, needle):
    _, url, _ = served
    reply = post(url, body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert needle in error["message"] and error["code"] == status and isinstance(error["type"], str)


def test_a_body_that_is_not_json_is_a_400(served):
    _, url, _ = served
    reply = httpx.post(f"{url}/completions", content=b"{not json", timeout=10)
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]["message"]


def test_it_listens_on_loopback_only(served):
    """The kernel's table of listening TCP sockets holds the server's port on 127.0.0.1 and nowhere else."""
    _, url, _ = served
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                listening.append(addr)
    if not listening:
        pytest.skip("no /proc/net/tcp on this system")
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex


def test_concurrent_requests_are_answered_together(served, tokenizer):
    """Requests sent at once are gathered into batches; each gets its own answer."""
    _, url, _ = served
    renderer = Renderer(tokenizer)
    prompts = renderer.encode([f"item {i}" for i in range(6)])
    body = {"max_tokens": 3, "temperature": 0, "return_token_ids": True}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda p: post(url, {**body, "prompt": p}).json(), prompts))
    one = post(url, {**body, "prompt": prompts}).json()["choices"]
    assert [r["choices"][0]["token_ids"] for r in replies] == [c["token_ids"] for c in one]
    assert [r["choices"][0]["prompt_token_ids"] for r in replies] == prompts
