"""What every test module shares: the one /dev/kvm rule and machines stopped for you.

- A test (or module) marked ``pytest.mark.kvm`` is skipped when /dev/kvm cannot be
  opened for reading and writing by this user (missing, or no permission: os.access,
  so a non-root user outside the kvm group skips too instead of failing). It is the
  only such rule; guest_abi.kvm_problem() goes further (it opens KVM) for the tests
  that need a working KVM, not only the device.
- ``started``: a fixture that starts a Machine and stops it when the test ends, pass
  or fail (the boot, try, finally: stop() the guest tests repeated).

Helpers the test modules share live in plain modules beside them (guest_abi, tinyvm,
fake_resolver, page_tables, pahole_text); the synthetic kernel images come from
fuzz.synthetic_images, which also makes the fuzz seeds. Test modules do not import
one another.
"""

from __future__ import annotations

import os

import pytest

KVM_DEVICE = "/dev/kvm"


def kvm_missing() -> str | None:
    """None when this user can open /dev/kvm read-write, else why not."""
    if not os.path.exists(KVM_DEVICE):
        return f"needs {KVM_DEVICE} (not present on this host)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"needs {KVM_DEVICE} read-write (this user may not open it: join the kvm group)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") is not None:
        why = kvm_missing()
        if why:
            pytest.skip(why)


@pytest.fixture
def started():
    """``started(machine)`` starts the machine and returns it; every machine started so
    is stopped when the test ends."""
    machines = []

    def start(machine):
        machines.append(machine)
        machine.start()
        return machine

    yield start
    for machine in reversed(machines):
        machine.stop()
