//! Chat prompts rendered with the checkpoint's own Jinja template (the same template HF
//! transformers and llama.cpp use), or ChatML when the checkpoint has none.
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
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
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(minijinja::context! {
            messages => messages,
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
