"""Black-box tests of `tandem serve`, driven like users drive it: the official `openai` client and
raw HTTP. Run by crates/tandem/tests/server.rs against a freshly started server.

usage: python3 test_server.py BASE_URL MODEL_NAME
"""
import concurrent.futures
import http.client
import json
import socket
import sys
import time
import urllib.parse

import openai
from harness import run_tests

BASE, MODEL = sys.argv[1], sys.argv[2]
HOST = urllib.parse.urlparse(BASE)
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered (413) and closed before reading an oversized body
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data, dict(r.getheaders())


def error_of(status_data):
    status, data, _ = status_data
    body = json.loads(data)
    assert "error" in body and body["error"]["message"], body
    return status, body["error"]


def still_serving():
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name the capital of France."}],
                                       temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content, r


def test_models_and_health():
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    # One model by name, as the OpenAI client retrieves it; an unknown one is the client's 404.
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.owned_by == "tandem" and m.model_extra["max_model_len"] > 0, m
    try:
        client.models.retrieve("gpt-17")
        raise AssertionError("an unknown model was found")
    except openai.NotFoundError as e:
        assert "gpt-17" in str(e), e
    assert raw("GET", "/health")[0] == 200


def test_completion_and_chat():
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name the capital of France."}],
                                       temperature=0, max_completion_tokens=30)
    assert "Paris" in c.choices[0].message.content and c.choices[0].finish_reason == "stop"
    assert c.usage.completion_tokens > 0


def test_streaming_with_usage():
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name the capital of France."}],
                                            temperature=0, max_tokens=30, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name the capital of France."}],
                                           temperature=0, max_tokens=30)
    assert text == plain.choices[0].message.content, (text, plain)
    assert finish == "stop" and usage.completion_tokens == plain.usage.completion_tokens
    s = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices)


def test_logprobs():
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], temperature=0,
                                       max_tokens=5, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5  # greedy takes the top token
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_n_seed_stop_echo():
    r = client.completions.create(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0, n=3, seed=5)
    again = client.completions.create(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert r.usage.completion_tokens == sum(1 for _ in range(3)) * 8 or r.usage.completion_tokens <= 24
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0).choices[0].text
    word = full.strip().split()[0]
    cut = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text)
    e = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0, echo=True)
    assert e.choices[0].text.startswith("Hello")


def test_openai_errors():
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert "no-such-model" in str(e)
    try:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=5)  # past 8,192
        raise AssertionError("oversized prompt accepted")
    except openai.BadRequestError as e:
        assert "context" in str(e)
    try:
        client.completions.create(model=MODEL, prompt="x", temperature=7)
        raise AssertionError("temperature 7 accepted")
    except openai.BadRequestError as e:
        assert "temperature" in str(e)


