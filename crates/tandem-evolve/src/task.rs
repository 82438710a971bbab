//! An offline task with exactly checkable answers: multi-step arithmetic word problems made from a
//! seed (a person, a thing, a start count and a few operations on it). The held-out set's seed is
//! never used for anything but evaluation.
use crate::answer::{extract, Extractor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The evaluation set's seed; `DEV_SEED` is for trying prompts and settings.
pub const HELD_OUT_SEED: u64 = 0x5eed_2026_1203;
pub const DEV_SEED: u64 = 7;

/// The instruction every problem ends with, so every method reads answers the same way.
pub const ANSWER_FORMAT: &str = "Solve it step by step, then end with a line of the form \"Answer: <number>\".";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub id: usize,
    /// The whole prompt (story, question and answer format).
    pub question: String,
    pub answer: i64,
}

impl Problem {
    /// Whether a candidate's text gives this problem's answer (read with `how`).
    pub fn check(&self, text: &str, how: Extractor) -> bool {
        self.check_answer(extract(text, how).as_deref())
    }

    /// Whether an extracted answer is right.
    pub fn check_answer(&self, answer: Option<&str>) -> bool {
        answer.is_some_and(|a| a == self.answer.to_string())
    }
}

const NAMES: &[&str] =
    &["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Liam"];
const THINGS: &[&str] = &["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"];

/// `count` problems of `steps` operations each (2-4 is where small models start to fail).
pub fn arithmetic(seed: u64, count: usize, steps: usize) -> Vec<Problem> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|id| problem(&mut rng, id, steps)).collect()
}

fn problem(rng: &mut StdRng, id: usize, steps: usize) -> Problem {
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let thing = THINGS[rng.random_range(0..THINGS.len())];
    let mut value: i64 = rng.random_range(5..60);
    let mut story = format!("{name} has {value} {thing}.");
    for _ in 0..steps {
        let (sentence, next) = operation(rng, name, thing, value);
        story.push(' ');
        story.push_str(&sentence);
        value = next;
    }
    let question = format!("{story} How many {thing} does {name} have now? {ANSWER_FORMAT}");
    Problem { id, question, answer: value }
}

/// One operation on the count: its sentence and the new count (always a positive whole number).
fn operation(rng: &mut StdRng, name: &str, thing: &str, value: i64) -> (String, i64) {
    loop {
        match rng.random_range(0..5) {
            0 => {
                let b = rng.random_range(3..40);
                return (format!("Then {name} buys {b} more."), value + b);
            }
            1 if value > 4 => {
                let b = rng.random_range(1..value);
                return (format!("Then {name} gives {b} of them away."), value - b);
            }
            2 => {
                let (c, d) = (rng.random_range(2..7), rng.random_range(2..13));
                return (format!("Then {name} gets {c} boxes with {d} {thing} in each."), value + c * d);
            }
            3 if value < 200 => return (format!("Then the number of {thing} {name} has doubles."), value * 2),
            4 => {
                let parts: Vec<i64> = (2..6).filter(|p| value % p == 0 && value / p > 1).collect();
                if let Some(&p) = parts.get(rng.random_range(0..parts.len().max(1))) {
                    let sentence = format!(
                        "Then {name} shares them equally among {p} friends, {name} included, and keeps one share."
                    );
                    return (sentence, value / p);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_reproducible_and_their_answers_follow_the_story() {
        let a = arithmetic(HELD_OUT_SEED, 50, 3);
        assert_eq!(a, arithmetic(HELD_OUT_SEED, 50, 3));
        assert_ne!(a[0].question, arithmetic(DEV_SEED, 1, 3)[0].question);
        for p in &a {
            assert!(p.answer > 0, "{p:?}");
            assert!(p.question.ends_with(ANSWER_FORMAT));
            assert!(p.check(&format!("... so\nAnswer: {}", p.answer), Extractor::Auto));
            assert!(!p.check(&format!("Answer: {}", p.answer + 1), Extractor::Auto));
        }
        // One worked by hand: the story's operations applied in order give the answer.
        let p = &a[0];
        let mut v: i64 = 0;
        for s in p.question.split(". ") {
            let n: Vec<i64> = s.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
            if s.contains(" has ") && !s.contains("Then") {
                v = n[0];
            } else if s.contains("buys") {
                v += n[0];
            } else if s.contains("away") {
                v -= n[0];
            } else if s.contains("boxes") {
                v += n[0] * n[1];
            } else if s.contains("doubles") {
                v *= 2;
            } else if s.contains("shares") {
                v /= n[0];
            }
        }
        assert_eq!(v, p.answer, "{}", p.question);
    }
}
