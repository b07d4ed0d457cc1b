"""Making R-LoRA a PEFT method type: `PeftType.RLORA` (a leaf: it imports nothing of rlora).

PEFT 0.21 keys every mapping (config class, tuner class, state-dict prefix) on a member of its `PeftType`
enum and offers `register_peft_method` to fill them, but has no way for an outside package to add an enum
member. We add one, `PeftType.RLORA`, exactly as the enum machinery would have built it, so that
`PeftType("RLORA")`, `PeftType.RLORA`, `"RLORA" in list(PeftType)` and JSON round trips all behave like for a
built-in method. Tests pin each of the PEFT entry points that depend on it.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "RLORA"


def _add_peft_type(name: str) -> PeftType:
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ forbids new members
    PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


RLORA_PEFT_TYPE = _add_peft_type(NAME)
