//! Which waiting request runs next. First-come-first-served now; a fair policy across clients
//! (virtual token counters) plugs in here later.

/// What a policy may look at for each waiting request.
#[derive(Debug, Clone)]
pub struct WaitingInfo {
    /// Order of arrival (smaller came first).
    pub arrival: u64,
    /// Who sent it (the OpenAI `user` field), for fairness across clients.
    pub client: Option<String>,
    pub prompt_tokens: usize,
}

pub trait SchedulingPolicy: Send {
    /// Index into `waiting` of the request to admit next, or None to admit nothing.
    fn pick(&mut self, waiting: &[WaitingInfo]) -> Option<usize>;
}

/// First come, first served.
#[derive(Debug, Default)]
pub struct Fcfs;

impl SchedulingPolicy for Fcfs {
    fn pick(&mut self, waiting: &[WaitingInfo]) -> Option<usize> {
        waiting.iter().enumerate().min_by_key(|(_, w)| w.arrival).map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fcfs_picks_the_earliest_arrival() {
        let w = |arrival| WaitingInfo { arrival, client: None, prompt_tokens: 1 };
        assert_eq!(Fcfs.pick(&[w(5), w(2), w(9)]), Some(1));
        assert_eq!(Fcfs.pick(&[]), None);
    }
}
