"""Whether a draft model speaks the main model's vocabulary: the one rule, for the load-time check and for discovery.

Pure functions on {id: token} maps and special tokens; no models, no files.
"""

from collections.abc import Mapping

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token")  # tokenizer attributes, in special_tokens' order


def special_tokens(bos_token, eos_token, pad_token, end_tokens) -> dict:
    """The special tokens a draft must share with its main model, in the order they are compared.

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

    Every id both models can emit must be the same token, so an embedding table padded beyond the
    tokenizer is fine; the special tokens must agree.

    Args:
        main_tokens, draft_tokens: {id: token} of each tokenizer (its added tokens included).
        limit: the smaller of the two output layers' sizes; only ids below it are compared.
        main_special, draft_special: each model's `special_tokens(...)`.
    """
    differ = different_ids(main_tokens, draft_tokens, limit)
    if differ:
        examples = ", ".join(f"id {i}: {main_tokens.get(i)!r} vs {draft_tokens.get(i)!r}" for i in differ[:3])
        return f"different vocabularies ({len(differ)} of {limit} ids differ; {examples})"
    for what, main_value in main_special.items():
        if main_value != draft_special.get(what):
            return f"different {what}: {main_value!r} vs {draft_special.get(what)!r}"
    return None
