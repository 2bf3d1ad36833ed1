//! The remover: deletes one replica of a repository whose row is gone. The job carries the
//! replica path, and checks right before it acts that no repository row references it again
//! (a repository adopted back from that path). Its call carries a fencing token taken under the
//! replica path's lock, after that look: an adoption, which takes the same lock and raises the
//! replica's fence with a newer token, then refuses a removal that reaches the node late, and a
//! fence raised by an adoption that never committed does not stop the removal.

use tonic::Code;

use super::{Inner, Outcome};
use crate::model::RelativePath;
use crate::store::{ClaimedJob, StoreError};

pub(super) async fn run(inner: &Inner, job: &ClaimedJob) -> Outcome {
    let Some(replica_path) = job.replica_path.as_deref() else {
        return Outcome::Failed("the removal job names no replica path".into());
    };
    // Held until the node has answered, so the path cannot be adopted in between.
    let lock = async {
        let mut lock = inner.store.lock_replica_path(replica_path).await?;
        let in_use = lock.in_use().await?;
        Ok::<_, StoreError>((lock, in_use))
    };
    let (lock, token) = match lock.await {
        Ok((_, true)) => {
            tracing::info!(id = %job.id, %replica_path, "the replica path is tracked again: nothing removed");
            return Outcome::Done;
        }
        Ok((mut lock, false)) => match lock.fence_token().await {
            Ok(token) => (lock, token),
            Err(error) => return Outcome::Postponed(error.to_string()),
        },
        Err(error @ StoreError::Unavailable(_)) => return Outcome::Postponed(error.to_string()),
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    let replica_path = match RelativePath::parse(replica_path) {
        Ok(replica_path) => replica_path,
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    let Some(replica) = inner.nodes.replica(&job.target, &replica_path) else {
        return Outcome::Failed(format!("storage {} is not configured", job.target));
    };
    if !replica.node.is_healthy() {
        return Outcome::Postponed(format!("{} is down", job.target));
    }
    let removed = replica.remove(Some(token)).await;
    if let Err(error) = lock.release().await {
        return Outcome::Postponed(error.to_string());
    }
    match removed {
        Ok(_) => {
            tracing::info!(id = %job.id, target = %job.target, %replica_path, "replica removed");
            Outcome::Done
        }
        Err(status) if status.code() == Code::NotFound => Outcome::Done,
        // A newer token has acted on the replica since the look at the catalog: it is not this
        // removal's any more.
        Err(status) if crate::fleet::is_fenced(&status) => {
            tracing::info!(id = %job.id, target = %job.target, %replica_path, %status, "the replica was adopted since: nothing removed");
            Outcome::Done
        }
        Err(status) => {
            let message = format!(
                "removing {replica_path} from {}: {}",
                job.target,
                status.message()
            );
            match status.code() {
                Code::Unavailable => Outcome::Postponed(message),
                _ => Outcome::Failed(message),
            }
        }
    }
}
