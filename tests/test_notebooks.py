"""Tests for notebooks/: the committed notebooks are what build_notebooks.py writes, the quickstart
runs top to bottom on a CPU (nbclient, kernel python3) and draws its plots, and every code cell of
the GPU notebook (which needs a GPU to run) at least compiles."""

from __future__ import annotations

import ast
import importlib.util
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks")
REGENERATE = "python notebooks/build_notebooks.py"


def _load_builder():
  spec = importlib.util.spec_from_file_location(
      "build_notebooks", os.path.join(NOTEBOOKS_DIR, "build_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


BUILDER = _load_builder()


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)


@pytest.mark.parametrize("name", sorted(BUILDER.NOTEBOOKS))
def test_committed_notebook_is_generated_and_cleared(name):
  with open(os.path.join(NOTEBOOKS_DIR, name), encoding="utf-8") as f:
    committed = f.read()
  assert committed == BUILDER.render(name), f"notebooks/{name} is stale: run `{REGENERATE}`"
  notebook = _read(name)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.id


@pytest.mark.parametrize("name", sorted(BUILDER.NOTEBOOKS))
def test_every_code_cell_compiles(name):
  for cell in _read(name).cells:
    if cell.cell_type == "code":
      ast.parse(cell.source, filename=f"{name}:{cell.id}")


def test_quickstart_runs_on_cpu_and_draws_its_plots():
  notebook = _read("quickstart.ipynb")
  client = NotebookClient(notebook, kernel_name="python3", timeout=600,
                          resources={"metadata": {"path": NOTEBOOKS_DIR}})
  client.execute(env={**os.environ, "JAX_PLATFORMS": "cpu"})  # raises on any cell's error
  outputs = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # KV budget per head, selected keys, mass vs budget
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "saved and reloaded the fixed context:" in text
  assert "squeezed (KV budget" in text and "dense    (KV budget 1.00" in text
