"""Anthropic's Messages API (/v1/messages) through the official anthropic client, on the scripted tiny models of
test_server_tools: text, thinking and tool_use blocks, streamed and not, tool results, errors and the key."""

import json

import anthropic
import httpx
import jsonschema
import pytest
from test_server_tools import ASK, SCRIPTS, THOUGHT, WEATHER, folders, random_base, scripted, serve, tokens_of  # noqa: F401

import mlx_spec

GET_WEATHER = {
    "name": "get_weather",
    "description": WEATHER["function"]["description"],
    "input_schema": WEATHER["function"]["parameters"],
}


def client_for(base: str, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key=api_key, max_retries=0, timeout=120)


def blocks(message) -> list[tuple]:
    out = []
    for block in message.content:
        if block.type == "text":
            out.append(("text", block.text))
        elif block.type == "thinking":
            out.append(("thinking", block.thinking))
        else:
            out.append((block.type, block.name, block.input))
    return out


def events(base: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", f"{base}/v1/messages", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    out = []
    for name, data in zip(lines[::2], lines[1::2]):
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[len("data: ") :])
        assert payload["type"] == name[len("event: ") :]
        out.append((payload["type"], payload))
    return out


def test_a_tool_use_round_trip_streamed_or_not(folders, scripted):  # noqa: F811
    client = client_for(scripted["call"])
    ask = dict(model="claude-anything", max_tokens=64, messages=ASK, tools=[GET_WEATHER])
    message = client.messages.create(**ask)
    assert blocks(message) == [("text", "Let me check. "), ("tool_use", "get_weather", {"city": "Paris"})]
    assert message.stop_reason == "tool_use" and message.role == "assistant" and message.model == "call"
    tool_use = message.content[1]
    assert tool_use.id.startswith("toolu_")
    # The prompt is the chat template's, with the tools.
    prompt = tokens_of(folders["call"], ASK, tools=[WEATHER])
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(prompt)

    with client.messages.stream(**ask) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Let me check. " and blocks(final) == blocks(message)
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == message.usage.output_tokens

    kinds = [name for name, _ in events(scripted["call"], ask)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:-2] == ["content_block_start", "content_block_delta", "content_block_stop"] * 2

    # The result goes back: tool_use and tool_result blocks are the template's calls and tool messages.
    turn = [
        *ASK,
        {"role": "assistant", "content": [block.model_dump() for block in message.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": '{"temperature": 21}'}],
        },
    ]
    answer = client.messages.create(model="x", max_tokens=64, messages=turn, tools=[GET_WEATHER])
    openai_turn = [
        *ASK,
        {
            "role": "assistant",
            "content": "Let me check. ",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": tool_use.id, "content": '{"temperature": 21}'},
    ]
    expected = tokens_of(folders["call"], openai_turn, tools=[WEATHER])
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == len(expected)
    count = httpx.post(f"{scripted['call']}/v1/messages/count_tokens", json={"messages": turn, "tools": [GET_WEATHER]})
    assert count.json() == {"input_tokens": len(expected)}


def test_thinking_blocks_and_text(folders, scripted):  # noqa: F811
    client = client_for(scripted["thinking"])
    message = client.messages.create(model="x", max_tokens=64, system="Be brief.", messages=ASK)
    assert blocks(message) == [("thinking", "The user asks about Paris."), ("text", "It is sunny.")]
    assert message.stop_reason == "end_turn"
    # A system turn between the others (Claude Code sends them) is the template's system message there.
    turns = [*ASK, {"role": "system", "content": "Tools: none."}]
    count = httpx.post(
        f"{scripted['thinking']}/v1/messages/count_tokens", json={"system": "Be brief.", "messages": turns}
    )
    expected = tokens_of(folders["thinking"], [{"role": "system", "content": "Be brief."}, *turns])
    assert count.json() == {"input_tokens": len(expected)}
    assert "<|im_start|>system\nTools: none.<|im_end|>" in mlx_spec.load(str(folders["thinking"]))[1].decode(expected)
    with client.messages.stream(model="x", max_tokens=64, messages=ASK) as stream:
        final = stream.get_final_message()
    assert blocks(final) == blocks(message)
    disabled = client.messages.create(model="x", max_tokens=64, messages=ASK, thinking={"type": "disabled"})
    assert [b.type for b in disabled.content] == ["text"]


def test_tool_choice_stop_sequences_and_max_tokens(scripted, random_base):  # noqa: F811
    client = client_for(random_base)
    message = client.messages.create(
        model="x", max_tokens=96, messages=ASK, tools=[GET_WEATHER], tool_choice={"type": "tool", "name": "get_weather"}
    )
    assert message.stop_reason == "tool_use" and message.content[-1].name == "get_weather"
    jsonschema.validate(message.content[-1].input, GET_WEATHER["input_schema"])

    client = client_for(scripted["thinking"])
    kwargs = dict(model="x", messages=ASK, thinking={"type": "disabled"})
    stopped = client.messages.create(max_tokens=64, stop_sequences=["Paris"], **kwargs)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert blocks(stopped) == [("text", "The user asks about ")]
    cut = client.messages.create(max_tokens=1, **kwargs)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 1
    assert blocks(cut) == [("text", THOUGHT[0])]
    none = client_for(scripted["call"]).messages.create(
        max_tokens=64, model="x", messages=ASK, tools=[GET_WEATHER], tool_choice={"type": "none"}
    )
    assert blocks(none) == [("text", "".join(SCRIPTS["call"]))]


def test_errors_in_anthropics_shape_and_the_api_key(folders):  # noqa: F811
    with serve(folders["call"], api_key="sesame") as base:
        assert client_for(base, "sesame").messages.create(model="x", max_tokens=8, messages=ASK).content
        with pytest.raises(anthropic.AuthenticationError) as e:
            client_for(base, "guess").messages.create(model="x", max_tokens=8, messages=ASK)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
        bearer = httpx.post(
            f"{base}/v1/messages",
            json={"max_tokens": 8, "messages": ASK},
            headers={"authorization": "Bearer sesame"},
        )
        assert bearer.status_code == 200
        for body, where in (
            ({"messages": ASK}, "max_tokens"),
            (
                {"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
                "messages[0].content[0]",
            ),
            ({"max_tokens": 8, "messages": ASK, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ):
            response = httpx.post(f"{base}/v1/messages", json=body, headers={"x-api-key": "sesame"})
            error = response.json()
            assert response.status_code == 400 and error["type"] == "error", error
            assert error["error"]["type"] == "invalid_request_error" and where in error["error"]["message"]
