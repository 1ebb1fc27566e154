"""Policy names: the registry the policy classes join (``register_policy``) and
the short names the command line, the study and the trainer build them from
(``policy_from_name("paper4-w4")``). The classes live in ``npapprox.policy``,
which fills ``POLICIES`` when it is imported (``import npapprox`` does)."""
from __future__ import annotations

import re
from typing import NamedTuple


class PolicyName(NamedTuple):
    """A registered family of policy names ``<name>[K][s][-gG][-wW]``: ``cls`` is
    built from them; ``options`` holds the parts its names take (``K`` bits, ``s``
    stochastic, ``g`` group, ``w`` window); ``style``: (matplotlib colormap, line
    style) of the family in plots; ``help``: what the family is, for the command line."""

    cls: type
    options: str
    style: tuple
    help: str


#: name -> PolicyName, in registration order; ``policy_from_name``, the command
#: line and the study's plots read it
POLICIES: dict[str, PolicyName] = {}


def register_policy(name: str, options: str = "K", style: tuple = ("Greys", "-"), help: str = ""):
    """Class decorator: ``policy_from_name`` builds the class from ``<name>...`` names."""
    def register(cls):
        POLICIES[name] = PolicyName(cls, options, style, help)
        return cls
    return register


def policy_help() -> str:
    """The policy names the registry knows, for help texts and errors."""
    def pattern(name, entry):
        o = entry.options
        return (name + "K" * ("K" in o) + "[s]" * ("s" in o) + "[-gG]" * ("g" in o) + "[-wW]" * ("w" in o)
                + (f" ({entry.help})" if entry.help else ""))
    return (" | ".join(pattern(name, entry) for name, entry in POLICIES.items())
            + "; K in 1, 2, 4, 8 bits, s: stochastic rounding, G: group size, W: window in standard deviations. "
              "Examples: paper4, paper8-w4, fit4, naive8, generic4s-g64")


class PolicySpec(NamedTuple):
    """A parsed policy name: family (a ``POLICIES`` key), bits (None for exact),
    stochastic, group and window (None: the class's default)."""

    family: str
    bits: int | None
    stochastic: bool
    group: int | None
    window: float | None


def parse_policy_name(name: str) -> PolicySpec:
    """The parts of a policy name (see ``policy_help()``), checked against ``POLICIES``."""
    m = re.fullmatch(r"([a-z]+?)([1248]?)(s?)(?:-g(\d+))?(?:-w(\d+(?:\.\d+)?))?", str(name).strip().lower())
    entry = POLICIES.get(m.group(1)) if m else None
    if (entry is None or bool(m.group(2)) != ("K" in entry.options)
            or any(m.group(i) and opt not in entry.options for i, opt in ((3, "s"), (4, "g"), (5, "w")))
            or m.group(5) and float(m.group(5)) <= 0):
        raise ValueError(f"unknown storage policy {name!r}; expected {policy_help()}")
    return PolicySpec(m.group(1), int(m.group(2)) if m.group(2) else None, bool(m.group(3)),
                      int(m.group(4)) if m.group(4) else None, float(m.group(5)) if m.group(5) else None)


def policy_from_name(name: str, seed: int = 0):
    """Build a policy from its short name (see ``policy_help()``)."""
    spec = parse_policy_name(name)
    options = POLICIES[spec.family].options
    args = (spec.bits,) if "K" in options else ()
    kwargs = {"stochastic": spec.stochastic, "seed": seed} if "s" in options else {}
    kwargs.update({k: v for k, v in (("group", spec.group), ("window", spec.window)) if v is not None})
    return POLICIES[spec.family].cls(*args, **kwargs)
