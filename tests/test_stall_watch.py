"""StallWatch (vmm/runtime/stall_watch.py) over a scripted monitor: which stalls are new,
and what it keeps."""

import threading

from vmm.runtime.monitor import Stall
from vmm.runtime.stall_watch import MAX_REPORTS, StallWatch


class ScriptedMonitor:
    """A monitor whose stalls() answers come from a list, one per call."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.active, self.ended = True, None
        self.done = threading.Event()

    def stalls(self, window_s, min_cpu_fraction, tasks=True):
        if not self.answers:
            self.done.set()
            return []
        return self.answers.pop(0)

    def stop(self):
        pass


def stall(cpu, start, end):
    return Stall(cpu, start, end, 1, None, 7, 0.5, 10)


def run(answers):
    mon = ScriptedMonitor(answers)
    captured = []
    sw = StallWatch(mon, lambda new: captured.append([(s.cpu, s.start) for s in new]) or len(captured),
                    window_s=1.0, interval=0.001)
    with sw.start():
        assert mon.done.wait(10)
    return sw, captured


def test_a_stall_that_goes_on_is_reported_once_even_when_its_start_slides():
    # CPU 1 stalls from t=1; the monitor's kept samples then drop the oldest, so the
    # same stall comes back with a later start each time (clipped to the first sample
    # kept); after a gap a second stall begins on CPU 1, and CPU 0 stalls once.
    sw, captured = run([
        [stall(1, 1.0, 2.0)],
        [stall(1, 1.5, 2.5)],
        [stall(1, 2.4, 3.0)],
        [stall(1, 5.0, 6.0), stall(0, 2.0, 6.0)],
        [stall(1, 5.5, 6.5), stall(0, 2.0, 6.5)],
    ])
    assert captured == [[(1, 1.0)], [(1, 5.0), (0, 2.0)]]
    assert len(sw.reports) == 2 and sw.dropped_reports == 0


def test_reports_kept_are_bounded():
    answers = [[stall(0, 10.0 * i, 10.0 * i + 1)] for i in range(MAX_REPORTS + 5)]
    sw, captured = run(answers)
    assert len(captured) == MAX_REPORTS + 5
    assert len(sw.reports) == MAX_REPORTS and sw.dropped_reports == 5
    assert sw.report == 1  # the first one stays
