"""Replays the fuzzing seed corpus and every input a fuzzing run found
(fuzz/corpus/<target>/, fuzz/regressions/<target>/) through its target: each must end in
a return or a VmmError, quickly. `make fuzz` runs the targets themselves (fuzz/run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fuzz.targets import TARGETS, run_one  # noqa: E402

CASES = [(p.parent.name, p) for kind in ("corpus", "regressions")
         for p in sorted((REPO / "fuzz" / kind).glob("*/*")) if p.is_file()]


def test_every_target_has_a_seed():
    have = {t for t, _ in CASES}
    assert have >= set(TARGETS), f"targets without a seed: {set(TARGETS) - have}"


@pytest.mark.parametrize("target, path", CASES, ids=[f"{t}/{p.parent.parent.name}/{p.name}"
                                                     for t, p in CASES])
def test_replay(target, path):
    assert target in TARGETS, f"{path}: no fuzzing target named {target!r}"
    run_one(target, path.read_bytes())
