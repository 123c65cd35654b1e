"""Loads a LLaMA checkpoint of either supported format, chosen by the path."""

from __future__ import annotations

import pathlib

from models.llama.config import LlamaConfig
from models.llama.model import Llama
from models.llama.weights_hf import CONFIG_FILE, load_hf_checkpoint
from models.llama.weights_llama2c import load_llama2c_checkpoint


def load_checkpoint(path: str | pathlib.Path, **kwargs) -> tuple[Llama, LlamaConfig]:
  """A `.bin` file -> llama2.c loader; a directory with config.json -> Hugging Face loader.

  kwargs (dtype, param_dtype) go to the chosen loader.
  """
  path = pathlib.Path(path)
  if path.is_file() and path.suffix == ".bin":
    return load_llama2c_checkpoint(path, **kwargs)
  if path.is_dir() and (path / CONFIG_FILE).is_file():
    return load_hf_checkpoint(path, **kwargs)
  raise ValueError(f"cannot tell the checkpoint format of {path}: expected a llama2.c .bin file "
                   f"or a Hugging Face directory with {CONFIG_FILE}")
