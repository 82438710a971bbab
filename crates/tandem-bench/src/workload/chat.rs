//! Chat prompts from lists of everyday topics, choices and ideas: the benchmark's stream
//! (`chat_prompts`) and self-distillation's (`distill_chat_prompts`) each from their own lists and
//! forms, with no item and no wording in common, so a day-0 drafter meets the benchmark's chat as
//! traffic it has not seen (what a served model meets).
use super::Prompt;
use rand::rngs::StdRng;
use rand::Rng;

/// What a chat prompt is built from: a form picked at random filled with one item of each list.
struct ChatLists {
    topics: &'static [&'static str],
    pairs: &'static [(&'static str, &'static str)],
    concepts: &'static [&'static str],
    audiences: &'static [&'static str],
    /// Forms with `{topic}`, `{a}` and `{b}` (a pair), `{concept}` and `{who}` (an audience).
    forms: &'static [&'static str],
}

/// `n` prompts from `lists`.
fn prompts(lists: &ChatLists, rng: &mut StdRng, n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|_| {
            let topic = lists.topics[rng.random_range(0..lists.topics.len())];
            let pair = lists.pairs[rng.random_range(0..lists.pairs.len())];
            let concept = lists.concepts[rng.random_range(0..lists.concepts.len())];
            let who = lists.audiences[rng.random_range(0..lists.audiences.len())];
            // An i32 draw, as the stream measured since 2026-12-05 made it (its test pins it).
            let form = lists.forms[rng.random_range(0..lists.forms.len() as i32) as usize];
            let text = form
                .replace("{topic}", topic)
                .replace("{a}", pair.0)
                .replace("{b}", pair.1)
                .replace("{concept}", concept)
                .replace("{who}", who);
            Prompt { domain: "chat", text }
        })
        .collect()
}

/// The benchmark's general questions: seven forms over the lists below (352 distinct prompts;
/// the first lists had 31, which a long stream repeated hundreds of times and a day-0 drafter
/// had all seen).
pub(super) fn chat_prompts(rng: &mut StdRng, n: usize) -> Vec<Prompt> {
    prompts(&BENCHMARK, rng, n)
}

/// Self-distillation's general questions (`tandem train-drafter --self-distill`).
pub(super) fn distill_chat_prompts(rng: &mut StdRng, n: usize) -> Vec<Prompt> {
    prompts(&DISTILL, rng, n)
}

const BENCHMARK: ChatLists = ChatLists {
    topics: &CHAT_TOPICS,
    pairs: &CHAT_PAIRS,
    concepts: &CHAT_CONCEPTS,
    audiences: &CHAT_AUDIENCES,
    forms: &[
        "Give me five practical tips for {topic}.",
        "What are the most common mistakes people make when {topic}?",
        "I have one week. Make me a simple day-by-day plan for {topic}.",
        "What are the main differences between {a} and {b}? Which would you recommend and why?",
        "Write a short, friendly paragraph arguing for {a} over {b}.",
        "Explain {concept} to {who}.",
        "What is a common misconception about {concept}, and what is actually true?",
    ],
};

/// Everyday activities, as "tips for ..." and "mistakes people make when ..." both read.
const CHAT_TOPICS: [&str; 48] = [
    "learning a new language",
    "growing tomatoes",
    "saving money",
    "running a first marathon",
    "sleeping better",
    "cooking rice",
    "public speaking",
    "keeping a houseplant alive",
    "planning a trip to Japan",
    "writing a cover letter",
    "training a puppy",
    "reducing stress at work",
    "starting to paint",
    "choosing a laptop",
    "making friends in a new city",
    "baking bread",
    "learning to swim",
    "preparing for a job interview",
    "moving to a new apartment",
    "studying for exams",
    "starting a vegetable garden",
    "learning the guitar",
    "negotiating a salary",
    "hosting a dinner party",
    "cycling to work",
    "buying a used car",
    "writing a short story",
    "taking better photos",
    "organizing a small kitchen",
    "learning to code",
    "caring for an older cat",
    "camping for the first time",
    "cutting down on sugar",
    "managing a team for the first time",
    "decluttering a closet",
    "teaching a child to read",
    "planning a wedding on a budget",
    "working from home",
    "brewing coffee at home",
    "learning chess",
    "keeping a journal",
    "recovering from a cold",
    "hiking in hot weather",
    "paying off a credit card",
    "making a podcast",
    "volunteering locally",
    "staying focused while reading",
    "packing for a long flight",
];

