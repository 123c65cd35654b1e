"""Training a small long-context LLaMA with this project's stack (`experiments/train_llama.py`).

Modules, in the order a training run uses them:
  model_configs      the trained model's `LlamaConfig` (needle-llama-15m) and name lookup
  essay_corpus       the Paul Graham essays tokenised once, split into train / held-out sentences
  retrieval_examples RULER-style retrieval examples built directly from token ids
  curriculum         sequence-length stages with about constant tokens per batch
  data_mixture       deterministic per-step batches (essay text + retrieval), background prefetch
  causal_attention   the training attention function (cuDNN flash attention on GPU)
  optimizer          AdamW with warm-up + cosine decay and gradient clipping
  train_step         the loss, the train state and the jitted bf16 train step
  checkpointing      orbax checkpoints every N steps, resumed after a crash
  metrics_log        metrics as JSON lines, progress with ETA, the loss curve
  needle_eval        greedy needle accuracy at a context length, held-out perplexity
  export             Hugging Face export (bf16 shards) checked by reloading
"""
