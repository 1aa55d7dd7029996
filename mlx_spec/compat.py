"""Whether a draft model speaks the main model's vocabulary: the one rule, for the load-time check and for discovery.

Exact: the same token for every id both models emit, and the same end tokens (ids). A bos / eos / pad token
string that differs while those agree is metadata: a warning (load time) or a note (discovery).

Pure functions on {id: token} maps and special tokens; no models, no files.
"""

from collections.abc import Mapping

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token")  # tokenizer attributes, in special_tokens' order


def special_tokens(bos_token, eos_token, pad_token, end_tokens) -> dict:
    """The special tokens of a model, as its draft is compared with it: the end tokens must agree, the token
    strings are metadata (their differences are reported, not refused).

    Args:
        bos_token, eos_token, pad_token: the tokenizer's special token strings (or None).
        end_tokens: the ids that end generation (the tokenizer's eos id and the model's `eos_token_id`s).
    """
    return {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "end tokens": sorted(end_tokens)}


def different_ids(main_tokens: Mapping[int, str], draft_tokens: Mapping[int, str], limit: int) -> list[int]:
    """The ids below `limit` whose token differs between the two maps (or that only one of them has), sorted."""
    if main_tokens == draft_tokens:
        return []
    in_draft = draft_tokens.get
    differ = [i for i, token in main_tokens.items() if i < limit and in_draft(i) != token]
    return sorted(differ + [i for i in draft_tokens if i < limit and i not in main_tokens])


def incompatibility(
    main_tokens: Mapping[int, str],
    draft_tokens: Mapping[int, str],
    limit: int,
    main_special: dict,
    draft_special: dict,
) -> str | None:
    """Why the draft cannot serve the main model ("different vocabularies (...)", ...), or None if it can.

    Exactness needs two things only: every id both models can emit is the same token (so an embedding table
    padded beyond the tokenizer is fine), and the same ids end generation. The bos / eos / pad token strings
    are metadata: where only they differ the draft serves (see `metadata_difference`).

    Args:
        main_tokens, draft_tokens: {id: token} of each tokenizer (its added tokens included).
        limit: the smaller of the two output layers' sizes; only ids below it are compared.
        main_special, draft_special: each model's `special_tokens(...)`.
    """
    differ = different_ids(main_tokens, draft_tokens, limit)
    if differ:
        examples = ", ".join(f"id {i}: {main_tokens.get(i)!r} vs {draft_tokens.get(i)!r}" for i in differ[:3])
        return f"different vocabularies ({len(differ)} of {limit} ids differ; {examples})"
    main_end, draft_end = main_special["end tokens"], draft_special["end tokens"]
    if main_end != draft_end:
        main_named = {i: main_tokens.get(i) for i in main_end}
        draft_named = {i: draft_tokens.get(i) for i in draft_end}
        return f"different end tokens: {main_named} vs {draft_named}"
    return None


def metadata_difference(main_special: dict, draft_special: dict) -> str | None:
    """The special token strings that differ, main's value first ("bos_token: None vs '<|endoftext|>'", several
    joined by "; "), or None. Where `incompatibility` is None this is metadata only: a note, not a refusal."""
    differ = [
        f"{what}: {main_special.get(what)!r} vs {draft_special.get(what)!r}"
        for what in SPECIAL_TOKEN_NAMES
        if main_special.get(what) != draft_special.get(what)
    ]
    return "; ".join(differ) or None
