//! The catalog against a real PostgreSQL: a fresh database per test.

use std::time::Duration;

use gitfleet::model::{RelativePath, RepositoryId, StorageName};
use gitfleet::store::{
    CREATE_RPC, Deleted, Deletion, NewRepository, RefChange, ReplicationLease, Store, Which,
    WriteLease, WriteStart,
};

async fn store() -> Store {
    let url = crate::common::db::fresh_database().await;
    let store = Store::connect_lazy(&url, 4, Duration::from_secs(5)).unwrap();
    store.migrate().await.unwrap();
    store
}

fn name(text: &str) -> StorageName {
    StorageName::parse(text).unwrap()
}

fn path(text: &str) -> RelativePath {
    RelativePath::parse(text).unwrap()
}

async fn create(store: &Store, relative_path: &str) -> RepositoryId {
    let storages = vec![name("s1"), name("s2"), name("s3")];
    let creation = begin_creation(store, relative_path).await;
    assert!(
        store
            .record_created_replicas(&creation, "proxy-a", &storages, &[], &name("s1"), None)
            .await
            .unwrap()
    );
    creation.repository
}

/// Records a new repository on s1 to s3 as proxy-a does, its creation's lease and intent
/// held.
async fn begin_creation(store: &Store, relative_path: &str) -> WriteLease {
    store
        .insert_repository(
            &NewRepository {
                id: store.next_repository_id().await.unwrap(),
                virtual_storage: name("default"),
                relative_path: path(relative_path),
                primary: name("s1"),
                assigned: vec![name("s1"), name("s2"), name("s3")],
                awaiting_first_push: false,
            },
            "proxy-a",
            Duration::from_secs(30),
            CREATE_RPC,
        )
        .await
        .unwrap()
        .expect("a new path")
}

#[test]
fn urls_get_their_database_replaced() {
    use crate::common::db::with_database;
    assert_eq!(
        with_database("postgres://u:p@h:5/db?host=/tmp/x", "t1"),
        "postgres://u:p@h:5/t1?host=/tmp/x"
    );
    assert_eq!(with_database("postgres://h", "t1"), "postgres://h/t1");
    assert_eq!(with_database("postgres://h/", "t1"), "postgres://h/t1");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_run_concurrently_and_twice() {
    let url = crate::common::db::fresh_database().await;
    let a = Store::connect_lazy(&url, 2, Duration::from_secs(5)).unwrap();
    let b = Store::connect_lazy(&url, 2, Duration::from_secs(5)).unwrap();
    let (first, second) = tokio::join!(a.migrate(), b.migrate());
    first.unwrap();
    second.unwrap();
    a.migrate().await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%' ORDER BY 1",
    )
    .fetch_all(a.pool())
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "assignments",
            "jobs",
            "maintenance",
            "pending_writes",
            "reconciler",
            "replica_totals",
            "replicas",
            "repositories",
            "repository_totals",
            "storage_identities",
            "storage_verifications",
            "storage_walks",
            "write_intents"
        ]
    );
}

