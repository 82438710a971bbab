//! What lets `tandem train-drafter` go on after it stopped (a session's end, a crash, Ctrl-C,
//! `--stop-after`): in OUT/progress, the target's answers as each part of them is read back, and
//! every `--checkpoint-every` steps the trainer's state (parameters, optimizer moments, step
//! count). The same command later continues from there and writes the drafter an uninterrupted
//! run would have written, bit for bit (each step draws its batch from the seed and the step's
//! number); a command with other arguments is refused rather than mixed in. The folder is removed
//! once the drafter is written.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tandem_engine::online::Trace;
use tandem_speculator::traces_io::{load_dir, TraceSpill};
use tandem_speculator::Trainer;

/// Options that may change between the parts of one run (how long, how often), left out of the
/// run's identity; every other argument must match.
const FREE_OPTIONS: [&str; 4] = ["--steps", "--stop-after", "--checkpoint-every", "--report-every"];

pub struct Resume {
    dir: PathBuf,
}

impl Resume {
    /// OUT/progress for the run `key` names: made if absent, refused if another run left it.
    pub fn open(out: &Path, key: &str) -> Result<Self> {
        let dir = out.join("progress");
        let key_file = dir.join("command.txt");
        match std::fs::read_to_string(&key_file) {
            Ok(k) if k == key => {}
            Ok(k) => bail!(
                "{} holds the progress of another run ({k}); run that command again to finish it, or \
                 remove the folder to start this one",
                dir.display()
            ),
            Err(_) => {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                std::fs::write(&key_file, key).with_context(|| format!("writing {}", key_file.display()))?;
            }
        }
        Ok(Resume { dir })
    }

    /// This process's command line without `FREE_OPTIONS`: what identifies a run.
    pub fn command_key() -> String {
        let mut kept = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            if FREE_OPTIONS.contains(&a.as_str()) {
                args.next();
            } else if !FREE_OPTIONS.iter().any(|o| a.starts_with(&format!("{o}="))) {
                kept.push(a);
            }
        }
        kept.join(" ")
    }

    /// Part `part` of the answers, as an earlier run kept it (None: not made yet).
    pub fn answers(&self, part: usize) -> Result<Option<Vec<Trace>>> {
        let dir = self.part_dir(part);
        if !dir.is_dir() {
            return Ok(None);
        }
        Ok(Some(load_dir(&dir).with_context(|| format!("reading {}", dir.display()))?))
    }

    /// Keeps part `part` of the answers: written beside, then renamed, so a part is whole or absent.
    pub fn keep_answers(&self, part: usize, traces: &[Trace]) -> Result<()> {
        let dir = self.part_dir(part);
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let mut spill = TraceSpill::new(&tmp)?;
        for t in traces {
            spill.write(t)?;
        }
        std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {}", tmp.display()))
    }

    /// Takes up the trainer's last saved state, if any; the step it had reached (0: none).
    pub fn restore(&self, trainer: &mut Trainer) -> Result<u64> {
        let path = self.state_path();
        if !path.exists() {
            return Ok(0);
        }
        trainer.load_state(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(trainer.steps)
    }

    pub fn save(&self, trainer: &Trainer) -> Result<()> {
        let path = self.state_path();
        trainer.save_state(&path).with_context(|| format!("writing {}", path.display()))
    }

    /// The run is done: its progress goes.
    pub fn finish(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))
    }

    fn part_dir(&self, part: usize) -> PathBuf {
        self.dir.join(format!("answers-{part:04}"))
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("trainer.safetensors")
    }
}
