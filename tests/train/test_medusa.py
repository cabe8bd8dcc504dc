"""Medusa-1 heads trained by the trainer (train.objective="medusa", jaxinfer/train/medusa.py): targets and
masking against a numpy reference over packed documents, the loss and its gradients against a plain
full-batch reference, a tiny run on a random base (held-out loss falls, the heads file loads, the base is
untouched), exact resume, and the config errors."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxinfer
from jaxinfer.config import ConfigError
from jaxinfer.data.packing import Split
from jaxinfer.models.medusa import MedusaConfig, MedusaHeads, load_medusa_heads
from jaxinfer.train import medusa as medusa_train
from jaxinfer.train import train, trainer
from jaxinfer.train.checkpoint import peek_latest
from jaxinfer.train.medusa import head_targets, head_weights, medusa_loss_and_grads
from testlib import assert_close, randn, tiny_model_config

DATA = Path(json.__file__).parent  # the json package: a few small stdlib files
EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "medusa.py"


def reference_targets(split: Split, row_ids, num_heads):
  """Head k at (row r, position t) predicts stream token g + k + 2 (g = r*L + t); it counts iff that token is in
  the row's L + 1 tokens and in the same document as token g, and the row is not padding."""
  L = split.seq_len
  doc = np.searchsorted(split.doc_starts, np.arange(len(split.tokens)), side="right") - 1
  targets = np.zeros((len(row_ids), L, num_heads), np.int64)
  mask = np.zeros((len(row_ids), L, num_heads), bool)
  for b, r in enumerate(row_ids):
    for t in range(L):
      for k in range(num_heads):
        g, ahead = r * L + t, r * L + t + k + 2
        if r >= 0 and t + k + 2 <= L and doc[g] == doc[ahead]:
          targets[b, t, k], mask[b, t, k] = split.tokens[ahead], True
  return targets, mask


def random_split(seed, seq_len, vocab=50):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 14, size=40)  # many short documents: boundaries inside most windows
  tokens = rng.integers(1, vocab, size=int(lengths.sum())).astype(np.int32)
  return Split(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), seq_len)


def test_head_targets_and_masks_match_a_numpy_reference():
  split = random_split(0, seq_len=16)
  row_ids = np.array([3, 0, -1, 7, 1])  # -1: a padding row
  rows = split.rows(row_ids)
  targets, mask = jax.device_get(jax.jit(head_targets, static_argnums=2)(rows["targets"], rows["loss_mask"], 5))
  want_t, want_m = reference_targets(split, row_ids, 5)
  np.testing.assert_array_equal(mask, want_m)
  np.testing.assert_array_equal(np.where(mask, targets, 0), want_t)
  assert want_m.any() and not want_m[2].any()  # padding counts nowhere
  live = want_m[[0, 1, 3, 4]]
  assert (~live[:, :-6]).any()  # document boundaries (not only row ends) cut some windows
  assert (want_m.sum(axis=(0, 1)) > 0).all() and np.all(np.diff(want_m.sum(axis=(0, 1))) <= 0)  # farther: fewer


def random_module(constructor, tag: str):
  """The module `constructor` builds, every parameter drawn from testlib.randn (norm scales around 1): no
  per-shape initialiser compiles, which cost seconds each on the loaded 2-core machine."""
  graphdef, state = nnx.split(nnx.eval_shape(constructor))
  leaves, tree = jax.tree.flatten(state)
  values = [(1.0 if x.ndim == 1 else 0.0) + 0.2 * randn(x.shape, f"{tag}.{i}", x.dtype) for i, x in enumerate(leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, values))


def random_base(cfg, tag="base"):
  return random_module(lambda: jaxinfer.Transformer(cfg, rngs=nnx.Rngs(0)), tag)


