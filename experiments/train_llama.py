"""Train a small long-context LLaMA on essays and RULER-style retrieval, export it for Hugging Face.

  python -m experiments.train_llama --workdir=/tmp/needle-llama \
      --export_dir=/tmp/needle-llama/export

The defaults are the recipe of assets/needle-llama-15m (its README has the command and results:
under 5 minutes on one H200, compilation and evaluation included).

Trains `--config` (default needle-llama-15m: ~14.5M parameters, tied 32K LLaMA-2 vocabulary) on
rows packed with Paul Graham essay text and retrieval examples (single / multi-key / multi-value
needles, JSON key-value lookup, variable tracking) generated on the fly from `--seed`, through a
sequence-length curriculum (`--seq_lens`, about `--tokens_per_batch` tokens per step), with AdamW
(warm-up + cosine decay, clipping), bf16 compute and float32 master weights.

Writes to --workdir: `checkpoints/` (orbax, every --save_every steps; a rerun with the same
settings resumes from the latest one) and `metrics.jsonl` (one line per --log_every steps).
At the end, with --export_dir: the model as bf16 Hugging Face shards (config.json,
model-0000N-of-0000M.safetensors of <= 15 MB, index), reloaded and checked for identical logits,
then evaluated (held-out essay perplexity; greedy needle accuracy at --eval_lengths), with
`eval.json`, `metrics.jsonl` and `loss_curve.png` beside it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments.cli import launcher, parse_ids
from models.llama.tokenizer import load_tokenizer
from squeezed_jax.training import (causal_attention, checkpointing, curriculum, data_mixture,
                                   essay_corpus, export, metrics_log, needle_eval, optimizer,
                                   retrieval_examples, train_step)
from squeezed_jax.training.model_configs import config_by_name, num_parameters

_LOG = logging.getLogger("experiments.train_llama")

_CONFIG = flags.DEFINE_string("config", "needle-llama-15m",
                              "Model config: a name of squeezed_jax.training.model_configs "
                              "TRAINING_CONFIGS or models.llama PRESETS.")
_CONFIG_OVERRIDES = flags.DEFINE_string(
    "config_overrides", "", "Comma-separated integer field=value changes to the config, e.g. "
    "'num_layers=2,hidden_size=64' (for quick runs).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "assets/tokenizers/llama2_tokenizer.model",
                                 "The LLaMA-2 SentencePiece tokenizer.")
_STEPS = flags.DEFINE_integer("steps", 4600, "Training steps in all (the schedule's length).")
_SEQ_LENS = flags.DEFINE_string("seq_lens", "1024,2048,4096,8192",
                                "Curriculum: sequence length of each stage.")
_STAGE_FRACTIONS = flags.DEFINE_string("stage_fractions", "0.3,0.25,0.25,0.2",
                                       "Share of the steps of each stage.")
_TOKENS_PER_BATCH = flags.DEFINE_integer("tokens_per_batch", 65536,
                                         "Tokens per step; batch size = this // seq_len.")
_MIXTURE = flags.DEFINE_string(
    "mixture", "essay=0.2,single_needle=0.25,multi_key_needle=0.25,multi_value_needle=0.1,"
    "kv_lookup=0.1,variable_tracking=0.1", "Chance of each document kind (essay or a retrieval "
    "task) to be drawn for the next document of a row.")
_MIN_DOC_TOKENS = flags.DEFINE_integer("min_doc_tokens", 256, "Shortest packed document.")
_FULL_LENGTH_SHARE = flags.DEFINE_float(
    "full_length_share", 0.5, "Share of retrieval documents as long as the room left in a row.")
_ANSWER_WEIGHT = flags.DEFINE_float(
    "answer_weight", 2.0, "Loss = text NLL + answer_weight * answer NLL (each a mean).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 250, "Linear warm-up steps.")
_FINAL_LR_FRACTION = flags.DEFINE_float("final_lr_fraction", 0.1,
                                        "Learning rate at the end, as a fraction of the peak.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices).")
_CLIP_NORM = flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clipping.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation and of the data.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics.jsonl go here.",
                               required=True)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None,
                                  "Where to write the Hugging Face export and its evaluation.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 1000, "Checkpoint every this many steps.")
_KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 2, "Latest checkpoints kept.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Log metrics every this many steps.")
_HELDOUT_EVERY = flags.DEFINE_integer("heldout_every", 1000,
                                      "Held-out essay loss every this many steps (0: at the end).")
_HELDOUT_SEQ_LEN = flags.DEFINE_integer("heldout_seq_len", 2048,
                                        "Window length of the held-out perplexity.")
_EVAL_LENGTHS = flags.DEFINE_string("eval_lengths", "4096,8192,16384",
                                    "Context lengths of the needle evaluation ('' for none).")
_EVAL_TASKS = flags.DEFINE_list("eval_tasks", ["single_needle"],
                                "RULER tasks evaluated at every --eval_lengths.")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 100, "Examples per task and length.")
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", 25, "Questions answered at once.")
_DATA_WORKERS = flags.DEFINE_integer(
    "data_workers", 4, "Processes building batches ahead (speed only: batches are the same); 0 "
    "builds them in a thread here.")
_ATTENTION = flags.DEFINE_enum("attention", "auto", ["auto", "cudnn", "xla"],
                               "Training attention: auto = cuDNN flash attention on GPU.")
_MAX_TRAIN_SECONDS = flags.DEFINE_float(
    "max_train_seconds", None, "Stop training (checkpoint, export, evaluate) once this many "
    "seconds have passed since the start, even before --steps.")


def _model_config():
  config = config_by_name(_CONFIG.value)
  overrides = {}
  for item in filter(None, (part.strip() for part in _CONFIG_OVERRIDES.value.split(","))):
    name, _, value = item.partition("=")
    if not hasattr(config, name):
      raise app.UsageError(f"--config_overrides: LlamaConfig has no field {name!r}")
    try:
      overrides[name] = type(getattr(config, name))(value)
    except ValueError as e:
      raise app.UsageError(f"--config_overrides: bad value for {name}: {e}") from None
  return config.replace(**overrides, dtype=jnp.bfloat16, param_dtype=jnp.float32)


def _run_settings(config, curriculum, mixture, optimizer_config) -> dict:
  """Everything that fixes what a step computes: a resumed run must have the same."""
  return {"model": config.to_hf_config(), "seed": _SEED.value,
          "stages": [dataclasses.asdict(s) for s in curriculum.stages],
          "mixture": dataclasses.asdict(mixture),
          "answer_weight": _ANSWER_WEIGHT.value,
          "optimizer": dataclasses.asdict(optimizer_config)}


def _check_same_run(saved: dict, current: dict, directory: str) -> None:
  differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if differing:
    raise ValueError(f"the checkpoints in {directory} are of a run with other settings "
                     f"({differing}); use another --workdir or the same flags")


class _Trainer:
  """The training loop: resume, prefetch, compiled steps per stage, logs, checkpoints."""

  def __init__(self, config, tokenizer):
    self.started = time.perf_counter()
    self.config = config
    self.curriculum = curriculum.Curriculum.from_fractions(
        parse_ids("seq_lens", _SEQ_LENS.value),
        [float(f) for f in _STAGE_FRACTIONS.value.split(",")],
        tokens_per_batch=_TOKENS_PER_BATCH.value, total_steps=_STEPS.value)
    longest = self.curriculum.stages[-1].seq_len
    if longest > config.max_position_embeddings:
      raise ValueError(f"--seq_lens reach {longest}, beyond the model's "
                       f"{config.max_position_embeddings=}")
    self.mixture = data_mixture.MixtureConfig(
        weights=data_mixture.parse_weights(_MIXTURE.value), min_doc_tokens=_MIN_DOC_TOKENS.value,
        full_length_share=_FULL_LENGTH_SHARE.value)
    self.corpus = essay_corpus.tokenize_essays(tokenizer)
    examples = retrieval_examples.RetrievalExampleBuilder(
        tokenizer, self.corpus, bos_id=config.bos_token_id, eos_id=config.eos_token_id)
    self.builder = data_mixture.BatchBuilder(self.corpus.train, examples, self.curriculum,
                                             self.mixture, seed=_SEED.value)
    self.optimizer_config = optimizer.OptimizerConfig(
        peak_learning_rate=_LEARNING_RATE.value, warmup_steps=_WARMUP_STEPS.value,
        total_steps=_STEPS.value, final_learning_rate_fraction=_FINAL_LR_FRACTION.value,
        weight_decay=_WEIGHT_DECAY.value, clip_norm=_CLIP_NORM.value)
    self.optimizer = optimizer.make_optimizer(self.optimizer_config)
    self.schedule = optimizer.learning_rate_schedule(self.optimizer_config)
    self.graphdef, self.state = train_step.init_train_state(config, self.optimizer, _SEED.value)
    self.attention_fn = causal_attention.causal_attention(
        None if _ATTENTION.value == "auto" else _ATTENTION.value)
    self.checkpoints = checkpointing.TrainingCheckpoints(
        os.path.join(_WORKDIR.value, "checkpoints"), save_every=_SAVE_EVERY.value,
        max_to_keep=_KEEP_CHECKPOINTS.value)
    self.settings = _run_settings(config, self.curriculum, self.mixture, self.optimizer_config)
    self.log = metrics_log.MetricsLog(os.path.join(_WORKDIR.value, "metrics.jsonl"))
    self.heldout = None

  def resume(self) -> int:
    """Restores the latest checkpoint, if any; returns the step to continue from."""
    restored = self.checkpoints.restore_latest(self.state)
    if restored is None:
      return 0
    step, self.state, saved = restored
    _check_same_run(saved, self.settings, self.checkpoints.directory)
    _LOG.info("resumed from the checkpoint of step %d in %s", step, self.checkpoints.directory)
    return step

  def heldout_loss(self, model) -> float:
    """Mean NLL of the held-out essay windows under `model`."""
    if self.heldout is None:
      self.heldout = needle_eval.heldout_windows(self.corpus.heldout,
                                                 seq_len=_HELDOUT_SEQ_LEN.value,
                                                 bos_id=self.config.bos_token_id)
    return needle_eval.heldout_loss(model, self.heldout, batch_size=len(self.heldout),
                                    attention_fn=self.attention_fn)

  def train(self, first_step: int) -> tuple[int, float]:
    """Trains from `first_step`; returns (steps done in all, training seconds)."""
    total = self.curriculum.total_steps
    step_fn = train_step.make_train_step(self.graphdef, self.optimizer, self.schedule,
                                         self.attention_fn, answer_weight=_ANSWER_WEIGHT.value)
    shapes = [(s.batch_size, s.seq_len) for s in self.curriculum.stages if s.end_step > first_step]
    compile_pool = concurrent.futures.ThreadPoolExecutor(max(1, len(shapes)))
    compiled = train_step.compile_ahead(step_fn, self.state, shapes, compile_pool)
    if _DATA_WORKERS.value:
      executor = data_mixture.process_pool(self.builder, _DATA_WORKERS.value)
      make_batch = data_mixture.build_in_worker
    else:
      executor, make_batch = concurrent.futures.ThreadPoolExecutor(1), self.builder.batch
    done = first_step
    train_started = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    steps = range(first_step, total)
    with data_mixture.Prefetcher(make_batch, steps, executor=executor) as batches:
      for step, batch in batches:
        stage = self.curriculum.stage_at(step)
        shape = (stage.batch_size, stage.seq_len)
        if not compiled[shape].done():
          _LOG.info("waiting for the compilation of the %s step", shape)
        self.state, metrics = compiled[shape].result()(self.state, jax.device_put(batch.as_dict()))
        window_steps += 1
        done = step + 1
        if done % _LOG_EVERY.value == 0 or done == total:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          rate = window_steps / (now - window_start)
          record = dict(step=done, seq_len=stage.seq_len, **metrics,
                        tokens_per_second=rate * stage.batch_size * stage.seq_len,
                        elapsed_seconds=now - self.started)
          self.log.write(record)
          print(metrics_log.progress_line(done, total, metrics, seq_len=stage.seq_len,
                                          steps_per_second=rate,
                                          elapsed_seconds=now - self.started), flush=True)
          window_start, window_steps = now, 0
        if _HELDOUT_EVERY.value and done % _HELDOUT_EVERY.value == 0 and done < total:
          loss = self.heldout_loss(nnx.merge(self.graphdef, self.state.params))
          self.log.write({"step": done, "heldout_loss": loss})
          print(f"step {done}: held-out essay loss {loss:.3f}", flush=True)
        self.checkpoints.save(done, self.state, self.settings)
        if (_MAX_TRAIN_SECONDS.value is not None
            and time.perf_counter() - self.started > _MAX_TRAIN_SECONDS.value and done < total):
          print(f"stopping early at step {done}: --max_train_seconds="
                f"{_MAX_TRAIN_SECONDS.value} passed", flush=True)
          break
    compile_pool.shutdown(wait=False, cancel_futures=True)
    self.checkpoints.save(done, self.state, self.settings, force=True)
    return done, time.perf_counter() - train_started


def _evaluate_and_export(trainer: _Trainer, tokenizer, steps_done: int,
                         train_seconds: float) -> None:
  """Exports to --export_dir, checks the reload, evaluates it and writes eval.json + plots."""
  out = _EXPORT_DIR.value
  model = export.cast_model(trainer.graphdef, trainer.state.params)
  files = export.export_hf(model, out)
  sample = trainer.corpus.heldout.tokens[None, :256]
  model, _ = export.reload_and_compare(model, out, sample)
  print(f"exported {len(files)} files to {out}; the reload gives identical logits", flush=True)
  heldout = trainer.heldout_loss(model)
  trainer.log.write({"step": steps_done, "heldout_loss": heldout})
  results = {"steps": steps_done, "train_seconds": round(train_seconds, 1),
             "parameters": int(sum(p.size for p in jax.tree.leaves(nnx.state(model)))),
             "heldout": {"seq_len": _HELDOUT_SEQ_LEN.value, "loss": heldout,
                         "perplexity": math.exp(heldout),
                         "tokens": int(trainer.heldout.shape[0] * _HELDOUT_SEQ_LEN.value)},
             "needle": [], "examples": []}
  print(f"held-out essay perplexity {math.exp(heldout):.2f} (loss {heldout:.3f})", flush=True)
  for num_tokens in parse_ids("eval_lengths", _EVAL_LENGTHS.value):
    for task in _EVAL_TASKS.value:
      started = time.perf_counter()
      result = needle_eval.needle_accuracy(
          model, tokenizer, num_tokens=num_tokens, num_examples=_EVAL_EXAMPLES.value, task=task,
          seed=10_000, batch_size=_EVAL_BATCH_SIZE.value)
      results["needle"].append(result.summary())
      results["examples"] += [{"task": task, "num_tokens": num_tokens, "prediction": p,
                               "answers": a} for p, a in zip(result.predictions[:3],
                                                             result.answers[:3])]
      print(f"{task} at {num_tokens} tokens: accuracy {result.accuracy:.3f} over "
            f"{len(result.predictions)} examples ({time.perf_counter() - started:.0f} s)",
            flush=True)
  trainer.log.write({"step": steps_done, "final": {k: results[k] for k in ("heldout", "needle")}})
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(results, f, indent=1)
  shutil.copyfile(trainer.log.path, os.path.join(out, "metrics.jsonl"))
  metrics_log.plot_loss_curve(metrics_log.read_metrics(trainer.log.path),
                              os.path.join(out, "loss_curve.png"))


@launcher
def main(argv):
  del argv
  config = _model_config()
  tokenizer = load_tokenizer(_TOKENIZER.value)
  if (tokenizer.bos_id, tokenizer.eos_id) != (config.bos_token_id, config.eos_token_id):
    raise ValueError(f"the tokenizer's BOS/EOS ({tokenizer.bos_id}, {tokenizer.eos_id}) differ "
                     f"from the config's ({config.bos_token_id}, {config.eos_token_id})")
  if tokenizer.vocab_size != config.vocab_size:
    raise ValueError(f"{tokenizer.vocab_size=} differs from {config.vocab_size=}")
  print(f"devices: {jax.devices()}; model {_CONFIG.value}: {num_parameters(config):,} "
        f"parameters", flush=True)
  trainer = _Trainer(config, tokenizer)
  first_step = trainer.resume()
  print(f"setup took {time.perf_counter() - trainer.started:.1f} s; training steps "
        f"{first_step}..{trainer.curriculum.total_steps} over stages "
        f"{[(s.seq_len, s.batch_size, s.end_step) for s in trainer.curriculum.stages]}",
        flush=True)
  steps_done, train_seconds = trainer.train(first_step)
  trainer.checkpoints.close()
  print(f"trained to step {steps_done} ({train_seconds:.0f} s this run); checkpoints in "
        f"{trainer.checkpoints.directory}, metrics in {trainer.log.path}", flush=True)
  if _EXPORT_DIR.value:
    _evaluate_and_export(trainer, tokenizer, steps_done, train_seconds)
    print(f"export, eval.json, metrics.jsonl and loss_curve.png in {_EXPORT_DIR.value}; "
          f"total {time.perf_counter() - trainer.started:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
