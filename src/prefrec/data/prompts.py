"""Prompt texts: the task instructions (DMPO pairwise, S-DPO selection) and the wrapper
that turns an instruction into the model's input.

The instruction wording for DMPO data reproduces the released files exactly, so prompts
built from raw data look like the paper's. A :class:`Domain` carries the nouns and verbs
that differ between MovieLens, Amazon Movies and Amazon Games.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    """Wording of one recommendation domain in the DMPO instruction."""

    name: str  # "movie", "Video Games"
    items: str  # plural noun: "movies"
    did: str  # past participle: "watched"
    doing: str  # gerund: "watching"


DOMAINS: dict[str, Domain] = {
    "movie": Domain("movie", "movies", "watched", "watching"),
    # The released Amazon Movies and TV files use the MovieLens wording.
    "amazon_movie": Domain("movie", "movies", "watched", "watching"),
    "amazon_game": Domain("Video Games", "Video Games", "shopped", "shopping"),
    "music": Domain("music", "artists", "listened to", "listening to"),
}


def title_tag(title: str) -> str:
    """``<Title:X>``, the item marker of the DMPO files."""
    return f"<Title:{title}>"


def pairwise_instruction(history: Sequence[str], first: str, second: str, domain: Domain) -> str:
    """The DMPO ranking instruction, byte-identical to the released files."""
    hist = "".join(f" {title_tag(t)} " for t in history)
    return (
        f"You are an assistant working on {domain.name} recommendations. "
        f"Here is the user's history of {domain.items} they have {domain.did}: {hist}. "
        f"Rank the likelihood of the user {domain.doing} the two {domain.items} "
        f" {title_tag(first)}  and  {title_tag(second)} ."
    )


def pairwise_completion(first: str, second: str) -> str:
    """The DMPO ranking answer: ``' <Title:A> ,  <Title:B> '``."""
    return f" {title_tag(first)} ,  {title_tag(second)} "


def selection_instruction(history: Sequence[str], candidates: Sequence[str]) -> str:
    """The S-DPO candidate-selection instruction (LastFM wording)."""
    hist = ", ".join(f'"{t}"' for t in history)
    cands = ", ".join(f'"{c}"' for c in candidates)
    return (
        f"This user has listened to {hist} in the previous. "
        f"Given the following {len(candidates)} artists: {cands}, "
        "recommend one artist for this user to listen to next. "
        "Answer with the artist's name only."
    )


# Model-input templates. "alpaca" is what the DMPO and S-DPO code trained with; "chat"
# uses the tokenizer's chat template; "plain" feeds the instruction as is.
ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat", "plain")


def model_input(instruction: str, template: str = "alpaca", tokenizer=None) -> str:
    """Wrap an instruction as the text the model sees before the completion."""
    if template == "alpaca":
        return ALPACA.format(instruction=instruction)
    if template == "plain":
        return instruction + "\n"
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown prompt template {template!r}; choose from {', '.join(TEMPLATES)}")
