"""The server's tool calls, reasoning and structured output, through the official openai client, on tiny models
with a Qwen2.5-style template: scripted models say a chosen text, random ones are held to a grammar."""

import json
import logging

import jsonschema
import mlx.core as mx
import pytest
from test_server import client_for, running
from tiny_chat import byte_tokenizer, random_model, save_chat_folder, scripted_model

import mlx_spec
from mlx_spec.grammar import GrammarProcessor, json_schema_grammar
from mlx_spec.options import GenerationOptions
from mlx_spec.server import create_app
from mlx_spec.server.tools import ReplyParser, may_be_bare_call, parse_bare, template_messages

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
SCRIPTS = {
    "call": ["Let me check. ", "<tool_call>", f"\n{CALL}\n", "</tool_call>"],
    "malformed": ["<tool_call>", '\n{"name": "get_weather", "arguments": {"city": \n', "</tool_call>"],
    "fenced": ["```json\n", '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}', "\n```"],
}
THOUGHT = ["The user asks ", "about Paris.", "</think>", "\n\nIt is sunny."]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "note": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["city", "days", "note", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_models")
    tokenizer = byte_tokenizer([p for script in SCRIPTS.values() for p in script])
    out = {name: save_chat_folder(scripted_model(tokenizer, s), tokenizer, root / name) for name, s in SCRIPTS.items()}
    thinking = byte_tokenizer(THOUGHT, thinking=True)
    out["thinking"] = save_chat_folder(scripted_model(thinking, THOUGHT), thinking, root / "thinking")
    main, draft = random_model(tokenizer)
    out["random"] = save_chat_folder(main, tokenizer, root / "random")
    out["random_draft"] = save_chat_folder(draft, tokenizer, root / "random_draft")
    return out


def serve(folder, draft_folder=None, api_key=None):
    model, tokenizer = mlx_spec.load(str(folder))
    draft = mlx_spec.load(str(draft_folder))[0] if draft_folder else None
    return running(create_app(model, tokenizer, draft, GenerationOptions(max_tokens=96), api_key=api_key))


@pytest.fixture(scope="module")
def scripted(folders):
    """Base URLs of a server for each script."""
    with serve(folders["call"]) as a, serve(folders["malformed"]) as b, serve(folders["fenced"]) as c:
        with serve(folders["thinking"]) as d:
            yield {"call": a, "malformed": b, "fenced": c, "thinking": d}


@pytest.fixture(scope="module")
def random_base(folders):
    with serve(folders["random"], folders["random_draft"]) as base:
        yield base


def tokens_of(folder, messages, **kwargs) -> list[int]:
    _, tokenizer = mlx_spec.load(str(folder))
    return tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True, **kwargs)


def chat(client, **kwargs):
    return client.chat.completions.create(model=client.models.list().data[0].id, **kwargs)


def streamed(client, **kwargs):
    """content, reasoning, calls (assembled from their deltas), finish_reason and the chunks of a stream."""
    chunks = list(chat(client, stream=True, **kwargs))
    content, reasoning, calls = "", "", {}
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    return content, reasoning, [calls[i] for i in sorted(calls)], chunks[-1].choices[0].finish_reason, chunks


# --- the reply's parts (pure) ----------------------------------------------------------------


def split(parser: ReplyParser, text: str, step: int) -> list[tuple]:
    parts = []
    for i in range(0, len(text), step):
        parts += parser.add(text[i : i + step])
    parts += parser.finish()
    merged = []
    for p in parts:
        item = (p.kind, p.call["function"]["name"] if p.call else p.text)
        if merged and item[0] == merged[-1][0] != "call":
            merged[-1] = (item[0], merged[-1][1] + item[1])
        else:
            merged.append(item)
    return merged


