"""Evaluation harness.

Data and scoring: `longbench_data` (LongBench / MiniLongBench loading), `longbench_metrics` (the
official-equivalent scorer), `haystack` and `ruler_tasks` (RULER-style synthetic tasks on the essay
haystack), `prompt_templates` (per-task templates split into fixed context and user input, middle
truncation, chat templates), `ruler_prompts` (fixed-shape RULER prompts). Running: `multiquery`
(many questions per context), `benchmark_runs` (examples per benchmark), `sweep` (method x budget x
example), `results_io` (resumable per-task jsonl), `sweep_report` (CSV, markdown, plot).
"""
