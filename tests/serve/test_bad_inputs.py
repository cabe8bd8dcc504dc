"""Bad inputs and their status codes (OpenAI error JSON), each tested; none of them affects other requests.

| input                                           | status | param           |
|-------------------------------------------------|--------|-----------------|
| unknown model                                   | 404    | model           |
| temperature -1 / top_p 0 / top_k -2 / min_p 2   | 400    | that field      |
| max_tokens 0, n 0, n 65, seed -1, logprobs 2    | 400    | that field      |
| an unknown field                                | 400    | that field      |
| presence_penalty 1, logit_bias, stop [""]       | 400    | that field      |
| prompt missing / empty / longer than the context| 400    | prompt          |
| prompt + max_tokens beyond the context          | 400    | max_tokens      |
| prompt token id outside the vocabulary          | 400    | prompt          |
| stop_token_ids outside the vocabulary           | 400    | stop_token_ids  |
| echo with logprobs                              | 400    | logprobs        |
| chat: no messages, a bad role                   | 400    | messages...     |
| chat on a model without a chat template         | 400    | messages        |
| body that is not JSON                           | 400    | body            |
| /detokenize ids outside the vocabulary          | 400    | tokens          |
| /tokenize of an unknown model                   | 404    | model           |
| the queue full                                  | 429    | -               |
"""

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

LONG = "x" * 300  # beyond max_model_len = 256


def call(url, body, raw=None):
  data = raw if raw is not None else json.dumps(body).encode()
  req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


C = "/v1/completions"
CHAT = "/v1/chat/completions"
OK = {"model": "random-bytes", "prompt": "hello", "max_tokens": 2, "temperature": 0}
MSG = [{"role": "user", "content": "hi"}]

CASES = [
    ("unknown model", C, dict(OK, model="gpt-9"), 404, "model"),
    ("negative temperature", C, dict(OK, temperature=-1), 400, "temperature"),
    ("top_p 0", C, dict(OK, top_p=0), 400, "top_p"),
    ("top_k -2", C, dict(OK, top_k=-2), 400, "top_k"),
    ("min_p 2", C, dict(OK, min_p=2), 400, "min_p"),
    ("max_tokens 0", C, dict(OK, max_tokens=0), 400, "max_tokens"),
    ("n 0", C, dict(OK, n=0), 400, "n"),
    ("n 65", C, dict(OK, n=65), 400, "n"),
    ("seed -1", C, dict(OK, seed=-1), 400, "seed"),
    ("logprobs 2", C, dict(OK, logprobs=2), 400, "logprobs"),
    ("unknown field", C, dict(OK, temprature=0.5), 400, "temprature"),
    ("presence penalty", C, dict(OK, presence_penalty=1.0), 400, "presence_penalty"),
    ("logit bias", C, dict(OK, logit_bias={"3": 1.0}), 400, "logit_bias"),
    ("empty stop string", C, dict(OK, stop=[""]), 400, "stop"),
    ("missing prompt", C, {"model": "random-bytes"}, 400, "prompt"),
    ("empty prompt", C, dict(OK, prompt=""), 400, "prompt"),
    ("prompt beyond the context", C, dict(OK, prompt=LONG), 400, "prompt"),
    ("prompt + max_tokens beyond the context", C, dict(OK, prompt="y" * 200, max_tokens=100), 400, "max_tokens"),
    ("token id outside the vocabulary", C, dict(OK, prompt=[1, 2, 999]), 400, "prompt"),
    ("negative token id", C, dict(OK, prompt=[-1]), 400, "prompt"),
    ("stop token id outside the vocabulary", C, dict(OK, stop_token_ids=[4096]), 400, "stop_token_ids"),
    ("echo with logprobs", C, dict(OK, echo=True, logprobs=1), 400, "logprobs"),
    ("chat without messages", CHAT, {"model": "random-bytes", "messages": []}, 400, "messages"),
    ("chat with a bad role", CHAT, {"model": "random-bytes", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("chat prompt beyond the context", CHAT, {"model": "random-bytes", "messages": [{"role": "user", "content": LONG}]},
     400, "messages"),
    ("detokenize outside the vocabulary", "/detokenize", {"tokens": [1, 256]}, 400, "tokens"),
    ("tokenize an unknown model", "/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
]


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server_url, name, path, body, status, param):
  code, out = call(server_url + path, body)
  assert code == status, out
  err = out["error"]
  assert err["code"] == status and err["param"] == param and err["type"]
  assert err["message"].startswith(param) or status == 404 or param in err["message"]


def test_limits_are_named(server_url):
  _, out = call(server_url + C, dict(OK, prompt=LONG))
  assert "256" in out["error"]["message"] and "max_model_len" in out["error"]["message"]
  _, out = call(server_url + C, dict(OK, prompt=[1, 2, 999]))
  assert "999" in out["error"]["message"] and "[0, 256)" in out["error"]["message"]
  _, out = call(server_url + C, None, raw=b"{not json")
  assert out["error"]["code"] == 400 and out["error"]["param"] == "body"


def test_openai_client_sees_errors(client):
  import openai

  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="temperature"):
    client.completions.create(model="random-bytes", prompt="x", max_tokens=2, temperature=-1)


def test_chat_without_template(serving, client):
  import openai

  from jaxinfer.serve.routes import Serving
  from jaxinfer.serve.server import BackgroundServer

  bare = Serving(dataclasses.replace(serving.served, chat_template=None), serving.bridge, serving.engine_config,
                 serving.metrics)
  with BackgroundServer(bare) as s:
    code, out = call(s.url + CHAT, {"model": "random-bytes", "messages": MSG})
    assert code == 400 and out["error"]["param"] == "messages" and "chat template" in out["error"]["message"]
    assert call(s.url + C, OK)[0] == 200  # completions still work there


def test_queue_full_is_429_and_harms_nobody(serving, server_url, monkeypatch):
  bridge = serving.bridge
  monkeypatch.setattr(bridge, "max_queue", 2)
  results = []
  bridge.pause()
  try:
    threads = [threading.Thread(target=lambda: results.append(call(server_url + C, OK))) for _ in range(2)]
    for t in threads:
      t.start()
    deadline = time.monotonic() + 30
    while bridge.num_pending_adds < 2:
      assert time.monotonic() < deadline, "the two requests never reached the bridge"
      time.sleep(0.01)
    code, out = call(server_url + C, OK)
    assert code == 429 and out["error"]["type"] == "rate_limit_error" and "max_queue=2" in out["error"]["message"]
  finally:
    bridge.resume()
  for t in threads:
    t.join(60)
  assert [r[0] for r in results] == [200, 200]


def test_errors_leave_the_engine_clean(serving, server_url):
  for _, path, body, _, _ in CASES[:6]:
    call(server_url + path, body)
  code, out = call(server_url + C, dict(OK, max_tokens=3))
  assert code == 200 and out["usage"]["completion_tokens"] == 3
  bridge = serving.bridge
  deadline = time.monotonic() + 30
  while bridge.num_unfinished:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  pages = bridge.call(lambda e: e.check_pages()).result(30)
  assert pages["in_use"] == 0
