#!/bin/busybox sh
# /init of vmm's guest job (vmm/machine/guestjob.py): set up a minimal user space, run
# the job (/vmm/job) through busybox sh -c with the console as its stdio, print its
# exit status as the console's last line, then reboot (reboot=k: the i8042 reset ends
# the VM).  The host reads the status from that line (docs/CONTRACTS.md "Guest job").
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "vmm-job: start"
/bin/sh -c "$(cat /vmm/job)"
rc=$?
printf '\nvmm-job: exit %d\n' "$rc"
sync
reboot -f
# reboot should not return; if it does, init exits and the kernel panics (panic=-1).
sleep 1
exit "$rc"
