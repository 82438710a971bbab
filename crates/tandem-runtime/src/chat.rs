//! Chat prompts rendered with the checkpoint's own Jinja template (the same template HF
//! transformers and llama.cpp use), or ChatML when the checkpoint has none.
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls of tools (rendered by templates that know tools).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// One call of a tool, as chat templates read it (Hugging Face's form: the arguments as an object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: serde_json::Value,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// Where a tool call begins and ends in a model's output (the Hermes format, which Qwen2.5's
/// templates teach and tandem's own tool instructions ask for).
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// The instructions tandem adds to the system message when the checkpoint's template does not
/// render tools itself: the tools' JSON schemas and the format to call them in.
fn tool_instructions(tools: &serde_json::Value) -> String {
    let listed: Vec<String> = tools.as_array().into_iter().flatten().map(|t| t.to_string()).collect();
    format!(
        "You may call functions to help with the user's request. The functions, as JSON schemas:\n<tools>\n{}\n</tools>\n\
         To call one, answer with a JSON object holding its name and arguments inside tags:\n\
         {TOOL_CALL_OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n{TOOL_CALL_CLOSE}",
        listed.join("\n")
    )
}

/// An output's text outside its tool calls, and the calls (name, arguments as a JSON object), in
/// order. A block that is not a JSON object with a string `name` stays in the text, as written.
pub fn parse_tool_calls(text: &str) -> (String, Vec<(String, serde_json::Value)>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find(TOOL_CALL_OPEN) {
        let body_at = open + TOOL_CALL_OPEN.len();
        let (body, after) = match rest[body_at..].find(TOOL_CALL_CLOSE) {
            Some(close) => (&rest[body_at..body_at + close], body_at + close + TOOL_CALL_CLOSE.len()),
            None => (&rest[body_at..], rest.len()),
        };
        match serde_json::from_str::<serde_json::Value>(body.trim()) {
            Ok(v) if v["name"].is_string() && (v["arguments"].is_object() || v.get("arguments").is_none()) => {
                content.push_str(&rest[..open]);
                let args = v.get("arguments").cloned().unwrap_or_else(|| serde_json::json!({}));
                calls.push((v["name"].as_str().unwrap_or_default().to_string(), args));
            }
            _ => content.push_str(&rest[..after]),
        }
        rest = &rest[after..];
    }
    content.push_str(rest);
    (content.trim().to_string(), calls)
}

/// ChatML, which SmolLM2 and Qwen2.5 are trained on; used when a checkpoint carries no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a template; `None` gives ChatML.
    pub fn new(template: Option<&str>, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, String> {
        let mut env = Environment::new();
        // HF templates call Python string methods (.strip(), .startswith(), ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_today(&fmt) });
        env.add_template_owned("chat", template.unwrap_or(CHATML).to_string())
            .map_err(|e| format!("chat template does not compile: {e}"))?;
        Ok(ChatTemplate { env, bos_token: bos_token.unwrap_or("").into(), eos_token: eos_token.unwrap_or("").into() })
    }

    /// The prompt text for `messages`, ending with the assistant turn's opening when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template renders `tools` itself (Qwen2.5's do; SmolLM2's and ChatML do not).
    pub fn knows_tools(&self) -> bool {
        self.env.get_template("chat").is_ok_and(|t| t.undeclared_variables(false).contains("tools"))
    }

    /// As `render`, offering the model `tools` (OpenAI's list of `{"type": "function",
    /// "function": {...}}`): through the template where it renders them, else as instructions
    /// added to the system message (one is added first when the chat has none).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let mut owned;
        let mut messages = messages;
        if !self.knows_tools() && (tools.is_some() || messages.iter().any(|m| !m.tool_calls.is_empty())) {
            owned = messages.to_vec();
            // The model reads its earlier calls as it was asked to write them.
            for m in owned.iter_mut() {
                for c in &m.tool_calls {
                    let call = serde_json::json!({"name": c.function.name, "arguments": c.function.arguments});
                    m.content.push_str(&format!("{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"));
                }
            }
            if let Some(t) = tools {
                let text = tool_instructions(t);
                match owned.first_mut() {
                    Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
                    _ => owned.insert(0, Message::new("system", &text)),
                }
            }
            messages = &owned;
        }
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| format!("chat template failed: {e}"))
    }

    /// The chat rendered for the model to continue its final message (a turn the caller began,
    /// vLLM's `continue_final_message`): the template's text up to the end of that message's
    /// content, its end-of-turn left off.
    pub fn render_continuing(&self, messages: &[Message]) -> Result<String, String> {
        let last = match messages.last() {
            Some(m) if !m.content.is_empty() => m,
            _ => return Err("there is no final message with content to continue".into()),
        };
        let text = self.render(messages, false)?;
        match text.rfind(&last.content) {
            Some(at) => Ok(text[..at + last.content.len()].to_string()),
            None => Err("the chat template rewrites the final message, so it cannot be continued".into()),
        }
    }
}

