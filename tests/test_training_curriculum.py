"""Tests of `squeezed_jax.training.curriculum`."""

from __future__ import annotations

import pytest

from squeezed_jax.training.curriculum import Curriculum, Stage


def test_stages_cover_the_steps_in_order():
  curriculum = Curriculum.from_fractions([1024, 2048, 4096, 8192], [0.3, 0.25, 0.25, 0.2],
                                         tokens_per_batch=65536, total_steps=1000)
  assert curriculum.stages == (Stage(1024, 64, 0, 300), Stage(2048, 32, 300, 550),
                               Stage(4096, 16, 550, 800), Stage(8192, 8, 800, 1000))
  assert curriculum.total_steps == 1000
  assert curriculum.stage_at(0).seq_len == 1024
  assert curriculum.stage_at(299).seq_len == 1024
  assert curriculum.stage_at(300).seq_len == 2048
  assert curriculum.stage_at(999).seq_len == 8192
  with pytest.raises(ValueError, match="step=1000 is outside"):
    curriculum.stage_at(1000)


def test_every_stage_gets_a_step():
  curriculum = Curriculum.from_fractions([64, 128, 256], [100.0, 0.001, 0.001],
                                         tokens_per_batch=256, total_steps=3)
  assert [(s.first_step, s.end_step) for s in curriculum.stages] == [(0, 1), (1, 2), (2, 3)]
  assert [s.batch_size for s in curriculum.stages] == [4, 2, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_lens=[64], fractions=[1, 1]), "one fraction per"),
    (dict(seq_lens=[64, 128], fractions=[1, 0]), "must be positive"),
    (dict(seq_lens=[64, 128], fractions=[1, 1], total_steps=1), "total_steps=1"),
    (dict(seq_lens=[64, 1024], fractions=[1, 1], tokens_per_batch=512), "tokens_per_batch=512"),
])
def test_errors(kwargs, message):
  kwargs = dict(dict(tokens_per_batch=1024, total_steps=10), **kwargs)
  with pytest.raises(ValueError, match=message):
    Curriculum.from_fractions(kwargs.pop("seq_lens"), kwargs.pop("fractions"), **kwargs)
