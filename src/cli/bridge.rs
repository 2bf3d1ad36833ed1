//! `gitfleet bridge`: lets a real git client speak to a gitfleet server. git runs it as the
//! ext:: transport command or as its ssh command; it pipes git's full-duplex protocol into the
//! SshUploadPack / SshReceivePack streams.

use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::{Credentials, Signer};
use crate::model::RepositoryName;
use crate::node::{ADDRESS_ENV, SIGNED_TOKEN_ENV};
use crate::proto::ssh_service_client::SshServiceClient;
use crate::proto::{RepositoryHeader, SshRequest};

/// git's exit status for a failure it did not even get to run.
const FAILURE: u8 = 128;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Credentials come from the environment: GITFLEET_TOKEN holds the shared \
secret (a fresh signed token is minted for the call), or GITFLEET_SIGNED_TOKEN holds a token \
already signed. GITFLEET_ADDRESS is the server's address, such as http://127.0.0.1:9001.

Examples:
  git -c protocol.ext.allow=always clone 'ext::gitfleet bridge connect %S STORAGE/REPO.git'
  GIT_SSH_COMMAND='gitfleet bridge ssh' git clone ssh://127.0.0.1:9001/STORAGE/REPO.git

The ssh form carries GIT_PROTOCOL, so git can use protocol v2; git's ext:: transport speaks v0."
)]
pub struct BridgeArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// For git's ext:: transport: `ext::gitfleet bridge connect %S STORAGE/REPO`.
    Connect {
        /// The server, such as http://127.0.0.1:9001.
        #[arg(long, env = ADDRESS_ENV)]
        address: String,
        /// The git service: git-upload-pack or git-receive-pack (git's %S).
        service: String,
        /// STORAGE/RELATIVE_PATH.
        repository: String,
    },
    /// For GIT_SSH_COMMAND: takes ssh's arguments, connects to http://HOST:PORT (or to
    /// GITFLEET_ADDRESS when set) and runs the command git asks for.
    Ssh {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 1..)]
        args: Vec<String>,
    },
}

struct Target {
    address: String,
    service: String,
    repository: RepositoryName,
}

pub async fn run(args: BridgeArgs) -> ExitCode {
    let target = match args.mode {
        Mode::Connect {
            address,
            service,
            repository,
        } => RepositoryName::parse(&repository)
            .map(|repository| Target {
                address,
                service,
                repository,
            })
            .map_err(|e| e.to_string()),
        // git probes its ssh command with -G to learn whether it is OpenSSH; answering like
        // OpenSSH lets git pass the port and GIT_PROTOCOL without GIT_SSH_VARIANT=ssh.
        Mode::Ssh { args } if args.first().is_some_and(|arg| arg == "-G") => {
            return ExitCode::SUCCESS;
        }
        Mode::Ssh { args } => parse_ssh(&args, std::env::var(ADDRESS_ENV).ok()),
    };
    match target {
        Ok(target) => match pump(target).await {
            Ok(code) => code,
            Err(message) => fail(&message),
        },
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("fatal: gitfleet: {message}");
    ExitCode::from(FAILURE)
}

fn credentials() -> Result<Signer, String> {
    if let Ok(token) = std::env::var(SIGNED_TOKEN_ENV) {
        return Ok(Signer::new(Credentials::Signed(token.into())));
    }
    match std::env::var("GITFLEET_TOKEN") {
        Ok(secret) => Ok(Signer::from_secret(&secret)),
        Err(_) => Err("no credentials: set GITFLEET_TOKEN (or GITFLEET_SIGNED_TOKEN)".into()),
    }
}

/// Reads ssh's command line: `[-o OPT]... [-p PORT] [-4|-6] HOST COMMAND...`.
fn parse_ssh(args: &[String], address: Option<String>) -> Result<Target, String> {
    let mut port = None;
    let mut rest = args.iter();
    let mut positional = Vec::new();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-o" => {
                rest.next();
            }
            "-p" => port = rest.next().cloned(),
            "-4" | "-6" | "-T" => {}
            other if positional.is_empty() && other.starts_with('-') => {
                return Err(format!("unsupported ssh option {other}"));
            }
            other => positional.push(other.to_owned()),
        }
    }
    let Some((host, command)) = positional.split_first() else {
        return Err("expected HOST and a git command".into());
    };
    let address = match (address, port) {
        (Some(address), _) => address,
        (None, Some(port)) => format!("http://{host}:{port}"),
        (None, None) => {
            return Err(
                "no port in the URL: use ssh://HOST:PORT/STORAGE/REPO or set GITFLEET_ADDRESS"
                    .into(),
            );
        }
    };
    let words = unquote(&command.join(" "))?;
    let [service, path] = &words[..] else {
        return Err(format!(
            "expected `git-upload-pack 'PATH'`, got {:?}",
            command.join(" ")
        ));
    };
    let repository =
        RepositoryName::parse(path.trim_start_matches('/')).map_err(|e| e.to_string())?;
    Ok(Target {
        address,
        service: service.clone(),
        repository,
    })
}