def test_loss_and_gradients_match_a_plain_full_batch_reference():
  cfg = tiny_model_config(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1)
  base = random_base(cfg)
  heads = random_module(lambda: MedusaHeads(MedusaConfig.for_model(cfg, num_heads=3), rngs=nnx.Rngs(0)), "heads")
  heads.init_from_base(base)  # the projections from the lm_head, the residual blocks random (not the identity)
  split = random_split(4, seq_len=12)
  row_ids = np.array([2, 5, 0, -1])
  rows = split.rows(row_ids)
  batch = {k: jnp.asarray(v.reshape(2, 2, -1)) for k, v in rows.items()}  # 2 accumulation steps of 2 rows
  weights = head_weights(3, 0.8)
  graphdef, params = nnx.split(heads)
  base_graphdef, base_params = nnx.split(base)
  step = jax.jit(lambda p, bp, b: medusa_loss_and_grads(graphdef, base_graphdef, p, bp, b, weights))
  loss, grads, counts, per_head = step(params, base_params, batch)

  want_t, want_m = reference_targets(split, row_ids, 3)

  def reference(p, bp):  # one pass over all rows; each head's mean over its counted targets, weighted 0.8^k
    hidden = nnx.merge(base_graphdef, bp)(rows["inputs"], rows["positions"], rows["segment_ids"], return_hidden=True)
    logp = jax.nn.log_softmax(nnx.merge(graphdef, p)(hidden), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(want_t)[..., None], axis=-1)[..., 0]
    means = [-jnp.sum(jnp.where(want_m[..., k], picked[..., k], 0.0)) / want_m[..., k].sum() for k in range(3)]
    return sum(0.8 ** k * means[k] for k in range(3)), jnp.stack(means)

  (want_loss, want_heads), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params, base_params)
  np.testing.assert_array_equal(np.asarray(counts), want_m.sum(axis=(0, 1)))
  assert_close(per_head, want_heads, 1e-5, "per-head losses")
  assert_close(loss, want_loss, 1e-5, "weighted loss")
  assert jax.tree.structure(grads) == jax.tree.structure(params)  # the heads only: the base is no argument
  for name in ("res_kernel", "res_bias", "out_kernel"):
    assert float(jnp.max(jnp.abs(want_grads[name][...]))) > 0, name
    assert_close(grads[name][...], want_grads[name][...], 1e-5, f"gradient of {name}")


# ------------------------------------------------------------------------------- runs on a tiny random base
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
  """A random 1-layer base saved with jaxinfer.save_hf, with a 300-token BPE of the json package beside it."""
  from jaxinfer.data.corpus import train_bpe

  root = tmp_path_factory.mktemp("medusa")
  docs = [p.read_text() for p in sorted(DATA.glob("*.py"))]
  tokenizer = train_bpe(docs, 300)
  cfg = tiny_model_config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                          num_layers=1)
  base = root / "base"
  jaxinfer.save_hf(random_base(cfg), base)
  tokenizer.save(str(base / "tokenizer.json"))
  return base


def medusa_config(base, workdir, cache_dir, **medusa):
  import importlib.util

  spec = importlib.util.spec_from_file_location("experiment_medusa", EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.workdir = str(workdir)
  config.medusa.base_dir = str(base)
  config.medusa.num_heads = 3
  for key, value in medusa.items():
    setattr(config.medusa, key, value)
  config.data.paths, config.data.max_bytes, config.data.eval_fraction = (str(DATA),), 0, 0.2
  config.data.cache_dir = str(cache_dir)
  for key, value in dict(steps=6, batch_size=8, seq_len=32, grad_accum=1, learning_rate=1e-2, warmup_steps=1,
                         eval_every=3, eval_batches=1, checkpoint_every=3, keep_checkpoints=3,
                         progress=False).items():
    setattr(config.train, key, value)
  return config


def digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def medusa_run(tiny_base, tmp_path_factory, cache_dir):
  before = {name: digest(tiny_base / name) for name in ("config.json", "model.safetensors", "tokenizer.json")}
  workdir = tmp_path_factory.mktemp("medusa_run") / "wd"
  result = train(medusa_config(tiny_base, workdir, cache_dir))
  return workdir, result, before


def test_heads_train_on_a_frozen_base_and_load(medusa_run, tiny_base):
  workdir, result, before = medusa_run
  assert result.final_step == 6 and sorted(result.losses) == list(range(1, 7))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  untrained = json.loads((workdir / medusa_train.BASELINE_FILE).read_text())
  for k in range(3):  # every head's held-out loss falls from the heads as initialised (lm_head copies)
    assert evals[-1][f"eval_loss_head{k}"] < untrained[f"eval_loss_head{k}"] - 0.05, k
    assert 0 <= evals[-1][f"eval_top1_head{k}"] <= evals[-1][f"eval_top3_head{k}"] <= 1
  assert evals[-1]["eval_loss"] < untrained["eval_loss"]
  assert all(f"loss_head{k}" in records[0] for k in range(3))

  # the base is untouched; the checkpoints hold the heads (and their optimizer) only
  assert {name: digest(tiny_base / name) for name in before} == before
  step, meta = peek_latest(workdir)
  assert step == 6 and set(meta["param_shapes"]) == {"res_kernel", "res_bias", "out_kernel"}
  base = jaxinfer.load_hf(tiny_base)
  heads = load_medusa_heads(tiny_base, model_config=base.config)
  assert heads.num_heads == 3
  lm_head = base.embed_tokens.embedding[...].T if base.lm_head is None else base.lm_head.kernel[...]
  start = {"res_kernel": 0.0, "res_bias": 0.0, "out_kernel": lm_head}  # init_from_base: identity blocks, lm_head
  for name, value in start.items():  # trained: every parameter moved from its start
    assert float(jnp.max(jnp.abs(getattr(heads, name)[...] - value))) > 1e-4, name
  results = (workdir / "results.md").read_text()
  assert "## Held-out accuracy per head" in results and "| head 2 | t+4 |" in results
  assert "unigram baseline top-1 / top-3" in results
  assert (workdir / "loss_curve.png").stat().st_size > 1000 and (workdir / "head_accuracy.png").stat().st_size > 1000


def test_resume_after_an_interruption_is_exact(medusa_run, tiny_base, tmp_path, cache_dir, losses_of):
  workdir, result, _ = medusa_run
  copy = tmp_path / "wd"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "6")  # as if the job had been stopped after the step-3 checkpoint
  resumed = train(medusa_config(tiny_base, copy, cache_dir, output_dir=str(tmp_path / "heads")))
  assert resumed.start_step == 3 and sorted(resumed.losses) == [4, 5, 6]
  for step in (4, 5, 6):
    assert resumed.losses[step] == result.losses[step], step  # bit-identical
  assert losses_of(copy) == result.losses
  a = load_medusa_heads(tiny_base)
  b = load_medusa_heads(tmp_path / "heads")
  np.testing.assert_array_equal(np.asarray(a.out_kernel[...]), np.asarray(b.out_kernel[...]))


