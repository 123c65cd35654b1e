"""Tests for experiments.cli_reference: docs/cli.md is current, and flags are described faithfully."""

from __future__ import annotations

import os
import textwrap

import pytest

from experiments import cli_reference


@pytest.fixture(scope="module")
def descriptions():
  return cli_reference.launcher_descriptions(cli_reference.launcher_modules())


def test_docs_cli_md_is_current(descriptions):
  with open(cli_reference.CLI_DOC, encoding="utf-8") as f:
    committed = f.read()
  assert committed == cli_reference.render(descriptions), (
      f"docs/cli.md is stale: run `{cli_reference.REGENERATE}` from the repository root")


def test_every_module_that_defines_flags_is_described(descriptions):
  described = {d["module"] for d in descriptions}
  for module_name in cli_reference.launcher_modules():
    path = os.path.join(cli_reference.EXPERIMENTS_DIR, module_name.split(".")[-1] + ".py")
    with open(path, encoding="utf-8") as f:
      source = f.read()
    defines_flags = "flags.DEFINE_" in source and "def main(" in source
    assert (module_name in described) == defines_flags, module_name
  for module_name in ("experiments.build_context", "experiments.generate"):
    assert module_name in described


def test_synthetic_launchers_are_described_and_rendered(tmp_path):
  package = tmp_path / "fake_launchers"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "tool.py").write_text(textwrap.dedent('''\
      """A tool.

        python -m fake_launchers.tool --input=x
      """
      from absl import app, flags

      _INPUT = flags.DEFINE_string("input", None, "The input | a file.", required=True)
      _MODE = flags.DEFINE_enum("mode", "fast", ["fast", "slow"], "How to run.")
      _SIZES = flags.DEFINE_list("sizes", ["1", "2"], "Sizes <N>.")
      _VERBOSE = flags.DEFINE_bool("verbose", False, "Say more.")
      _RATE = flags.DEFINE_float("rate", None, "A rate.")


      def main(argv):
        raise AssertionError("main must not run")


      if __name__ == "__main__":
        app.run(main)
      '''))
  (package / "shared_flags.py").write_text(
      "from absl import flags\n_X = flags.DEFINE_integer('input', 3, 'Same name, no main.')\n")
  (package / "plain.py").write_text("def main():\n  pass\n")
  modules = cli_reference.launcher_modules(str(package), "fake_launchers")
  assert modules == ["fake_launchers.plain", "fake_launchers.shared_flags", "fake_launchers.tool"]
  descriptions = cli_reference.launcher_descriptions(modules, extra_path=str(tmp_path))
  assert [d["module"] for d in descriptions] == ["fake_launchers.tool"]
  [tool] = descriptions
  assert tool["doc"].startswith("A tool.")
  assert [f["name"] for f in tool["flags"]] == ["input", "mode", "sizes", "verbose", "rate"]
  assert [f["required"] for f in tool["flags"]] == [True, False, False, False, False]
  text = cli_reference.render(descriptions)
  assert "## python -m fake_launchers.tool" in text
  assert "| [`fake_launchers.tool`](#python--m-fake_launcherstool) | 5 |" in text
  assert "| `--input` | string | **required** | The input \\| a file. |" in text
  assert "| `--mode` | one of `fast`, `slow` | `fast` | How to run. |" in text
  assert "| `--sizes` | comma separated list of strings | `1,2` | Sizes &lt;N&gt;. |" in text
  assert "| `--verbose` | bool | `false` | Say more. |" in text
  assert "| `--rate` | float |  | A rate. |" in text


def test_a_launcher_that_fails_to_import_is_named(tmp_path):
  package = tmp_path / "broken_launchers"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "bad.py").write_text("raise ImportError('no such dependency')\n")
  with pytest.raises(RuntimeError, match="importing broken_launchers.bad failed"):
    cli_reference.launcher_descriptions(["broken_launchers.bad"], extra_path=str(tmp_path))
