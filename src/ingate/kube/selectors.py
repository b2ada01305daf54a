"""Kubernetes label selectors: the string syntax (`app=vllm,env in (prod,staging),!canary`).

Used to check pods locally against a pool's selector (the API server filters the watch with the same
string) and by the fake API server. Equality (`=`, `==`, `!=`), set (`in`, `notin`) and existence
(`key`, `!key`) requirements, comma-separated, all must hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SET = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str
    """one of =, !=, in, notin, exists, !exists"""
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        v = labels.get(self.key)
        if self.op == "=":
            return has and v in self.values
        if self.op == "!=":
            return not has or v not in self.values
        if self.op == "in":
            return has and v in self.values
        if self.op == "notin":
            return not has or v not in self.values
        if self.op == "exists":
            return has
        return not has


def _split(selector: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [t.strip() for t in out if t.strip()]


def parse_selector(selector: str) -> tuple[Requirement, ...]:
    """Parse a selector string; raises ValueError naming the bad term."""
    reqs = []
    for term in _split(selector):
        m = _SET.match(term)
        if m:
            vals = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(Requirement(m.group(1), m.group(2), vals))
        elif "!=" in term:
            k, v = term.split("!=", 1)
            reqs.append(Requirement(k.strip(), "!=", frozenset([v.strip()])))
        elif "=" in term:
            k, v = term.replace("==", "=", 1).split("=", 1)
            reqs.append(Requirement(k.strip(), "=", frozenset([v.strip()])))
        elif term.startswith("!"):
            reqs.append(Requirement(term[1:].strip(), "!exists"))
        elif re.fullmatch(r"[^\s!=(),]+", term):
            reqs.append(Requirement(term, "exists"))
        else:
            raise ValueError(f"label selector: cannot parse {term!r}")
        if not reqs[-1].key:
            raise ValueError(f"label selector: empty key in {term!r}")
    return tuple(reqs)


def selector_matches(selector: str | tuple[Requirement, ...], labels: dict[str, str]) -> bool:
    reqs = parse_selector(selector) if isinstance(selector, str) else selector
    return all(r.matches(labels) for r in reqs)
