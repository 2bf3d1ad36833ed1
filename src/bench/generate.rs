//! The benchmark's repositories, made with `git fast-import` from a seeded generator, so every
//! run measures the same bytes: a large history (many commits over many files, a pack of about
//! the asked size) and a small one with many branches.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use rand::{RngCore as _, SeedableRng as _};

use super::git::Git;
use super::progress;

/// The shape of the large repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub commits: usize,
    pub files: usize,
    /// Roughly the size of the repository's pack, in MiB.
    pub pack_mib: usize,
}

/// What was made, as the measurements need it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Repositories {
    /// The large repository at its last commit, as pushed to the servers.
    #[serde(skip)]
    pub large: PathBuf,
    /// The large repository one commit earlier: where an incremental fetch starts.
    #[serde(skip)]
    pub large_before: PathBuf,
    /// Many branches, a short history: pushes and accessor calls.
    #[serde(skip)]
    pub small: PathBuf,
    pub large_commits: usize,
    pub large_files: usize,
    pub large_pack_bytes: u64,
    pub small_refs: usize,
    pub small_pack_bytes: u64,
}

/// Branches of the small repository, besides main.
pub const SMALL_BRANCHES: usize = 100;
const SMALL_COMMITS: usize = 50;
const SMALL_FILES: usize = 20;
/// Files the incremental change touches.
const CHANGED_FILES: usize = 3;
const LINE: usize = 64;
/// Commit times start here (2024-01-01), one minute apart.
const EPOCH: u64 = 1_704_067_200;

