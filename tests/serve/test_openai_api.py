"""The server through the official openai client: completions and chat, plain and streaming, greedy output
equal to jaxinfer.generate; usage chunk; stop strings across tokens; a UTF-8 character split over tokens;
/v1/models, /tokenize, /detokenize; /metrics parsed by prometheus_client's parser."""

import json
import urllib.request

import pytest

import jaxinfer
from jaxinfer.generation.sampling import SamplingParams


def ids_of(choice_logprobs) -> list[int]:
  """Token ids from logprobs tokens written as token_id:N (return_tokens_as_token_ids)."""
  return [int(t.split(":")[1]) for t in choice_logprobs.tokens]


def generate(served, text, n):
  prompt = served.tokenizer.encode(text)
  return jaxinfer.generate(served.model, [prompt], n, SamplingParams())[0]


def post(url, body) -> dict:
  req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    return json.loads(r.read())


def test_completion_greedy_equals_generate(client, served, model_name):
  text = "def fibonacci(n):\n    # the n-th Fibonacci number"  # prompts of 33..64 bytes: one generate program
  expected = generate(served, text, 16)
  r = client.completions.create(model=model_name, prompt=text, max_tokens=16, temperature=0, logprobs=1,
                                extra_body={"return_tokens_as_token_ids": True})
  choice = r.choices[0]
  assert ids_of(choice.logprobs) == expected
  assert choice.text == served.tokenizer.decode(expected)
  assert choice.finish_reason == "length"
  assert r.usage.prompt_tokens == len(text.encode()) and r.usage.completion_tokens == 16
  assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
  # token ids as the prompt give the same
  r2 = client.completions.create(model=model_name, prompt=served.tokenizer.encode(text), max_tokens=16, temperature=0)
  assert r2.choices[0].text == choice.text