/// Two things people choose between.
const CHAT_PAIRS: [(&str, &str); 24] = [
    ("cats", "dogs"),
    ("tea", "coffee"),
    ("trains", "planes"),
    ("e-books", "paper books"),
    ("renting", "buying a home"),
    ("running", "swimming"),
    ("the sea", "the mountains"),
    ("summer", "winter"),
    ("city life", "country life"),
    ("a laptop", "a desktop computer"),
    ("yoga", "weight training"),
    ("electric cars", "petrol cars"),
    ("working alone", "working in a team"),
    ("podcasts", "audiobooks"),
    ("gas stoves", "induction hobs"),
    ("a gap year", "starting university right away"),
    ("public schools", "home schooling"),
    ("saving", "investing"),
    ("hotels", "holiday rentals"),
    ("walking", "cycling"),
    ("cash", "card payments"),
    ("novels", "short stories"),
    ("early mornings", "late nights"),
    ("a big wedding", "a small wedding"),
];

/// Ideas to explain.
const CHAT_CONCEPTS: [&str; 32] = [
    "photosynthesis",
    "inflation",
    "the water cycle",
    "compound interest",
    "how vaccines work",
    "why the sky is blue",
    "how a bill becomes law",
    "what a black hole is",
    "how the internet works",
    "why we have seasons",
    "how a refrigerator keeps food cold",
    "what DNA does",
    "how airplanes stay in the air",
    "supply and demand",
    "how the heart pumps blood",
    "why the moon has phases",
    "how a rainbow forms",
    "what an election is for",
    "how bees make honey",
    "what gravity is",
    "how a bank works",
    "why leaves change colour in autumn",
    "how earthquakes happen",
    "what a calorie is",
    "how a battery stores energy",
    "why bread rises",
    "how the stock market works",
    "what a volcano is",
    "how sound travels",
    "why we need sleep",
    "what climate change is",
    "how a compass works",
];

/// Who an explanation is for.
const CHAT_AUDIENCES: [&str; 4] = [
    "a curious twelve-year-old",
    "a busy adult in two paragraphs",
    "someone who has never studied science",
    "a grandparent",
];

const DISTILL: ChatLists = ChatLists {
    topics: &DISTILL_TOPICS,
    pairs: &DISTILL_PAIRS,
    concepts: &DISTILL_CONCEPTS,
    audiences: &DISTILL_AUDIENCES,
    forms: &[
        "How do I get started with {topic}? Keep it short.",
        "What should a complete beginner know before {topic}?",
        "Write a checklist for {topic}.",
        "List the pros and cons of {a} and of {b}.",
        "My friend prefers {a} and I prefer {b}. Help us settle the argument fairly.",
        "Describe {concept} in simple words for {who}, with an everyday example.",
        "Why does {concept} matter? Answer in a few sentences.",
    ],
};

/// Activities, as "started with ...", "before ..." and "a checklist for ..." all read.
const DISTILL_TOPICS: [&str; 48] = [
    "repairing a bicycle tyre",
    "knitting a scarf",
    "making a monthly budget",
    "walking ten thousand steps a day",
    "waking up earlier",
    "cooking pasta from scratch",
    "giving a toast at a wedding",
    "looking after a fish tank",
    "planning a road trip across Spain",
    "writing a resignation letter",
    "adopting a rescue dog",
    "avoiding burnout",
    "learning to draw portraits",
    "buying a first smartphone",
    "joining a local sports club",
    "making homemade pizza",
    "learning to ice skate",
    "asking for a promotion",
    "sharing a flat with strangers",
    "revising for a driving test",
    "building a raised garden bed",
    "learning the piano",
    "selling things online",
    "throwing a birthday party for a child",
    "commuting by bus",
    "choosing a winter coat",
    "writing a poem",
    "editing holiday videos",
    "setting up a home office",
    "learning spreadsheets",
    "feeding a toddler vegetables",
    "sleeping in a tent in winter",
    "drinking more water",
    "leading a team meeting",
    "tidying a garage",
    "helping a teenager with homework",
    "organising a family reunion",
    "studying at a library",
    "making tea the traditional way",
    "learning to juggle",
    "writing a blog",
    "getting over jet lag",
    "climbing an indoor wall",
    "building an emergency fund",
    "starting a book club",
    "donating blood",
    "memorising a speech",
    "travelling with only a backpack",
];

