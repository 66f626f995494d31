"""What a boundary build did: the inputs, every repair, match, cut and remainder, the simplification and
its measured error, and the output; printed at the end of every build."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BoundariesReport:
    """What the build did, for the log and the data README."""

    inputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    repairs: dict[str, Any] = field(default_factory=dict)
    code_matches: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    whole_countries: list[str] = field(default_factory=list)
    carved: list[str] = field(default_factory=list)
    remainders: list[str] = field(default_factory=list)
    iso_a2_fixes: list[str] = field(default_factory=list)
    simplification: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [f"inputs: {json.dumps(self.inputs, sort_keys=True)}", f"counts: {json.dumps(self.counts)}"]
        for key in ("code_matches", "unmatched", "whole_countries", "carved", "remainders", "iso_a2_fixes"):
            items = getattr(self, key)
            out.append(f"{key}: {len(items)}")
            out += [f"  {s}" for s in items]
        for src, rep in self.repairs.items():
            out.append(f"repairs {src}: {len(rep['repaired'])} repaired, {len(rep['dropped'])} dropped")
            out += [f"  repaired {s}" for s in rep["repaired"]] + [f"  DROPPED {s}" for s in rep["dropped"]]
        out.append(f"simplification: {json.dumps(self.simplification)}")
        out.append(f"output: {json.dumps(self.output)}")
        return out