#[tokio::test]
async fn a_path_removed_and_created_again_gets_a_new_id_and_replica_path() {
    let store = store().await;
    let first = create(&store, "group/project.git").await;
    let record = store
        .find_repository(&name("default"), &path("group/project.git"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.replica_path, first.replica_path());
    assert_eq!(record.generation, 0);
    assert_eq!(record.up_to_date().count(), 3);

    // The path is taken.
    let duplicate = store
        .insert_repository(
            &NewRepository {
                id: store.next_repository_id().await.unwrap(),
                virtual_storage: name("default"),
                relative_path: path("group/project.git"),
                primary: name("s1"),
                assigned: vec![name("s1")],
                awaiting_first_push: false,
            },
            "proxy-a",
            Duration::from_secs(30),
            CREATE_RPC,
        )
        .await
        .unwrap();
    assert!(duplicate.is_none());

    // A live write lease keeps the row, unless the deletion is forced.
    sqlx::query(
        "UPDATE repositories SET lease_owner = 'a-proxy', lease_token = nextval('repository_lease_tokens'),
                lease_expires_at = now() + interval '1 minute'",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let (vs, rp) = (name("default"), path("group/project.git"));
    let waiting = Deletion {
        force: false,
        remove_after: Some(Duration::from_secs(60)),
        unwritten_only: false,
    };
    let busy = store
        .delete_repository(Which::Path(&vs, &rp), waiting)
        .await
        .unwrap();
    assert!(matches!(busy, Deleted::Busy), "{busy:?}");
    assert!(store.find_repository(&vs, &rp).await.unwrap().is_some());
    let forced = Deletion {
        force: true,
        ..waiting
    };
    let Deleted::Removed(removed) = store
        .delete_repository(Which::Path(&vs, &rp), forced)
        .await
        .unwrap()
    else {
        panic!("not removed");
    };
    assert_eq!(removed.id, first);
    assert_eq!(removed.storages, [name("s1"), name("s2"), name("s3")]);
    // One removal job per replica, carrying the replica path, waiting for its delay.
    let jobs: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT kind, target_storage, replica_path, run_after > now() + interval '50 seconds'
         FROM jobs WHERE repository_id = $1 AND state = 'queued' ORDER BY target_storage",
    )
    .bind(first.0)
    .fetch_all(store.pool())
    .await
    .unwrap();
    let expected: Vec<_> = ["s1", "s2", "s3"]
        .iter()
        .map(|s| {
            (
                "remove".to_string(),
                s.to_string(),
                Some(first.replica_path().to_string()),
                true,
            )
        })
        .collect();
    assert_eq!(jobs, expected);
    assert!(matches!(
        store
            .delete_repository(Which::Path(&vs, &rp), forced)
            .await
            .unwrap(),
        Deleted::NotFound
    ));
    assert!(
        store
            .find_repository(&name("default"), &path("group/project.git"))
            .await
            .unwrap()
            .is_none()
    );

    let second = create(&store, "group/project.git").await;
    assert!(second.0 > first.0);
    assert_ne!(second.replica_path(), first.replica_path());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_path_is_adopted_and_judged_unused_one_holder_at_a_time() {
    let store = store().await;
    let orphan = "@replicas/ab/cd/77.git";
    // Adopting holds the path; a remover's look at it waits for the row to be committed.
    let mut adopting = store.lock_replica_path(orphan).await.unwrap();
    assert!(!adopting.in_use().await.unwrap());
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut lock = store.lock_replica_path(orphan).await.unwrap();
            let in_use = lock.in_use().await.unwrap();
            lock.release().await.unwrap();
            in_use
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second holder did not wait");
    let id = adopting
        .track(
            &name("default"),
            &path("adopted.git"),
            &name("s1"),
            &[name("s1"), name("s2")],
        )
        .await
        .unwrap()
        .expect("tracked");
    adopting.release().await.unwrap();
    assert!(waiting.await.unwrap(), "the remover saw the path unused");
    let record = store
        .find_repository(&name("default"), &path("adopted.git"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.id, id);
    assert_eq!(record.replica_path.as_str(), orphan);
    assert_eq!(record.replicas, [(name("s1"), 0)]);
    // The same path, or the same name, cannot be adopted twice.
    let mut again = store.lock_replica_path(orphan).await.unwrap();
    let twice = again
        .track(
            &name("default"),
            &path("other.git"),
            &name("s1"),
            &[name("s1")],
        )
        .await
        .unwrap();
    assert_eq!(twice, None);
    // A lock dropped without release commits nothing and frees the path.
    drop(again);
    let mut dropped = store
        .lock_replica_path("@replicas/00/00/5.git")
        .await
        .unwrap();
    dropped
        .track(
            &name("default"),
            &path("never.git"),
            &name("s1"),
            &[name("s1")],
        )
        .await
        .unwrap()
        .expect("tracked inside the lock");
    drop(dropped);
    let mut after = store
        .lock_replica_path("@replicas/00/00/5.git")
        .await
        .unwrap();
    assert!(!after.in_use().await.unwrap());
    after.release().await.unwrap();
}

#[tokio::test]
async fn a_write_lease_is_exclusive_and_fenced() {
    let store = store().await;
    let id = create(&store, "a.git").await;
    let all = [name("s1"), name("s2"), name("s3")];
    let change = [RefChange {
        name: "refs/heads/main".into(),
        old: "0".repeat(40),
        new: "1".repeat(40),
    }];
    let lease = Duration::from_secs(30);
    let WriteStart::Leased(held) = store
        .begin_write(
            &name("default"),
            &path("a.git"),
            "proxy-a",
            lease,
            "/x/Y",
            &change,
            &all,
        )
        .await
        .unwrap()
    else {
        panic!("the lease was free")
    };
    assert_eq!(held.targets, all);
    assert_eq!(held.generation, 0);

    // A second writer finds the lease taken.
    assert!(matches!(
        store
            .begin_write(
                &name("default"),
                &path("a.git"),
                "proxy-b",
                lease,
                "/x/Y",
                &change,
                &all
            )
            .await
            .unwrap(),
        WriteStart::Busy
    ));
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM write_intents")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(open, 1);

    // A stale token commits nothing.
    let mut stale = held.clone();
    stale.token -= 1;
    assert!(
        store
            .commit_write(&stale, "proxy-a", &all[..2], &all[0], None)
            .await
            .unwrap()
            .is_none()
    );

    let outcome = store
        .commit_write(&held, "proxy-a", &all[..2], &all[0], None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome.generation, 1);
    assert_eq!(outcome.queued, [name("s3")]);
    let record = store
        .find_repository(&name("default"), &path("a.git"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.generation, 1);
    assert_eq!(record.up_to_date().cloned().collect::<Vec<_>>(), all[..2]);
    let jobs: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT kind, source_storage, target_storage FROM jobs WHERE repository_id = $1",
    )
    .bind(id.0)
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(jobs, [("replicate".into(), "s1".into(), "s3".into())]);
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM write_intents")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(open, 0);

    // Committing twice is refused: the lease is gone.
    assert!(
        store
            .commit_write(&held, "proxy-a", &all, &all[0], None)
            .await
            .unwrap()
            .is_none()
    );
    // Now the next writer gets the lease, with the outdated replica left out.
    let WriteStart::Leased(next) = store
        .begin_write(
            &name("default"),
            &path("a.git"),
            "proxy-b",
            lease,
            "/x/Y",
            &change,
            &all,
        )
        .await
        .unwrap()
    else {
        panic!("the lease was released")
    };
    assert!(next.token > held.token);
    assert_eq!(next.targets, all[..2]);
}

#[tokio::test]
async fn a_commit_is_refused_when_a_replica_changed_under_the_write() {
    let store = store().await;
    let id = create(&store, "changed.git").await;
    let all = [name("s1"), name("s2"), name("s3")];
    let WriteStart::Leased(lease) = store
        .begin_write(
            &name("default"),
            &path("changed.git"),
            "proxy-a",
            Duration::from_secs(30),
            "/x/Y",
            &[],
            &all,
        )
        .await
        .unwrap()
    else {
        panic!("the lease was free")
    };
    // The replica on s2 is found missing (as a verifier would) while the write runs.
    sqlx::query("DELETE FROM replicas WHERE repository_id = $1 AND storage = 's2'")
        .bind(id.0)
        .execute(store.pool())
        .await
        .unwrap();
    assert!(
        store
            .commit_write(&lease, "proxy-a", &all[..2], &all[0], None)
            .await
            .unwrap()
            .is_none()
    );
    let record = store
        .find_repository(&name("default"), &path("changed.git"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.generation, 0, "nothing was committed");
    // The lease is still this writer's to release.
    assert!(store.release_write(&lease, "proxy-a").await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_undone_to_break_a_deadlock_is_worth_trying_again() {
    use gitfleet::store::StoreError;
    use sqlx::Connection as _;

    let url = crate::common::db::fresh_database().await;
    let mut setup = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE pair (id int PRIMARY KEY, value int)")
        .execute(&mut setup)
        .await
        .unwrap();
    sqlx::query("INSERT INTO pair VALUES (1, 0), (2, 0)")
        .execute(&mut setup)
        .await
        .unwrap();
    // Two transactions take the two rows in opposite orders: PostgreSQL undoes one of them.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let take = |first: i32, second: i32| {
        let (url, barrier) = (url.clone(), barrier.clone());
        tokio::spawn(async move {
            let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut transaction = connection.begin().await.unwrap();
            let lock = "UPDATE pair SET value = value + 1 WHERE id = $1";
            sqlx::query(lock)
                .bind(first)
                .execute(&mut *transaction)
                .await
                .unwrap();
            barrier.wait().await;
            let outcome = sqlx::query(lock)
                .bind(second)
                .execute(&mut *transaction)
                .await;
            match outcome {
                Ok(_) => transaction
                    .commit()
                    .await
                    .map(drop)
                    .map_err(StoreError::from),
                Err(error) => Err(StoreError::from(error)),
            }
        })
    };
    let (one, two) = (take(1, 2), take(2, 1));
    let outcomes = [one.await.unwrap(), two.await.unwrap()];
    let refused: Vec<&StoreError> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{outcomes:?}");
    assert!(
        matches!(refused[0], StoreError::Unavailable(_)),
        "{:?}",
        refused[0]
    );
    assert!(
        refused[0].to_string().contains("deadlock"),
        "{}",
        refused[0]
    );
}

/// One change of main, from absent.
fn main_created() -> Vec<RefChange> {
    vec![RefChange {
        name: "refs/heads/main".into(),
        old: "0".repeat(40),
        new: "1".repeat(40),
    }]
}

/// Takes the write lease of `relative_path` for `changes`, on s1 to s3.
async fn lease_for_write(
    store: &Store,
    relative_path: &str,
    changes: &[RefChange],
) -> gitfleet::store::WriteLease {
    let all = [name("s1"), name("s2"), name("s3")];
    let start = store
        .begin_write(
            &name("default"),
            &path(relative_path),
            "proxy-a",
            Duration::from_secs(30),
            "/x/Y",
            changes,
            &all,
        )
        .await
        .unwrap();
    let WriteStart::Leased(lease) = start else {
        panic!("the lease was free")
    };
    lease
}

#[tokio::test]
async fn a_generation_is_recorded_only_on_a_majority_of_the_assignments_as_they_stand() {
    let store = store().await;
    let all = [name("s1"), name("s2"), name("s3")];

    // One replica of three is not a majority: nothing is recorded.
    let id = create(&store, "one.git").await;
    let lease = lease_for_write(&store, "one.git", &main_created()).await;
    let committed = store
        .commit_write(&lease, "proxy-a", &all[..1], &all[0], None)
        .await
        .unwrap();
    assert!(committed.is_none(), "{committed:?}");
    let record = store
        .find_repository(&name("default"), &path("one.git"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((record.id, record.generation), (id, 0));

    // Two of three were a majority when the write began; two more storages are assigned
    // before it commits: two of five are not.
    let id = create(&store, "grown.git").await;
    let lease = lease_for_write(&store, "grown.git", &main_created()).await;
    sqlx::query("INSERT INTO assignments (repository_id, storage) VALUES ($1, 's4'), ($1, 's5')")
        .bind(id.0)
        .execute(store.pool())
        .await
        .unwrap();
    let committed = store
        .commit_write(&lease, "proxy-a", &all[..2], &all[0], None)
        .await
        .unwrap();
    assert!(committed.is_none(), "{committed:?}");

    // Three of five are.
    sqlx::query("INSERT INTO replicas (repository_id, storage, generation) VALUES ($1, 's4', 0)")
        .bind(id.0)
        .execute(store.pool())
        .await
        .unwrap();
    let current = [name("s1"), name("s2"), name("s4")];
    let committed = store
        .commit_write(&lease, "proxy-a", &current, &current[0], None)
        .await
        .unwrap()
        .expect("a majority of the assignments");
    assert_eq!(committed.generation, 1);
}

#[tokio::test]
async fn head_s_old_branch_is_recorded_in_the_intent_under_the_lease() {
    let store = store().await;
    create(&store, "head.git").await;
    let changes = [
        RefChange {
            name: "refs/heads/x".into(),
            old: "0".repeat(40),
            new: "1".repeat(40),
        },
        RefChange {
            name: "HEAD".into(),
            old: String::new(),
            new: "refs/heads/next".into(),
        },
    ];
    let lease = lease_for_write(&store, "head.git", &changes).await;
    let mut stale = lease.clone();
    stale.token -= 1;
    assert!(
        !store
            .record_head_before(&stale, "proxy-a", "refs/heads/main")
            .await
            .unwrap()
    );
    assert!(
        store
            .record_head_before(&lease, "proxy-a", "refs/heads/main")
            .await
            .unwrap()
    );
    let recorded: String = sqlx::query_scalar("SELECT ref_updates::text FROM write_intents")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let recorded: Vec<RefChange> = serde_json::from_str(&recorded).unwrap();
    let mut expected = changes.to_vec();
    expected[1].old = "refs/heads/main".into();
    assert_eq!(recorded, expected);
}

#[tokio::test]
async fn a_replication_takes_the_repository_s_lease_between_writes_and_writes_wait_for_it() {
    let store = store().await;
    let id = create(&store, "busy.git").await;
    let lease = Duration::from_secs(30);
    let target = name("s3");
    let take = || store.lease_for_replication(id, None, &target, "worker-a", lease);

    // A write in flight (its intent open, its lease held) makes the lease busy, not an
    // interrupted write, and the attempt reserves the lease.
    let write = lease_for_write(&store, "busy.git", &main_created()).await;
    assert!(matches!(take().await.unwrap(), ReplicationLease::Busy));
    // Once the write is over, a new write waits while the reservation lasts...
    let all = [name("s1"), name("s2"), name("s3")];
    store
        .commit_write(&write, "proxy-a", &all[..2], &all[0], None)
        .await
        .unwrap()
        .expect("two of three");
    let start = store
        .begin_write(
            &name("default"),
            &path("busy.git"),
            "proxy-b",
            lease,
            "/x/Y",
            &main_created(),
            &all,
        )
        .await
        .unwrap();
    assert!(matches!(start, WriteStart::Busy), "{start:?}");
    // ...and the replication takes it, with a newer token, at the generation the write left.
    let ReplicationLease::Leased(leased) = take().await.unwrap() else {
        panic!("the lease was free and reserved for the replication")
    };
    assert!(leased.token > write.token);
    assert_eq!(leased.generation, 1);
    assert_eq!(leased.target_generation, Some(0));
    assert_eq!(leased.sources.len(), 2);

    // A second replicator finds it busy; another owner's lapsed reservation does not stand
    // in its way.
    assert!(matches!(
        store
            .lease_for_replication(id, None, &name("s3"), "worker-b", lease)
            .await
            .unwrap(),
        ReplicationLease::Busy
    ));
    store
        .release_repository_lease(id, leased.token, "worker-a")
        .await
        .unwrap();
    sqlx::query("UPDATE repositories SET lease_reserved_until = now() - interval '1 second'")
        .execute(store.pool())
        .await
        .unwrap();
    assert!(matches!(take().await.unwrap(), ReplicationLease::Leased(_)));
}

#[tokio::test]
async fn a_replication_leaves_an_interrupted_write_to_its_recovery() {
    let store = store().await;
    let id = create(&store, "stale.git").await;
    let write = lease_for_write(&store, "stale.git", &main_created()).await;
    sqlx::query(
        "UPDATE repositories SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id.0)
    .execute(store.pool())
    .await
    .unwrap();
    assert!(matches!(
        store
            .lease_for_replication(id, None, &name("s3"), "worker-a", Duration::from_secs(30))
            .await
            .unwrap(),
        ReplicationLease::Interrupted
    ));
    // Nothing was taken or reserved: the write's proxy may still close it.
    let (owner, reserved): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT lease_owner, lease_reserved_by FROM repositories WHERE id = $1")
            .bind(id.0)
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!((owner.as_deref(), reserved), (Some("proxy-a"), None));
    assert!(write.token > 0);
}

/// A write whose statement waited for the repository's row while a replication recorded its
/// target and released the lease read the replicas before that: it starts again, and then
/// writes to the replica the replication brought up to date.
#[tokio::test]
async fn a_write_that_waited_for_a_replication_s_close_reads_the_replicas_again() {
    let store = store().await;
    let id = create(&store, "closing.git").await;
    let all = [name("s1"), name("s2"), name("s3")];
    sqlx::query(
        "UPDATE repositories SET lease_owner = 'worker-a', lease_expires_at = now() + interval '1 minute'
         WHERE id = $1",
    )
    .bind(id.0)
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE replicas SET generation = NULL WHERE repository_id = $1 AND storage = 's3'",
    )
    .bind(id.0)
    .execute(store.pool())
    .await
    .unwrap();

    // The replication's close: the target recorded and the lease released, not yet committed.
    let mut close = store.pool().begin().await.unwrap();
    sqlx::query("UPDATE replicas SET generation = 0 WHERE repository_id = $1 AND storage = 's3'")
        .bind(id.0)
        .execute(&mut *close)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1",
    )
    .bind(id.0)
    .execute(&mut *close)
    .await
    .unwrap();
    let waiting = tokio::spawn({
        let store = store.clone();
        let all = all.clone();
        async move {
            store
                .begin_write(
                    &name("default"),
                    &path("closing.git"),
                    "proxy-a",
                    Duration::from_secs(30),
                    "/x/Y",
                    &main_created(),
                    &all,
                )
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    close.commit().await.unwrap();
    let start = waiting.await.unwrap();
    assert!(matches!(start, WriteStart::Busy), "{start:?}");

    let lease = lease_for_write(&store, "closing.git", &main_created()).await;
    assert_eq!(lease.targets, all);
}

/// A creation holds the repository's lease and an intent until its replicas are recorded; a
/// proxy that lost the lease records nothing.
#[tokio::test]
async fn a_creation_is_recorded_under_its_lease_and_intent() {
    let store = store().await;
    let storages = vec![name("s1"), name("s2"), name("s3")];
    let creation = begin_creation(&store, "new.git").await;
    let id = creation.repository;
    let (owner, intents): (Option<String>, i64) = sqlx::query_as(
        "SELECT lease_owner, (SELECT count(*) FROM write_intents WHERE repository_id = $1)
         FROM repositories WHERE id = $1",
    )
    .bind(id.0)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((owner.as_deref(), intents), (Some("proxy-a"), 1));

    // Another owner (a recovery that took over) is not this proxy: nothing is recorded.
    assert!(
        !store
            .record_created_replicas(&creation, "proxy-b", &storages, &[], &name("s1"), None)
            .await
            .unwrap()
    );
    assert!(
        store
            .record_created_replicas(
                &creation,
                "proxy-a",
                &storages[..2],
                &storages[2..],
                &name("s1"),
                None
            )
            .await
            .unwrap()
    );
    let record = store
        .find_repository(&name("default"), &path("new.git"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.up_to_date().count(), 2);
    let (owner, intents, jobs): (Option<String>, i64, i64) = sqlx::query_as(
        "SELECT lease_owner, (SELECT count(*) FROM write_intents WHERE repository_id = $1),
                (SELECT count(*) FROM jobs WHERE repository_id = $1 AND target_storage = 's3')
         FROM repositories WHERE id = $1",
    )
    .bind(id.0)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((owner, intents, jobs), (None, 0, 1));
}