/// (year, month 1-12, day 1-31) of a Unix time in seconds, UTC (Howard Hinnant's civil-date
/// algorithm).
pub fn civil_date(secs: u64) -> (i64, i64, i64) {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Today's date (UTC) for templates that print it; supports %d %m %Y %b %B.
fn strftime_today(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (year, month, day) = civil_date(secs);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    fmt.replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%b", &name[..3])
        .replace("%B", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn a_continued_message_ends_the_text_without_its_end_of_turn() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        let begun = [Message::new("user", "Hi"), Message::new("assistant", "Hello, I")];
        assert_eq!(
            t.render_continuing(&begun).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, I"
        );
        assert!(t.render_continuing(&[Message::new("assistant", "")]).is_err());
        // A template that rewrites the message cannot be continued.
        let strip = ChatTemplate::new(Some("{{ messages[0]['content'].strip() }}"), None, None).unwrap();
        assert!(strip.render_continuing(&[Message::new("assistant", "x ")]).is_err());
    }

    #[test]
    fn tools_reach_a_template_that_renders_them_and_others_get_instructions() {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
        let knows = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls %}<{{ c.function.name }} {{ c.function.arguments | tojson }}>{% endfor %}\n{% endfor %}";
        let t = ChatTemplate::new(Some(knows), None, None).unwrap();
        assert!(t.knows_tools());
        let mut called = Message::new("assistant", "");
        called.tool_calls.push(ToolCall {
            id: "c1".into(),
            kind: "function".into(),
            function: FunctionCall { name: "get_weather".into(), arguments: serde_json::json!({"city": "Paris"}) },
        });
        let chat = [Message::new("user", "Weather?"), called.clone(), Message::new("tool", "18 C")];
        let text = t.render_with_tools(&chat, Some(&tools), false).unwrap();
        assert_eq!(text, "[get_weather]user: Weather?\nassistant: <get_weather {\"city\":\"Paris\"}>\ntool: 18 C\n");
        // ChatML has no place for tools: a system message of instructions, the call in the text.
        let plain = ChatTemplate::new(None, None, None).unwrap();
        assert!(!plain.knows_tools());
        let text = plain.render_with_tools(&chat, Some(&tools), true).unwrap();
        assert!(
            text.starts_with("<|im_start|>system\nYou may call functions") && text.contains("\"get_weather\""),
            "{text}"
        );
        assert!(text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call><|im_end|>"), "{text}");
        assert_eq!(plain.render_with_tools(&chat[..1], None, true).unwrap(), plain.render(&chat[..1], true).unwrap());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(Some("{{ messages[0]['content'].strip() }}"), None, None).unwrap();
        assert_eq!(t.render(&[Message::new("user", "  x ")], false).unwrap(), "x");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(Some("{{ raise_exception('bad role') }}"), None, None).unwrap();
        assert!(t.render(&[], false).unwrap_err().contains("bad role"));
    }
}
