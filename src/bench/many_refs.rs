//! A one-commit push into a repository that holds many refs, through the cluster and to a
//! bare repository by its path, alternately. The refs are written onto every replica (and the
//! path's copy) alike with `update-ref` and packed, as a repository that grew over years would
//! be, rather than pushed: a push of 100,000 refs is not what is measured.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::git::Git;
use super::measure::{NODES, Setup};
use super::progress;
use super::report::{Row, Target};
use crate::config::ProxyConfig;
use crate::dev::cluster::storage_dir;
use crate::model::{RelativePath, StorageName};
use crate::store::Store;

pub(super) fn pushes_with_many_refs(
    runtime: &tokio::runtime::Runtime,
    setup: &Setup,
    counts: &[usize],
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    let config = ProxyConfig::load(Path::new(setup.cluster.var("GITFLEET_CONFIG")?))?;
    let store = {
        let _context = runtime.enter();
        Store::connect_lazy(&config.database.url, 2, Duration::from_secs(10))?
    };
    let http = setup.cluster.var("GITFLEET_HTTP_URL")?.to_owned();
    let git = setup.git;
    let mut rows = Vec::new();
    for &count in counts {
        let name = format!("bench/refs-{count}.git");
        let url = format!("{http}/default/{name}");
        let work = setup.scratch.join(format!("refs-{count}-gitfleet"));
        git.run(None, &["clone", "--quiet", &setup.small_url], &[&work])?;
        // The push creates the repository.
        git.run(
            Some(&work),
            &["push", "--quiet", &url, "HEAD:refs/heads/main"],
            &[],
        )?;
        let record = runtime
            .block_on(store.find_repository(
                &StorageName::parse("default")?,
                &RelativePath::parse(&name)?,
            ))?
            .with_context(|| format!("{name} is not in the catalog after its push"))?;
        let tip = git.run(Some(&work), &["rev-parse", "HEAD"], &[])?;
        let script: String = (0..count)
            .map(|n| format!("create refs/heads/many/{n:06} {}\n", tip.trim()))
            .collect();
        progress(format_args!(
            "push into {count} refs: writing them onto the 3 replicas and a local copy"
        ));
        let mut copies: Vec<PathBuf> = (1..=NODES)
            .map(|index| storage_dir(&setup.cluster.dir, index).join(record.replica_path.as_str()))
            .collect();
        let path = setup.scratch.join(format!("refs-{count}-path.git"));
        git.run(
            None,
            &["clone", "--quiet", "--bare", "--no-local"],
            &[&copies[0], &path],
        )?;
        copies.push(path.clone());
        for copy in &copies {
            update_refs(git, copy, &script)?;
            git.run(Some(copy), &["pack-refs", "--all"], &[])?;
        }
        // The replicas changed behind the catalog's back: their checksum is no longer known.
        runtime.block_on(
            sqlx::query("UPDATE repositories SET refs_checksum = NULL WHERE id = $1")
                .bind(record.id.0)
                .execute(store.pool()),
        )?;
        let local = setup.scratch.join(format!("refs-{count}-local"));
        git.run(None, &["clone", "--quiet"], &[&path, &local])?;
        let (mut gitfleet, mut baseline) = (Vec::new(), Vec::new());
        for run in 0..=runs {
            for (work_tree, seconds) in [(&work, &mut gitfleet), (&local, &mut baseline)] {
                std::fs::write(work_tree.join("many.txt"), format!("run {run}\n"))?;
                git.run(Some(work_tree), &["add", "many.txt"], &[])?;
                git.run(
                    Some(work_tree),
                    &["commit", "--quiet", "-m", &format!("many {run}")],
                    &[],
                )?;
                let remote = if *work_tree == work {
                    url.as_str()
                } else {
                    "origin"
                };
                let took = git.timed(
                    Some(work_tree),
                    &["push", "--quiet", remote, "HEAD:refs/heads/main"],
                    &[],
                )?;
                if run > 0 {
                    seconds.push(took);
                }
            }
        }
        progress(format_args!("  {runs} runs each way"));
        rows.push(
            Row::new(
                format!("push, one commit, into {count} refs"),
                "s",
                &gitfleet,
            )
            .against("local path", &baseline)
            .target(Target::RatioAtMost(1.5)),
        );
    }
    Ok(rows)
}

/// Feeds `script` to `git update-ref --stdin` in `repository`.
fn update_refs(git: &Git, repository: &Path, script: &str) -> anyhow::Result<()> {
    let mut command = git.command(Some(repository));
    command
        .args(["update-ref", "--stdin"])
        .stdin(Stdio::piped());
    let mut child = command.spawn()?;
    child
        .stdin
        .take()
        .context("update-ref's stdin")?
        .write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "git update-ref --stdin in {} failed: {}",
            repository.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