def test_a_reply_splits_alike_in_pieces_of_any_size():
    def parser(**kw):
        return ReplyParser(
            [WEATHER], lambda t, _: json.loads(t), ("<tool_call>", "</tool_call>"), ("<think>", "</think>"), **kw
        )

    text = f"<think>hmm</think>\n\nOK <tool_call>\n{CALL}\n</tool_call> done<tool_call>{{bad</tool_call>"
    expected = [
        ("reasoning", "hmm"),
        ("content", "OK "),
        ("call", "get_weather"),
        ("content", " done<tool_call>{bad</tool_call>"),
    ]
    for step in (1, 2, 3, 7, len(text)):
        assert split(parser(), text, step) == expected
        assert split(parser(reasoning=True), "a<b</think>x <thi", step) == [("reasoning", "a<b"), ("content", "x <thi")]
        assert split(parser(), f"```json\n{CALL}\n```", step) == [("call", "get_weather")]
        assert split(parser(), f" {CALL} ", step) == [("call", "get_weather")]
        assert split(parser(), "```python\nprint(1)\n```", step) == [("content", "```python\nprint(1)\n```")]
    first = parser()
    assert first.add("```js") == [] and first.add("on\n{") == [] and first.num_calls == 0  # held: may be a call
    assert first.add('"a": 1}') == [] and [p.text for p in first.finish()] == ['```json\n{"a": 1}']
    assert split(ReplyParser(None), "<tool_call>x</tool_call>", 3) == [("content", "<tool_call>x</tool_call>")]
    cut = '<tool_call>\n{"name": "get_wea'  # max_tokens ended the reply inside a call: it is text
    assert split(parser(), cut, 4) == [("content", cut)]


def test_bare_calls_name_a_given_tool():
    assert parse_bare(CALL, [WEATHER])[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    two = parse_bare(f'[{CALL}, {{"name": "get_time", "parameters": {{}}}}]', [WEATHER, TIME])
    assert [c["function"]["name"] for c in two] == ["get_weather", "get_time"] and two[0]["id"] != two[1]["id"]
    assert parse_bare('{"name": "get_stock", "arguments": {}}', [WEATHER]) is None
    assert parse_bare('{"city": "Paris"}', [WEATHER]) is None
    assert parse_bare('{"name": "get_weather", "arguments": 5}', [WEATHER]) is None


def test_a_bare_call_that_is_not_json_is_text_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="mlx_spec.server")
    assert parse_bare('{"a": [1, 2}', [WEATHER]) is None and not caplog.records  # some JSON-like text: no warning
    assert parse_bare('```json\n{"name": "get_weather", "arguments": {"city": }\n```', [WEATHER]) is None
    assert "looks like a tool call is not valid JSON" in caplog.text
    assert all(map(may_be_bare_call, ["", " ", "`", "``", "```", "```j", "```json", "```json\n", "{", "```\n{"]))
    assert not any(map(may_be_bare_call, ["Sure", "```py", "```json\nx", "`a"]))


# --- tool calls ------------------------------------------------------------------------------


def test_a_tool_call_round_trip(folders, scripted, caplog):
    caplog.set_level(logging.WARNING, logger="mlx_spec.server")
    client = client_for(scripted["call"])
    answer = chat(client, messages=ASK, tools=[WEATHER, TIME])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The prompt held the tools, rendered by the template.
    assert answer.usage.prompt_tokens == len(tokens_of(folders["call"], ASK, tools=[WEATHER, TIME]))
    assert answer.usage.prompt_tokens > len(tokens_of(folders["call"], ASK)) + 50

    content, _, calls, finish_reason, chunks = streamed(client, messages=ASK, tools=[WEATHER])
    assert content == "Let me check. " and finish_reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert not any("<tool_call>" in (c.choices[0].delta.content or "") for c in chunks if c.choices)

    # The call and its result go back into the conversation.
    turn = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = chat(client, messages=turn, tools=[WEATHER])
    expected = tokens_of(folders["call"], turn, tools=[WEATHER])
    assert answer.usage.prompt_tokens == len(expected)
    _, tokenizer = mlx_spec.load(str(folders["call"]))
    assert f"<tool_call>\n{CALL}\n</tool_call>" in tokenizer.decode(expected)  # arguments as an object
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in tokenizer.decode(expected)
    assert not caplog.records


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(folders, scripted):
    client = client_for(scripted["call"])
    answer = chat(client, messages=ASK, tools=[WEATHER], tool_choice="none")
    message = answer.choices[0].message
    assert message.tool_calls is None and answer.choices[0].finish_reason == "stop"
    assert message.content == "".join(SCRIPTS["call"])
    assert answer.usage.prompt_tokens == len(tokens_of(folders["call"], ASK))