/// Two things people weigh against each other.
const DISTILL_PAIRS: [(&str, &str); 24] = [
    ("rabbits", "hamsters"),
    ("green tea", "black tea"),
    ("buses", "trams"),
    ("magazines", "newspapers"),
    ("a flat", "a house with a garden"),
    ("tennis", "badminton"),
    ("lakes", "beaches"),
    ("spring", "autumn"),
    ("suburbs", "the city centre"),
    ("a tablet", "a phone for reading"),
    ("pilates", "jogging"),
    ("hybrid cars", "bicycles"),
    ("an office", "a coworking space"),
    ("radio", "television"),
    ("cast iron pans", "non-stick pans"),
    ("studying abroad", "studying at home"),
    ("private tutors", "online courses"),
    ("a pension", "a savings account"),
    ("camping", "a hotel"),
    ("scooters", "motorbikes"),
    ("shopping online", "shopping in stores"),
    ("poetry", "plays"),
    ("breakfast", "brunch"),
    ("a party", "a quiet dinner"),
];

/// Ideas to describe.
const DISTILL_CONCEPTS: [&str; 32] = [
    "evaporation",
    "interest rates",
    "the carbon cycle",
    "taxes",
    "how antibiotics work",
    "why the ocean is salty",
    "how a court trial works",
    "what a comet is",
    "how email gets delivered",
    "why days are shorter in winter",
    "how a microwave heats food",
    "what proteins do in the body",
    "how ships float",
    "opportunity cost",
    "how lungs take in oxygen",
    "why tides rise and fall",
    "how lightning forms",
    "what a parliament does",
    "how ants find food",
    "what magnetism is",
    "how insurance works",
    "why snow is white",
    "how mountains form",
    "what a vitamin is",
    "how solar panels make electricity",
    "why milk goes sour",
    "how a loan works",
    "what a glacier is",
    "how light travels",
    "why we dream",
    "what biodiversity is",
    "how a clock keeps time",
];

/// Who a description is for.
const DISTILL_AUDIENCES: [&str; 4] =
    ["a ten-year-old", "a new employee", "someone learning English", "a retired engineer"];

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashSet;

    #[test]
    fn the_benchmarks_chat_stream_is_the_one_measured_since_2026_12_05() {
        // Figures of `bench online` are compared across sessions: its prompts must not drift.
        let chat = super::super::stream(0, 0, 5500, super::super::STREAM_SEED).unwrap();
        let pinned = [
            (0, "Give me five practical tips for writing a cover letter."),
            (1000, "What are the most common mistakes people make when saving money?"),
            (2000, "Write a short, friendly paragraph arguing for working alone over working in a team."),
            (5000, "Write a short, friendly paragraph arguing for early mornings over late nights."),
        ];
        for (i, text) in pinned {
            assert_eq!(chat[i].text, text, "chat prompt {i}");
        }
    }

    #[test]
    fn distillation_chat_shares_no_item_or_prompt_with_the_benchmarks() {
        let words = |l: &ChatLists| -> HashSet<&str> {
            let pairs = l.pairs.iter().flat_map(|(a, b)| [*a, *b]);
            l.topics
                .iter()
                .copied()
                .chain(pairs)
                .chain(l.concepts.iter().copied())
                .chain(l.audiences.iter().copied())
                .collect()
        };
        let (bench, distill) = (words(&BENCHMARK), words(&DISTILL));
        let shared: Vec<_> = bench.intersection(&distill).collect();
        assert!(shared.is_empty(), "items in both: {shared:?}");
        let texts = |p: Vec<Prompt>| -> HashSet<String> { p.into_iter().map(|p| p.text).collect() };
        let seen = texts(chat_prompts(&mut StdRng::seed_from_u64(7), 20_000));
        let taught = texts(distill_chat_prompts(&mut StdRng::seed_from_u64(0), 20_000));
        assert!(seen.len() > 300 && taught.len() > 300, "{} and {} distinct prompts", seen.len(), taught.len());
        assert!(seen.is_disjoint(&taught));
        // No form's opening words in common either (the forms differ, not only their fillings).
        let openings = |t: &HashSet<String>| -> HashSet<String> {
            t.iter().map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).collect()
        };
        assert!(openings(&seen).is_disjoint(&openings(&taught)));
    }
}
