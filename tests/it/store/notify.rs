//! The one notification listener against a real PostgreSQL: it hears the channels it was
//! given and no other, says when its connection is cut or the server is gone, and hears again
//! once it is back, saying so, since what was announced in between is lost.

use std::time::Duration;

use gitfleet::store::{JOBS_CHANNEL, MAINTENANCE_CHANNEL, Notice, ROUTING_CHANNEL, Store};
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

use crate::common::db::{OwnServer, fresh_database};

/// The next notice, within a generous bound.
async fn next(notices: &mut Receiver<Notice>) -> Notice {
    tokio::time::timeout(Duration::from_secs(30), notices.recv())
        .await
        .expect("no notice within 30s")
        .expect("the listener stopped")
}

async fn announce(store: &Store, channel: &str, payload: &str) {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(store.pool())
        .await
        .unwrap();
}

fn notified(channel: &str, payload: &str) -> Notice {
    Notice::Notified {
        channel: channel.to_owned(),
        payload: payload.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listener_hears_its_channels_and_says_when_its_connection_was_cut() {
    let url = fresh_database().await;
    let store = Store::connect_lazy(&url, 4, Duration::from_secs(5)).unwrap();
    let cancel = CancellationToken::new();
    let mut notices = store.listen(&[ROUTING_CHANNEL, JOBS_CHANNEL], cancel.clone());
    assert_eq!(next(&mut notices).await, Notice::Listening);

    announce(&store, MAINTENANCE_CHANNEL, "not asked for").await;
    announce(&store, JOBS_CHANNEL, "replicate").await;
    announce(&store, ROUTING_CHANNEL, "42").await;
    assert_eq!(
        next(&mut notices).await,
        notified(JOBS_CHANNEL, "replicate")
    );
    assert_eq!(next(&mut notices).await, notified(ROUTING_CHANNEL, "42"));

    // The server cuts the listening session: the listener reconnects by itself and says it
    // listens anew before anything else.
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(cut, vec![true], "one listening session");
    assert_eq!(next(&mut notices).await, Notice::Listening);
    announce(&store, ROUTING_CHANNEL, "43").await;
    assert_eq!(next(&mut notices).await, notified(ROUTING_CHANNEL, "43"));

    // Cancelled, it stops, and says nothing more.
    cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), notices.recv()).await;
    assert_eq!(end.expect("the listener stops when cancelled"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listener_is_deaf_while_the_server_is_down_and_listens_again_after() {
    let server = OwnServer::start().await;
    let store = Store::connect_lazy(server.url(), 4, Duration::from_secs(2)).unwrap();
    let mut notices = store.listen(&[JOBS_CHANNEL], CancellationToken::new());
    assert_eq!(next(&mut notices).await, Notice::Listening);

    server.stop();
    let notice = next(&mut notices).await;
    assert!(matches!(notice, Notice::Deaf(_)), "{notice:?}");
    // It keeps trying, deaf each time, while the server stays down.
    let notice = next(&mut notices).await;
    assert!(matches!(notice, Notice::Deaf(_)), "{notice:?}");

    server.start_again();
    loop {
        match next(&mut notices).await {
            Notice::Listening => break,
            Notice::Deaf(_) => continue,
            other => panic!("{other:?} before the listener was back"),
        }
    }
    announce(&store, JOBS_CHANNEL, "remove").await;
    assert_eq!(next(&mut notices).await, notified(JOBS_CHANNEL, "remove"));
}
