"""Reading the state_dicts of other ADOPT implementations into :class:`adopt.ADOPT`.

``torch.optim.Optimizer.load_state_dict`` installs the saved param groups as they are, so a
checkpoint of another implementation would keep its own names for the settings (ADOPT
would not read them and silently run its defaults) and lack the settings it does not have
(ADOPT would fill them with hard defaults, not with what the optimizer was built with).
:func:`translate_state_dict` rewrites such a state_dict into ADOPT's layout first:

* ADOPT's hyperparameters missing from a saved group take the current group's value, i.e.
  the value the optimizer was constructed with.
* Synonyms become ADOPT's keys: timm's ``decoupled`` and pytorch_optimizer's
  ``weight_decouple`` are ``decouple``, pytorch_optimizer's ``cautious`` is ``caution``, timm's
  ``max_lr_snapshot`` (the lr its corrected weight decay is relative to) is ``lr_max``
  (timm's ``caution`` and ``corrected_weight_decay`` are ADOPT's names too). A cautious
  pytorch_optimizer checkpoint warns: it rescales the kept elements by ``numel / (kept + 1)``
  where ADOPT (as timm and the paper) uses ``1 / max(kept / numel, 1e-3)``. timm's ``clip_exp``
  is ``clip_lambda=PowerClip(clip_exp)``
  (timm clips at ``(step - 1) ** clip_exp`` with its counter already advanced, i.e. at
  ``s ** clip_exp`` for ``s`` earlier steps, exactly as :class:`PowerClip` does), or no clip
  for ``clip_exp=None``.
* Settings ADOPT does not have (pytorch_optimizer's ``fixed_decay`` and ``stable_adamw``) are
  dropped when off and refused (ValueError naming the key) when on, since ADOPT cannot
  honour them.
* pytorch_optimizer counts steps per group (``group['step']``) and stores no per-parameter
  step: each parameter's state gets the group's count. (Its clip is ``clip_lambda(s + 1)``,
  one step later than ADOPT's ``clip_lambda(s)``; its clip is not in the state_dict, so
  ADOPT keeps the one it was built with: see docs/api.md to reproduce pytorch_optimizer's.)
* Bookkeeping is kept (torch's LR schedulers and SWA, named parameters) without a word;
  any other key ADOPT does not know and the
  current group does not have is kept, with a UserWarning naming it, as ADOPT ignores it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

from .schedules import ClipSchedule, PowerClip

__all__ = ["translate_state_dict"]

# Other implementations' names for ADOPT's settings.
_SYNONYMS = {
    "decoupled": "decouple", "weight_decouple": "decouple", "cautious": "caution", "max_lr_snapshot": "lr_max",
}
# Synonyms whose meaning differs slightly when on: what ADOPT does instead (a UserWarning).
_SYNONYM_NOTES = {
    "cautious": "pytorch_optimizer rescales the kept elements by numel / (kept + 1), ADOPT's caution (as timm's) "
                "by 1 / max(kept / numel, 1e-3); the step continues with ADOPT's",
}
# Settings of other implementations that change the update when on; ADOPT has none of them.
_OFF_OR_REFUSED = {
    "fixed_decay": "weight decay not scaled by lr",
    "stable_adamw": "the update divided by its RMS",
}
# Kept without a word: torch's own bookkeeping in param groups.
_TORCH_BOOKKEEPING = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"}
)
_CLIP_KEY = "clip_exp"  # timm's clip exponent
_GROUP_STEP_KEY = "step"  # pytorch_optimizer's per-group step count


def translate_state_dict(
    state_dict: Mapping[str, Any], current_groups: list[dict[str, Any]], hyperparameters: frozenset[str]
) -> tuple[dict[str, Any], Optional[tuple[Optional[ClipSchedule]]]]:
    """The state_dict in ADOPT's layout, and ``(clip_lambda,)`` if it sets the clip (None if
    it does not). Does not modify ``state_dict``; raises ValueError naming a setting it
    cannot honour. ``hyperparameters`` are the keys of ADOPT's param groups (its ``defaults``).

    Groups beyond the current ones are left for ``Optimizer.load_state_dict`` to reject.
    """
    state = dict(state_dict["state"])
    groups = []
    clips: list[tuple[int, Optional[float]]] = []
    for g_idx, saved in enumerate(state_dict["param_groups"]):
        current = current_groups[g_idx] if g_idx < len(current_groups) else {}
        group = _translate_group(g_idx, saved, current, hyperparameters)
        if _CLIP_KEY in saved:
            clips.append((g_idx, saved[_CLIP_KEY]))
        if _GROUP_STEP_KEY in saved:
            for p_id in saved["params"]:
                if p_id in state and "step" not in state[p_id]:
                    state[p_id] = {**state[p_id], "step": saved[_GROUP_STEP_KEY]}
        groups.append(group)
    return {**state_dict, "state": state, "param_groups": groups}, _clip_of(clips, len(groups))


def _translate_group(
    g_idx: int, saved: Mapping[str, Any], current: Mapping[str, Any], hyperparameters: frozenset[str]
) -> dict[str, Any]:
    where = f"param_groups[{g_idx}]"
    group: dict[str, Any] = {}
    for key, value in saved.items():
        if key in hyperparameters or key in _TORCH_BOOKKEEPING:
            group[key] = value
            continue
        target = _SYNONYMS.get(key)
        if target in hyperparameters:
            if target in saved and saved[target] != value:
                raise ValueError(f"loaded state_dict: {where} has {target}={saved[target]!r} but {key}={value!r}")
            group[target] = value
            if value and key in _SYNONYM_NOTES:
                warnings.warn(f"loaded state_dict: {where} has {key}={value!r}: {_SYNONYM_NOTES[key]}", UserWarning,
                              stacklevel=4)
        elif key in _OFF_OR_REFUSED or target in _OFF_OR_REFUSED:
            if value:
                what = _OFF_OR_REFUSED[target or key]
                raise ValueError(
                    f"loaded state_dict: {where} has {key}={value!r} ({what}), which ADOPT does not support"
                )
        elif key in (_CLIP_KEY, _GROUP_STEP_KEY):
            continue  # the clip and the step count are read by translate_state_dict
        elif key in current:
            group[key] = value  # a key of the user's own, as torch keeps it
        else:
            warnings.warn(
                f"loaded state_dict: {where} has {key}={value!r}, a setting ADOPT does not have; "
                "it is kept in the group but does not change the update",
                UserWarning,
                stacklevel=4,
            )
            group[key] = value
    for key in hyperparameters:
        if key not in group and key in current:
            group[key] = current[key]  # the value the optimizer was constructed with
    return group


def _clip_of(clips: list[tuple[int, Optional[float]]], n_groups: int) -> Optional[tuple[Optional[ClipSchedule]]]:
    """``(clip_lambda,)`` of timm's per-group ``clip_exp``, the same in every group (ADOPT has
    one clip for all groups), or None where no group has it."""
    if not clips:
        return None
    exponents = {exponent for _, exponent in clips}
    if len(clips) != n_groups or len(exponents) > 1:
        found = ", ".join(f"param_groups[{i}]: {e!r}" for i, e in clips)
        raise ValueError(
            f"loaded state_dict: clip_exp differs between param groups ({found}, of {n_groups} groups); "
            "ADOPT has one clip_lambda for all groups"
        )
    (exponent,) = exponents
    return (None if exponent is None else PowerClip(exponent),)
