//! What the database announces with `NOTIFY`, and the one listener that hears it: it connects,
//! listens on the channels asked for, reconnects when the connection drops, and tells its
//! subscriber each time it starts hearing again, since whatever was announced in between is
//! lost. Every channel name gitfleet uses is here.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Store;

/// Routing changes, with a repository id as payload (any other payload: everything changed).
pub const ROUTING_CHANNEL: &str = "gitfleet_routing";
/// A change of the maintenance write lock.
pub const MAINTENANCE_CHANNEL: &str = "gitfleet_maintenance";
/// Jobs that became ready, with their kind as payload.
pub const JOBS_CHANNEL: &str = "gitfleet_jobs";

/// How long the listener waits before it connects again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Notices waiting for the subscriber before the listener waits for it.
const BACKLOG: usize = 1024;

/// What the listener tells its subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Listening from now on, after a (re)connection: anything announced before may have been
    /// missed.
    Listening,
    /// An announcement.
    Notified { channel: String, payload: String },
    /// The connection is down: nothing is heard until the next [`Notice::Listening`].
    Deaf(String),
}

impl Store {
    /// Listens on `channels` until `cancel`, the subscriber's end dropped, or forever.
    pub fn listen(
        &self,
        channels: &'static [&'static str],
        cancel: CancellationToken,
    ) -> mpsc::Receiver<Notice> {
        let (notice_tx, notice_rx) = mpsc::channel(BACKLOG);
        let store = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = notice_tx.closed() => {}
                _ = listen(store, channels, &notice_tx) => {}
            }
        });
        notice_rx
    }
}

async fn listen(store: Store, channels: &[&str], notice_tx: &mpsc::Sender<Notice>) {
    loop {
        let error = match connect(&store, channels).await {
            Ok(mut listener) => {
                if notice_tx.send(Notice::Listening).await.is_err() {
                    return;
                }
                loop {
                    let notice = match listener.try_recv().await {
                        Ok(Some(notification)) => Notice::Notified {
                            channel: notification.channel().to_owned(),
                            payload: notification.payload().to_owned(),
                        },
                        // The connection dropped and was made again underneath.
                        Ok(None) => Notice::Listening,
                        Err(error) => break error,
                    };
                    if notice_tx.send(notice).await.is_err() {
                        return;
                    }
                }
            }
            Err(error) => error,
        };
        tracing::debug!(%error, ?channels, "not listening for notifications");
        if notice_tx
            .send(Notice::Deaf(error.to_string()))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

async fn connect(store: &Store, channels: &[&str]) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(store.pool()).await?;
    // A lost connection is made again, and listened on again, before `try_recv` says it was
    // lost: from then on nothing is missed.
    listener.eager_reconnect(true);
    listener.listen_all(channels.iter().copied()).await?;
    Ok(listener)
}