/// Makes the repositories under `dir`, or reuses the ones a previous run made with the same
/// shape (a marker file records it once they are complete).
pub fn prepare(git: &Git, dir: &Path, shape: Shape) -> anyhow::Result<Repositories> {
    let marker = dir.join("shape.json");
    let large = dir.join("large.git");
    let large_before = dir.join("large-before.git");
    let small = dir.join("small.git");
    let reusable = std::fs::read(&marker)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Shape>(&bytes).ok())
        == Some(shape);
    if reusable {
        progress(format_args!(
            "reusing the repositories in {} (same shape)",
            dir.display()
        ));
    } else {
        let _ = std::fs::remove_file(&marker);
        for path in [&large, &large_before, &small] {
            if path.exists() {
                std::fs::remove_dir_all(path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        std::fs::create_dir_all(dir)?;
        make_large(git, &large, shape)?;
        // The state before the last commit, sharing its objects by hard links.
        git.run(
            None,
            &["clone", "--quiet", "--bare", "--local"],
            &[&large, &large_before],
        )?;
        git.run(
            Some(&large_before),
            &["update-ref", "refs/heads/main", "refs/heads/main~1"],
            &[],
        )?;
        git.run(Some(&large_before), &["gc", "--quiet", "--prune=now"], &[])?;
        make_small(git, &small)?;
        std::fs::write(&marker, serde_json::to_vec(&shape)?)?;
    }
    Ok(Repositories {
        large_pack_bytes: pack_bytes(&large)?,
        small_pack_bytes: pack_bytes(&small)?,
        large,
        large_before,
        small,
        large_commits: shape.commits,
        large_files: shape.files,
        small_refs: SMALL_BRANCHES + 1,
    })
}

/// Sizes of the packs under `repository/objects/pack`.
pub fn pack_bytes(repository: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(repository.join("objects/pack"))? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|ext| ext == "pack") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// A stream of `git fast-import` commands into a new bare repository.
struct Import {
    child: std::process::Child,
    input: std::io::BufWriter<std::process::ChildStdin>,
    random: rand::rngs::StdRng,
    commits: u64,
}

impl Import {
    fn start(git: &Git, repository: &Path, seed: u64) -> anyhow::Result<Self> {
        git.run(None, &["init", "--quiet", "--bare"], &[&repository])?;
        let mut child = git
            .command(Some(repository))
            .args(["fast-import", "--quiet", "--done"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("starting git fast-import")?;
        let input = std::io::BufWriter::with_capacity(1 << 20, child.stdin.take().expect("piped"));
        Ok(Self {
            child,
            input,
            random: rand::rngs::StdRng::seed_from_u64(seed),
            commits: 0,
        })
    }

    /// `bytes` of random text, in lines of [`LINE`] characters: about six bits of entropy a
    /// byte, so the pack holds roughly three quarters of what the files hold.
    fn text(&mut self, bytes: usize) -> Vec<u8> {
        const ALPHABET: &[u8; 64] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _";
        let mut text = vec![0u8; bytes.max(LINE)];
        self.random.fill_bytes(&mut text);
        for (index, byte) in text.iter_mut().enumerate() {
            *byte = if index % LINE == LINE - 1 {
                b'\n'
            } else {
                ALPHABET[usize::from(*byte & 63)]
            };
        }
        text
    }

    /// One commit on `branch` that sets `files` (path, contents). The first commit of a branch
    /// starts it; later ones continue it.
    fn commit(
        &mut self,
        branch: &str,
        message: &str,
        files: &[(String, Vec<u8>)],
    ) -> anyhow::Result<()> {
        let when = EPOCH + self.commits * 60;
        self.commits += 1;
        let out = &mut self.input;
        writeln!(out, "commit refs/heads/{branch}\nmark :{}", self.commits)?;
        writeln!(out, "author Bench <bench@gitfleet.invalid> {when} +0000")?;
        writeln!(out, "committer Bench <bench@gitfleet.invalid> {when} +0000")?;
        writeln!(out, "data {}\n{message}", message.len())?;
        for (path, contents) in files {
            writeln!(out, "M 100644 inline {path}\ndata {}", contents.len())?;
            out.write_all(contents)?;
            writeln!(out)?;
        }
        writeln!(out)?;
        Ok(())
    }

    fn branch(&mut self, branch: &str, from: &str) -> anyhow::Result<()> {
        writeln!(self.input, "reset refs/heads/{branch}\nfrom {from}\n")?;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<()> {
        writeln!(self.input, "done")?;
        self.input.flush()?;
        drop(self.input);
        let status = self.child.wait()?;
        if !status.success() {
            bail!("git fast-import failed ({status})");
        }
        Ok(())
    }
}

/// A file's path: a hundred directories of files with eight-letter names. The names vary in
/// their last characters, as real ones do; git's packer groups versions of a file by a hash of
/// those, and names that differ only in a few digits would collide and go undeltified.
fn file_path(index: usize) -> String {
    const LETTERS: u64 = 26u64.pow(8);
    // Multiplying by a number prime to 26 is a bijection modulo 26^8: no two files share a name.
    let mut code = (index as u64).wrapping_mul(1_000_003) % LETTERS;
    let mut name = [b'a'; 8];
    for letter in name.iter_mut().rev() {
        *letter = b'a' + (code % 26) as u8;
        code /= 26;
    }
    format!(
        "src/d{:02}/{}.txt",
        index % 100,
        std::str::from_utf8(&name).expect("ascii")
    )
}

/// The large history: a first commit with every file, then one commit per change, each
/// appending to one file. The first commit holds half the bytes, the changes the other half.
fn make_large(git: &Git, repository: &Path, shape: Shape) -> anyhow::Result<()> {
    progress(format_args!(
        "making the large repository: {} commits, {} files, a pack of about {} MiB",
        shape.commits, shape.files, shape.pack_mib
    ));
    let started = std::time::Instant::now();
    // Random text packs to about 0.8 of its size; trees and commits add the rest.
    let bytes = shape.pack_mib * (1 << 20) * 5 / 4;
    let per_file = bytes / 2 / shape.files.max(1);
    let per_change = bytes / 2 / shape.commits.max(1);
    let mut import = Import::start(git, repository, 1)?;
    let mut contents: Vec<Vec<u8>> = Vec::with_capacity(shape.files);
    let mut first = Vec::with_capacity(shape.files);
    for index in 0..shape.files {
        let text = import.text(per_file);
        contents.push(text.clone());
        first.push((file_path(index), text));
    }
    import.commit("main", "initial import", &first)?;
    drop(first);
    // Files are changed in a fixed, scattered order; the last commit touches a few at once,
    // as the incremental fetch's change.
    let mut order = rand::rngs::StdRng::seed_from_u64(2);
    for number in 1..shape.commits {
        let touched = if number + 1 == shape.commits {
            CHANGED_FILES
        } else {
            1
        };
        let mut changes = Vec::with_capacity(touched);
        for _ in 0..touched {
            let index = (order.next_u64() % shape.files.max(1) as u64) as usize;
            let addition = import.text(per_change);
            contents[index].extend_from_slice(&addition);
            changes.push((file_path(index), contents[index].clone()));
        }
        import.commit("main", &format!("change {number}"), &changes)?;
        if number % 2000 == 0 {
            progress(format_args!(
                "  {number}/{} commits ({:.0?})",
                shape.commits,
                started.elapsed()
            ));
        }
    }
    import.finish()?;
    // One pack with deltas between versions (fast-import stores inline files whole), as a
    // server that was repacked would hold.
    git.run(
        Some(repository),
        &[
            "repack",
            "-a",
            "-d",
            "-f",
            "--depth=50",
            "--window=10",
            "--quiet",
        ],
        &[],
    )?;
    progress(format_args!(
        "  made in {:.1?}: pack of {:.1} MiB",
        started.elapsed(),
        pack_bytes(repository)? as f64 / f64::from(1 << 20)
    ));
    Ok(())
}

/// The small repository: a short history on main, and [`SMALL_BRANCHES`] branches on its
/// commits.
fn make_small(git: &Git, repository: &Path) -> anyhow::Result<()> {
    let mut import = Import::start(git, repository, 3)?;
    for number in 0..SMALL_COMMITS {
        let files: Vec<_> = if number == 0 {
            (0..SMALL_FILES)
                .map(|index| (file_path(index), import.text(2048)))
                .collect()
        } else {
            vec![(file_path(number % SMALL_FILES), import.text(2048))]
        };
        import.commit("main", &format!("small change {number}"), &files)?;
    }
    // Commit marks count from 1.
    for branch in 0..SMALL_BRANCHES {
        import.branch(
            &format!("topic/{branch:03}"),
            &format!(":{}", SMALL_COMMITS - branch % SMALL_COMMITS),
        )?;
    }
    import.finish()?;
    git.run(Some(repository), &["repack", "-a", "-d", "--quiet"], &[])?;
    Ok(())
}