def test_a_malformed_call_comes_back_as_text_with_a_warning(scripted, caplog):
    caplog.set_level(logging.WARNING, logger="mlx_spec.server")
    client = client_for(scripted["malformed"])
    answer = chat(client, messages=ASK, tools=[WEATHER])
    choice = answer.choices[0]
    assert choice.message.content == "".join(SCRIPTS["malformed"]) and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert "a tool call could not be parsed (JSONDecodeError" in caplog.text
    content, _, calls, finish_reason, _ = streamed(client, messages=ASK, tools=[WEATHER])
    assert (content, calls, finish_reason) == ("".join(SCRIPTS["malformed"]), [], "stop")


def test_a_fenced_json_reply_naming_a_tool_is_a_call(scripted):
    client = client_for(scripted["fenced"])
    answer = chat(client, messages=ASK, tools=[WEATHER])
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert answer.choices[0].message.content is None and answer.choices[0].finish_reason == "tool_calls"
    content, _, calls, finish_reason, _ = streamed(client, messages=ASK, tools=[WEATHER])
    assert content == "" and [c["name"] for c in calls] == ["get_weather"] and finish_reason == "tool_calls"
    # Without tools it is only text.
    answer = chat(client, messages=ASK)
    assert answer.choices[0].message.content == "".join(SCRIPTS["fenced"])


def test_a_named_or_required_tool_choice_makes_a_call(random_base):
    client = client_for(random_base)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in (named, "required"):
        answer = chat(client, messages=ASK, tools=[TIME, WEATHER], tool_choice=tool_choice)
        calls = answer.choices[0].message.tool_calls
        assert answer.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        name = calls[0].function.name
        assert name == "get_weather" or tool_choice == "required" and name == "get_time"
        tool = WEATHER if name == "get_weather" else TIME
        jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])
    _, _, calls, finish_reason, _ = streamed(client, messages=ASK, tools=[WEATHER], tool_choice=named, temperature=0.7)
    assert finish_reason == "tool_calls" and [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


# --- reasoning -------------------------------------------------------------------------------


def test_thinking_goes_to_reasoning_content(folders, scripted):
    client = client_for(scripted["thinking"])
    answer = chat(client, messages=ASK)
    message = answer.choices[0].message
    assert (
        message.model_extra["reasoning_content"] == "The user asks about Paris." and message.content == "It is sunny."
    )
    content, reasoning, _, finish_reason, _ = streamed(client, messages=ASK)
    assert (reasoning, content, finish_reason) == ("The user asks about Paris.", "It is sunny.", "stop")
    # enable_thinking reaches the template (top level or in chat_template_kwargs): no think block is opened.
    for extra in ({"enable_thinking": False}, {"chat_template_kwargs": {"enable_thinking": False}}):
        answer = chat(client, messages=ASK, extra_body=extra)
        assert answer.usage.prompt_tokens == len(tokens_of(folders["thinking"], ASK, enable_thinking=False))
        assert "reasoning_content" not in answer.choices[0].message.model_extra
        assert answer.choices[0].message.content.startswith("The user asks about Paris.</think>")
    # A reply held to a grammar does not think (unless asked to): it is all content.
    yes_no = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["yes", "no"]}}}
    answer = chat(client, messages=ASK, response_format=yes_no)
    assert json.loads(answer.choices[0].message.content) in ("yes", "no")
    assert "reasoning_content" not in answer.choices[0].message.model_extra
    assert answer.usage.prompt_tokens == len(tokens_of(folders["thinking"], ASK, enable_thinking=False))


# --- structured output -----------------------------------------------------------------------


