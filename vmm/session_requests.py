"""What a request handler on vmm.Machine gets (vmm.runtime.requests; docs/requests.md):
the frozen machine with its kernel, and Op batches that run inside the request's one
freeze; and the built-in "scx-clock" request (vmm.Machine.serve_scx_clock)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from .ops import Op, OpResult
from .runtime.requests import Request, RequestContext

if TYPE_CHECKING:  # the public signatures' types; nothing here runs
    from .kernel import Kernel
    from .kernel.live import LiveKernel
    from .ops.scx import ScxInjection
    from .runtime.watch import Watch, WatchHit


class KernelRequestContext(RequestContext):
    """What a handler registered on vmm.Machine gets: the machine (frozen, unless the
    handler was registered with freeze=False) with its kernel, and Op batches that run
    inside that same freeze (nested freezes join it: no second rendezvous)."""

    def apply(self, batch: "Union[Op, list]") -> OpResult:
        """An Op (any of vmm.ops), or a list of (target, value) pairs: one cold write
        batch. A bad batch is refused whole before any write (vmm.ops)."""
        op = batch if isinstance(batch, Op) else Op.WriteKernelCold(list(batch))
        return self.machine.apply(op)

    def inject_scx_clock(self, cpus: Optional[Iterable[int]] = None,
                         clock: Optional[int] = None) -> "ScxInjection":
        """The scx clock/flag batch on ``cpus`` (default every possible CPU), with its
        read-back (vmm.Machine.inject_scx_clock)."""
        return self.machine.inject_scx_clock(clock=clock, cpus=cpus)

    def read(self, *args: Any, **kwargs: Any) -> Union[int, bytes]:
        """vmm.Machine.read, in this freeze."""
        return self.machine.read(*args, **kwargs)

    @property
    def live(self) -> "LiveKernel":
        """The kernel over the guest's memory, with this freeze's registers."""
        return self.machine.live(self.snapshot)

    @property
    def kernel_image(self) -> "Kernel":
        return self.machine.kernel_image


@dataclass
class WatchContext(KernelRequestContext):
    """What ``on_hit`` of vmm.Machine.watch gets: a request handler's context (apply,
    read, inject_scx_clock, live: all inside the hit's freeze) plus the hit
    (vmm.runtime.watch.WatchHit): ``vcpu`` (index), ``rip``, ``old``/``new`` (data
    watches), ``watch`` (the handle)."""

    hit: "Optional[WatchHit]" = None

    @property
    def vcpu(self) -> Optional[int]:
        return self.hit.vcpu if self.hit else None

    @property
    def rip(self) -> Optional[int]:
        return self.hit.rip if self.hit else None

    @property
    def old(self) -> Optional[int]:
        return self.hit.old if self.hit else None

    @property
    def new(self) -> Optional[int]:
        return self.hit.new if self.hit else None

    @property
    def watch(self) -> "Optional[Watch]":
        return self.hit.watch if self.hit else None


def scx_clock_request(ctx: KernelRequestContext, request: Request) -> str:
    """The built-in "scx-clock" request: ``cpu=N`` (default: every possible CPU) and
    ``clock=N`` (default: the guest's kvm-clock at the freeze); replies
    ``cpus=0,1 clock=N flags=0x9->0x29,... ok=1`` (flags before->after per CPU, the first
    16) after writing and reading back inside the request's freeze."""
    cpus = [request.int_arg("cpu")] if "cpu" in request.kwargs else None
    clock = request.int_arg("clock") if "clock" in request.kwargs else None
    inj = ctx.inject_scx_clock(cpus=cpus, clock=clock)
    rows = inj.rows[:16]
    return (f"cpus={','.join(str(r.cpu) for r in rows)} clock={inj.clock} flags="
            + ",".join(f"{r.flags_before:#x}->{r.flags_after:#x}" for r in rows)
            + f" ok={int(inj.ok)}")
