"""The README's API example runs as written (from the repository root)."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_readme_api_example_runs(monkeypatch, tmp_path):
  with open(os.path.join(ROOT, "README.md")) as f:
    example = re.search(r"## API in ten lines\n\n```python\n(.*?)```", f.read(), re.S).group(1)
  monkeypatch.chdir(ROOT)
  example = example.replace("/tmp/my_context", str(tmp_path / "ctx"))
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["ctx"].num_tokens == 10 * len(namespace["ids"])
  assert len(namespace["out"].token_ids[0]) > 0
