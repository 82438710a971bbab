//! A request's prompt as token ids: text tokenized, or a chat's messages checked and rendered by
//! the model's template. The one way the completion, chat, scoring, tokenize and evolving routes
//! turn what a client sent into what the model reads.
use crate::api::{ChatMessage, Content};
use crate::error::ApiError;
use crate::AppState;
use tandem_runtime::Message;

pub(crate) fn tokenize(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state
        .tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), Some("prompt")))
}

/// A chat's messages, checked: known roles (`developer` read as `system`), text content (only an
/// assistant turn may omit it).
pub(crate) fn chat_messages(messages: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("`messages` must hold at least one message", Some("messages")));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool" | "developer") {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role `{}` is not one of system, user, assistant, tool, developer", m.role),
                Some("messages"),
            ));
        }
        let content = match &m.content {
            // Only an assistant turn may come without content (OpenAI: one that called tools).
            None if m.role == "assistant" => String::new(),
            None => {
                return Err(ApiError::bad_request(
                    format!("messages[{i}] ({}) needs `content`", m.role),
                    Some("messages"),
                ))
            }
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}]: content parts of type `{kind}` are not supported (text only)"),
                                Some("messages"),
                            ))
                        }
                    }
                }
                text
            }
        };
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        let mut message = Message::new(role, &content);
        for (j, c) in m.tool_calls.iter().flatten().enumerate() {
            let arguments = serde_json::from_str(&c.function.arguments).map_err(|e| {
                ApiError::bad_request(
                    format!("messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}"),
                    Some("messages"),
                )
            })?;
            message.tool_calls.push(tandem_runtime::ToolCall {
                id: c.id.clone().unwrap_or_default(),
                kind: "function".into(),
                function: tandem_runtime::FunctionCall { name: c.function.name.clone(), arguments },
            });
        }
        message.tool_call_id = m.tool_call_id.clone();
        out.push(message);
    }
    Ok(out)
}

/// The token ids of a chat rendered by the model's template: ready for the assistant's turn (by
/// default), without it (`add_generation_prompt: false`), or ending inside the final message for
/// the model to continue (`continue_final_message`, which an explicit `add_generation_prompt: true`
/// contradicts).
pub(crate) fn chat_prompt_as(
    state: &AppState,
    messages: &[Message],
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    tools: Option<&serde_json::Value>,
) -> Result<Vec<u32>, ApiError> {
    let bad = |e: String| ApiError::bad_request(e, Some("messages"));
    let text = match (add_generation_prompt, continue_final_message.unwrap_or(false)) {
        (Some(true), true) => Err(ApiError::bad_request(
            "`continue_final_message` continues the final message: it cannot also add the assistant turn's opening (`add_generation_prompt`)",
            Some("continue_final_message"),
        )),
        (_, true) => state.template.render_continuing(messages).map_err(bad),
        (generation, false) => state.template.render_with_tools(messages, tools, generation.unwrap_or(true)).map_err(bad),
    }?;
    tokenize(state, &text)
}

/// The token ids of a chat rendered by the model's template, ready for the assistant's turn.
pub(crate) fn chat_prompt(state: &AppState, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
    chat_prompt_as(state, messages, None, None, None)
}
