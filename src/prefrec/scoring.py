"""Log-probabilities of completions given prompts: the one place that runs the model.

``score_completions`` returns, for each (prompt, completion) pair, the summed log-prob of the
completion's tokens, log pi(y|x) = sum_t log p(y_t | x, y_<t). Training (SFT, DPO, DMPO,
S-DPO, reference log-probs) and likelihood evaluation all go through it.

Tokenisation follows TRL: the prompt is tokenised with the tokenizer's special tokens (BOS
if it adds one), the completion without them, the two id lists are concatenated and EOS is
appended to the completion (``add_eos``), so the completion's token boundary never depends
on how the two texts would merge.

Shared-prefix scoring
---------------------
Items with the same group id (default: consecutive items with an identical prompt) are
scored together. Their full token sequences share a longest common prefix: the user's
history in DMPO pairwise data (a user's K prompts differ only in the candidate pair near
the end), the whole prompt plus the first completion tokens for a pair's two orderings,
the prompt for S-DPO candidate selection. Each group becomes ONE packed row

    [common prefix | suffix_1 | suffix_2 | ... | suffix_m]

run through the decoder with a 4D block attention mask -- prefix tokens attend causally
to the prefix, suffix_j tokens attend to the whole prefix and causally to suffix_j, never
to another suffix -- and explicit ``position_ids`` (suffix_j continues at the prefix
length), so every token sees exactly the context and rotary positions it has in its own
full sequence. The same rule applied recursively gives a prefix tree (trie): suffixes
that share tokens among themselves (a DMPO prompt's two orderings share the prompt's
candidate part and `` <Title:``) share those too. The row is the trie's segments in
depth-first order, and a token may attend to the earlier tokens of its own segment and to
every token of the segments above it. The common prefix is the root segment; a group of one
is its sequence unchanged. The prefix runs once per group, and gradients flow through it
into every member's score. The vocabulary head is applied only to the hidden states that
predict completion tokens (about 17 per DMPO sequence instead of ~420), and log_softmax
runs in fp32.

Why a packed row with a block mask (option a) rather than a prefix KV cache expanded over
the suffixes (option b)? Both are exact and run the same tokens through the linear layers,
which is where the time goes (in a CPU profile of the packed path, 57% ``aten::mm``,
15% attention with the dense mask). Packing does it in ONE forward per batch instead of two plus a
per-layer cache copy; it needs no padding *between* prefix and suffix when groups of
different prefix lengths share a batch (a batched cache does, which shifts the window of
sliding-attention layers); autograd through it is plain; it extends to the trie for free;
and layers with sliding windows (Gemma 3, some Qwen) are handled exactly by building their
window from the logical positions. Measured interleaved on SmolLM2-135M / CPU (8 DMPO ML-1M
groups of 6 sequences, a prototype of the cache variant, before the trie), the packed row
was faster in 7 of 8 repetitions (best 7.0 s against 9.4 s). Against the naive path
(``benchmarks/bench_scoring.py``, 16 groups, median of 3 interleaved repetitions, CPU):
4.0x on DMPO K=3 groups of 6 sequences, 3.2x on chosen + 3 rejected groups of 4, 14x on
S-DPO LastFM groups of 20 candidates; the head at completion positions alone gives 1.2x.

transformers (5.x) passes a 4D ``attention_mask`` through ``create_causal_mask`` unchanged
(``_preprocess_mask_arguments`` early-exits on 4D tensors); models with several layer types
(``config.layer_types``) take a dict ``{layer_type: mask}``. The mask is additive (0 where
attention is allowed, the dtype's minimum elsewhere), which both the ``sdpa`` and the
``eager`` attention functions add to the scores. Flash/flex attention take no dense mask,
so they are refused with a hint to use ``shared_prefix=False``.

Batching: ``batch_size`` counts GROUPS (packed rows) per forward on the shared path and
SEQUENCES per forward on the naive path. Groups (sequences) are sorted by length, longest
first, so rows in a batch pad little and an out-of-memory error shows up in the first
batch; results come back in input order.

Collaborative item tokens (:mod:`prefrec.item_tokens`): when the model carries an item
projector, every ``<Title:X>`` of a prompt is followed by a virtual token with a negative
id; the decoder then takes ``inputs_embeds`` (token embeddings, the projector's output at
virtual positions) on both paths, and the trie shares a virtual token like any other.

``shared_prefix=False`` is the naive reference: every sequence alone, right-padded, through
``model(...)`` with its full-vocabulary logits -- what TRL's DPO trainer does. Tests check
the shared path against it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

# Layer types whose attention pattern the block mask reproduces exactly.
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_DENSE_MASK_ATTENTION = ("sdpa", "eager")


@dataclass
class Scores:
    """Completion log-probs of a batch of (prompt, completion) pairs, in input order.

    Attributes:
        logps: [n] fp32, log pi(y_i|x_i) summed over completion tokens (EOS included when
            scored with ``add_eos``); carries gradients when scored with ``grad=True``.
        n_tokens: [n] int64, the number of completion tokens of each item.
        token_logps: per item, the [n_tokens_i] per-token log-probs, or None unless asked.
    """

    logps: torch.Tensor
    n_tokens: torch.Tensor
    token_logps: list[torch.Tensor] | None = None

    def normalized(self) -> torch.Tensor:
        """Length-normalised score: logps / n_tokens (mean log-prob per completion token)."""
        return self.logps / self.n_tokens.to(self.logps.dtype)


@dataclass(frozen=True)
class TokenizedItem:
    """One full sequence: prompt ids followed by completion ids (completion starts at n_prompt)."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_completion(self) -> int:
        return len(self.ids) - self.n_prompt