def test_concurrent_equals_alone():
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]
    params = [dict(max_tokens=8 + i % 5, temperature=0) if i % 2 else dict(max_tokens=10, temperature=0.7, seed=i, top_p=0.9)
              for i in range(16)]

    def ask(i):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}], **params[i])
        return r.choices[0].message.content

    alone = [ask(i) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone, [(a, b) for a, b in zip(alone, together) if a != b]


def test_bad_input_never_takes_the_server_down():
    cases = {
        "truncated json": (b'{"prompt": "hi", "max_tok', 400, None),
        "wrong type": (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
        "negative max_tokens": (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400, "max_tokens"),
        "huge max_tokens": (json.dumps({"prompt": "hi", "max_tokens": 10**12}).encode(), 400, "max_tokens"),
        "invalid utf-8": (b'{"prompt": "\xff\xfe bad"}', 400, None),
        "10 MB body": (b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}', 413, None),
        "not an object": (b"[1, 2, 3]", 400, None),
        "missing prompt": (b"{}", 400, None),
        "bad n": (json.dumps({"prompt": "hi", "n": 0}).encode(), 400, "n"),
        "logit_bias not an id": (json.dumps({"prompt": "hi", "logit_bias": {"abc": 5}}).encode(), 400, "logit_bias"),
        "logit_bias out of range": (json.dumps({"prompt": "hi", "logit_bias": {"50": 101}}).encode(), 400, "logit_bias"),
        "logit_bias past the vocabulary": (json.dumps({"prompt": "hi", "logit_bias": {"99999999": 1}}).encode(), 400,
                                           "logit_bias"),
        "logit_bias not a number": (json.dumps({"prompt": "hi", "logit_bias": {"50": "x"}}).encode(), 400, "logit_bias"),
        "presence_penalty above 2": (json.dumps({"prompt": "hi", "presence_penalty": 2.5}).encode(), 400,
                                     "presence_penalty"),
        "frequency_penalty below -2": (json.dumps({"prompt": "hi", "frequency_penalty": -3}).encode(), 400,
                                       "frequency_penalty"),
        # Fields tandem does not implement are refused, not silently ignored.
        "best_of": (json.dumps({"prompt": "hi", "best_of": 3}).encode(), 400, "best_of"),
        "suffix": (json.dumps({"prompt": "hi", "suffix": "end"}).encode(), 400, "suffix"),
        "vLLM's bad_words": (json.dumps({"prompt": "hi", "bad_words": ["x"]}).encode(), 400, "bad_words"),
        # Structured outputs that cannot be honoured.
        "a schema that is not JSON": (json.dumps({"prompt": "hi", "guided_json": "{nope"}).encode(), 400,
                                      "guided_json"),
        "a regex that does not compile": (json.dumps({"prompt": "hi", "guided_regex": "(a"}).encode(), 400,
                                          "guided_regex"),
        "two grammars at once": (json.dumps({"prompt": "hi", "guided_regex": "a+", "guided_choice": ["a"]}).encode(),
                                 400, "guided_choice"),
        "unknown response_format": (json.dumps({"prompt": "hi", "response_format": {"type": "yaml"}}).encode(), 400,
                                    "response_format"),
        "json_schema without a schema": (json.dumps({"prompt": "hi", "response_format": {
            "type": "json_schema", "json_schema": {"name": "x"}}}).encode(), 400, "response_format"),
        "an empty choice": (json.dumps({"prompt": "hi", "guided_choice": []}).encode(), 400, "guided_choice"),
        "a Lark grammar with no start": (json.dumps({"prompt": "hi", "guided_grammar": "x: \"a\""}).encode(), 400,
                                         "guided_grammar"),
    }
    for name, (body, status, param) in cases.items():
        got, err = error_of(raw("POST", "/v1/completions", body))
        assert got == status, (name, got, err)
        if param:
            assert param in err["message"], (name, err)
        still_serving()
    for name, body in {
        "empty messages": {"messages": []},
        "bad role": {"messages": [{"role": "wizard", "content": "hi"}]},
        "messages not a list": {"messages": "hi"},
    }.items():
        got, err = error_of(raw("POST", "/v1/chat/completions", json.dumps(body).encode()))
        assert got == 400 and "messages" in err["message"], (name, err)
    # Their neutral values are what clients send by default: accepted.
    neutral = {"prompt": "hi", "max_tokens": 2, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
               "best_of": 1, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
               "use_beam_search": False, "include_stop_str_in_output": False, "guided_json": None}
    assert raw("POST", "/v1/completions", json.dumps(neutral).encode())[0] == 200
    # Unknown fields are ignored, as OpenAI does.
    status, data, _ = raw("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, "frobnicate": True}).encode())
    assert status == 200, data
    assert raw("GET", "/no/such/route")[0] == 404
    # A client that disconnects mid-stream: its generation is cancelled, the server goes on.
    s = socket.create_connection((HOST.hostname, HOST.port))
    body = json.dumps({"prompt": "Count to one thousand:", "max_tokens": 2000, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data:" not in received:
        chunk = s.recv(4096)
        assert chunk, "the stream ended before any data"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:100]
    s.close()
    still_serving()
    for _ in range(50):
        metrics = raw("GET", "/metrics")[1].decode()
        if "tandem_running_batch_size 0" in metrics:
            break
        time.sleep(0.1)
    assert "tandem_running_batch_size 0" in metrics, "the disconnected stream was not cancelled"


def test_logit_bias():
    def tokens(bias, **extra):
        body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 1,
                "logit_bias": bias, **extra}
        status, data, _ = raw("POST", "/v1/completions", json.dumps(body).encode())
        assert status == 200, data
        return json.loads(data)["choices"][0]["logprobs"]["tokens"]
    # +100 forces a token; -100 bans it (the next bias then wins), also when sampling.
    a, b = tokens({"42": 100}), tokens({"43": 100})
    assert len(set(a)) == 1 and len(set(b)) == 1 and a[0] != b[0], (a, b)
    assert tokens({"42": -100, "43": 100}) == b
    assert tokens({"42": 100}, temperature=1.0, seed=3) == a
    # The OpenAI client sends the same field.
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logit_bias={"42": 100})
    assert r.choices[0].text == "".join(a), (r.choices[0].text, a)


def test_presence_and_frequency_penalties():
    prompt = "1, 2, 3, 1, 2, 3, 1, 2, 3,"

    def run(**extra):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 20, **extra}
        status, data, _ = raw("POST", "/v1/completions", json.dumps(body).encode())
        assert status == 200, data
        return json.loads(data)["choices"][0]["logprobs"]
    # Logprobs stay the model's own; each greedy choice must be the best of them once the
    # penalties of what the output (not the prompt) already holds are taken off (OpenAI's formula,
    # as vLLM applies it), among the 20 most likely tokens and itself.
    for presence, frequency in [(0.0, 1.5), (1.0, 0.0), (0.5, -0.5)]:
        lp = run(presence_penalty=presence, frequency_penalty=frequency)
        counts = {}

        def score(token, logprob):
            n = counts.get(token, 0)
            return logprob - frequency * n - (presence if n else 0.0)
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            best = max(score(t, v) for t, v in top.items())
            assert score(token, logprob) >= best - 1e-4, (presence, frequency, token, counts, top)
            counts[token] = counts.get(token, 0) + 1
    plain, penalised = run()["tokens"], run(frequency_penalty=1.5)["tokens"]
    assert penalised != plain, plain
    # The OpenAI client sends the same fields.
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, frequency_penalty=1.5)
    assert r.choices[0].text == "".join(penalised), (r.choices[0].text, penalised)


