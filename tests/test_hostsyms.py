"""vmm.runtime.hostsyms: a guest RIP that is an address of the host's own KVM is named
as host state left in the guest (the nested-SVM lane's hang); anything else is not."""

from vmm.runtime.hostsyms import host_symbol, leaked_host_state

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81001000 T start_kernel
ffffffffc0480000 t svm_vcpu_load\t[kvm_amd]
ffffffffc048a0a0 T __svm_vcpu_run\t[kvm_amd]
ffffffffc048a200 t svm_vcpu_put\t[kvm_amd]
ffffffffc0600000 t ext4_fill_super\t[ext4]
"""


def _kallsyms(tmp_path, text=KALLSYMS):
    path = tmp_path / "kallsyms"
    path.write_text(text)
    return str(path)


def test_a_rip_in_the_hosts_kvm_is_named_as_leaked_host_state(tmp_path):
    path = _kallsyms(tmp_path)
    assert host_symbol(0xFFFFFFFFC048A13C, path) == ("__svm_vcpu_run", "kvm_amd", 0x9C)
    why = leaked_host_state(0xFFFFFFFFC048A13C, path)
    assert "__svm_vcpu_run+0x9c [kvm_amd]" in why and "host" in why


def test_other_addresses_are_not_blamed_on_the_host(tmp_path):
    path = _kallsyms(tmp_path)
    assert leaked_host_state(0xFFFFFFFF81001010, path) is None  # the host's core kernel
    assert leaked_host_state(0xFFFFFFFFC0600010, path) is None  # another host module
    assert leaked_host_state(0x401000, path) is None  # user space: never looked up
    assert host_symbol(0xFFFFFFFFC0700000, path) is None  # too far from any symbol


def test_hidden_or_missing_kallsyms_names_nothing(tmp_path):
    # What a user without root reads: every address zero.
    hidden = _kallsyms(tmp_path, "".join("0" * 16 + line[16:] + "\n"
                                         for line in KALLSYMS.splitlines()))
    assert leaked_host_state(0xFFFFFFFFC048A13C, hidden) is None
    assert leaked_host_state(0xFFFFFFFFC048A13C, str(tmp_path / "absent")) is None
