"""Text handling without a server: the incremental detokenizer (byte-level and BPE tokenizers, never half a
UTF-8 character), stop strings across deltas, chat templates rendered as transformers' apply_chat_template."""

import json

import pytest
import transformers  # the test extra's numerical reference

from jaxinfer.serve.chat_template import SIMPLE_TEMPLATE, TemplateError, from_checkpoint, render, special_tokens
from jaxinfer.serve.detokenizer import IncrementalDetokenizer
from jaxinfer.serve.stop import StopMatcher
from jaxinfer.tokenizer import ByteTokenizer, HFTokenizer

TEXT = "naïve café → 𝄞 done ✓"


def stream(detok, ids):
  pieces = [detok.add([t]) for t in ids]
  return pieces, pieces + [detok.flush()]


def test_byte_detokenizer_never_emits_half_a_character():
  tok = ByteTokenizer()
  ids = tok.encode(TEXT)
  pieces, whole = stream(IncrementalDetokenizer(tok), ids)
  assert "".join(whole) == TEXT
  assert all("\ufffd" not in p for p in whole)
  assert pieces[ids.index(0xF0)] == ""  # the first byte of 𝄞 alone emits nothing
  assert "𝄞" in pieces  # it comes out whole once its 4th byte arrives


def test_invalid_bytes_match_a_full_decode():
  tok = ByteTokenizer()
  ids = [104, 0xE2, 0x82, 105, 0xC3]  # a cut-off 3-byte sequence inside, a lone lead byte at the end
  _, whole = stream(IncrementalDetokenizer(tok), ids)
  assert "".join(whole) == tok.decode(ids)


def test_skip_ids_are_never_text():
  tok = ByteTokenizer()
  _, whole = stream(IncrementalDetokenizer(tok, skip_ids={0x41}), tok.encode("xAy"))
  assert "".join(whole) == "xy"


@pytest.fixture(scope="module")
def bpe():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  t.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
  return HFTokenizer(t)


def test_bpe_detokenizer(bpe):
  ids = bpe.encode(TEXT + " hello world")
  assert len(ids) > len(TEXT.split())  # non-ASCII characters split over byte tokens
  _, whole = stream(IncrementalDetokenizer(bpe), ids)
  assert "".join(whole) == bpe.decode(ids)
  assert all("\ufffd" not in p for p in whole)


@pytest.mark.parametrize("deltas,stops,emitted,stopped", [
    (["Hel", "lo ST", "OP there"], ["STOP"], "Hello ", "STOP"),
    (["a", "b", "c", "d"], ["bc", "abcd"], "a", "bc"),  # the earliest match wins
    (["x", "y"], ["yz"], "xy", None),  # a partial match at the end is given back
    (["one\n", "\ntwo"], ["\n\n"], "one", "\n\n"),
    (["caf", "é!"], ["é"], "caf", "é"),
])
def test_stop_strings(deltas, stops, emitted, stopped):
  m = StopMatcher(stops)
  out = "".join(m.add(d) for d in deltas) + m.flush()
  assert out == emitted and m.stopped == stopped


def test_stop_holds_back_only_what_could_start_a_match():
  m = StopMatcher(["END"])
  assert m.add("abcdE") == "abc"  # len("END") - 1 = 2 characters are held back
  assert m.add("x") == "d"
  assert m.flush() == "Ex"


CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
          "{{ raise_exception('system must come first') }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
          "{% if tools %}{{ tools | tojson }}{% endif %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_matches_transformers(tmp_path, bpe):
  bpe.tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "</s>",
       "tokenizer_class": "PreTrainedTokenizerFast"}))
  template, source = from_checkpoint(tmp_path)
  assert template == CHATML and source.endswith("tokenizer_config.json")
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "héllo\n  "},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
  for add in (True, False):
    ours = render(template, messages, add, special_tokens(tmp_path))
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
  with pytest.raises(TemplateError, match="system must come first"):
    render(template, messages + [{"role": "system", "content": "late"}], True, special_tokens(tmp_path))


def test_special_tokens_in_either_form(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>", "lstrip": False},
                                                              "eos_token": "</s>", "pad_token": None}))
  assert special_tokens(tmp_path) == {"bos_token": "<s>", "eos_token": "</s>"}


def test_chat_template_file_wins(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
  (tmp_path / "chat_template.jinja").write_text("B")
  assert from_checkpoint(tmp_path)[0] == "B"
  (tmp_path / "chat_template.jinja").unlink()
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool", "template": "T"},
                                                                                {"name": "default", "template": "D"}]}))
  assert from_checkpoint(tmp_path)[0] == "D"
  (tmp_path / "tokenizer_config.json").write_text("{}")
  assert from_checkpoint(tmp_path) == (None, "none")


def test_simple_template():
  text = render(SIMPLE_TEMPLATE, [{"role": "user", "content": "hi"}], True)
  assert text == "### User:\nhi\n\n### Assistant:\n"