def test_min_tokens():
    messages = [{"role": "user", "content": "Name the capital of France."}]

    def chat(**extra):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60, **extra)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason
    # EOS held back: the same answer up to where it ended, then more, at least min_tokens long.
    short, n, reason = chat()
    assert reason == "stop" and n < 30, (short, n, reason)
    text, m, _ = chat(extra_body={"min_tokens": n + 10})
    assert m >= n + 10 and text.startswith(short) and len(text) > len(short), (short, text, m)
    # A stop string is not matched inside the first min_tokens tokens either.
    cut, k, reason = chat(stop=["."])
    assert reason == "stop" and "." not in cut and k <= n, (cut, k, reason)
    text, m, _ = chat(stop=["."], extra_body={"min_tokens": k + 5})
    assert text.startswith(cut + ".") and m >= k + 5, (cut, text, m)


def test_include_stop_str_in_output():
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Name the capital of France."}], temperature=0,
                max_tokens=60, stop=[" France", "."])
    r = client.chat.completions.create(**args)
    cut = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "France" not in cut, r
    # vLLM's extension keeps the stop string that ended the output, streamed or not.
    kept = client.chat.completions.create(**args, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == cut + " France", (cut, kept)
    chunks = client.chat.completions.create(**args, stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut + " France"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


def test_structured_outputs():
    import re

    import jsonschema  # an independent validator of what the grammar held the output to

    ask = [{"role": "user", "content": "Write a short poem about a person who lives by the sea."}]
    # Unconstrained, the model writes prose: the checks below can tell a held output from a free one.
    free = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=60)
    try:
        json.loads(free.choices[0].message.content)
        raise AssertionError("the unconstrained answer is JSON already")
    except json.JSONDecodeError:
        pass
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    # Greedy and sampled (several choices, each with its own place in the grammar), chat and streamed.
    greedy = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=120,
                                            response_format=fmt)
    sampled = client.chat.completions.create(model=MODEL, messages=ask, temperature=1.0, seed=7, n=3,
                                             max_tokens=120, response_format=fmt)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=ask, temperature=0, max_tokens=120, response_format=fmt, stream=True) if c.choices)
    answers = [greedy.choices[0]] + list(sampled.choices)
    for c in answers:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert streamed == greedy.choices[0].message.content, (streamed, greedy.choices[0].message.content)
    assert len({c.message.content for c in sampled.choices}) > 1, "three sampled choices were identical"
    # Any JSON object; the completions route takes vLLM's fields.
    obj = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=80,
                                         messages=[{"role": "user", "content": "Give the capital of France as a JSON object."}],
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict), obj
    phone = client.completions.create(model=MODEL, prompt="Call me at", temperature=0.7, seed=3, max_tokens=20,
                                      extra_body={"guided_regex": r" \(\d{3}\) \d{3}-\d{4}"})
    assert re.fullmatch(r" \(\d{3}\) \d{3}-\d{4}", phone.choices[0].text), phone.choices[0].text
    for extra in ({"guided_choice": ["yes", "no", "maybe so"]}, {"structured_outputs": {"choice": ["yes", "no", "maybe so"]}}):
        r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=10, extra_body=extra,
                                           messages=[{"role": "user", "content": "Is the sea salty?"}])
        assert r.choices[0].message.content in ("yes", "no", "maybe so"), r
    lark = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{2,10}/'
    r = client.completions.create(model=MODEL, prompt="Say hello to Bob.", temperature=0, max_tokens=12,
                                  extra_body={"guided_grammar": lark})
    assert re.fullmatch(r"(hello|hi) [a-z]{2,10}", r.choices[0].text), r.choices[0].text
    # A schema given as a string (vLLM accepts both), on the completions route.
    r = client.completions.create(model=MODEL, prompt="A person as JSON:", temperature=0, max_tokens=120,
                                  extra_body={"guided_json": json.dumps(PERSON)})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    still_serving()


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": {"type": "object", "required": ["city", "unit"],
                                                     "properties": {"city": {"type": "string", "maxLength": 30},
                                                                    "unit": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers",
                                      "parameters": {"type": "object", "required": ["a", "b"],
                                                     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
]


def test_tool_calls():
    import jsonschema

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def check(calls, name=None):
        assert calls, "no tool call"
        for c in calls:
            assert c.type == "function" and c.id and (name is None or c.function.name == name), c
            jsonschema.validate(json.loads(c.function.arguments), params[c.function.name])

    # `required` and a named function hold the answer to a call of the tools' own schemas.
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None, r
    check(r.choices[0].message.tool_calls)
    named = {"type": "function", "function": {"name": "add"}}
    sampled = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, tool_choice=named,
                                             temperature=1.0, seed=5, n=3, max_tokens=80)
    for c in sampled.choices:
        check(c.message.tool_calls, "add")
    # Streamed: the same call, whole in the last chunk; no tag leaks into the content.
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, tool_choice="required",
                                                temperature=0, max_tokens=80, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                calls[tc.index] = (tc.function.name, tc.function.arguments)
            finish = c.finish_reason or finish
    first = r.choices[0].message.tool_calls[0]
    assert (content, finish, calls) == ("", "tool_calls", {0: (first.function.name, first.function.arguments)})
    # The tools reach the prompt (this model's template has no place for them: tandem's instructions).
    with_tools = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, tool_choice="none",
                                                temperature=0, max_tokens=1)
    without = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=1)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 50, (with_tools.usage, without.usage)
    status, data, _ = raw("POST", "/tokenize", json.dumps({"messages": ask, "tools": TOOLS}).encode())
    assert status == 200 and json.loads(data)["count"] == with_tools.usage.prompt_tokens, data
    # A history with the call and its result is read back; `none` parses nothing.
    call = r.choices[0].message.tool_calls[0]
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    after = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=30)
    assert after.choices[0].message.content, after
    assert with_tools.choices[0].message.tool_calls is None
    for body, param in [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"messages": ask + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]}, "messages"),
    ]:
        status, err = error_of(raw("POST", "/v1/chat/completions", json.dumps({"messages": ask, **body}).encode()))
        assert status == 400 and err["param"] == param, (body, err)
    still_serving()


