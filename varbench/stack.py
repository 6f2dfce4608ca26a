"""``method=stack``: several methods in one run, each on hook points no other member uses.

``conf/method/stack_*.yaml`` name the members: ``methods: [nova, scalekv]`` (method families with their defaults) or
option dicts (``{name: scalekv, budget_fraction: 0.2}``). The members are built by the harness registry (core code
imports no plug-in): it hands :class:`Stack` its ``build_method`` as ``build``.

A member *claims* a hook when its class overrides it (``varbench/hooks.py``; ``select`` and ``restore`` are one
claim, as are ``compress_kv`` and ``uses_kv_hook``). Two members claiming one hook stop the run with one line naming
the hook: nothing decides whose plan, selection or logits would win. The stack forwards each hook to its claimant;
``start`` reaches every member. What the loop records adds up by construction (tokens computed by the selecting
member, keys kept by the compressing one); what the members report is summed (``method_flops``) and kept per
member in the summary; token claims are the union of the members' — a (scale, layer) claimed by two members shows
as two claims, and the contract suite (``tests/test_methods_contract.py``) fails on it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from varbench.errors import UserError
from varbench.hooks import Method, MethodConfig

# hook -> the Method attributes whose override claims it
HOOKS = {"plan_scale": ("plan_scale",), "attention": ("attention",), "select": ("select", "restore"),
         "after_layer": ("after_layer",), "compress_kv": ("compress_kv", "uses_kv_hook"),
         "after_logits": ("after_logits",), "code_mask": ("code_mask",), "after_scale": ("after_scale",)}


def claimed_hooks(m: Method) -> list[str]:
    cls = type(m)
    return [h for h, attrs in HOOKS.items() if any(getattr(cls, a) is not getattr(Method, a) for a in attrs)]


@dataclass
class StackConfig(MethodConfig):
    name: str = "stack"
    family: str = "stack"
    methods: list = field(default_factory=list)   # members: a method family (str) or its options (dict)


class Stack(Method):
    CITATION = "varbench: members run on disjoint hook points (varbench/stack.py)"
    STATUS = "composition of its members"
    Config = StackConfig
    NOOP = {"methods": []}
    cfg: StackConfig

    def __init__(self, cfg: StackConfig | None = None, build: Callable[[dict], Method] | None = None):
        self.members: list[Method] = []
        self.owner: dict[str, Method] = {}
        self._own_claims: dict = {}
        super().__init__(cfg)
        specs = list(self.cfg.methods or [])
        if specs and build is None:
            raise UserError("method=stack builds its members by name through the harness registry "
                            "(varbench.harness.registry.build_method); pass build=")
        for spec in specs:
            node = {"name": spec} if isinstance(spec, str) else dict(spec)
            if (node.get("family") or node.get("name")) == "stack":
                raise UserError("method=stack: a member cannot be a stack")
            self.members.append(build(node))
        for m in self.members:
            for h in claimed_hooks(m):
                if h in self.owner:
                    raise UserError(f"method=stack: members {self.owner[h].name!r} and {m.name!r} both claim the hook "
                                    f"{h!r}; a stack runs members on disjoint hooks")
                self.owner[h] = m
        sel = self.owner.get("select")
        self.granularity = sel.granularity if sel is not None else "block"
        self.batch_rectangular = all(m.batch_rectangular for m in self.members)
        self.needs_kv_positions = any(m.needs_kv_positions for m in self.members)
        fams = [set(type(m).FAMILIES) for m in self.members if type(m).FAMILIES is not None]
        if fams:   # the runner reads FAMILIES from the class: a subclass carrying the members' common families
            self.__class__ = type("Stack", (Stack,), {"FAMILIES": tuple(sorted(set.intersection(*fams)))})
        self.start()

    # ---- claims: the union of the members' (a stack claims nothing itself)
    @property
    def claims(self) -> dict:
        out: dict = {k: list(v) for k, v in self._own_claims.items()}
        for m in getattr(self, "members", []):
            for k, v in m.claims.items():
                out.setdefault(k, []).extend(v)
        return out

    @claims.setter
    def claims(self, value: dict) -> None:
        self._own_claims = value

    @property
    def claimed_skips(self) -> list:
        return sorted(s for m in getattr(self, "members", []) for s in m.claimed_skips)

    @claimed_skips.setter
    def claimed_skips(self, value) -> None:
        pass

    # ---- forwarding
    def reset(self) -> None:
        for m in getattr(self, "members", []):
            m.start()

    def _fw(self, hook: str):
        return self.owner.get(hook)

    def plan_scale(self, sctx):
        m = self._fw("plan_scale")
        return m.plan_scale(sctx) if m else super().plan_scale(sctx)

    def attention(self, lctx):
        m = self._fw("attention")
        return m.attention(lctx) if m else None

    def select(self, lctx, x):
        m = self._fw("select")
        return m.select(lctx, x) if m else None

    def restore(self, lctx, x_in, y, sel):
        m = self._fw("select")
        return m.restore(lctx, x_in, y, sel) if m else super().restore(lctx, x_in, y, sel)

    def after_layer(self, lctx, x_in, x_out):
        m = self._fw("after_layer")
        if m:
            m.after_layer(lctx, x_in, x_out)

    def compress_kv(self, lctx, kv):
        m = self._fw("compress_kv")
        return m.compress_kv(lctx, kv) if m else None

    def uses_kv_hook(self) -> bool:
        m = self._fw("compress_kv")
        return bool(m and m.uses_kv_hook())

    def after_logits(self, sctx, lc, lu, lg):
        m = self._fw("after_logits")
        return m.after_logits(sctx, lc, lu, lg) if m else None

    def code_mask(self, sctx):
        m = self._fw("code_mask")
        return m.code_mask(sctx) if m else None

    def after_scale(self, sctx, state):
        m = self._fw("after_scale")
        if m:
            m.after_scale(sctx, state)

    def check_schedule(self, schedule):
        notes = [n for n in (m.check_schedule(schedule) for m in self.members) if n]
        return "; ".join(notes) or None

    def summary(self) -> dict:
        out: dict = {"members": {}}
        flops = 0.0
        for m in self.members:
            s = m.summary()
            out["members"][m.name] = s
            flops += float(s.get("method_flops") or 0.0)
            for k, v in s.items():
                if k != "method_flops":
                    out.setdefault(k, v)
        out["method_flops"] = flops
        return out

    # ---- run level: each member's own metrics and figures, from its part of every image's summary
    def _member_summary(self, m: Method, s: dict) -> dict:
        return ((s or {}).get("members") or {}).get(m.name) or {}

    def aggregate(self, summaries: list[dict]) -> dict[str, tuple[float, int]]:   # an instance's: it needs members
        """The members' run-level metrics (NOVA's activation rate, SparVAR's tile density, ...) under their own
        names; a name two members report is kept per member as ``<member>.<metric>``."""
        out: dict = {}
        parts = [(m, m.aggregate([self._member_summary(m, s) for s in summaries])) for m in self.members]
        clash = {k for i, (_, a) in enumerate(parts) for _, b in parts[i + 1:] for k in a if k in b}
        for m, agg in parts:
            for k, v in agg.items():
                out[f"{m.name}.{k}" if k in clash else k] = v
        return out

    def report(self, records: list[dict], out_dir, title: str = "") -> list:
        """Each member's figures, drawn from records whose ``method_summary`` is that member's."""
        paths: list = []
        for m in self.members:
            recs = [dict(r, method_summary=self._member_summary(m, r.get("method_summary"))) for r in records]
            paths += m.report(recs, out_dir, f"{title} [{m.name}]" if title else m.name)
        return paths

    def footnote(self) -> str | None:
        notes = [n for n in (m.footnote() for m in self.members) if n]
        return self.cfg.footnote or ("stack of " + " + ".join(m.name for m in self.members)
                                     + (": " + " / ".join(notes) if notes else ""))
