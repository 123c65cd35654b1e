"""LongBench prompts split into a fixed context and a user input; chat wrapping; middle truncation.

The fixed context is everything the prompt holds before the question: instruction, document and
repeated instruction. The user input is the question and the answer cue (ALGORITHM.md, "LongBench
setup"). Every English LongBench template puts its question after the document, so a split never
reorders text: `fixed + user == full prompt`, always.

Templates are LongBench's official `dataset2prompt` (English tasks, verbatim, typos included).
Each is cut at the start of its user part (`USER_PART_START`): e.g. hotpotqa's fixed part ends with
"...do not output any other words.\\n\\n" and its user part is "Question: {input}\\nAnswer:".
Summarisation tasks and passage_count have no question: their user input is the answer cue
("Summary:", "The final answer is: "), the repeated instruction staying in the fixed context.

MiniLongBench examples hold an already built `origin_prompt` (OpenCompass's wording, which differs
from the official one in places); it is cut at the last occurrence of the task's
`BUILT_PROMPT_MARKER` (e.g. "Question:"). For repobench-p that marker is "Next line of code:",
so the code being completed stays in the fixed context there (the official split puts it in the
user input).

Token ids: the fixed context is encoded with BOS, the user input without it and appended, as the
online phase places it. A prompt over `max_length` tokens loses the middle of its fixed context
(LongBench's middle truncation: the first max_length // 2 tokens and the last ones are kept), so
the user input always survives whole.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # longbench_data imports `datasets`, which RULER-only machines may lack.
  from squeezed_jax.eval.longbench_data import LongBenchExample

_QA_INSTRUCTION = ("Answer the question based on the given passages. Only give me the answer and "
                   "do not output any other words.")
_QASPER_INSTRUCTION = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. "
    "If the question cannot be answered based on the information in the article, write "
    "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
    "\"unanswerable\". Do not provide any explanation.")
_MULTI_HOP = (f"{_QA_INSTRUCTION}\n\nThe following are given passages.\n{{context}}\n\n"
              f"{_QA_INSTRUCTION}\n\nQuestion: {{input}}\nAnswer:")

LONGBENCH_TEMPLATES: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
        "story asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": (
        f"You are given a scientific article and a question. {_QASPER_INSTRUCTION}\n\nArticle: "
        f"{{context}}\n\n Answer the question based on the above article as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based "
        "on the information in the article, write \"unanswerable\". If the question is a yes/no "
        "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation."
        "\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": _MULTI_HOP,
    "2wikimqa": _MULTI_HOP,
    "musique": _MULTI_HOP,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report."
        "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
        "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}"
        "\nAnswer:"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "trec": ("Please determine the type of the question below. Here are some examples of "
             "questions.\n\n{context}\n{input}"),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do "
                 "not output any other words. The following are some examples.\n\n{context}\n\n"
                 "{input}"),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some "
               "examples.\n\n{context}\n\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
        "removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
        "and so on.\n\nThe final answer is: "),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
        "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The "
        "answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# Where each template's user part starts (its first occurrence after {context}).
USER_PART_START: dict[str, str] = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa",
                     "musique"), "Question: {input}"),
    "qmsum": "Query: {input}",
    "gov_report": "Summary:",
    "multi_news": "Summary:",
    "passage_count": "The final answer is: ",
    "passage_retrieval_en": "The following is an abstract.",
    "trec": "{input}",
    "triviaqa": "{input}",
    "samsum": "{input}",
    "lcc": "Next line of code:",
    "repobench-p": "{input}Next line of code:",
}

# Where a built (MiniLongBench) prompt's user input starts: the last occurrence of this text.
BUILT_PROMPT_MARKER: dict[str, str] = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa",
                     "musique", "trec"), "Question:"),
    "qmsum": "Query:",
    "gov_report": "Summary:",
    "multi_news": "Summary:",
    "passage_count": "The final answer is:",
    "passage_retrieval_en": "The following is an abstract.",
    "triviaqa": "Passage:",
    "samsum": "Dialogue:",
    "lcc": "Next line of code:",
    "repobench-p": "Next line of code:",
}

# LongBench's `dataset2maxlen`: greedy decoding stops after this many new tokens.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64,
    "repobench-p": 64,
}

# Few-shot and code tasks are never chat-wrapped (LongBench's pred.py).
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})

# (prefix, suffix) around a prompt, by model family: LongBench's `build_chat` wordings.
CHAT_TEMPLATES: dict[str, tuple[str, str]] = {
    "none": ("", ""),
    "llama2_chat": ("[INST]", "[/INST]"),
    "vicuna": ("A chat between a curious user and an artificial intelligence assistant. The "
               "assistant gives helpful, detailed, and polite answers to the user's questions. "
               "USER: ", " ASSISTANT:"),
}


class Encoder(Protocol):
  """What prompt encoding needs from a tokenizer."""

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text`, with BOS first if `bos`."""
    ...