def test_continue_final_message():
    user = [{"role": "user", "content": "Name the capital of France."}]
    begun = user + [{"role": "assistant", "content": "The capital of France is"}]

    def tok(body):
        status, data, _ = raw("POST", "/tokenize", json.dumps(body).encode())
        assert status == 200, data
        return json.loads(data)["tokens"]
    # vLLM's form: the chat ready for the assistant's turn, then the begun text, no end of turn.
    want = tok({"messages": user}) + tok({"prompt": "The capital of France is"})
    assert tok({"messages": begun, "continue_final_message": True, "add_generation_prompt": False}) == want
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    r = client.chat.completions.create(model=MODEL, messages=begun, temperature=0, max_tokens=10, extra_body=extra)
    assert r.usage.prompt_tokens == len(want) and "Paris" in r.choices[0].message.content, r
    # It goes on as a completion of the same ids does.
    c = client.completions.create(model=MODEL, prompt=want, max_tokens=10, temperature=0)
    assert c.choices[0].text == r.choices[0].message.content, (c.choices[0].text, r.choices[0].message.content)
    for body, param in [
        ({"messages": begun, "continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        ({"messages": user + [{"role": "assistant", "content": ""}], "continue_final_message": True}, "messages"),
    ]:
        status, err = error_of(raw("POST", "/v1/chat/completions", json.dumps(body).encode()))
        assert status == 400 and err["param"] == param, err


def test_tokenize_and_detokenize():
    def post(path, body):
        status, data, _ = raw("POST", path, json.dumps(body).encode())
        return status, json.loads(data)
    prompt = "The capital of France is"
    status, t = post("/tokenize", {"prompt": prompt})
    assert status == 200 and t["count"] == len(t["tokens"]) and t["max_model_len"] > t["count"], t
    # The ids a completion is charged for; and back to the same text.
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == t["count"], (r.usage, t)
    status, d = post("/detokenize", {"tokens": t["tokens"]})
    assert status == 200 and d["prompt"] == prompt, d
    # A chat, rendered by the model's template as the chat route renders it.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name the capital of France."}]
    status, c = post("/tokenize", {"model": MODEL, "messages": messages})
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert status == 200 and chat.usage.prompt_tokens == c["count"], (chat.usage, c)
    # Without the assistant turn's opening: a shorter prefix of the same ids.
    status, bare = post("/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert status == 200 and bare["count"] < c["count"] and c["tokens"][:bare["count"]] == bare["tokens"], (bare, c)
    for path, body, status, param in [
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": "a", "messages": messages}, 400, None),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": "a", "model": "gpt-17"}, 404, None),
        ("/detokenize", {"tokens": [99999999]}, 400, "tokens"),
        ("/detokenize", {"tokens": "x"}, 400, "tokens"),
    ]:
        got, err = error_of(raw("POST", path, json.dumps(body).encode()))
        assert got == status and err.get("param") == param, (path, body, got, err)
    still_serving()


def test_clients_are_attributed_and_metered():
    body = json.dumps({"prompt": "Count: one two three", "max_tokens": 5, "temperature": 0})
    for who in ({"X-Tandem-Client": "team-a", "X-Tandem-Agent": "planner"}, {"Authorization": "Bearer sk-secret-key"}):
        status, _, _ = raw("POST", "/v1/completions", body, {"Content-Type": "application/json", **who})
        assert status == 200, status
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, user="user-7")
    assert r.usage.completion_tokens == 3, r.usage
    # No waiting: a response's accounting is published before the response ends.
    text = raw("GET", "/metrics")[1].decode()
    assert 'tandem_client_service_tokens_total{client="team-a/planner",kind="output"} 5' in text, text
    assert 'tandem_client_service_tokens_total{client="user-7",kind="output"} 3' in text, text
    assert "sk-secret-key" not in text and 'client="key-' in text, "API keys must be hashed, never exported"
    assert 'tandem_scheduler_info{policy="fair"} 1' in text, text
    assert 'tandem_client_request_latency_seconds_count{client="user-7"} 1' in text, text


