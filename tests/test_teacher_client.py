"""prefkd.teacher_client: distilling from a teacher behind a completions server. A dpkd run against `prefkd serve`
computes the teacher log-probs a run with the teacher loaded computes, of the same texts; a server that dies mid-run
ends it with one line and the checkpoint kept, and `--resume` continues once it is back; malformed or truncated
replies are clear errors; token-level methods refuse teacher.url."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from support import chat_tokenizer, save_chat_model, start_server, stop_server, tiny_models
from typer.testing import CliRunner

from prefkd import teacher_client
from prefkd.cli import app
from prefkd.generation import SamplingConfig
from prefkd.methods import dpkd
from prefkd.teacher_client import ServerConfig, TeacherServer, TeacherServerError

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    return tiny_models(tmp_path_factory.mktemp("client"), tokenizer)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    proc, url = start_server(files["teacher"], tmp_path_factory.mktemp("log") / "server.log")
    yield url
    stop_server(proc)


def _distill(files, out, *extra):
    return runner.invoke(app, ["distill", "--method", "dpkd", f"out={out}", f"student.path={files['student']}",
                               f"data.prompts={files['prompts']}", "train.batch_size=4", "sampling.max_new_tokens=6",
                               "sampling.temperature=0", "diagnostics.every=0", "train.log_every=1", *extra])


def _spy(monkeypatch):
    seen = []
    real = dpkd.teacher_logps

    def logps(teacher, prompts, y_t, y_s, known, device):
        out = real(teacher, prompts, y_t, y_s, known, device)
        seen.append((prompts, y_t, y_s, out[0].tolist(), out[1].tolist()))
        return out

    monkeypatch.setattr(dpkd, "teacher_logps", logps)
    return seen


@pytest.mark.slow  # a `prefkd serve` subprocess
def test_dpkd_against_the_server_computes_what_the_loaded_teacher_does(files, server, tmp_path, monkeypatch):
    """Same prompts, same (greedy) samples y_t and y_s, same teacher log-probs of them, step by step."""
    seen = _spy(monkeypatch)
    res = _distill(files, tmp_path / "local", f"teacher.path={files['teacher']}", "train.steps=2")
    assert res.exit_code == 0, res.output
    local, seen[:] = list(seen), []
    res = _distill(files, tmp_path / "served", f"teacher.url={server}", "train.steps=2")
    assert res.exit_code == 0, res.output
    assert "the teacher is" in res.output
    assert len(seen) == len(local) == 2
    for (prompts, y_t, y_s, p_t, p_s), (l_prompts, l_y_t, l_y_s, l_p_t, l_p_s) in zip(seen, local, strict=True):
        assert prompts == l_prompts and y_t == l_y_t and y_s == l_y_s
        assert p_t == pytest.approx(l_p_t, abs=1e-4) and p_s == pytest.approx(l_p_s, abs=1e-4)
        assert all(x < 0 for x in p_t + p_s)  # real log-probs, not zeros
    logs = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in ("local", "served")]
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], abs=1e-4)


@pytest.mark.slow
def test_across_tokenizers_the_server_teacher_equals_the_loaded_one(files, tmp_path, monkeypatch):
    """A Llama-3-style teacher (its own vocabulary, chat template and end tokens) behind the server: its tokenizer
    travels with it, and the run reads the same texts and log-probs as with the teacher loaded."""
    texts = ["the cat sat on the mat", "caf\u00e9 \u00fcber alles", "two plus two is four"] * 40
    save_chat_model(tmp_path / "llama", "llama", chat_tokenizer("llama", texts, vocab_size=450), seed=1)
    proc, url = start_server(tmp_path / "llama", tmp_path / "server.log")
    try:
        seen = _spy(monkeypatch)
        res = _distill(files, tmp_path / "local", f"teacher.path={tmp_path / 'llama'}", "train.steps=1")
        assert res.exit_code == 0, res.output
        local, seen[:] = list(seen), []
        res = _distill(files, tmp_path / "served", f"teacher.url={url}", "train.steps=1")
        assert res.exit_code == 0, res.output
        assert "across tokenizers" in res.output
    finally:
        stop_server(proc)
    (prompts, y_t, y_s, p_t, p_s), (l_prompts, l_y_t, l_y_s, l_p_t, l_p_s) = seen[0], local[0]
    assert prompts == l_prompts and y_t == l_y_t and y_s == l_y_s
    assert p_t == pytest.approx(l_p_t, abs=1e-4) and p_s == pytest.approx(l_p_s, abs=1e-4)


@pytest.mark.slow
def test_a_server_that_dies_mid_run_ends_it_clearly_and_resume_continues(files, tmp_path, monkeypatch):
    root = tmp_path
    proc, url = start_server(files["teacher"], root / "server.log")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    monkeypatch.setattr(teacher_client, "BACKOFF", 0.05)
    real = dpkd.teacher_logps
    calls = []

    def dying(teacher, *args):
        calls.append(1)
        if len(calls) == 3:  # step 3: the checkpoints of steps 1 and 2 are written
            stop_server(proc)
        return real(teacher, *args)

    monkeypatch.setattr(dpkd, "teacher_logps", dying)
    try:
        out = root / "run"
        res = _distill(files, out, f"teacher.url={url}", "train.steps=4", "train.save_every=1", "teacher.retries=2")
        assert res.exit_code == 2
        line = res.output.strip().splitlines()[-1]
        assert line.startswith(f"error: teacher server {url}: cannot connect")
        assert "3 tries" in line and "step 2" in line and "--resume" in line
        assert "Traceback" not in res.output
        assert (out / "checkpoint").is_dir() and not (out / "model").exists()
        proc, url2 = start_server(files["teacher"], root / "server2.log", port=port)
        assert url2 == url
        res = runner.invoke(app, ["distill", "--method", "dpkd", f"out={out}", f"student.path={files['student']}",
                                  f"data.prompts={files['prompts']}", "train.batch_size=4",
                                  "sampling.max_new_tokens=6", "sampling.temperature=0", "diagnostics.every=0",
                                  "train.log_every=1", f"teacher.url={url}", "train.steps=4", "train.save_every=1",
                                  "teacher.retries=2", "--resume"])
        assert res.exit_code == 0, res.output
        assert "resuming from the checkpoint at step 2" in res.output
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4] and (out / "model").is_dir()
    finally:
        stop_server(proc)


@pytest.mark.slow  # a `prefkd serve` subprocess
def test_seqkd_and_generate_sample_through_the_server(files, server, tmp_path, tokenizer):
    res = runner.invoke(app, ["distill", "--method", "seqkd", f"out={tmp_path / 'seqkd'}",
                              f"student.path={files['student']}", f"teacher.url={server}",
                              f"data.prompts={files['prompts']}", "train.steps=1", "train.batch_size=4",
                              "sampling.max_new_tokens=6", f"distill.cache_dir={tmp_path / 'cache'}"])
    assert res.exit_code == 0, res.output
    caches = list((tmp_path / "cache").glob("teacher-*.jsonl"))
    assert len(caches) == 1
    res = runner.invoke(app, ["generate", f"server.url={server}", f"data={files['prompts']}",
                              f"out={tmp_path / 'gen.jsonl'}", "sampling.max_new_tokens=6"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()[1:]]
    n = len((files["prompts"]).read_text().splitlines())
    assert len(rows) == n and all(len(r["response_ids"]) <= 6 for r in rows)
    assert all(r["finished"] == (r["response_ids"][-1:] == [tokenizer.eos_token_id]) for r in rows)


@pytest.mark.parametrize("method", ["kd", "uld", "distillm2"])
def test_token_level_methods_refuse_the_server_and_point_to_offline_logits(files, method, tmp_path):
    res = runner.invoke(app, ["distill", "--method", method, f"out={tmp_path / method}",
                              f"student.path={files['student']}", "teacher.url=http://127.0.0.1:9/v1",
                              f"data.prompts={files['prompts']}", "train.steps=1"])
    assert res.exit_code == 2
    assert "teacher.logits=DIR" in res.output and "dpkd" in res.output
    assert not (tmp_path / method).exists()


def test_url_and_path_together_are_refused(files, tmp_path):
    res = _distill(files, tmp_path / "both", "teacher.url=http://127.0.0.1:9/v1", f"teacher.path={files['teacher']}",
                   "train.steps=1")
    assert res.exit_code == 2 and "drop one" in res.output


# ---- a fake server whose replies go wrong ---------------------------------------------------------------------

class Fake(BaseHTTPRequestHandler):
    mode = "ok"
    posts = 0

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model",
                                                                     "max_model_len": 512}]}).encode())
        else:
            self._send(404, b'{"error": {"message": "no", "type": "NotFoundError", "code": 404}}')

    def do_POST(self):
        type(self).posts += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = type(self).mode
        if mode == "truncated":  # a cut body: the length promises more than comes
            self._send(200, b'{"choices": [{"index": 0, "text"', length=500)
            self.close_connection = True
        elif mode == "not json":
            self._send(200, b'{"choices": [{"index": 0, "text"')
        elif mode == "short":
            self._send(200, json.dumps({"choices": [{"index": 0, "text": "", "logprobs": {
                "token_logprobs": [None, -1.0], "tokens": ["a", "b"], "top_logprobs": [None, {}],
                "text_offset": [0, 1]}}]}).encode())
        elif mode == "500":
            self._send(500, b'{"error": {"message": "CUDA out of memory", "type": "InternalServerError"}}')
        elif mode == "400":
            self._send(400, b'{"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}')
        elif mode == "no ids":
            self._send(200, json.dumps({"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]}).encode())


@pytest.fixture
def fake(files):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Fake.posts = 0
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode,needle,tries", [
    ("truncated", "broke off mid-reply", 3),
    ("not json", "the reply is not JSON", 1),
    ("short", "scores 2 tokens of the 4 sent", 1),
    ("500", "HTTP 500: CUDA out of memory", 3),
    ("400", "HTTP 400: max_tokens is too large", 1),
])
def test_bad_replies_are_clear_errors(fake, files, mode, needle, tries, monkeypatch):
    monkeypatch.setattr(teacher_client, "BACKOFF", 0.01)
    Fake.mode = mode
    client = TeacherServer(ServerConfig(url=fake, tokenizer=str(files["tokenizer"]), retries=2))
    with pytest.raises(TeacherServerError) as err:
        client.score([[1, 2]], [[3, 4]])
    message = str(err.value)
    assert message.startswith(f"teacher server {fake}: ") and needle in message and "\n" not in message
    assert Fake.posts == tries  # connection trouble and 5xx are retried; what the server said is not
    client.close()


def test_a_sample_without_token_ids_is_a_clear_error(fake, files):
    Fake.mode = "no ids"
    client = TeacherServer(ServerConfig(url=fake, tokenizer=str(files["tokenizer"]), retries=0))
    with pytest.raises(TeacherServerError, match="a sample without token_ids"):
        client.sample([[1, 2]], SamplingConfig(max_new_tokens=4), 0, [0], seed=1)
    client.close()


def test_a_bad_reply_in_a_run_is_one_line_and_exit_2(fake, files, tmp_path):
    Fake.mode = "not json"
    res = _distill(files, tmp_path / "bad", f"teacher.url={fake}", f"teacher.tokenizer={files['tokenizer']}",
                   "train.steps=1")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith(f"error: teacher server {fake}: POST /completions: the "
                                                          "reply is not JSON")


def test_no_server_at_all_is_a_clear_error(files, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_client, "BACKOFF", 0.01)
    res = _distill(files, tmp_path / "none", "teacher.url=http://127.0.0.1:9/v1", "teacher.retries=1",
                   "train.steps=1")
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == ("error: teacher server http://127.0.0.1:9/v1: cannot connect (is "
                                                   "the server running, and is the URL right?) (2 tries; "
                                                   "teacher.retries=1)")
    assert not (tmp_path / "none").exists()  # nothing written before the teacher answered


@pytest.mark.slow  # a `prefkd serve` subprocess
def test_pair_logps_scores_only_what_is_unknown(files, server):
    client = TeacherServer(ServerConfig(url=server))
    prompts, y_t = [[5, 6, 7], [8, 9]], [[10, 11], [12]]
    y_s = [[[13], [14, 15]]]
    p_t, p_s = client.pair_logps(prompts, y_t, y_s, [None, -3.5], torch.device("cpu"))
    want = client.score(prompts + prompts, y_t + y_s[0])
    assert p_t.tolist() == pytest.approx([want[0], -3.5]) and p_s.tolist() == pytest.approx(want[2:])
    client.close()