def tokenize_items(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    add_eos: bool = True,
    max_length: int | None = None,
    item_rows: Callable[[str], int] | None = None,
) -> list[TokenizedItem]:
    """Tokenise prompts (with special tokens) and completions (without) separately, TRL-style.

    Each distinct text is tokenised once. When ``max_length`` is set and a sequence is longer,
    the prompt loses tokens from its START (the completion and the end of the prompt, which
    names the candidates, are kept); a completion that alone does not fit raises ValueError.
    ``item_rows`` (title -> item-projector row): a virtual token ``-(row + 1)`` follows
    each ``<Title:X>`` tag of a prompt (:mod:`prefrec.item_tokens`); the text's own tokens
    stay as they are.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    if item_rows is None:
        prompt_ids = _tokenize_unique(tokenizer, prompts, add_special_tokens=True)
    else:
        prompt_ids = _tokenize_with_items(tokenizer, prompts, item_rows)
    completion_ids = _tokenize_unique(tokenizer, completions, add_special_tokens=False)
    items = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        p_ids = prompt_ids[prompt]
        c_ids = completion_ids[completion] + ((eos,) if add_eos else ())
        if not c_ids:
            raise ValueError(f"item {i}: the completion has no tokens (empty text, add_eos=False)")
        if max_length is not None and len(p_ids) + len(c_ids) > max_length:
            keep = max_length - len(c_ids)
            if keep < 1:
                raise ValueError(
                    f"item {i}: the completion alone has {len(c_ids)} tokens, "
                    f"max_length={max_length} leaves no room for the prompt"
                )
            p_ids = p_ids[len(p_ids) - keep :]
        if not p_ids:
            # The first completion token needs at least one token of context to be scored.
            raise ValueError(f"item {i}: the prompt has no tokens; nothing to condition on")
        items.append(TokenizedItem(p_ids + c_ids, len(p_ids)))
    return items


def _tokenize_unique(tokenizer, texts: Sequence[str], *, add_special_tokens: bool):
    """Map each distinct text to its token ids (one batched tokenizer call)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    encoded = tokenizer(unique, add_special_tokens=add_special_tokens)["input_ids"]
    return {text: tuple(ids) for text, ids in zip(unique, encoded, strict=True)}


def _tokenize_with_items(tokenizer, texts: Sequence[str], item_rows: Callable[[str], int]):
    """Like :func:`_tokenize_unique` for prompts, with a virtual item token after each title tag."""
    from prefrec.item_tokens import item_positions

    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    encoded = tokenizer(unique, add_special_tokens=True, return_offsets_mapping=True)
    out = {}
    for text, ids, offsets in zip(unique, encoded["input_ids"], encoded["offset_mapping"],
                                  strict=True):
        ids = list(ids)
        # Right to left, so earlier insertion points stay valid.
        for index, title in reversed(item_positions(text, offsets)):
            ids.insert(index, -(item_rows(title) + 1))
        out[text] = tuple(ids)
    return out