def metric(name):
    text = raw("GET", "/metrics")[1].decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_repeated_prompt_is_served_from_the_prefix_cache():
    # A long system prompt sent twice (two agent turns): the second request starts on the first's
    # cached KV blocks, and its answer is the same, logprobs included.
    system = "You are a careful assistant who answers questions about geography in one short sentence. " * 3
    ask = lambda q: client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
        temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    first = ask("What is the capital of Italy?")
    hits = metric("tandem_prefix_cache_hit_tokens_total")
    again = ask("What is the capital of Italy?")
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.choices[0].logprobs == first.choices[0].logprobs
    assert metric("tandem_prefix_cache_hit_tokens_total") - hits >= first.usage.prompt_tokens - 16
    # Reported as OpenAI reports it.
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16, again.usage
    other = ask("What is the capital of Spain?")
    assert metric("tandem_prefix_cache_hit_tokens_total") - hits >= 2 * 48, "the system prompt was not shared"
    assert other.usage.prompt_tokens > 48


def test_metrics():
    status, data, headers = raw("GET", "/metrics")
    text = data.decode()
    assert status == 200
    for name in ["tandem_requests_total", "tandem_prompt_tokens_total", "tandem_generation_tokens_total", "tandem_queue_depth",
                 "tandem_running_batch_size", "tandem_kv_cache_used_bytes", "tandem_kv_cache_cached_bytes",
                 "tandem_kv_cache_total_bytes", "tandem_prefix_cache_hit_tokens_total",
                 "tandem_prefix_cache_query_tokens_total", 'tandem_kv_cache_blocks{state="free"}',
                 "tandem_time_to_first_token_seconds_bucket", "tandem_inter_token_latency_seconds_count"]:
        assert name in text, name
    assert 'status="400"' in text and 'status="200"' in text


if __name__ == "__main__":
    run_tests(globals())