# ------------------------------------------------------------------------------------------ config errors
@pytest.fixture
def no_compile(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("compiled before the config was rejected")

  monkeypatch.setattr(medusa_train, "compile_medusa_steps", refuse)
  monkeypatch.setattr(trainer, "create_sharded_module", refuse)


def snapshot(path):
  return {p: os.stat(p).st_mtime_ns for p in sorted(path.rglob("*"))} if path.exists() else None


def _without_tokenizer(base, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(base, bare, ignore=shutil.ignore_patterns("tokenizer.json"))
  return dict(base_dir=str(bare))


def _other_base(base, tmp_path):
  other = tmp_path / "other"
  cfg = jaxinfer.load_hf(base).config.replace(hidden_size=48)
  jaxinfer.save_hf(random_base(cfg, "other"), other)
  shutil.copyfile(base / "tokenizer.json", other / "tokenizer.json")
  return dict(base_dir=str(other))


@pytest.mark.parametrize("change, on_run, message", [
    (lambda base, tmp: dict(base_dir=str(tmp / "nope")), False, r"medusa.base_dir: \S+nope does not exist"),
    (_without_tokenizer, False, r"medusa.base_dir: \S+bare has no tokenizer.json"),
    (lambda base, tmp: dict(num_heads=0), False, r"medusa.num_heads: must be a positive integer, got 0"),
    (lambda base, tmp: dict(num_heads=32), False, r"medusa.num_heads: 32 heads predict up to 33 tokens ahead"),
    (lambda base, tmp: dict(decay_coefficient=0.0), False, r"medusa.decay_coefficient: must lie in \(0, 1\]"),
    (lambda base, tmp: dict(num_heads=4), True, r"medusa.num_heads: the checkpoint at step 6 in \S+ holds heads "
     r"with num_heads=3, this config asks for 4"),
    (_other_base, True, r"medusa.base_dir: the heads in \S+ \(step 6\) were trained for a base with "
     r"hidden_size=32, the base at \S+other has hidden_size=48"),
])
def test_config_errors_name_the_field(tiny_base, medusa_run, tmp_path, cache_dir, no_compile, change, on_run,
                                      message):
  workdir = medusa_run[0] if on_run else tmp_path / "wd"
  before = snapshot(workdir)
  with pytest.raises(ConfigError, match=message):
    train(medusa_config(tiny_base, workdir, cache_dir, **change(tiny_base, tmp_path)))
  assert snapshot(workdir) == before  # nothing written (nor created)


def test_a_model_section_is_refused(tiny_base, tmp_path, cache_dir, no_compile):
  from jaxinfer.config import model_section

  config = medusa_config(tiny_base, tmp_path / "wd", cache_dir)
  config.model = model_section()
  with pytest.raises(ConfigError, match="model: unknown top-level field.*takes the model from its 'medusa' section"):
    train(config)
  assert not (tmp_path / "wd").exists()


def test_cli_resolves_the_medusa_paths_and_reports_errors(tmp_path, capsys, monkeypatch):
  from jaxinfer.cli import main

  monkeypatch.chdir(tmp_path)
  code = main(["jaxinfer", "train", "--config", str(EXPERIMENT), "--config.medusa.base_dir=missing/hf",
               f"--config.workdir={tmp_path / 'wd'}"])
  assert code == 2
  err = capsys.readouterr().err
  assert f"invalid config: medusa.base_dir: {tmp_path / 'missing' / 'hf'} does not exist" in err
  assert not (tmp_path / "wd").exists()

