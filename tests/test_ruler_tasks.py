"""Tests of the RULER-style tasks (`squeezed_jax.eval.ruler_tasks`) and their essay haystack."""

from __future__ import annotations

import json
import random
import re

import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval import haystack as haystack_lib
from squeezed_jax.eval import ruler_tasks

LLAMA2 = load_tokenizer("assets/tokenizers/llama2_tokenizer.model")
TOK512 = load_tokenizer("assets/stories260K/tok512.bin")
HAYSTACK_TASKS = tuple(t for t in ruler_tasks.TASKS if t != "common_words")
# Small lengths with the 512-token vocabulary need a shorter common-word list.
SMALL_OPTIONS = {"common_words": {"common_freq": 8, "uncommon_freq": 2}}


def _tolerance(num_tokens: int) -> int:
  return max(64, num_tokens // 50)


def test_load_essays_errors(tmp_path):
  assert len(haystack_lib.load_essays()) > 1_000_000
  with pytest.raises(FileNotFoundError, match="does not exist"):
    haystack_lib.load_essays(tmp_path / "missing.json")
  bad_files = (("bad.json", "{not json"), ("list.json", "[1]"), ("empty.json", '{"text": " "}'))
  for name, content in bad_files:
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=name):
      haystack_lib.load_essays(tmp_path / name)


def test_split_sentences_whole_sentences():
  sentences = haystack_lib.split_sentences("One  two.\nThree? \"Four!\" Five.Six and 3.5 seven")
  assert sentences == ["One two.", "Three?", "\"Four!\"", "Five.", "Six and 3.5 seven"]


@pytest.mark.parametrize("num_tokens", [1000, 4096])
def test_haystack_text_fits_from_seeded_start(num_tokens):
  haystack = haystack_lib.haystack_for(LLAMA2)
  text = haystack.text(num_tokens, seed=5)
  start = haystack.random_start(random.Random(5))
  run = haystack.sentence_run(start, 400)
  count = next(n for n in range(1, 400) if " ".join(run[:n]) == text)
  assert len(LLAMA2.encode(text, bos=False)) <= num_tokens
  assert len(LLAMA2.encode(" ".join(run[:count + 1]), bos=False)) > num_tokens
  assert haystack.text(num_tokens, seed=5) == text
  assert haystack.text(num_tokens, seed=6) != text


def test_haystack_wraps_around():
  haystack = haystack_lib.Haystack(LLAMA2, ["Alpha beta.", "Gamma delta.", "Epsilon."])
  assert haystack.sentence_run(2, 4) == ["Epsilon.", "Alpha beta.", "Gamma delta.", "Epsilon."]
  text = haystack.text(40, seed=0)
  assert len(LLAMA2.encode(text, bos=False)) <= 40
  assert len(LLAMA2.encode(text + " Alpha beta. Gamma delta. Epsilon.", bos=False)) > 40


def test_largest_fitting_size_matches_linear_search():
  rng = random.Random(0)
  costs = [rng.randint(1, 9) for _ in range(300)]
  prefix = [0]
  for cost in costs:
    prefix.append(prefix[-1] + cost)
  calls = []

  def num_tokens_of_size(size):
    calls.append(size)
    return 7 + prefix[size]

  for budget, guess in ((500, 10), (500, 290), (1000, 100), (7, 5)):
    calls.clear()
    size, tokens = haystack_lib.largest_fitting_size(
        num_tokens_of_size, num_tokens=budget, guess=guess, max_size=300)
    expected = max(s for s in range(301) if 7 + prefix[s] <= budget)
    assert (size, tokens) == (expected, 7 + prefix[expected])
    assert len(calls) <= 12
  with pytest.raises(ValueError, match="num_tokens=6 is too small"):
    haystack_lib.largest_fitting_size(num_tokens_of_size, num_tokens=6, guess=1, max_size=300)


