//! Judging a replica's answer to a write: whether it is definitive, so that the replica's state
//! after it is known.

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
}