/// Splits a POSIX shell command line that uses only single quotes and backslashes, the way
/// git quotes the path it passes to ssh.
fn unquote(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => words.extend(word.take()),
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err("unterminated quote in the ssh command".into()),
                    }
                }
            }
            '\\' => word
                .get_or_insert_with(String::new)
                .push(chars.next().ok_or("trailing backslash")?),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

async fn pump(target: Target) -> Result<ExitCode, String> {
    let signer = credentials()?;
    let channel = crate::client::connect(&target.address, signer)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = SshServiceClient::new(channel);
    let (sender, receiver) = mpsc::channel(8);
    let first = SshRequest {
        repository: Some(RepositoryHeader {
            storage: target.repository.storage.to_string(),
            relative_path: target.repository.relative_path.to_string(),
        }),
        git_protocol: std::env::var("GIT_PROTOCOL").unwrap_or_default(),
        ..Default::default()
    };
    sender
        .send(first)
        .await
        .map_err(|_| "request stream closed")?;
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let message = match stdin.read(&mut buffer).await {
                Ok(0) | Err(_) => SshRequest {
                    close_stdin: true,
                    ..Default::default()
                },
                Ok(read) => SshRequest {
                    stdin: buffer[..read].to_vec().into(),
                    ..Default::default()
                },
            };
            let closing = message.close_stdin;
            if sender.send(message).await.is_err() || closing {
                return;
            }
        }
    });
    let input = ReceiverStream::new(receiver);
    let response = match target.service.as_str() {
        "git-upload-pack" => client.ssh_upload_pack(input).await,
        "git-receive-pack" => client.ssh_receive_pack(input).await,
        other => return Err(format!("unsupported git service {other:?}")),
    };
    let mut stream = response
        .map_err(|status| format!("{} ({:?})", status.message(), status.code()))?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Err("the server closed the stream without an exit status".into()),
            Err(status) => return Err(format!("{} ({:?})", status.message(), status.code())),
        };
        if !message.stdout.is_empty() {
            stdout
                .write_all(&message.stdout)
                .await
                .map_err(|e| e.to_string())?;
            stdout.flush().await.map_err(|e| e.to_string())?;
        }
        if !message.stderr.is_empty() {
            let _ = stderr.write_all(&message.stderr).await;
        }
        if let Some(status) = message.exit_status {
            return Ok(ExitCode::from(u8::try_from(status).unwrap_or(FAILURE)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_what_git_passes_to_ssh() {
        let target = parse_ssh(
            &strings(&[
                "-o",
                "SendEnv=GIT_PROTOCOL",
                "-p",
                "9001",
                "127.0.0.1",
                "git-upload-pack '/s1/a b/it'\\''s.git'",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(target.address, "http://127.0.0.1:9001");
        assert_eq!(target.service, "git-upload-pack");
        assert_eq!(target.repository.to_string(), "s1/a b/it's.git");
        let target = parse_ssh(
            &strings(&["gitfleet", "git-receive-pack '/s1/x.git'"]),
            Some("http://h:1".into()),
        )
        .unwrap();
        assert_eq!(target.address, "http://h:1");
        assert!(parse_ssh(&strings(&["host", "git-upload-pack '/s1/x.git'"]), None).is_err());
        assert!(
            parse_ssh(
                &strings(&["-p", "1", "host", "git-upload-pack '/s1/../x.git'"]),
                None
            )
            .is_err()
        );
    }
}
