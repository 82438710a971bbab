//! Stop strings, matched on the decoded text so that a stop string split across tokens is found;
//! text that might be the start of a stop string is held back until it is known not to be.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Stops,
    text: String,
    emitted: usize,
}

/// A request's stop strings, and whether the one that ends an output is part of it (vLLM's
/// `include_stop_str_in_output`; OpenAI leaves it out).
#[derive(Debug, Clone, Default)]
pub struct Stops {
    pub strings: Vec<String>,
    pub included: bool,
}

/// What to do after a piece of text arrives.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty) and continue.
    Continue(String),
    /// Emit this text, then finish with reason "stop".
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Stops) -> Self {
        let strings = stops.strings.into_iter().filter(|s| !s.is_empty()).collect();
        StopMatcher { stops: Stops { strings, ..stops }, ..Default::default() }
    }

    pub fn push(&mut self, piece: &str) -> StopOutcome {
        let search_from = self.emitted;
        self.text.push_str(piece);
        let found = (self.stops.strings.iter())
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|p| (search_from + p, s.len())))
            .min_by_key(|&(at, _)| at);
        if let Some((at, len)) = found {
            let end = if self.stops.included { at + len } else { at };
            let out = self.text[self.emitted..end].to_string();
            self.emitted = at;
            return StopOutcome::Stop(out);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut keep = self.text.len();
        for s in &self.stops.strings {
            for len in (1..s.len()).rev() {
                if len <= self.text.len() - self.emitted && self.text.ends_with(&s[..len]) && s.is_char_boundary(len) {
                    keep = keep.min(self.text.len() - len);
                    break;
                }
            }
        }
        let out = self.text[self.emitted..keep].to_string();
        self.emitted = keep;
        StopOutcome::Continue(out)
    }

    /// Emits `piece` and what was held back, matching nothing: the output is still under its
    /// `min_tokens` (vLLM checks no stop string there either); matching resumes after it.
    pub fn pass(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        self.flush()
    }

    /// Text still held back, released when generation ends without a stop string.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(strings: &[&str]) -> Stops {
        Stops { strings: strings.iter().map(|s| s.to_string()).collect(), included: false }
    }

    #[test]
    fn an_included_stop_string_ends_the_output() {
        let mut m = StopMatcher::new(Stops { included: true, ..stops(&["\n\n", "b"]) });
        assert_eq!(m.push("a E"), StopOutcome::Continue("a E".into()));
        assert_eq!(m.push("a\n"), StopOutcome::Continue("a".into()));
        assert_eq!(m.push("\nzb"), StopOutcome::Stop("\n\n".into()));
    }

    #[test]
    fn finds_stop_strings_across_pieces() {
        let mut m = StopMatcher::new(stops(&["END"]));
        assert_eq!(m.push("hello E"), StopOutcome::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("D and more"), StopOutcome::Stop(String::new()));
    }

    #[test]
    fn releases_held_text_that_was_not_a_stop() {
        let mut m = StopMatcher::new(stops(&["END"]));
        assert_eq!(m.push("a E"), StopOutcome::Continue("a ".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("Ex".into()));
        assert_eq!(m.push("EN"), StopOutcome::Continue(String::new()));
        assert_eq!(m.flush(), "EN");
    }

    #[test]
    fn passed_text_is_not_searched() {
        let mut m = StopMatcher::new(stops(&["END"]));
        assert_eq!(m.pass("END and EN"), "END and EN");
        // "EN" went out under `pass`: the stop it would complete is not found.
        assert_eq!(m.push("D"), StopOutcome::Continue("D".into()));
        assert_eq!(m.push(" END"), StopOutcome::Stop(" ".into()));
    }

    #[test]
    fn stops_at_the_earliest_of_several() {
        let mut m = StopMatcher::new(stops(&["\n\n", "b"]));
        assert_eq!(m.push("aab\n\nc"), StopOutcome::Stop("aa".into()));
    }
}
