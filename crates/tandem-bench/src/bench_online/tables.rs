//! The benchmark's tables: per window of requests, per configuration, where each one's engine
//! time went by kind of step, and each draft controller's figures.
use super::{Summary, WindowRow};
use tandem_engine::online::KStat;

/// Every table, in order, to stdout.
pub(super) fn print(all_rows: &[WindowRow], summaries: &[Summary]) {
    println!("\n| config | served | domain | acceptance length | tok/s | x none | k | version | gain | first-token agreement | trainer share | trainer steps |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in all_rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            r.config,
            r.served,
            r.domain,
            r.acceptance_length,
            r.tok_s,
            r.speedup.map_or("".into(), |s| format!("{s:.2}x")),
            r.chosen_k.map_or("".into(), |k| k.to_string()),
            r.drafter_version.map_or("".into(), |v| v.to_string()),
            r.gain.map_or("".into(), |g| format!("{g:.2}")),
            r.first_agreement.map_or("".into(), |a| format!("{a:.2}")),
            r.train_share.filter(|&s| s > 0.0).map_or("".into(), |s| format!("{s:.2}")),
            r.train_steps.filter(|&s| s > 0).map_or("".into(), |s| s.to_string())
        );
    }
    println!("\n| config | requests | tok/s | x none | acceptance | identical (compared) | trainer steps | serving paused for them | versions | rollbacks | dropped traces | target reached after (code, math, chat) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in summaries {
        let reach: Vec<String> =
            s.reached_target_after.iter().map(|(_, n)| n.map_or("no".into(), |n| n.to_string())).collect();
        let paused = match s.trainer_turn_secs {
            0.0 => String::new(),
            t => format!("{t:.1} s ({:.1}%)", 100.0 * s.trainer_turn_share),
        };
        println!(
            "| {} | {} | {:.1} | {} | {:.2} | {} | {} | {paused} | {} | {} | {} | {} |",
            s.config,
            s.requests,
            s.tok_s,
            s.speedup.map_or("".into(), |r| format!("{r:.2}x")),
            s.acceptance_length,
            s.identical_to_none.map_or("".into(), |b| format!("{b} ({})", s.compared_to_none)),
            s.trainer_steps,
            s.drafter_versions,
            s.rollbacks,
            s.traces_dropped,
            reach.join(", ")
        );
    }
    print_step_kinds(summaries);
    // Per draft length: a decode step's tokens and time against k = 0's say whether acceptance or
    // the cost of drafting and verifying limits what speculation earns.
    for s in summaries.iter().filter(|s| !s.k_table.is_empty()) {
        println!("\n{}: per draft length, the controller's model at the end of the run", s.config);
        print_controller_table("k", &s.k_table);
        println!("\n{}: per sibling budget of the draft tree at the held length, the same model", s.config);
        print_controller_table("siblings", &s.alternatives_table);
    }
}

/// Where each configuration's engine time went, by kind of step: prompts cost every
/// configuration alike, so they bound the whole's gain; ms per token of each decode kind against
/// `plain`'s is what drafts earn where they run. A step's ms split into drafting, the target's
/// forward and the rest (commit: verification, cache rollback, events) say which part of a
/// drafted step costs more than a plain one.
fn print_step_kinds(summaries: &[Summary]) {
    println!(
        "\n| config | step kind | steps | share of step time | ms/step | drafting | forward | commit | rows/step | tokens/step | ms/token |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for s in summaries {
        let total: f64 = s.steps.named().iter().map(|(_, t)| t.secs).sum();
        for (kind, t) in s.steps.named().into_iter().filter(|(_, t)| t.steps > 0) {
            let per = |x: f64, n: u64| x / n.max(1) as f64;
            let rest = t.secs - t.drafting_secs - t.forward_secs;
            println!(
                "| {} | {kind} | {} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                s.config,
                t.steps,
                100.0 * t.secs / total.max(1e-9),
                per(t.secs * 1e3, t.steps),
                per(t.drafting_secs * 1e3, t.steps),
                per(t.forward_secs * 1e3, t.steps),
                per(rest * 1e3, t.steps),
                per(t.rows as f64, t.steps),
                per(t.emitted as f64, t.steps),
                per(t.secs * 1e3, t.emitted),
            );
        }
    }
}

/// The controller's figures per draft length, or per sibling budget, step time against 0's
/// (a figure partly from priors, of a shape tried too rarely yet, is marked *).
fn print_controller_table(arm: &str, table: &[KStat]) {
    let base = table.iter().find(|r| r.k == 0).map(|r| r.step_secs);
    println!("| {arm} | steps run | tokens/step | ms/step | x {arm}=0 step time | tok/s |");
    println!("|---|---|---|---|---|---|");
    for r in table {
        let ratio = base.filter(|&b| b > 0.0).map_or("".into(), |b| format!("{:.2}", r.step_secs / b));
        println!(
            "| {}{} | {} | {:.2} | {:.1} | {} | {:.1} |",
            r.k,
            if r.measured { "" } else { "*" },
            r.steps,
            r.tokens_per_step,
            r.step_secs * 1e3,
            ratio,
            r.tokens_per_sec
        );
    }
}
