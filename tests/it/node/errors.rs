//! Bad input gets a specific status and a message a person understands, and changes nothing.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use gitfleet::proto::object_service_client::ObjectServiceClient;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::smart_http_service_client::SmartHttpServiceClient;
use gitfleet::proto::ssh_service_client::SshServiceClient;
use gitfleet::proto::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Every path below a directory, for "nothing changed on disk" checks.
fn snapshot(root: &Path) -> Vec<String> {
    let mut paths: Vec<String> = walkdir(root);
    paths.sort();
    paths
}

fn walkdir(root: &Path) -> Vec<String> {
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            paths.push(
                entry
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .display()
                    .to_string(),
            );
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    paths
}

async fn node_with_repository() -> (NodeProcess, tempfile::TempDir) {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    (node, work)
}

#[tokio::test]
async fn bad_paths_and_names_are_refused_with_clear_messages() {
    let node = NodeProcess::start();
    let mut repositories = RepositoryServiceClient::new(node.channel().await);
    let before = snapshot(&node.storage_path("s1"));
    let long = "a/".repeat(600) + "x.git";
    let cases: Vec<(&str, &str, &str, Code, &str)> = vec![
        ("s1", "../escape.git", "main", Code::InvalidArgument, "'..'"),
        (
            "s1",
            "a/../../escape.git",
            "main",
            Code::InvalidArgument,
            "'..'",
        ),
        (
            "s1",
            "/etc/escape.git",
            "main",
            Code::InvalidArgument,
            "absolute",
        ),
        ("s1", "nul\0byte.git", "main", Code::InvalidArgument, "NUL"),
        ("s1", "", "main", Code::InvalidArgument, "empty"),
        ("s1", &long, "main", Code::InvalidArgument, "limit is 1024"),
        (
            "s1",
            "a//b.git",
            "main",
            Code::InvalidArgument,
            "empty component",
        ),
        (
            "s1",
            ".gitfleet/tmp/x.git",
            "main",
            Code::InvalidArgument,
            "reserved",
        ),
        (
            "s1",
            "ok.git",
            "bad..branch",
            Code::InvalidArgument,
            "branch name",
        ),
        ("s1", "ok.git", "-rf", Code::InvalidArgument, "branch name"),
        (
            "nope",
            "ok.git",
            "main",
            Code::NotFound,
            "storage \"nope\" is not served by this node",
        ),
        (
            "../s1",
            "ok.git",
            "main",
            Code::InvalidArgument,
            "storage name",
        ),
    ];
    for (storage, path, branch, code, needle) in cases {
        let status = repositories
            .create_repository(CreateRepositoryRequest {
                repository: header(storage, path),
                default_branch: branch.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{storage}/{path:?}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{path:?}: {:?} lacks {needle:?}",
            status.message()
        );
    }
    let status = repositories
        .create_repository(CreateRepositoryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("header"), "{}", status.message());
    assert_eq!(
        snapshot(&node.storage_path("s1")),
        before,
        "a refused request changed the disk"
    );
    assert!(!node.dir.path().join("escape.git").exists());
}

#[tokio::test]
async fn a_repository_that_does_not_exist_is_not_found_everywhere() {
    let node = NodeProcess::start();
    let channel = node.channel().await;
    let missing = || header("s1", "missing.git");
    let expect = |result: Result<(), tonic::Status>, rpc: &str| {
        let status = result.expect_err(rpc);
        assert_eq!(status.code(), Code::NotFound, "{rpc}: {status:?}");
        assert!(
            status.message().contains("s1/missing.git does not exist"),
            "{rpc}: {}",
            status.message()
        );
    };
    let mut refs = RefServiceClient::new(channel.clone());
    expect(
        refs.list_refs(ListRefsRequest {
            repository: missing(),
            prefixes: vec![],
        })
        .await
        .map(drop),
        "ListRefs",
    );
    expect(
        refs.find_default_branch(FindDefaultBranchRequest {
            repository: missing(),
        })
        .await
        .map(drop),
        "FindDefaultBranch",
    );
    expect(
        refs.refs_checksum(RefsChecksumRequest {
            repository: missing(),
        })
        .await
        .map(drop),
        "RefsChecksum",
    );
    expect(
        refs.set_default_branch(SetDefaultBranchRequest {
            repository: missing(),
            branch: "x".into(),
        })
        .await
        .map(drop),
        "SetDefaultBranch",
    );
    let mut objects = ObjectServiceClient::new(channel.clone());
    expect(
        objects
            .read_commit(ReadCommitRequest {
                repository: missing(),
                revision: "HEAD".into(),
            })
            .await
            .map(drop),
        "ReadCommit",
    );
    let mut http = SmartHttpServiceClient::new(channel.clone());
    expect(
        http.info_refs_upload_pack(InfoRefsRequest {
            repository: missing(),
            git_protocol: String::new(),
        })
        .await
        .map(drop),
        "InfoRefs",
    );
    let mut repositories = RepositoryServiceClient::new(channel.clone());
    expect(
        repositories
            .remove_repository(RemoveRepositoryRequest {
                repository: missing(),
            })
            .await
            .map(drop),
        "Remove",
    );
    expect(
        repositories
            .rename_repository(RenameRepositoryRequest {
                repository: missing(),
                new_relative_path: "x.git".into(),
            })
            .await
            .map(drop),
        "Rename",
    );
    let request = tokio_stream::iter(vec![SshRequest {
        repository: missing(),
        close_stdin: true,
        ..Default::default()
    }]);
    expect(
        SshServiceClient::new(channel)
            .ssh_upload_pack(request)
            .await
            .map(drop),
        "SshUploadPack",
    );
}

#[tokio::test]
async fn bad_reference_updates_change_nothing() {
    let (node, work) = node_with_repository().await;
    let mut refs = RefServiceClient::new(node.channel().await);
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let zero = "0".repeat(40);
    let before = refs_of(&node.repo_path("s1", "repo.git"));
    let cases = [
        (
            vec![("refs/heads/bad..name", zero.as_str(), main.as_str())],
            "reference name",
        ),
        (vec![("main", zero.as_str(), main.as_str())], "refs/"),
        (vec![("refs/heads/x", "xyz", main.as_str())], "object id"),
        (
            vec![
                ("refs/heads/x", zero.as_str(), main.as_str()),
                ("refs/heads/x", zero.as_str(), main.as_str()),
            ],
            "twice",
        ),
        (vec![], "no reference updates"),
    ];
    for (updates, needle) in cases {
        let updates = updates
            .into_iter()
            .map(|(n, o, w)| RefUpdate {
                name: n.into(),
                old_target: o.into(),
                new_target: w.into(),
            })
            .collect();
        let status = refs
            .update_refs(UpdateRefsRequest {
                repository: header("s1", "repo.git"),
                updates,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} lacks {needle:?}",
            status.message()
        );
    }
    assert_eq!(refs_of(&node.repo_path("s1", "repo.git")), before);
}

/// A receive-pack request: one command creating `refs/heads/pushed`, then `pack`.
fn receive_pack_request(new: &str, pack: &[u8]) -> Vec<u8> {
    let command = format!(
        "{} {new} refs/heads/pushed\0report-status side-band-64k\n",
        "0".repeat(40)
    );
    let mut body = gitfleet::git::pktline::encode(command.as_bytes());
    body.extend_from_slice(b"0000");
    body.extend_from_slice(pack);
    body
}

async fn post_receive_pack(node: &NodeProcess, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let messages: Vec<PostReceivePackRequest> = body
        .chunks(1000)
        .enumerate()
        .map(|(i, chunk)| PostReceivePackRequest {
            repository: if i == 0 {
                header("s1", "repo.git")
            } else {
                None
            },
            git_protocol: String::new(),
            data: chunk.to_vec().into(),
            ..Default::default()
        })
        .collect();
    let mut stream = SmartHttpServiceClient::new(node.channel().await)
        .post_receive_pack(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut output = Vec::new();
    while let Some(message) = stream.message().await? {
        output.extend_from_slice(&message.data);
    }
    Ok(output)
}

#[tokio::test]
async fn garbage_and_truncated_packs_are_refused() {
    let (node, work) = node_with_repository().await;
    let before = refs_of(&node.repo_path("s1", "repo.git"));
    // A real pack of a new commit, so only its bytes are wrong.
    std::fs::write(work.path().join("new.txt"), "x".repeat(100_000)).unwrap();
    run_git(work.path(), &["add", "new.txt"]);
    run_git(work.path(), &["commit", "-q", "-m", "new"]);
    let new = run_git(work.path(), &["rev-parse", "HEAD"])
        .trim()
        .to_owned();
    let mut pack_objects = git(work.path())
        .args(["pack-objects", "--stdout", "--revs", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    pack_objects
        .stdin
        .take()
        .unwrap()
        .write_all(b"HEAD\n^HEAD~1\n")
        .unwrap();
    let pack = pack_objects.wait_with_output().unwrap().stdout;
    assert!(pack.starts_with(b"PACK"));

    for (name, body) in [
        (
            "garbage",
            receive_pack_request(&new, b"PACK this is not a pack at all"),
        ),
        (
            "truncated",
            receive_pack_request(&new, &pack[..pack.len() / 2]),
        ),
    ] {
        let status = post_receive_pack(&node, body).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains("the pushed pack was rejected"),
            "{name}: {}",
            status.message()
        );
        assert_eq!(
            refs_of(&node.repo_path("s1", "repo.git")),
            before,
            "{name} changed refs"
        );
    }
    // A well-formed push whose expected old value is stale: receive-pack refuses the update.
    let known = run_git(work.path(), &["rev-parse", "main~1"])
        .trim()
        .to_owned();
    let empty_pack = git(work.path())
        .args(["pack-objects", "--stdout", "-q"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
        .stdout;
    let command = format!(
        "{} {known} refs/heads/main\0report-status\n",
        "1".repeat(40)
    );
    let mut body = gitfleet::git::pktline::encode(command.as_bytes());
    body.extend_from_slice(b"0000");
    body.extend_from_slice(&empty_pack);
    let status = post_receive_pack(&node, body).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("push rejected: refs/heads/main"),
        "{}",
        status.message()
    );
    assert_eq!(refs_of(&node.repo_path("s1", "repo.git")), before);

    let status = post_receive_pack(&node, b"zzzz not even pkt-lines".to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("receive-pack"),
        "{}",
        status.message()
    );

    // The same request with the whole pack works, so the failures above were the pack's.
    let report = post_receive_pack(&node, receive_pack_request(&new, &pack))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&report).contains("ok refs/heads/pushed"));
    assert!(
        refs_of(&node.repo_path("s1", "repo.git")).contains(&format!("{new} refs/heads/pushed"))
    );
    wait_for_no_children(node.pid()).await;
}

#[tokio::test]
async fn a_push_stream_that_stops_halfway_changes_nothing_and_leaves_no_process() {
    let (node, work) = node_with_repository().await;
    let before = refs_of(&node.repo_path("s1", "repo.git"));
    let new = run_git(work.path(), &["rev-parse", "HEAD"])
        .trim()
        .to_owned();
    let body = receive_pack_request(&new, b"PACK\0\0\0\x02\0\0\0\x05");

    let (sender, receiver) = mpsc::channel(4);
    let mut client = SmartHttpServiceClient::new(node.channel().await);
    let call = tokio::spawn(async move {
        let mut stream = client
            .post_receive_pack(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    });
    sender
        .send(PostReceivePackRequest {
            repository: header("s1", "repo.git"),
            git_protocol: String::new(),
            data: body.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // git is now waiting for the rest of the pack.
    for _ in 0..100 {
        if !children_of(node.pid()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !children_of(node.pid()).is_empty(),
        "receive-pack never started"
    );
    call.abort();
    drop(sender);
    wait_for_no_children(node.pid()).await;
    assert_eq!(refs_of(&node.repo_path("s1", "repo.git")), before);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_ends_the_git_process() {
    let (node, _work) = node_with_repository().await;
    for _ in 0..3 {
        // The advertisement arrives; upload-pack now waits for the client's wants.
        let (sender, stream) = open_session(&node).await;
        assert_eq!(children_of(node.pid()).len(), 1);
        drop(stream);
        drop(sender);
        wait_for_no_children(node.pid()).await;
    }
}

#[tokio::test]
async fn a_client_that_disconnects_mid_clone_leaves_no_git_process_behind() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    // Enough incompressible data that pack-objects is still busy when the client leaves.
    push_noise(&node, work.path());
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();

    let (sender, mut stream) = open_session(&node).await;
    let mut request = gitfleet::git::pktline::encode(format!("want {main}\n").as_bytes());
    request.extend_from_slice(b"0000");
    request.extend_from_slice(&gitfleet::git::pktline::encode(b"done\n"));
    sender
        .send(SshRequest {
            stdin: request.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // upload-pack answers (NAK first), then starts pack-objects. Nothing more is read, so
    // pack-objects blocks on a full pipe once it runs, and stays alive until the client leaves.
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.stdout.is_empty());
    let mut waited = 0;
    while git_processes_of(node.pid()).len() < 2 {
        assert!(
            waited < 200,
            "pack-objects never started: {:?}",
            git_processes_of(node.pid())
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        waited += 1;
    }
    drop(stream);
    drop(sender);
    wait_for_no_children(node.pid()).await;
}
