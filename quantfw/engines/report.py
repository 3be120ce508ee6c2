"""One report of everything an engine would refuse or silently compute differently for a
checkpoint: each profile rule whose `when` matches is run; a failing rule is a Finding naming the
rule and its source."""

from __future__ import annotations

from dataclasses import dataclass

from quantfw.engines import checks
from quantfw.engines.facts import CheckpointFacts, gather
from quantfw.engines.profile import EngineProfile, load_profile
from quantfw.io.loader import Opened
from quantfw.layout.expr import holds


@dataclass(frozen=True)
class Finding:
    level: str  # refuse | differs
    engine: str
    rule: str
    message: str
    source: str

    def line(self) -> str:
        return f"{self.level.upper()} {self.engine}.{self.rule}: {self.message} (source: {self.source})"


def run_rules(profile: EngineProfile, facts: CheckpointFacts) -> list[Finding]:
    out = []
    for rule in profile.rules:
        if not holds(rule.when, facts.env, f"{profile.where}: rule {rule.id}.when"):
            continue
        problems = checks.CHECKS[rule.check].run(rule, facts)
        if problems:
            why = checks.fill(rule.why, facts.env)
            detail = "; ".join(p for p in problems if p)
            out.append(Finding(rule.level, profile.name, rule.id, f"{why}: {detail}" if detail else why, rule.source))
    return out


def engine_report(op: Opened, engine: str | EngineProfile, tp: int = 1, ep: int = 1) -> list[Finding]:
    """Findings of `engine` for the opened checkpoint at MoE tensor parallel `tp`, expert parallel `ep`."""
    profile = engine if isinstance(engine, EngineProfile) else load_profile(engine)
    return run_rules(profile, gather(op, tp, ep))


def refused(findings: list[Finding]) -> bool:
    return any(f.level == "refuse" for f in findings)