def default_group_ids(prompts: Sequence[str]) -> list[int]:
    """Consecutive items with an identical prompt share a group id."""
    ids, current = [], -1
    for i, prompt in enumerate(prompts):
        if i == 0 or prompt != prompts[i - 1]:
            current += 1
        ids.append(current)
    return ids


def group_members(group_ids: Sequence[Hashable]) -> list[list[int]]:
    """Item indices of each group, groups in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(i)
    return list(members.values())


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for other in sequences[1:]:
        n = next((t for t in range(n) if other[t] != first[t]), n)
    return n


@dataclass
class PackedGroup:
    """One group's sequences as a prefix tree (trie) laid out in a single row.

    A *segment* is a maximal run of tokens shared by exactly the same members. Segments are
    laid out depth-first: first the common prefix of the whole group, then each branch, so
    every segment comes after all of its ancestors.

    Attributes:
        ids, positions, segments: per row slot: token id, rotary position (the token's
            position in its full sequence) and segment index.
        parents: per segment, the index of its parent segment (-1 for the root).
        members: item index of each member.
        predictors: per member, the row slots whose hidden states predict its completion
            tokens (the slot of position t-1 for each completion token at position t).
        targets: per member, its completion token ids.
    """

    ids: list[int]
    positions: list[int]
    segments: list[int]
    parents: list[int]
    members: list[int]
    predictors: list[list[int]]
    targets: list[list[int]]

    def ancestors(self) -> torch.Tensor:
        """[S, S] bool: ancestors[s, t] is True when segment t is s or lies above it."""
        n = len(self.parents)
        table = torch.eye(n, dtype=torch.bool)
        for s, parent in enumerate(self.parents):
            if parent >= 0:  # parents precede children, so the parent's row is complete
                table[s] |= table[parent]
        return table


def pack_group(items: Sequence[TokenizedItem], members: Sequence[int]) -> PackedGroup:
    """Pack one group's sequences into a prefix tree; every shared token appears once.

    The root segment is the longest common token prefix of the group (a DMPO user's
    history); deeper segments share what subsets of members share (a pair's two orderings
    share their whole prompt). A group of one is its sequence unchanged.
    """
    ids: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    parents: list[int] = []
    path_slots: dict[int, list[int]] = {}  # member -> row slot of each of its positions
    # Depth-first over (members sharing everything up to `depth`, depth, parent, slots so far).
    stack = [(list(members), 0, -1, [])]
    while stack:
        node, depth, parent, slots = stack.pop()
        seqs = [items[i].ids for i in node]
        n = common_prefix_length([seq[depth:] for seq in seqs])
        segment, start = len(parents), len(ids)
        parents.append(parent)
        ids.extend(seqs[0][depth : depth + n])
        positions.extend(range(depth, depth + n))
        segments.extend([segment] * n)
        slots = slots + list(range(start, start + n))
        branches: dict[int, list[int]] = {}
        for i, seq in zip(node, seqs, strict=True):
            if len(seq) == depth + n:
                path_slots[i] = slots
            else:
                branches.setdefault(seq[depth + n], []).append(i)
        # Reversed so that branches are laid out in order of first appearance.
        stack.extend((branch, depth + n, segment, slots) for branch in reversed(branches.values()))
    predictors = [path_slots[i][items[i].n_prompt - 1 : -1] for i in members]
    targets = [list(items[i].ids[items[i].n_prompt :]) for i in members]
    return PackedGroup(ids, positions, segments, parents, list(members), predictors, targets)


def tree_attention_mask(
    segments: torch.Tensor,
    ancestors: torch.Tensor,
    positions: torch.Tensor,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive [B, 1, L, L] mask of packed rows: 0 where query q may attend key k, else min.

    allowed(q, k) = k <= q  and  ancestors[segment_q, segment_k]
    (k lies on q's own path through the prefix tree: exactly the tokens before q in its
    full sequence). Segment ids are global over the batch; padding slots carry a segment
    with no ancestors. With a sliding window also position_q - position_k < window (the
    window of the unpacked sequence). Every slot may attend itself, so no row is empty.
    """
    length = segments.shape[1]
    slot = torch.arange(length, device=segments.device)
    allowed = ancestors[segments[:, :, None], segments[:, None, :]]
    allowed &= slot[None, None, :] <= slot[None, :, None]
    if sliding_window is not None:
        allowed &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _base_model(model):
    """The transformers model under a PEFT wrapper (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _completion_logprobs(base, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target | context) from the decoder's hidden states at the predicting positions.

    Applies the output embedding (lm_head) to the gathered states only, the model's final
    logit soft-capping if it has one, and log_softmax in fp32.
    """
    logits = base.get_output_embeddings()(hidden).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _layer_masks(base, segments, ancestors, positions, dtype):
    """The decoder's ``attention_mask`` argument: one 4D mask, or a dict per layer type."""
    config = base.config
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in _DENSE_MASK_ATTENTION:
        raise ValueError(
            f"shared-prefix scoring needs the 'sdpa' or 'eager' attention implementation "
            f"(the model uses {attn!r}); load it with attn_implementation='sdpa' or "
            f"score with shared_prefix=False"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    unsupported = layer_types - set(_SUPPORTED_LAYER_TYPES)
    if unsupported:
        raise ValueError(
            f"shared-prefix scoring does not support layer types {sorted(unsupported)}; "
            f"score with shared_prefix=False"
        )
    full = tree_attention_mask(segments, ancestors, positions, dtype)
    if layer_types == {"full_attention"}:
        return full
    masks = {"full_attention": full}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = tree_attention_mask(
            segments, ancestors, positions, dtype, sliding_window=config.sliding_window
        )
    return masks


def _decoder_inputs(base, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``input_ids``, or with virtual item tokens (negative ids) ``inputs_embeds``: the
    token embeddings with the item projector's output at the virtual positions."""
    from prefrec.item_tokens import item_projector_of

    virtual = ids < 0
    if not bool(virtual.any()):
        return {"input_ids": ids}
    projector = item_projector_of(base)
    if projector is None:
        raise ValueError("the prompts carry item tokens but the model has no item projector")
    embeds = base.get_input_embeddings()(ids.clamp(min=0))
    items = projector(-ids[virtual] - 1).to(embeds.dtype)
    embeds = embeds.masked_scatter(virtual[..., None], items)  # keeps the projector's graph
    return {"inputs_embeds": embeds}


def _score_packed(model, groups: list[PackedGroup], pad_id: int):
    """Run one batch of packed groups; return (token log-probs, owner item of each)."""
    base = _base_model(model)
    head = base.get_output_embeddings().weight
    width = max(len(g.ids) for g in groups)
    n_segments = sum(len(g.parents) for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    # Segment ids are global over the batch; id n_segments is padding (no ancestors).
    segments = torch.full((len(groups), width), n_segments, dtype=torch.long)
    ancestors = torch.zeros((n_segments + 1, n_segments + 1), dtype=torch.bool)
    rows, slots, targets, owners = [], [], [], []
    offset = 0
    for b, g in enumerate(groups):
        n, s = len(g.ids), len(g.parents)
        ids[b, :n] = torch.tensor(g.ids, dtype=torch.long)
        positions[b, :n] = torch.tensor(g.positions, dtype=torch.long)
        segments[b, :n] = torch.tensor(g.segments, dtype=torch.long) + offset
        ancestors[offset : offset + s, offset : offset + s] = g.ancestors()
        offset += s
        for item, pred, tgt in zip(g.members, g.predictors, g.targets, strict=True):
            rows.extend([b] * len(pred))
            slots.extend(pred)
            targets.extend(tgt)
            owners.extend([item] * len(tgt))
    device = head.device
    ids, positions = ids.to(device), positions.to(device)
    mask = _layer_masks(base, segments.to(device), ancestors.to(device), positions, head.dtype)
    hidden = base.get_decoder()(
        **_decoder_inputs(base, ids), attention_mask=mask, position_ids=positions,
        use_cache=False,
    ).last_hidden_state
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(slots, device=device)]
    logps = _completion_logprobs(base, picked, torch.tensor(targets, device=device))
    return logps, owners


def _score_naive(model, items: list[TokenizedItem], indices: list[int], pad_id: int):
    """Reference: run each sequence alone (right-padded batch) through ``model(...)``."""
    device = _base_model(model).get_output_embeddings().weight.device
    width = max(len(items[i].ids) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(indices), width), dtype=torch.long)
    for b, i in enumerate(indices):
        ids[b, : len(items[i].ids)] = torch.tensor(items[i].ids)
        attention[b, : len(items[i].ids)] = 1
    inputs = _decoder_inputs(_base_model(model), ids.to(device))
    logits = model(**inputs, attention_mask=attention.to(device)).logits
    pieces, owners = [], []
    for b, i in enumerate(indices):
        item = items[i]
        row = logits[b, item.n_prompt - 1 : len(item.ids) - 1].float().log_softmax(-1)
        target = torch.tensor(item.ids[item.n_prompt :], device=device)
        pieces.append(row.gather(-1, target[:, None]).squeeze(-1))
        owners.extend([i] * len(target))
    return torch.cat(pieces), owners


def score_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    group_ids: Sequence[Hashable] | None = None,
    batch_size: int = 8,
    shared_prefix: bool = True,
    add_eos: bool = True,
    per_token: bool = False,
    grad: bool = False,
    max_length: int | None = None,
) -> Scores:
    """Summed log-probs of ``completions[i]`` after ``prompts[i]`` (see the module docstring).

    Args:
        model: a transformers causal LM, or a PEFT model wrapping one.
        tokenizer: its tokenizer.
        prompts: full model-input texts (already wrapped by ``prompts.model_input``).
        completions: answer texts.
        group_ids: items with equal ids share a prefix computation; default: consecutive
            items with an identical prompt. Only speed depends on it, never the result.
        batch_size: packed groups per forward (shared path) or sequences per forward (naive).
        shared_prefix: False runs every sequence alone (the reference).
        add_eos: append EOS to every completion.
        per_token: also return per-token log-probs.
        grad: keep the autograd graph (training); otherwise run under ``torch.no_grad``.
        max_length: truncate long prompts from the start so prompt + completion fit.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if group_ids is not None and len(group_ids) != len(prompts):
        raise ValueError(f"got {len(group_ids)} group ids for {len(prompts)} prompts")
    from prefrec.item_tokens import item_projector_of

    projector = item_projector_of(model)
    items = tokenize_items(tokenizer, prompts, completions, add_eos=add_eos, max_length=max_length,
                           item_rows=projector.row if projector is not None else None)
    device = _base_model(model).get_output_embeddings().weight.device
    n_tokens = torch.tensor([it.n_completion for it in items], dtype=torch.long, device=device)
    if not items:
        empty = torch.zeros(0, device=device)
        return Scores(empty, n_tokens, [] if per_token else None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else items[0].ids[0]

    pieces, owners = [], []
    with torch.set_grad_enabled(grad):
        if shared_prefix:
            members = group_members(
                group_ids if group_ids is not None else default_group_ids(prompts)
            )
            packed = sorted((pack_group(items, m) for m in members), key=lambda g: -len(g.ids))
            for start in range(0, len(packed), batch_size):
                logps, owner = _score_packed(model, packed[start : start + batch_size], pad_id)
                pieces.append(logps)
                owners.extend(owner)
        else:
            order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
            for start in range(0, len(order), batch_size):
                logps, owner = _score_naive(model, items, order[start : start + batch_size], pad_id)
                pieces.append(logps)
                owners.extend(owner)
        flat = torch.cat(pieces)
        owner_index = torch.tensor(owners, device=device)
        total = torch.zeros(len(items), device=device, dtype=flat.dtype).index_add(
            0, owner_index, flat
        )
        token_logps = None
        if per_token:
            # Tokens of one item are contiguous in `flat`, in sequence order.
            by_item = torch.argsort(owner_index, stable=True)
            token_logps = list(flat[by_item].split(n_tokens.tolist()))
    return Scores(total, n_tokens, token_logps)
