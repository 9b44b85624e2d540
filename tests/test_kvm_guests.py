"""Our tiny hand-assembled guests (tests/tinyvm.py) run on real KVM."""

from __future__ import annotations

import pytest

from tinyvm import COUNT, USER_COUNT, RecordingHandler, TinyVm, wait_until

pytestmark = pytest.mark.kvm


def test_real_mode_counter_guest_runs():
    with TinyVm(COUNT) as g:
        g.start(RecordingHandler())
        assert wait_until(lambda: g.counter(0) > 100)


def test_ring3_counter_guest_runs():
    with TinyVm(USER_COUNT, user=True) as g:
        h = RecordingHandler()
        g.start(h)
        ok = wait_until(lambda: g.counter(0) > 1000 or h.stops, timeout=5)
        assert not h.stops, h.stops
        assert ok
