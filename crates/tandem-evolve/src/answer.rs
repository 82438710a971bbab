//! Reading a final answer from a candidate, and the majority vote: one piece of code for every
//! method (single sample, majority vote, RSA, Squeeze Evolve), so they are judged alike.
use serde::Deserialize;

/// Where the answer is in a candidate's text.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Extractor {
    /// The last `\boxed{...}`, else the first number after the last "answer" (as in "Answer: 42"
    /// or "the answer is 42"), else the last number in the text.
    #[default]
    Auto,
    /// The last number in the text.
    LastNumber,
    /// The last `\boxed{...}`'s content, verbatim.
    Boxed,
}

/// The answer a candidate gives, normalized (numbers without thousands separators, signs or
/// trailing zeros), or None.
pub fn extract(text: &str, how: Extractor) -> Option<String> {
    match how {
        Extractor::Boxed => boxed(text),
        Extractor::LastNumber => numbers(text).last().map(|n| normalize(n)),
        Extractor::Auto => boxed(text).or_else(|| after_answer(text)).or_else(|| extract(text, Extractor::LastNumber)),
    }
}

fn boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    let inner = text[start..start + i].trim();
                    return Some(if is_number(inner) { normalize(inner) } else { inner.to_string() });
                }
            }
            _ => {}
        }
    }
    None
}

fn after_answer(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    // Lowercasing keeps byte offsets for the ASCII marker searched for.
    let at = lower.rfind("answer")?;
    numbers(text.get(at..)?).first().map(|n| normalize(n))
}

/// Numbers as written: an optional minus, digits with optional thousands commas, an optional
/// decimal part.
fn numbers(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let neg = i > 0 && b[i - 1] == b'-' && (i < 2 || !b[i - 2].is_ascii_alphanumeric());
        let start = if neg { i - 1 } else { i };
        let mut end = i;
        while end < b.len()
            && (b[end].is_ascii_digit()
                || ((b[end] == b',' || b[end] == b'.') && end + 1 < b.len() && b[end + 1].is_ascii_digit()))
        {
            end += 1;
        }
        out.push(&text[start..end]);
        i = end;
    }
    out
}

fn is_number(s: &str) -> bool {
    numbers(s).first().is_some_and(|n| n.len() == s.trim_start_matches('+').len())
}

/// "1,200" -> "1200", "+3" -> "3", "4.50" -> "4.5", "7.0" -> "7", "-0" -> "0".
fn normalize(n: &str) -> String {
    let mut s: String = n.trim_start_matches('+').chars().filter(|&c| c != ',').collect();
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if s == "-0" {
        s = "0".into();
    }
    s
}

/// The most frequent answer and its count; ties go to the answer seen first. None when no
/// candidate has an answer.
pub fn majority<'a>(answers: impl IntoIterator<Item = &'a Option<String>>) -> Option<(String, usize)> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for a in answers.into_iter().flatten() {
        match counts.iter_mut().find(|(s, _)| *s == a.as_str()) {
            Some(c) => c.1 += 1,
            None => counts.push((a.as_str(), 1)),
        }
    }
    let best = counts.iter().map(|c| c.1).max()?;
    counts.into_iter().find(|c| c.1 == best).map(|(s, n)| (s.to_string(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_the_same_way_whatever_the_wording() {
        let auto = |t: &str| extract(t, Extractor::Auto);
        assert_eq!(auto("So 3 + 4 = 7.\nAnswer: 1,207"), Some("1207".into()));
        assert_eq!(auto("the answer is -12 apples, not 5"), Some("-12".into()));
        assert_eq!(auto("Thus \\boxed{\\frac{1}{2}} and 9"), Some("\\frac{1}{2}".into()));
        assert_eq!(auto("\\boxed{42.50}"), Some("42.5".into()));
        assert_eq!(auto("first 12, then 30 left"), Some("30".into()));
        assert_eq!(auto("step-3 gives 8"), Some("8".into()));
        assert_eq!(auto("no numbers here"), None);
        assert_eq!(extract("Answer: 5 but really 6", Extractor::LastNumber), Some("6".into()));
        assert_eq!(extract("x 7.0", Extractor::LastNumber), Some("7".into()));
    }

    #[test]
    fn majority_counts_answers_and_breaks_ties_by_first_seen() {
        let v = |xs: &[Option<&str>]| xs.iter().map(|x| x.map(String::from)).collect::<Vec<_>>();
        assert_eq!(majority(&v(&[Some("3"), None, Some("5"), Some("5"), Some("3")])), Some(("3".into(), 2)));
        assert_eq!(majority(&v(&[None, Some("5"), Some("5"), Some("3")])), Some(("5".into(), 2)));
        assert_eq!(majority(&v(&[None, None])), None);
    }
}
