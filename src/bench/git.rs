//! Running git for the benchmark: with a home of its own, so the operator's settings change
//! nothing, and timed from spawn to exit.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

#[derive(Debug, Clone)]
pub struct Git {
    home: PathBuf,
}

impl Git {
    /// A git whose global config is `home/.gitconfig`, written here.
    pub fn new(home: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&home)?;
        std::fs::write(
            home.join(".gitconfig"),
            "[user]\n\tname = Bench\n\temail = bench@gitfleet.invalid\n\
             [init]\n\tdefaultBranch = main\n\
             [advice]\n\tdetachedHead = false\n\
             [gc]\n\tauto = 0\n\
             [maintenance]\n\tauto = false\n",
        )?;
        Ok(Self { home })
    }

    /// `git` in `dir` (a git directory or a work tree), with stdout and stderr captured.
    pub fn command(&self, dir: Option<&Path>) -> Command {
        let mut command = Command::new("git");
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = dir {
            command.arg("-C").arg(dir);
        }
        command
    }

    /// Runs `git ARGS PATHS` to completion and returns its stdout; a failure carries stderr.
    pub fn run(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        paths: &[&dyn AsRef<OsStr>],
    ) -> anyhow::Result<String> {
        let mut command = self.command(dir);
        command.args(args);
        for path in paths {
            command.arg(path.as_ref());
        }
        let output = command
            .output()
            .with_context(|| format!("running git {}", args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "git {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Like [`Git::run`], and how long it took, in seconds.
    pub fn timed(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        paths: &[&dyn AsRef<OsStr>],
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        self.run(dir, args, paths)?;
        Ok(started.elapsed().as_secs_f64())
    }
}
