//! The write's judgement, apart from any I/O: given each target's refs checksum before and
//! after the write, which replicas agree, and whether the write is committed, was refused by
//! the replicas, or must be rolled back; and, after a rollback, how the intent is closed.

use std::collections::BTreeMap;

/// What to do with a write, from the replicas' refs before and after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// At least `needed` replicas changed their refs the same way: they are committed as the
    /// next generation. Indices into the targets.
    Commit { agreeing: Vec<usize> },
    /// Every replica answered and none changed: the replicas refused the write (a stale old
    /// value, a non-fast-forward push), and their answer is the caller's.
    Refused,
    /// Not acknowledged: undone where it landed.
    RollBack {
        /// How many changed their refs the same way: fewer than needed.
        agreeing: usize,
        /// Changed: rolled back.
        changed: Vec<usize>,
        /// Unchanged: clean as they are.
        unchanged: Vec<usize>,
        /// No checksum after the write: their state is unknown.
        unknown: Vec<usize>,
    },
}

/// Judges a write. `before[i]` and `after[i]` are target i's refs checksums; `after[i]` is
/// None when the replica did not answer.
pub(super) fn judge(before: &[String], after: &[Option<String>], needed: usize) -> Verdict {
    // Grouped by the state the write left them in; BTreeMap so that ties break the same way
    // every time.
    let mut changed: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut unchanged = Vec::new();
    let mut unknown = Vec::new();
    for (index, (before, after)) in before.iter().zip(after).enumerate() {
        match after {
            Some(after) if after == before => unchanged.push(index),
            Some(after) => changed.entry(after.as_str()).or_default().push(index),
            None => unknown.push(index),
        }
    }
    let agreeing = changed
        .values()
        .max_by_key(|group| group.len())
        .cloned()
        .unwrap_or_default();
    if !agreeing.is_empty() && agreeing.len() >= needed {
        return Verdict::Commit { agreeing };
    }
    if changed.is_empty() && unknown.is_empty() {
        return Verdict::Refused;
    }
    let mut changed: Vec<usize> = changed.into_values().flatten().collect();
    changed.sort_unstable();
    Verdict::RollBack {
        agreeing: agreeing.len(),
        changed,
        unchanged,
        unknown,
    }
}

/// Whether a replica's answer to the write is definitive: it ran the write to its end and
/// said how it went (applied, or refused with a reason: a lost compare-and-swap is ABORTED).
/// A call that timed out, was cancelled or cut off, or failed inside the node may still change
/// the replica afterwards.
pub(super) fn definitive<T>(reply: &Result<T, tonic::Status>) -> bool {
    use tonic::Code;
    match reply {
        Ok(_) => true,
        Err(status) => !matches!(
            status.code(),
            Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unavailable
                | Code::Unknown
                | Code::Internal
        ),
    }
}

/// How a rolled-back write's intent is closed, from what the rollback left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    /// Every target is back where it was: the lease is released, the generation unchanged.
    Release,
    /// Some targets are uncertain: the clean ones, a majority of the assignments, become the
    /// next generation, and the uncertain ones are repaired from them.
    CommitClean,
    /// Too few targets are known to be clean to record a generation on: the intent stays
    /// open for recovery.
    LeaveOpen,
}

/// `needed`: a majority of the repository's assignments.
pub(super) fn settle(clean: usize, uncertain: usize, needed: usize) -> Settle {
    match (clean, uncertain) {
        (_, 0) => Settle::Release,
        (clean, _) if clean >= needed => Settle::CommitClean,
        _ => Settle::LeaveOpen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_answer_that_ran_to_its_end_is_definitive() {
        use tonic::Status;
        assert!(definitive(&Ok::<(), Status>(())));
        for refusal in [
            Status::failed_precondition("fenced: token 4 is older than 5"),
            Status::aborted("reference update rejected, nothing was changed"),
            Status::invalid_argument("git receive-pack failed"),
            Status::not_found("no such repository"),
        ] {
            assert!(definitive(&Err::<(), _>(refusal)));
        }
        for open in [
            Status::deadline_exceeded("the replica had not finished"),
            Status::cancelled("gone"),
            Status::unavailable("connection reset"),
            Status::internal("the request's task failed"),
        ] {
            assert!(!definitive(&Err::<(), _>(open)));
        }
    }

    fn sums(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    fn after(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_owned)).collect()
    }

    #[test]
    fn a_majority_that_changed_alike_commits() {
        let verdict = judge(
            &sums(&["a", "a", "a"]),
            &after(&[Some("b"), Some("b"), Some("a")]),
            2,
        );
        assert_eq!(
            verdict,
            Verdict::Commit {
                agreeing: vec![0, 1]
            }
        );
        // A replica that did not answer does not stop a majority.
        let verdict = judge(
            &sums(&["a", "a", "a"]),
            &after(&[None, Some("b"), Some("b")]),
            2,
        );
        assert_eq!(
            verdict,
            Verdict::Commit {
                agreeing: vec![1, 2]
            }
        );
    }

    #[test]
    fn replicas_that_changed_differently_do_not_make_a_majority() {
        let verdict = judge(
            &sums(&["a", "a", "a"]),
            &after(&[Some("b"), Some("c"), Some("a")]),
            2,
        );
        assert_eq!(
            verdict,
            Verdict::RollBack {
                agreeing: 1,
                changed: vec![0, 1],
                unchanged: vec![2],
                unknown: vec![],
            }
        );
    }

    #[test]
    fn nothing_changed_anywhere_is_the_replicas_refusal() {
        let verdict = judge(
            &sums(&["a", "b", "a"]),
            &after(&[Some("a"), Some("b"), Some("a")]),
            2,
        );
        assert_eq!(verdict, Verdict::Refused);
    }

    #[test]
    fn nothing_changed_but_a_replica_silent_is_rolled_back_not_refused() {
        let verdict = judge(
            &sums(&["a", "a", "a"]),
            &after(&[Some("a"), None, Some("a")]),
            2,
        );
        assert_eq!(
            verdict,
            Verdict::RollBack {
                agreeing: 0,
                changed: vec![],
                unchanged: vec![0, 2],
                unknown: vec![1],
            }
        );
    }

    #[test]
    fn one_replica_alone_is_not_a_majority_of_three() {
        let verdict = judge(&sums(&["a", "a", "a"]), &after(&[Some("b"), None, None]), 2);
        assert_eq!(
            verdict,
            Verdict::RollBack {
                agreeing: 1,
                changed: vec![0],
                unchanged: vec![],
                unknown: vec![1, 2],
            }
        );
        // With one target needed, the one that changed commits.
        let verdict = judge(&sums(&["a"]), &after(&[Some("b")]), 1);
        assert_eq!(verdict, Verdict::Commit { agreeing: vec![0] });
    }

    #[test]
    fn a_rollback_settles_by_what_it_left() {
        assert_eq!(settle(3, 0, 2), Settle::Release);
        assert_eq!(settle(0, 0, 2), Settle::Release);
        assert_eq!(settle(2, 1, 2), Settle::CommitClean);
        // One clean replica of three is no generation to record.
        assert_eq!(settle(1, 2, 2), Settle::LeaveOpen);
        assert_eq!(settle(0, 2, 2), Settle::LeaveOpen);
    }
}