def test_completion_streaming_with_usage(client, served, model_name):
  text = "import os\nimport sys\n\ndef main(argv: list[str]) -> int:\n"
  expected = served.tokenizer.decode(generate(served, text, 16))
  chunks = list(client.completions.create(model=model_name, prompt=text, max_tokens=16, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
  body = [c for c in chunks if c.choices]
  assert "".join(c.choices[0].text for c in body) == expected
  assert body[-1].choices[0].finish_reason == "length"
  assert all(c.usage is None for c in body)
  last = chunks[-1]
  assert last.choices == [] and last.usage.completion_tokens == 16 and last.usage.prompt_tokens == len(text)
  assert last.usage.total_tokens == 16 + len(text)


def test_sse_ends_with_done(server_url, model_name):
  req = urllib.request.Request(server_url + "/v1/completions", json.dumps(
      {"model": model_name, "prompt": "x", "max_tokens": 3, "temperature": 0, "stream": True}).encode(),
      {"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
  assert all(e.startswith("data: ") for e in events)
  assert events[-1] == "data: [DONE]"
  assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_chat_greedy_plain_and_streaming(client, served, model_name):
  from jaxinfer.serve import chat_template

  messages = [{"role": "system", "content": "Py"}, {"role": "user", "content": "A stack"}]
  rendered = chat_template.render(served.chat_template, messages, True)
  assert rendered.endswith("### Assistant:\n")
  expected_ids = jaxinfer.generate(served.model, [served.tokenizer.encode(rendered)], 16, SamplingParams())[0]
  expected = served.tokenizer.decode(expected_ids)
  r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
  assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
  assert r.usage.prompt_tokens == len(rendered.encode()) and r.usage.completion_tokens == 16
  chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
  # /tokenize renders the same template
  tok = post(model_url(client) + "/tokenize", {"model": model_name, "messages": messages})
  assert tok["tokens"] == served.tokenizer.encode(rendered) and tok["count"] == len(rendered.encode())


def model_url(client) -> str:
  return str(client.base_url).rstrip("/").removesuffix("/v1")


def sampled(client, model_name, seed, **kw):
  """A seeded sampled completion (batch-independent random stream) with its token ids."""
  r = client.completions.create(model=model_name, prompt=f"seed {seed}:", max_tokens=48, temperature=1.0, seed=seed,
                                logprobs=1, extra_body={"return_tokens_as_token_ids": True}, **kw)
  return r.choices[0], ids_of(r.choices[0].logprobs)


@pytest.fixture(scope="module")
def multibyte(client, model_name):
  """(seed, choice) of a seeded output holding a multi-byte UTF-8 character (each byte is its own token), found
  by a bounded deterministic search."""
  for seed in range(40):
    choice, ids = sampled(client, model_name, seed)
    chars = [ch for ch in choice.text if ord(ch) > 127 and ch != "\ufffd"]
    if chars:
      return seed, choice, ids, chars[0]
  pytest.fail("no multi-byte character in 40 seeded outputs")


def test_utf8_character_split_over_tokens_is_never_emitted_half(client, model_name, multibyte):
  seed, choice, ids, char = multibyte
  assert len(char.encode()) >= 2  # byte-level tokens: the character spans several tokens
  pieces = [c.choices[0].text for c in client.completions.create(
      model=model_name, prompt=f"seed {seed}:", max_tokens=48, temperature=1.0, seed=seed, stream=True)]
  assert "".join(pieces) == choice.text
  assert any(char in p for p in pieces)  # whole in one chunk
  # no chunk ends in an incomplete character: every replacement char is one the full decode has too
  assert sum(p.count("\ufffd") for p in pieces) == choice.text.count("\ufffd")


def test_stop_string_across_tokens_is_trimmed(client, model_name, multibyte):
  seed, choice, ids, char = multibyte
  at = choice.text.index(char)
  stop = choice.text[max(0, at - 2):at + 2]  # several tokens, the split character included
  start = choice.text.index(stop)
  for stream in (False, True):
    kw = dict(model=model_name, prompt=f"seed {seed}:", max_tokens=48, temperature=1.0, seed=seed,
              stop=["never appears \x00", stop])
    if stream:
      chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
      text = "".join(c.choices[0].text for c in chunks if c.choices)
      reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
      used = chunks[-1].usage.completion_tokens
    else:
      r = client.completions.create(**kw)
      text, reasons, used = r.choices[0].text, [r.choices[0].finish_reason], r.usage.completion_tokens
    assert text == choice.text[:start], stream
    assert reasons[-1] == "stop"
    assert used <= len(ids)


def test_n_choices_and_echo(client, model_name):
  r = client.completions.create(model=model_name, prompt="abc", max_tokens=6, temperature=1.0, seed=11, n=3)
  assert sorted(c.index for c in r.choices) == [0, 1, 2]
  assert len({c.text for c in r.choices}) > 1  # seeds 11, 12, 13
  assert r.usage.completion_tokens == 18
  one = client.completions.create(model=model_name, prompt="abc", max_tokens=6, temperature=1.0, seed=12)
  assert one.choices[0].text == [c for c in r.choices if c.index == 1][0].text
  e = client.completions.create(model=model_name, prompt="abc", max_tokens=4, temperature=0, echo=True)
  g = client.completions.create(model=model_name, prompt="abc", max_tokens=4, temperature=0)
  assert e.choices[0].text == "abc" + g.choices[0].text


def test_models_tokenize_detokenize(client, server_url, served, model_name):
  models = client.models.list()
  assert [m.id for m in models.data] == [model_name]
  tok = post(server_url + "/tokenize", {"model": model_name, "prompt": "héllo"})
  assert tok == {"count": 6, "max_model_len": 256, "tokens": list("héllo".encode())}
  assert post(server_url + "/detokenize", {"model": model_name, "tokens": tok["tokens"]}) == {"prompt": "héllo"}
  with urllib.request.urlopen(server_url + "/health", timeout=10) as r:
    assert r.status == 200


def test_metrics_parse(client, server_url, model_name):
  from prometheus_client.parser import text_string_to_metric_families

  client.completions.create(model=model_name, prompt="metrics", max_tokens=5, temperature=0)
  with urllib.request.urlopen(server_url + "/metrics", timeout=10) as r:
    text = r.read().decode()
  families = {f.name: f for f in text_string_to_metric_families(text)}
  for name in ("jaxinfer:num_requests_running", "jaxinfer:num_requests_waiting", "jaxinfer:kv_cache_usage_perc",
               "jaxinfer:prefix_cache_queries", "jaxinfer:prefix_cache_hits", "jaxinfer:time_to_first_token_seconds",
               "jaxinfer:inter_token_latency_seconds", "jaxinfer:e2e_request_latency_seconds",
               "jaxinfer:generation_tokens", "jaxinfer:request_success"):
    assert name in families, name
  samples = {(s.name, s.labels.get("le")): s.value for f in families.values() for s in f.samples}
  assert samples[("jaxinfer:time_to_first_token_seconds_count", None)] >= 1
  assert samples[("jaxinfer:inter_token_latency_seconds_count", None)] >= 4
  assert samples[("jaxinfer:e2e_request_latency_seconds_bucket", "+Inf")] >= 1
  assert 0.0 <= samples[("jaxinfer:kv_cache_usage_perc", None)] <= 1.0
  assert families["jaxinfer:time_to_first_token_seconds"].type == "histogram"
  assert all(s.labels["model_name"] == model_name for s in families["jaxinfer:num_requests_running"].samples)