@dataclasses.dataclass(frozen=True)
class PromptSplit:
  """A prompt as its fixed context (text before the question) and user input (the rest)."""

  fixed: str
  user: str

  @property
  def full(self) -> str:
    return self.fixed + self.user


@dataclasses.dataclass(frozen=True)
class PromptIds:
  """A prompt's token ids: `context` (with BOS, prefilled once) and `question` (appended)."""

  context: list[int]
  question: list[int]


def _check_task(task: str) -> None:
  if task not in LONGBENCH_TEMPLATES:
    raise ValueError(f"no prompt template for LongBench {task=}; expected one of "
                     f"{sorted(LONGBENCH_TEMPLATES)}")


def split_template(task: str) -> tuple[str, str]:
  """(fixed template with {context}, user template) of `task`, concatenating to the official one."""
  _check_task(task)
  template = LONGBENCH_TEMPLATES[task]
  start = template.find(USER_PART_START[task], template.index("{context}"))
  return template[:start], template[start:]


def split_built_prompt(task: str, prompt: str) -> PromptSplit:
  """Cuts an already built prompt at the last occurrence of the task's `BUILT_PROMPT_MARKER`."""
  _check_task(task)
  marker = BUILT_PROMPT_MARKER[task]
  start = prompt.rfind(marker)
  if start <= 0:
    raise ValueError(f"{task=}: the built prompt has no {marker=} after its start, so its user "
                     f"input cannot be found (prompt ends with {prompt[-200:]!r})")
  return PromptSplit(prompt[:start], prompt[start:])


def longbench_prompt(example: LongBenchExample) -> PromptSplit:
  """The split prompt of a LongBench example (official fields or a MiniLongBench built prompt)."""
  if example.origin_prompt is not None:
    return split_built_prompt(example.task, example.origin_prompt)
  fixed, user = split_template(example.task)
  return PromptSplit(fixed.format(context=example.context),
                     user.format(input=example.input or ""))


def apply_chat_template(prompt: PromptSplit, task: str, chat_template: str) -> PromptSplit:
  """Wraps `prompt` in a model family's chat turn: the prefix joins the fixed context, the
  suffix the user input. Tasks in NO_CHAT_TASKS are left as they are."""
  if chat_template not in CHAT_TEMPLATES:
    raise ValueError(f"unknown {chat_template=}; expected one of {sorted(CHAT_TEMPLATES)}")
  if task in NO_CHAT_TASKS:
    return prompt
  prefix, suffix = CHAT_TEMPLATES[chat_template]
  return PromptSplit(prefix + prompt.fixed, prompt.user + suffix)


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
  """`ids` if they fit, else their first max_length // 2 and last max_length - max_length // 2."""
  if max_length < 2:
    raise ValueError(f"{max_length=} must be >= 2")
  if len(ids) <= max_length:
    return list(ids)
  head = max_length // 2
  return ids[:head] + ids[len(ids) - (max_length - head):]


def encode_prompt(tokenizer: Encoder, prompt: PromptSplit, max_length: int) -> PromptIds:
  """Token ids of `prompt`, at most `max_length` in all, cut in the middle as LongBench does.

  The whole prompt is middle-truncated (`truncate_middle`); the kept tail must hold the whole user
  input, so the cut always falls inside the fixed context.
  """
  context = tokenizer.encode(prompt.fixed, bos=True)
  question = tokenizer.encode(prompt.user, bos=False)
  tail = max_length - max_length // 2
  if len(context) + len(question) > max_length and len(question) > tail:
    raise ValueError(f"the user input takes {len(question)} tokens, more than the {tail} that "
                     f"middle truncation to {max_length=} keeps at the end")
  kept = truncate_middle(context + question, max_length)
  return PromptIds(kept[:len(kept) - len(question)], question)
