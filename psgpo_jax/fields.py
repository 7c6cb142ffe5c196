"""Building frozen config dataclasses from mappings, naming unknown fields."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping


def checked_fields(cls: type, values: Mapping[str, Any], section: str) -> Dict[str, Any]:
  """`values` as a dict, or a ValueError naming every key that is not a field of `cls`.

  Args:
    cls: a dataclass type.
    values: e.g. a ConfigDict section.
    section: how the message names the section, e.g. "model config".
  """
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"Unknown {section} field(s) {unknown}; known fields: {sorted(known)}.")
  return values