def test_a_json_schema_reply_parses_and_validates(random_base):
    client = client_for(random_base)
    schema_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    # The user's message repeats the reply's opening: prompt lookup drafts from it.
    messages = [{"role": "user", "content": 'Answer like {"city": "Rome", "days": 3, "note": "sun", "tags": [true]}'}]

    def answer(**kwargs):
        return chat(client, messages=messages, response_format=schema_format, **kwargs)

    greedy = answer()
    text = greedy.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert greedy.choices[0].finish_reason == "stop" and greedy.stats["total_draft_tokens_count"] > 0
    alone = answer(extra_body={"draft": False})  # prompt lookup only
    assert alone.choices[0].message.content == text and alone.usage.completion_tokens == greedy.usage.completion_tokens
    assert alone.stats["lookup_draft_tokens_count"] > 0
    for seed, k in ((None, "auto"), (1, "auto"), (2, 4)):
        sampled = answer(temperature=0.7, seed=seed, extra_body={"num_draft_tokens": k})
        jsonschema.validate(json.loads(sampled.choices[0].message.content), SCHEMA)
        assert sampled.stats["total_draft_tokens_count"] > 0  # speculative rounds, drafted or copied
    assert sampled.stats["total_draft_tokens_count"] > sampled.stats["lookup_draft_tokens_count"]  # the draft model
    content, *_ = streamed(client, messages=messages, response_format=schema_format, temperature=0.7)
    jsonschema.validate(json.loads(content), SCHEMA)
    anything = chat(client, messages=messages, response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_a_constrained_greedy_generation_is_the_same_with_or_without_a_draft(folders):
    main, tokenizer = mlx_spec.load(str(folders["random"]))
    draft, _ = mlx_spec.load(str(folders["random_draft"]))
    prompt = tokenizer.apply_chat_template(ASK, add_generation_prompt=True)
    vocab = main.args.vocab_size

    def generate(**kwargs):
        processor = GrammarProcessor(tokenizer, json_schema_grammar(SCHEMA), vocab)
        out = list(
            mlx_spec.stream_generate(main, tokenizer, prompt, max_tokens=96, logits_processors=[processor], **kwargs)
        )
        return [r.token for r in out]

    plain = generate(prompt_lookup=False)
    for kwargs in (dict(draft_model=draft), dict(draft_model=draft, num_draft_tokens=6), dict()):
        assert generate(**kwargs) == plain
    text = tokenizer.decode(plain)
    jsonschema.validate(json.loads(text.removesuffix("<|im_end|>")), SCHEMA)
    # The processor masks a row from the tokens before it, whatever it saw before: a rejected draft leaves nothing.
    processor = GrammarProcessor(tokenizer, json_schema_grammar(SCHEMA), vocab)
    history = mx.array(prompt)
    logits = mx.zeros((1, vocab))
    first = processor(history, logits)
    processor(mx.concatenate([history, mx.array(plain[:5])]), logits)
    assert mx.array_equal(processor(history, logits), first)
    assert (first[0] > -float("inf")).sum().item() == 1  # only "{"


def test_bad_tool_and_format_requests_are_400s(random_base):
    client = client_for(random_base)
    import openai

    cases = [
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (dict(response_format={"type": "xml"}), "response_format"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}), "response_format"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, messages=ASK, **kwargs)
        assert e.value.response.json()["error"]["param"] == param, kwargs


@pytest.mark.slow
def test_the_default_pair_calls_a_tool_with_its_own_template():
    """`mlx-spec serve` on the default pair (a subprocess, as a user runs it: OpenBLAS preloaded): Qwen2.5-Coder's
    own template renders the tool, and its call comes back as `tool_calls`."""
    import signal

    from test_server import start_cli, stop_cli

    child, base, lines = start_cli("--max-tokens", "48")
    try:
        client = client_for(base).with_options(timeout=900)
        answer = chat(client, messages=ASK, tools=[WEATHER])
        stop_cli(child, signal.SIGINT, lines)
    finally:
        if child.poll() is None:
            child.kill()
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    assert answer.choices[0].finish_reason == "tool_calls" and answer.stats["total_draft_tokens_count"] > 0
    print(answer.choices[0].message, answer.stats)


def test_a_draft_cut_to_a_shortlist_still_proposes_what_the_grammar_allows(folders):
    main, tokenizer = mlx_spec.load(str(folders["random"]))
    draft, _ = mlx_spec.load(str(folders["random_draft"]))
    prompt = tokenizer.apply_chat_template(ASK, add_generation_prompt=True)

    def generate(**kwargs):
        processor = GrammarProcessor(tokenizer, json_schema_grammar(SCHEMA), main.args.vocab_size)
        out = mlx_spec.stream_generate(main, tokenizer, prompt, max_tokens=96, logits_processors=[processor], **kwargs)
        return "".join(r.text for r in out)

    # The first 100 ids are bytes: "{", quotes and digits are among them, most letters, the piece tokens and the
    # end are not: rows where the draft may propose nothing the grammar allows (it is rejected there).
    for kwargs in (dict(), dict(temp=0.7), dict(temp=0.7, seed=3)):
        text = generate(draft_model=draft, draft_vocab_size=100, num_draft_tokens=4, **kwargs)
        jsonschema.validate(json.loads(text), SCHEMA)
        if not kwargs:
            assert text == generate()
