"""Tests of the LongBench prompt split, chat wrapping and middle truncation (`prompt_templates`)."""

from __future__ import annotations

import os
import random
import string

import pytest

from models.llama.tokenizer import load_tokenizer
from squeezed_jax.eval import prompt_templates as pt
from squeezed_jax.eval.longbench_data import LongBenchExample, load_longbench

MINI_DIR = os.path.join(os.path.dirname(__file__), "data", "longbench_mini")
MINI_TASKS = sorted(name[:-len(".json")] for name in os.listdir(MINI_DIR)
                    if name.endswith(".json"))
TOK512 = load_tokenizer("assets/stories260K/tok512.bin")


def _random_text(rng: random.Random, length: int) -> str:
  return "".join(rng.choice(string.ascii_letters + " .\n") for _ in range(length))


@pytest.mark.parametrize("task", sorted(pt.LONGBENCH_TEMPLATES))
def test_split_round_trips_to_the_official_prompt(task):
  rng = random.Random(task)
  context, question = _random_text(rng, 300), _random_text(rng, 40)
  example = LongBenchExample(task=task, context=context, input=question, answers=["x"],
                             all_classes=None, length=1, id="0")
  prompt = pt.longbench_prompt(example)
  assert prompt.full == pt.LONGBENCH_TEMPLATES[task].format(context=context, input=question)
  assert context in prompt.fixed and context not in prompt.user
  fixed_template, user_template = pt.split_template(task)
  assert fixed_template + user_template == pt.LONGBENCH_TEMPLATES[task]
  assert "{input}" not in fixed_template and "{context}" not in user_template
  if "{input}" in pt.LONGBENCH_TEMPLATES[task]:
    assert question in prompt.user and question not in prompt.fixed
  assert prompt.user.startswith(user_template.split("{input}")[0])


def test_split_places_the_question_after_the_repeated_instruction():
  fixed, user = pt.split_template("hotpotqa")
  assert fixed.endswith("do not output any other words.\n\n") and fixed.count(
      "Answer the question based on the given passages.") == 2
  assert user == "Question: {input}\nAnswer:"
  fixed, user = pt.split_template("gov_report")
  assert fixed.endswith("Now, write a one-page summary of the report.\n\n") and user == "Summary:"
  assert pt.split_template("repobench-p")[1] == "{input}Next line of code:\n"


@pytest.mark.parametrize("task", MINI_TASKS)
def test_built_minilongbench_prompts_split_at_their_question(task):
  examples = load_longbench(task, source=MINI_DIR)
  for example in examples:
    prompt = pt.longbench_prompt(example)
    assert prompt.full == example.origin_prompt
    assert prompt.user.startswith(pt.BUILT_PROMPT_MARKER[task])
    assert pt.BUILT_PROMPT_MARKER[task] not in prompt.user[1:]
    assert len(prompt.fixed) > 10 * len(prompt.user)


def test_built_prompt_without_marker_is_an_error():
  with pytest.raises(ValueError, match="marker='Question:'"):
    pt.split_built_prompt("hotpotqa", "Passages only, and no question at all.")
  with pytest.raises(ValueError, match="no prompt template"):
    pt.split_template("dureader")


def test_chat_template_wraps_the_turn_around_both_parts():
  prompt = pt.PromptSplit("Instruction and document.\n\n", "Question: why?\nAnswer:")
  wrapped = pt.apply_chat_template(prompt, "hotpotqa", "llama2_chat")
  assert wrapped.full == "[INST]" + prompt.full + "[/INST]"
  assert wrapped.fixed.startswith("[INST]") and wrapped.user.endswith("[/INST]")
  vicuna = pt.apply_chat_template(prompt, "qasper", "vicuna")
  assert vicuna.fixed.endswith(prompt.fixed) and vicuna.user == prompt.user + " ASSISTANT:"
  assert pt.apply_chat_template(prompt, "trec", "llama2_chat") == prompt
  assert pt.apply_chat_template(prompt, "hotpotqa", "none") == prompt
  with pytest.raises(ValueError, match="unknown chat_template='chatml'"):
    pt.apply_chat_template(prompt, "hotpotqa", "chatml")


def test_truncate_middle_keeps_the_first_and_last_halves():
  ids = list(range(100, 111))  # 11 ids
  assert pt.truncate_middle(ids, 11) == ids
  assert pt.truncate_middle(ids, 6) == [100, 101, 102, 108, 109, 110]
  assert pt.truncate_middle(ids, 5) == [100, 101, 108, 109, 110]
  with pytest.raises(ValueError, match="max_length=1"):
    pt.truncate_middle(ids, 1)


def test_encode_prompt_cuts_inside_the_fixed_context():
  rng = random.Random(0)
  prompt = pt.PromptSplit(_random_text(rng, 2000), "Question: what is it?\nAnswer:")
  context = TOK512.encode(prompt.fixed, bos=True)
  question = TOK512.encode(prompt.user, bos=False)
  whole = pt.encode_prompt(TOK512, prompt, max_length=len(context) + len(question))
  assert (whole.context, whole.question) == (context, question)
  cut = pt.encode_prompt(TOK512, prompt, max_length=301)
  assert cut.question == question and len(cut.context) + len(cut.question) == 301
  assert cut.context[:150] == context[:150]
  assert cut.context[150:] == context[len(context) - (151 - len(question)):]
  with pytest.raises(ValueError, match="more than the 6 that middle truncation"):
    pt.encode_prompt(TOK512, prompt, max_length=12)
