//! Storage-level RPCs: create/remove/rename atomically, walk thousands of repositories,
//! quarantine and restore, purge, disk usage.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use gitfleet::proto::node_service_client::NodeServiceClient;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::*;
use tonic::Code;

fn storage(name: &str) -> Option<StorageHeader> {
    Some(StorageHeader {
        storage: name.into(),
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[tokio::test]
async fn create_exists_rename_remove() {
    let node = NodeProcess::start();
    let mut repositories = RepositoryServiceClient::new(node.channel().await);
    let checker = repositories.clone();
    let exists = |path: &str| {
        let mut repositories = checker.clone();
        let request = RepositoryExistsRequest {
            repository: header("s1", path),
        };
        async move {
            repositories
                .repository_exists(request)
                .await
                .unwrap()
                .into_inner()
                .exists
        }
    };

    assert!(!exists("a/b.git").await);
    repositories
        .create_repository(CreateRepositoryRequest {
            repository: header("s1", "a/b.git"),
            default_branch: "trunk".into(),
        })
        .await
        .unwrap();
    assert!(exists("a/b.git").await);
    let head = run_git(&node.repo_path("s1", "a/b.git"), &["symbolic-ref", "HEAD"]);
    assert_eq!(head.trim(), "refs/heads/trunk");

    let status = repositories
        .create_repository(CreateRepositoryRequest {
            repository: header("s1", "a/b.git"),
            default_branch: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    repositories
        .rename_repository(RenameRepositoryRequest {
            repository: header("s1", "a/b.git"),
            new_relative_path: "c/d/e.git".into(),
        })
        .await
        .unwrap();
    assert!(!exists("a/b.git").await && exists("c/d/e.git").await);
    assert!(
        !node.storage_path("s1").join("a").exists(),
        "empty parent left behind"
    );

    repositories
        .create_repository(CreateRepositoryRequest {
            repository: header("s1", "x.git"),
            default_branch: String::new(),
        })
        .await
        .unwrap();
    let status = repositories
        .rename_repository(RenameRepositoryRequest {
            repository: header("s1", "x.git"),
            new_relative_path: "c/d/e.git".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::AlreadyExists,
        "a rename never replaces a repository"
    );

    repositories
        .remove_repository(RemoveRepositoryRequest {
            repository: header("s1", "c/d/e.git"),
        })
        .await
        .unwrap();
    assert!(!exists("c/d/e.git").await);
    assert!(!node.storage_path("s1").join("c").exists());
    let status = repositories
        .remove_repository(RemoveRepositoryRequest {
            repository: header("s1", "c/d/e.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn walk_streams_thousands_of_repositories() {
    let node = NodeProcess::start();
    RepositoryServiceClient::new(node.channel().await)
        .create_repository(CreateRepositoryRequest {
            repository: header("s1", "template.git"),
            default_branch: String::new(),
        })
        .await
        .unwrap();
    let root = node.storage_path("s1");
    let template = root.join("template.git");
    const COUNT: usize = 2500;
    for i in 1..COUNT {
        copy_dir(
            &template,
            &root.join(format!("@replicas/{:02x}/{i}.git", i % 256)),
        );
    }
    // Things that are not repositories are not reported.
    std::fs::create_dir_all(root.join("not-a-repo/inner")).unwrap();
    std::fs::write(root.join("stray-file"), "x").unwrap();

    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut stream = NodeServiceClient::new(node.channel().await)
        .walk_storage(WalkStorageRequest {
            storage: storage("s1"),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let mut messages = 0;
    while let Some(message) = stream.message().await.unwrap() {
        messages += 1;
        assert!(message.repositories.len() <= 1000);
        seen.extend(message.repositories);
    }
    assert_eq!(seen.len(), COUNT);
    assert!(messages >= 3, "results come in batches");
    assert!(seen.iter().any(|r| r.relative_path == "template.git"));
    assert!(seen.iter().any(|r| r.relative_path == "@replicas/07/7.git"));
    assert!(
        seen.iter()
            .all(|r| !r.relative_path.starts_with(".gitfleet"))
    );
    assert!(
        seen.iter()
            .all(|r| (started - 120..=started + 5).contains(&r.modified_at)),
        "modification times are recent"
    );
    let mut paths: Vec<_> = seen.iter().map(|r| r.relative_path.clone()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), COUNT, "no repository is reported twice");

    let usage = NodeServiceClient::new(node.channel().await)
        .disk_usage(DiskUsageRequest {
            storage: storage("s1"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.repository_count, COUNT as u64);
    assert!(
        usage.used_bytes > 0
            && usage.total_bytes >= usage.available_bytes
            && usage.available_bytes > 0,
        "{usage:?}"
    );
}

#[tokio::test]
async fn quarantine_restore_and_purge() {
    let node = NodeProcess::start();
    let mut repositories = RepositoryServiceClient::new(node.channel().await);
    let mut internal = NodeServiceClient::new(node.channel().await);
    for path in ["keep/one.git", "keep/two.git"] {
        repositories
            .create_repository(CreateRepositoryRequest {
                repository: header("s1", path),
                default_branch: String::new(),
            })
            .await
            .unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    run_git(
        work.path(),
        &["push", "-q", &node.ssh_url("s1", "keep/one.git"), "main"],
    );
    let refs_before = refs_of(&node.repo_path("s1", "keep/one.git"));

    let id = internal
        .quarantine_repository(QuarantineRepositoryRequest {
            repository: header("s1", "keep/one.git"),
        })
        .await
        .unwrap()
        .into_inner()
        .quarantine_id;
    assert!(!node.repo_path("s1", "keep/one.git").exists());
    let listed = internal
        .list_quarantine(ListQuarantineRequest {
            storage: storage("s1"),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(
        (
            listed.entries[0].quarantine_id.as_str(),
            listed.entries[0].relative_path.as_str()
        ),
        (id.as_str(), "keep/one.git")
    );

    // Quarantined repositories are not walked.
    let walked = internal
        .walk_storage(WalkStorageRequest {
            storage: storage("s1"),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        walked
            .repositories
            .iter()
            .map(|r| r.relative_path.as_str())
            .collect::<Vec<_>>(),
        ["keep/two.git"]
    );

    // Restoring brings back the same bytes; a taken path is refused.
    let restored = internal
        .restore_repository(RestoreRepositoryRequest {
            storage: storage("s1"),
            quarantine_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored.relative_path, "keep/one.git");
    assert_eq!(refs_of(&node.repo_path("s1", "keep/one.git")), refs_before);
    let status = internal
        .restore_repository(RestoreRepositoryRequest {
            storage: storage("s1"),
            quarantine_id: id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = internal
        .restore_repository(RestoreRepositoryRequest {
            storage: storage("s1"),
            quarantine_id: "../../etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let id = internal
        .quarantine_repository(QuarantineRepositoryRequest {
            repository: header("s1", "keep/two.git"),
        })
        .await
        .unwrap()
        .into_inner()
        .quarantine_id;
    repositories
        .create_repository(CreateRepositoryRequest {
            repository: header("s1", "keep/two.git"),
            default_branch: String::new(),
        })
        .await
        .unwrap();
    let status = internal
        .restore_repository(RestoreRepositoryRequest {
            storage: storage("s1"),
            quarantine_id: id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // Purge honours the age: nothing is a day old, everything is at least 0 seconds old.
    let purged = internal
        .purge_quarantine(PurgeQuarantineRequest {
            storage: storage("s1"),
            older_than_seconds: 86_400,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 0);
    // The caller's clock: nothing was quarantined before 1970.
    let purged = internal
        .purge_quarantine(PurgeQuarantineRequest {
            storage: storage("s1"),
            quarantined_before: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 0);
    let purged = internal
        .purge_quarantine(PurgeQuarantineRequest {
            storage: storage("s1"),
            older_than_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 1);
    let listed = internal
        .list_quarantine(ListQuarantineRequest {
            storage: storage("s1"),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap();
    assert!(listed.is_none_or(|message| message.entries.is_empty()));
}

#[tokio::test]
async fn leftovers_of_a_crash_are_cleaned_at_start() {
    let first = NodeProcess::start();
    let leftover = first
        .storage_path("s1")
        .join(".gitfleet/tmp/create-interrupted");
    std::fs::create_dir_all(leftover.join("objects")).unwrap();
    let storage_path = first.storage_path("s1");
    // A second node on the same storage starts by emptying the temporary area.
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[auth]\ntoken = \"{TOKEN}\"\n[[storages]]\nname = \"s1\"\npath = \"{}\"\n",
        storage_path.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("second.toml");
    std::fs::write(&config_path, config).unwrap();
    let _second = NodeProcess::spawn(dir, &config_path);
    assert!(!leftover.exists());
}

#[tokio::test]
async fn repositories_never_nest() {
    let node = NodeProcess::start();
    let mut repositories = RepositoryServiceClient::new(node.channel().await);
    for path in ["a.git", "dir/x.git"] {
        repositories
            .create_repository(CreateRepositoryRequest {
                repository: header("s1", path),
                default_branch: String::new(),
            })
            .await
            .unwrap();
    }
    let before = refs_of(&node.repo_path("s1", "a.git"));
    let cases = [
        ("a.git/inner.git", "inside repository a.git"),
        ("a.git/refs/heads/evil.git", "inside repository a.git"),
        ("a.git/HEAD/x.git", "not a directory"),
        ("dir", "not a repository"),
    ];
    for (path, needle) in cases {
        let status = repositories
            .create_repository(CreateRepositoryRequest {
                repository: header("s1", path),
                default_branch: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{path}: {:?} lacks {needle:?}",
            status.message()
        );
    }
    let status = repositories
        .rename_repository(RenameRepositoryRequest {
            repository: header("s1", "dir/x.git"),
            new_relative_path: "a.git/x.git".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = repositories
        .rename_repository(RenameRepositoryRequest {
            repository: header("s1", "a.git"),
            new_relative_path: "a.git/sub/b.git".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "a repository cannot move inside itself: {status:?}"
    );
    assert_eq!(refs_of(&node.repo_path("s1", "a.git")), before);
    assert!(node.repo_path("s1", "dir/x.git").exists());
}

#[tokio::test]
async fn interrupted_quarantines_and_restores_are_recovered_at_start() {
    let first = NodeProcess::start();
    create_repository(&first, "victim.git", "main").await;
    let area = first.storage_path("s1").join(".gitfleet/quarantine");
    // What a crash leaves: a quarantine whose repository was already moved in, one that never
    // got its repository, and a restore that claimed its entry but did not finish.
    let moved = area.join(".incoming-100-aaaa");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::write(moved.join("origin"), "victim.git").unwrap();
    std::fs::rename(
        first.repo_path("s1", "victim.git"),
        moved.join("repository.git"),
    )
    .unwrap();
    std::fs::create_dir_all(area.join(".incoming-200-bbbb")).unwrap();
    copy_dir(&moved, &area.join(".restoring-300-cccc"));

    let config = format!(
        "listen = \"127.0.0.1:0\"\n[auth]\ntoken = \"{TOKEN}\"\n[[storages]]\nname = \"s1\"\npath = \"{}\"\n",
        first.storage_path("s1").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("second.toml");
    std::fs::write(&config_path, config).unwrap();
    let second = NodeProcess::spawn(dir, &config_path);

    let mut internal = NodeServiceClient::new(second.channel().await);
    let listed = internal
        .list_quarantine(ListQuarantineRequest {
            storage: storage("s1"),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let ids: Vec<&str> = listed
        .entries
        .iter()
        .map(|e| e.quarantine_id.as_str())
        .collect();
    assert_eq!(ids, ["100-aaaa", "300-cccc"]);
    assert!(!area.join(".incoming-200-bbbb").exists());
    let restored = internal
        .restore_repository(RestoreRepositoryRequest {
            storage: storage("s1"),
            quarantine_id: "100-aaaa".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored.relative_path, "victim.git");
    assert!(first.repo_path("s1", "victim.git").join("HEAD").exists());
}
