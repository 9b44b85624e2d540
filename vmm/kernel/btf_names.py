"""C-like spellings of BTF types ('struct rq', 'int[4]', 'void (*)(int)'): the Btf
class's naming half (a mixin; Btf supplies get() and resolve())."""

from __future__ import annotations

from vmm.kernel.btf_types import (ARRAY, CONST, ENUM, ENUM64, FUNC_PROTO, FWD, NAME_BUDGET, PTR,
                                  RESTRICT, STRUCT, TYPE_TAG, UNION, VOLATILE, Type, _enter)


class TypeNames:
    """type_name() and the function-prototype spelling, cycle-safe and bounded."""

    def type_name(self, t: Type | int, _depth: int = 0) -> str:
        """C-like spelling: 'struct rq', 'u64', 'struct task_struct *', 'int[4]'.

        Cycle-safe and bounded: a type that refers back to itself (only corrupt BTF can)
        is an ImageError naming it; a spelling that would visit more than NAME_BUDGET
        types (a hostile graph of function pointers) is cut short with '...'."""
        return self._type_name(t, [], [NAME_BUDGET])

    def _type_name(self, t: Type | int, stack: list[int], budget: list[int]) -> str:
        if isinstance(t, int):
            t = self.get(t)
        k = t.kind
        if k == 0:
            return "void"
        if k in (STRUCT, UNION):
            return f"{t.kind_name} {t.name}" if t.name else f"{t.kind_name} {{...}}"
        if k in (ENUM, ENUM64):
            return f"enum {t.name}" if t.name else "enum {...}"
        if k == FWD:
            return f"{'union' if t.kind_flag else 'struct'} {t.name}"
        if k not in (PTR, CONST, VOLATILE, RESTRICT, TYPE_TAG, ARRAY, FUNC_PROTO):
            return t.name or t.kind_name
        budget[0] -= 1
        if budget[0] < 0:
            return "..."
        if k == FUNC_PROTO:
            return self._proto_name(t, "", 0, stack, budget)
        _enter(stack, t, "naming it")
        try:
            if k == PTR:
                target = self.get(t.ref)
                if self.resolve(target).kind == FUNC_PROTO:
                    return self._proto_name(self.resolve(target), "(*)", 0, stack, budget)
                return self._type_name(target, stack, budget) + " *"
            if k in (CONST, VOLATILE, RESTRICT):
                return f"{t.kind_name} {self._type_name(t.ref, stack, budget)}"
            if k == TYPE_TAG:
                return self._type_name(t.ref, stack, budget)
            return f"{self._type_name(t.elem_type, stack, budget)}[{t.nelems}]"  # ARRAY
        finally:
            stack.pop()

    def _proto_name(self, t: Type, inner: str, depth: int = 0, stack: list[int] | None = None,
                    budget: list[int] | None = None) -> str:
        stack = [] if stack is None else stack
        budget = [NAME_BUDGET] if budget is None else budget
        _enter(stack, t, "naming it")
        try:
            args = ", ".join(self._type_name(p.type_id, stack, budget) if p.type_id else "..."
                             for p in t.params) or "void"
            return f"{self._type_name(t.ref, stack, budget)} {inner}({args})"
        finally:
            stack.pop()
