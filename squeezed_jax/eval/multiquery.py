"""Many questions per fixed context: the setting Squeezed Attention exists for (cf. PreFixQA).

One essay haystack holds `num_questions` magic-number needles with distinct keys (RULER's
multi-key needle task with that many keys); each key is asked once, all questions against the one
fixed context built once. With `sweep.Sweep`, the questions of a context are answered in one
batched `generate` call per setting: a record's `seconds` is then the call's time divided by the
number of questions (amortised per question), and `build_seconds` the one offline build, shown
apart. Accuracy is RULER's string match (x100), averaged over questions.

The context is padded to exactly `num_tokens - question_tokens` tokens (`ruler_prompts`), so
contexts of a length share one compiled build; questions are asked as they are (a fixed question
prefill chunk keeps their compiled shape).
"""

from __future__ import annotations

import re

from squeezed_jax.eval import ruler_tasks
from squeezed_jax.eval.haystack import TextTokenizer
from squeezed_jax.eval.ruler_prompts import padded_context_ids
from squeezed_jax.eval.sweep import EvalExample

TASK = "multiquery"
MAX_NEW_TOKENS = 32
# `ruler_tasks.magic_number_needle`'s sentence, read back.
_NEEDLE = re.compile(r"The special magic number for (\S+) is (\d+)\.")


def multiquery_example(tokenizer: TextTokenizer, *, example_id: str, num_tokens: int,
                       num_questions: int, seed: int, question_tokens: int = 128,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> EvalExample:
  """A context of num_tokens - question_tokens ids with `num_questions` needles, each asked once.

  Every question is at most `question_tokens` ids, so context + question <= `num_tokens`.
  """
  context_tokens = num_tokens - question_tokens
  example = ruler_tasks.make_example("multi_key_needle", num_tokens=context_tokens,
                                     tokenizer=tokenizer, seed=seed, num_keys=num_questions)
  value_of = dict(_NEEDLE.fullmatch(n).groups() for n in example.metadata["needles"])
  questions, answers = [], []
  for key in example.metadata["keys"]:
    question = tokenizer.encode(ruler_tasks.magic_number_question(key), bos=False)
    if len(question) > question_tokens:
      raise ValueError(f"a multiquery question has {len(question)} tokens, more than "
                       f"{question_tokens=}")
    questions.append(question)
    answers.append([value_of[key]])
  return EvalExample(id=example_id, task=TASK, length=num_tokens,
                     context=padded_context_ids(tokenizer, example, context_tokens),
                     questions=questions, answers=answers, max_new_tokens=max_new_tokens)
