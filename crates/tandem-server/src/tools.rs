//! Tool calling in the chat API (OpenAI's `tools` and `tool_choice`): the tools go to the model
//! through its chat template (or tandem's instructions where the template has no place for them),
//! the model calls them in the Hermes format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`),
//! and calls found in its output are returned as `tool_calls`. `tool_choice: "required"` or a named
//! function holds the output to a grammar of one such call, with the function's parameters as its
//! arguments' JSON schema; `"none"` offers the tools but parses nothing.
use crate::api::{ChatRequest, Common};
use crate::error::ApiError;
use crate::AppState;
use serde_json::{json, Value};
use tandem_runtime::chat::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use tandem_runtime::{parse_tool_calls, Grammar, GrammarSpec};

/// What a request's `tool_choice` asks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools, checked.
#[derive(Debug, Clone)]
pub(crate) struct ToolUse {
    /// OpenAI's list (`{"type": "function", "function": {...}}`), as templates read it.
    pub tools: Value,
    pub choice: Choice,
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request(message, Some("tools"))
}

/// The request's tools and `tool_choice`, if it offers tools (a `tool_choice` without tools is
/// accepted only as `"none"` or `"auto"`, which clients send by default).
pub(crate) fn requested(req: &ChatRequest) -> Result<Option<ToolUse>, ApiError> {
    let tools = req.tools.clone().unwrap_or_default();
    let choice = match &req.tool_choice {
        None => None,
        Some(Value::String(s)) if s == "none" => Some(Choice::None),
        Some(Value::String(s)) if s == "auto" => Some(Choice::Auto),
        Some(Value::String(s)) if s == "required" => Some(Choice::Required),
        Some(v) if v["type"] == "function" && v["function"]["name"].is_string() => {
            Some(Choice::Named(v["function"]["name"].as_str().unwrap_or_default().to_string()))
        }
        Some(v) => {
            return Err(ApiError::bad_request(
                format!("`tool_choice` must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {v}"),
                Some("tool_choice"),
            ))
        }
    };
    if tools.is_empty() {
        return match choice {
            None | Some(Choice::None) | Some(Choice::Auto) => Ok(None),
            Some(_) => Err(ApiError::bad_request("`tool_choice` needs `tools`", Some("tool_choice"))),
        };
    }
    let mut names = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t["function"]["name"].as_str().unwrap_or_default();
        if t["type"] != "function" || name.is_empty() {
            return Err(bad(format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")));
        }
        if !t["function"].get("parameters").is_none_or(|p| p.is_object()) {
            return Err(bad(format!("tools[{i}].function.parameters must be a JSON schema object")));
        }
        if names.contains(&name) {
            return Err(bad(format!("two tools are named `{name}`")));
        }
        names.push(name);
    }
    let choice = choice.unwrap_or(Choice::Auto);
    if let Choice::Named(n) = &choice {
        if !names.contains(&n.as_str()) {
            return Err(ApiError::bad_request(
                format!("`tool_choice` names `{n}`, which is not among the tools"),
                Some("tool_choice"),
            ));
        }
    }
    Ok(Some(ToolUse { tools: Value::Array(tools), choice }))
}

impl ToolUse {
    /// Whether calls in the output are returned as `tool_calls`.
    pub fn parses(&self) -> bool {
        self.choice != Choice::None
    }

    /// With `tool_choice` `required` or a named function, the compiled grammar every choice is
    /// held to (which a structured output asked beside it would contradict).
    pub fn held_to(&self, state: &AppState, c: &Common) -> Result<Option<Grammar>, ApiError> {
        let Some(spec) = self.grammar() else { return Ok(None) };
        if let Some((_, param)) = crate::structured::requested(c)? {
            return Err(ApiError::bad_request(
                format!("`tool_choice` already holds the answer to a function call: remove `{param}`"),
                Some("tool_choice"),
            ));
        }
        let grammars = state.grammars().map_err(|e| ApiError::bad_request(e, Some("tool_choice")))?;
        grammars.compile(&spec).map(Some).map_err(|e| ApiError::bad_request(format!("`tools`: {e}"), Some("tools")))
    }

    /// The grammar of one call of the chosen function (or any of them, for `required`).
    fn grammar(&self) -> Option<GrammarSpec> {
        let callable = |t: &&Value| match &self.choice {
            Choice::Required => true,
            Choice::Named(n) => t["function"]["name"] == n.as_str(),
            Choice::None | Choice::Auto => false,
        };
        let calls: Vec<String> = self.tools.as_array()?.iter().filter(callable).map(call_schema).collect();
        if calls.is_empty() {
            return None;
        }
        let rules: Vec<String> = (0..calls.len()).map(|i| format!("call{i}")).collect();
        let mut lark = format!(
            "start: {} ({}) {}\n",
            Value::String(format!("{TOOL_CALL_OPEN}\n")),
            rules.join(" | "),
            Value::String(format!("\n{TOOL_CALL_CLOSE}"))
        );
        for (rule, schema) in rules.iter().zip(&calls) {
            lark.push_str(&format!("{rule}: %json {schema}\n"));
        }
        Some(GrammarSpec::Lark(lark))
    }
}

/// The JSON schema of a call of tool `t`: its name, and its parameters as the arguments.
fn call_schema(t: &Value) -> String {
    let f = &t["function"];
    let params = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
    json!({
        "type": "object",
        "properties": {"name": {"const": f["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
    })
    .to_string()
}

/// The calls in `text` and the text around them: tagged calls, or else an output that is nothing
/// but one call's JSON object naming one of the tools (small models often leave the tags off).
fn calls_in(text: &str, tools: &Value) -> (String, Vec<(String, Value)>) {
    let (content, calls) = parse_tool_calls(text);
    if !calls.is_empty() {
        return (content, calls);
    }
    let named = |n: &str| tools.as_array().into_iter().flatten().any(|t| t["function"]["name"] == n);
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(v) if v["name"].as_str().is_some_and(named) && v["arguments"].is_object() => {
            (String::new(), vec![(v["name"].as_str().unwrap_or_default().to_string(), v["arguments"].clone())])
        }
        _ => (content, calls),
    }
}

/// OpenAI's `tool_calls` entries for the calls in `text`, with the rest of the text (None when
/// nothing but calls was written). `id` makes the calls' ids unique.
pub(crate) fn message(text: &str, tools: &Value, id: &str) -> (Option<String>, Vec<Value>) {
    let (content, calls) = calls_in(text, tools);
    let content = Some(content.trim().to_string()).filter(|c| !c.is_empty() || calls.is_empty());
    (content, calls_json(id, calls))
}

/// A whole answer's `message` and finish reason, its calls as `tool_calls`.
pub(crate) fn answer(text: &str, tools: &Value, id: &str, finish: &'static str) -> (Value, &'static str) {
    let (content, calls) = message(text, tools, id);
    let finish = finish_with(finish, &calls);
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    (message, finish)
}

/// OpenAI's finish reason for an answer that ended by itself with calls: `tool_calls`.
fn finish_with(finish: &'static str, calls: &[Value]) -> &'static str {
    if finish == "stop" && !calls.is_empty() {
        "tool_calls"
    } else {
        finish
    }
}

fn call(id: &str, i: usize, name: &str, args: &Value) -> Value {
    json!({"id": format!("call_{id}_{i}"), "type": "function", "function": {"name": name, "arguments": args.to_string()}})
}

/// A streamed choice's text with tool calls held back: content is sent as it comes up to where a
/// call may begin (an output that opens with `{` may be a call without tags: it is held to the
/// end); the calls are sent whole when the choice ends.
#[derive(Default)]
pub(crate) struct ToolStream {
    tools: Value,
    text: String,
    /// Bytes of `text` sent as content.
    sent: usize,
    /// A call has begun: nothing more is sent as content until the end.
    in_call: bool,
}

impl ToolStream {
    pub fn new(tools: Value) -> Self {
        ToolStream { tools, ..Default::default() }
    }

    /// The content to send now, given the next piece of the output.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.sent == 0 && self.text.trim_start().starts_with('{') {
            self.in_call = true;
        }
        if self.in_call {
            return String::new();
        }
        let unsent = &self.text[self.sent..];
        let upto = match unsent.find(TOOL_CALL_OPEN) {
            Some(at) => {
                self.in_call = true;
                at
            }
            // Hold back a tail that may be the start of a call's tag.
            None => (1..TOOL_CALL_OPEN.len().min(unsent.len() + 1))
                .rev()
                .find(|&n| {
                    unsent.is_char_boundary(unsent.len() - n) && TOOL_CALL_OPEN.starts_with(&unsent[unsent.len() - n..])
                })
                .map_or(unsent.len(), |n| unsent.len() - n),
        };
        let out = unsent[..upto].to_string();
        self.sent += upto;
        out
    }

    /// At the end: the content not sent yet, and the calls.
    pub fn finish(&self, id: &str) -> (String, Vec<Value>) {
        let (content, calls) = calls_in(&self.text, &self.tools);
        if calls.is_empty() {
            return (self.text[self.sent..].to_string(), calls_json(id, calls));
        }
        // What was sent is the start of the text before the first call.
        let sent = self.text[..self.sent].trim();
        let rest = content.strip_prefix(sent).unwrap_or("").to_string();
        (rest, calls_json(id, calls))
    }

    /// The last chunk's `delta` (the content held back, the calls with their `index`) and finish
    /// reason.
    pub fn end(&self, id: &str, finish: &'static str) -> (Value, &'static str) {
        let (rest, calls) = self.finish(id);
        let finish = finish_with(finish, &calls);
        let mut delta = json!({});
        if !rest.is_empty() {
            delta["content"] = json!(rest);
        }
        if !calls.is_empty() {
            let indexed = calls.into_iter().enumerate().map(|(i, mut c)| {
                c["index"] = json!(i);
                c
            });
            delta["tool_calls"] = Value::Array(indexed.collect());
        }
        (delta, finish)
    }
}

fn calls_json(id: &str, calls: Vec<(String, Value)>) -> Vec<Value> {
    calls.into_iter().enumerate().map(|(i, (name, args))| call(id, i, &name, &args)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_parsed_from_the_text_and_the_rest_is_content() {
        let text =
            "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let tools = json!([{"type": "function", "function": {"name": "weather"}}]);
        let (content, calls) = message(text, &tools, "7");
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "weather");
        assert_eq!(
            serde_json::from_str::<Value>(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap(),
            json!({"city": "Paris"})
        );
        // Only calls: no content. Not a call (bad JSON): all of it is content.
        let two = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\"}</tool_call>";
        let (content, calls) = message(two, &tools, "8");
        assert_eq!((content, calls.len()), (None, 2));
        assert_ne!(calls[0]["id"], calls[1]["id"]);
        let (content, calls) = message("<tool_call>{oops</tool_call> hi", &tools, "9");
        assert_eq!((content.as_deref(), calls.len()), (Some("<tool_call>{oops</tool_call> hi"), 0));
        // A bare call of a known tool; a bare object that names none is content.
        let (content, calls) = message(" {\"name\": \"weather\", \"arguments\": {}}", &tools, "10");
        assert_eq!((content, calls.len()), (None, 1));
        let (content, calls) = message("{\"name\": \"other\", \"arguments\": {}}", &tools, "11");
        assert_eq!((content.is_some(), calls.len()), (true, 0));
    }

    #[test]
    fn a_stream_holds_back_what_may_begin_a_call() {
        let pieces = ["Sure", ". <to", "ol_c", "all>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>"];
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let mut s = ToolStream::new(tools.clone());
        let sent: String = pieces.iter().map(|p| s.push(p)).collect();
        assert_eq!(sent, "Sure. ");
        let (rest, calls) = s.finish("1");
        assert_eq!((rest.as_str(), calls.len()), ("", 1));
        // A `<` that begins no call is sent once it is clear.
        let mut s = ToolStream::default();
        assert_eq!(s.push("a <"), "a ");
        assert_eq!(s.push("b"), "<b");
        assert_eq!(s.finish("2"), (String::new(), vec![]));
        let mut s = ToolStream::default();
        assert_eq!(s.push("x <tool"), "x ");
        assert_eq!(s.finish("3").0, "<tool");
        // A bare call is held from its first `{` and sent as a call; a bare object that is none, as text.
        let mut s = ToolStream::new(tools);
        assert_eq!(s.push(" {\"name\": \"f\", "), "");
        assert_eq!(s.push("\"arguments\": {}}"), "");
        assert_eq!(s.finish("4").1.len(), 1);
        let mut s = ToolStream::default();
        assert_eq!(s.push("{\"a\": 1}"), "");
        assert_eq!(s.finish("5"), ("{\"a\": 1}".to_string(), vec![]));
    }
}