def _check_needles(example):
  for needle, offset in zip(example.metadata["needles"], example.metadata["needle_offsets"]):
    assert example.context[offset:offset + len(needle)] == needle
  assert example.metadata["needle_offsets"] == sorted(example.metadata["needle_offsets"])
  needles = example.metadata["needles"]
  if example.task in ("single_needle", "multi_key_needle", "multi_value_needle"):
    key = example.metadata["asked_key"]
    asked = [n for n in needles if f" for {key} is " in n]
    assert sorted(re.findall(r"is (\d{7})\.", " ".join(asked))) == sorted(example.answers)
    assert f" {key} " in example.question
    assert len(needles) == {"single_needle": 1}.get(example.task, 4)
  elif example.task == "kv_lookup":
    (needle,) = needles
    assert f'"{example.metadata["asked_key"]}": "{example.answers[0]}"' in needle
    assert json.loads(needle.removeprefix("JSON data: "))[example.metadata["asked_key"]] == (
        example.answers[0])
  elif example.task == "variable_tracking":
    names = example.answers
    value = example.metadata["values"][0]
    chain = [n for n in needles if any(f"VAR {name} =" in n for name in names)]
    assert chain == [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    assert value in example.question


def _check_common_words(example):
  items = re.findall(r"^\d+\. (\w+)$", example.context, flags=re.MULTILINE)
  counts = {word: items.count(word) for word in set(items)}
  common_freq, uncommon_freq = example.metadata["common_freq"], example.metadata["uncommon_freq"]
  assert all(counts[word] == common_freq for word in example.answers)
  assert all(c == uncommon_freq for w, c in counts.items() if w not in example.answers)
  assert len(counts) == len(example.answers) + example.metadata["num_uncommon"]
  assert f" {len(example.answers)} most common" in example.question


def _check_example(example, task, num_tokens, tokenizer, tolerance):
  assert example.task == task
  tokens = ruler_tasks.prompt_num_tokens(tokenizer, example.context, example.question)
  assert tokens == example.metadata["prompt_tokens"]
  assert num_tokens - tolerance <= tokens <= num_tokens
  assert example.context.endswith("\n") and example.answers
  assert all(answer not in example.question for answer in example.answers)
  if task == "common_words":
    _check_common_words(example)
  else:
    _check_needles(example)


@pytest.mark.parametrize("num_tokens", [4096, 16384])
@pytest.mark.parametrize("task", ruler_tasks.TASKS)
def test_llama2_lengths_and_answers(task, num_tokens):
  example = ruler_tasks.make_example(task, num_tokens=num_tokens, tokenizer=LLAMA2, seed=11)
  _check_example(example, task, num_tokens, LLAMA2, _tolerance(num_tokens))


@pytest.mark.parametrize("task", ruler_tasks.TASKS)
def test_tok512_small_length(task):
  num_tokens = 1500
  example = ruler_tasks.make_example(task, num_tokens=num_tokens, tokenizer=TOK512, seed=3,
                                     **SMALL_OPTIONS.get(task, {}))
  # A tok512 sentence is ~100 tokens, so allow one sentence of slack.
  _check_example(example, task, num_tokens, TOK512, tolerance=300)


@pytest.mark.parametrize("task", ruler_tasks.TASKS)
def test_deterministic_for_seed(task):
  make = lambda seed: ruler_tasks.make_example(task, num_tokens=4096, tokenizer=LLAMA2, seed=seed)
  first = make(21)
  assert make(21) == first
  other = make(22)
  assert other.answers != first.answers and other.context != first.context


def test_haystack_depths_vary_with_seed():
  starts, offsets = set(), set()
  for seed in range(6):
    example = ruler_tasks.make_example("single_needle", num_tokens=1024, tokenizer=LLAMA2,
                                       seed=seed)
    starts.add(example.metadata["haystack_start"])
    offsets.add(example.metadata["needle_offsets"][0])
  assert len(starts) == 6 and len(offsets) >= 5


def test_errors():
  with pytest.raises(ValueError, match="unknown task='needle'"):
    ruler_tasks.make_example("needle", num_tokens=4096, tokenizer=LLAMA2, seed=0)
  with pytest.raises(ValueError, match="num_tokens=0 must be positive"):
    ruler_tasks.make_example("kv_lookup", num_tokens=0, tokenizer=LLAMA2, seed=0)
  for task in ruler_tasks.TASKS:
    with pytest.raises(ValueError, match=f"task '{task}': num_tokens=50 is too small"):
      ruler_tasks.make_example(task, num_tokens=50, tokenizer=LLAMA2, seed=0)
  with pytest.raises(ValueError, match="common_freq=3 > uncommon_freq=3"):
    ruler_tasks.make_example("common_words", num_tokens=4096, tokenizer=LLAMA2, seed=0,
                             common_freq=3)


def test_scorers():
  answers = ["1234567", "7654321", "Apple"]
  assert ruler_tasks.ruler_score("The numbers are 1234567 and 7654321; apple.", answers) == 1.0
  assert ruler_tasks.ruler_score("It is 7654321.", answers) == pytest.approx(1 / 3)
  assert ruler_tasks.ruler_score("APPLE, 1234567", answers) == pytest.approx(2 / 3)
  assert ruler_tasks.ruler_score("nothing here", answers) == 0.0
  assert ruler_tasks.string_match_part("It is 7654321.", answers) == 1.0
  assert ruler_tasks.string_match_part("123456", answers) == 0.0
  with pytest.raises(ValueError, match="answers must not be empty"):
    ruler_tasks.ruler_score("x", [])
