//! Turn-taking for `tandem bench online --interleave`: configurations served side by side take
//! turns request by request.
use anyhow::{ensure, Result};
use std::sync::{Condvar, Mutex};

/// Whose turn it is under `--interleave`: request r of configuration c is turn r × configs + c.
pub struct Turns {
    configs: usize,
    /// The turn now, and whether a configuration failed (then no turn comes again).
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Turns {
    pub fn new(configs: usize) -> Self {
        Turns { configs, state: Mutex::new((0, false)), changed: Condvar::new() }
    }

    /// Blocks until request `request` of configuration `config` may run.
    pub fn wait(&self, request: usize, config: usize) -> Result<()> {
        let want = request * self.configs + config;
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while st.0 != want && !st.1 {
            st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        ensure!(!st.1, "another configuration failed");
        Ok(())
    }

    /// The turn is over (`ok`), or its configuration failed and the others stop waiting.
    pub fn end(&self, ok: bool) {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match ok {
            true => st.0 += 1,
            false => st.1 = true,
        }
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_configurations_take_turns_request_by_request() {
        let turns = Turns::new(3);
        let log = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for c in (0..3).rev() {
                let (turns, log) = (&turns, &log);
                s.spawn(move || {
                    for r in 0..4 {
                        turns.wait(r, c).unwrap();
                        log.lock().unwrap().push((r, c));
                        turns.end(true);
                    }
                });
            }
        });
        let want: Vec<(usize, usize)> = (0..4).flat_map(|r| (0..3).map(move |c| (r, c))).collect();
        assert_eq!(log.into_inner().unwrap(), want);
        // A configuration that fails releases the others instead of leaving them waiting.
        let turns = Turns::new(2);
        std::thread::scope(|s| {
            let waiting = s.spawn(|| turns.wait(0, 1));
            turns.wait(0, 0).unwrap();
            turns.end(false);
            assert!(waiting.join().unwrap().is_err());
        });
    }
}
