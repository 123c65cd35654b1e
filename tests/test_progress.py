"""Tests for squeezed_jax.progress: a bar with an ETA for several steps, none for one or when off."""

from __future__ import annotations

import pytest

from squeezed_jax.progress import ENV_VAR, enabled, progress


def test_several_steps_draw_a_bar_with_rate_and_eta(capsys, monkeypatch):
  monkeypatch.delenv(ENV_VAR, raising=False)
  assert list(progress(range(3), desc="clustering", unit="layer")) == [0, 1, 2]
  drawn = capsys.readouterr().err
  assert "clustering: 100%" in drawn and "3/3" in drawn
  assert "layer/s" in drawn or "s/layer" in drawn  # the rate
  assert "<" in drawn  # elapsed<remaining: the ETA


def test_a_single_step_draws_nothing(capsys, monkeypatch):
  monkeypatch.delenv(ENV_VAR, raising=False)
  assert list(progress(["only"], desc="context prefill", unit="chunk")) == ["only"]
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), (" False ", False),
                                             ("1", True), ("yes", True)])
def test_the_environment_variable_switches_bars(capsys, monkeypatch, value, expected):
  monkeypatch.setenv(ENV_VAR, value)
  assert enabled() is expected
  assert list(progress(range(4), desc="sweep", unit="example")) == [0, 1, 2, 3]
  assert ("sweep" in capsys.readouterr().err) is expected
