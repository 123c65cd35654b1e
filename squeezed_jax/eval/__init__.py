"""Evaluation harness: LongBench data loading (`longbench_data`) and its official-equivalent scorer
(`longbench_metrics`)."""
