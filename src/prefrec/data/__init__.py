"""Data layer: typed records, readers and writers per format, raw protocols, audit."""

from prefrec.data.schema import (
    Interaction,
    Interactions,
    PairwiseExample,
    PreferenceGroup,
    ScoredCompletion,
    SelectionExample,
    group_pairs_by_user,
    pair_to_group,
    selection_to_group,
    trl_rows,
)

__all__ = [
    "Interaction",
    "Interactions",
    "PairwiseExample",
    "PreferenceGroup",
    "ScoredCompletion",
    "SelectionExample",
    "group_pairs_by_user",
    "pair_to_group",
    "selection_to_group",
    "trl_rows",
]
