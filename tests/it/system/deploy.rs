//! docker-compose.yml and the config files it mounts stay in step with the config format:
//! every service's config, with the environment the compose file gives it, loads and
//! validates as that role would load it. (No Docker engine is needed.)

use std::path::Path;

use gitfleet::config::{NodeConfig, ProxyConfig};

/// One service of the compose file: its name and its lines.
struct ServiceBlock {
    name: String,
    lines: Vec<String>,
}

/// Splits the `services:` section into its services, by indentation.
fn services(compose: &str) -> Vec<ServiceBlock> {
    let mut blocks: Vec<ServiceBlock> = Vec::new();
    let mut inside = false;
    for line in compose.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            inside = line.trim_end() == "services:";
            continue;
        }
        if !inside || line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 2 && line.trim_end().ends_with(':') {
            blocks.push(ServiceBlock {
                name: line.trim().trim_end_matches(':').to_owned(),
                lines: Vec::new(),
            });
        } else if let Some(block) = blocks.last_mut() {
            block.lines.push(line.to_owned());
        }
    }
    blocks
}

/// `${NAME:-default}` as compose resolves it with nothing set: the default.
fn resolve(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("a closed ${...}") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

impl ServiceBlock {
    fn environment(&self) -> Vec<(String, String)> {
        self.lines
            .iter()
            .filter_map(|line| {
                let (key, value) = line.trim().split_once(": ")?;
                key.starts_with("GITFLEET__")
                    .then(|| (key.to_owned(), resolve(value.trim())))
            })
            .collect()
    }

    /// The config file mounted from the repository, if any.
    fn config_file(&self) -> Option<String> {
        self.lines.iter().find_map(|line| {
            let mount = line.trim().strip_prefix("- ./")?;
            let (source, target) = mount.split_once(':')?;
            target
                .starts_with("/etc/gitfleet/")
                .then(|| source.to_owned())
        })
    }

    fn role(&self) -> Option<&str> {
        self.lines.iter().find_map(|line| {
            let command = line.trim().strip_prefix("command: [\"")?;
            command.split('"').next()
        })
    }
}

#[test]
fn every_service_config_loads_with_its_compose_environment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let blocks = services(&compose);
    let names: Vec<&str> = blocks.iter().map(|block| block.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "postgres",
            "node-1",
            "node-2",
            "node-3",
            "proxy",
            "worker-replication",
            "worker-cleanup"
        ]
    );

    let mut storages = Vec::new();
    let mut proxy = None;
    let mut worker_nodes = Vec::new();
    for block in &blocks {
        let Some(role) = block.role() else { continue };
        let file = block
            .config_file()
            .unwrap_or_else(|| panic!("{} mounts no config", block.name));
        let path = root.join(&file);
        let env = block.environment();
        match role {
            "node" => {
                let config: NodeConfig = gitfleet::config::load(&path, env).unwrap();
                config.validate().unwrap();
                assert_eq!(config.listen.port(), 9001, "the health check probes 9001");
                storages.push(config.storages[0].name.clone());
            }
            "proxy" => {
                let config: ProxyConfig = gitfleet::config::load(&path, env).unwrap();
                config.validate().unwrap();
                assert!(
                    config.database.url.contains("@postgres/"),
                    "{}",
                    config.database.url
                );
                assert_eq!(config.http_listen.map(|a| a.port()), Some(8080));
                proxy = Some(config);
            }
            "worker" => {
                let config: ProxyConfig = gitfleet::config::load(&path, env).unwrap();
                config.validate().unwrap();
                assert!(config.database.url.contains("@postgres/"));
                assert_eq!(
                    config.worker.http_listen.map(|a| a.port()),
                    Some(9300),
                    "the health check probes 9300"
                );
                let command = block
                    .lines
                    .iter()
                    .find(|line| line.trim().starts_with("command:"))
                    .unwrap();
                let job = command.split("\"--job\", \"").nth(1).unwrap();
                let job = job.split('"').next().unwrap();
                assert!(
                    gitfleet::worker::JobType::parse(job).is_some(),
                    "{}: no job type {job}",
                    block.name
                );
                worker_nodes.push(config.virtual_storages[0].nodes.clone());
            }
            other => panic!("{}: unknown role {other}", block.name),
        }
    }
    // The proxy knows each node by the storage name that node serves, at its service name.
    let proxy = proxy.expect("a proxy service");
    let nodes = &proxy.virtual_storages[0].nodes;
    assert_eq!(
        nodes
            .iter()
            .map(|node| node.storage.clone())
            .collect::<Vec<_>>(),
        storages
    );
    // Workers reach the same nodes with the same secrets.
    assert!(!worker_nodes.is_empty());
    for worker in &worker_nodes {
        assert_eq!(
            worker
                .iter()
                .map(|n| (&n.address, &n.token))
                .collect::<Vec<_>>(),
            nodes
                .iter()
                .map(|n| (&n.address, &n.token))
                .collect::<Vec<_>>()
        );
    }
    for (index, node) in nodes.iter().enumerate() {
        assert_eq!(node.address, format!("http://node-{}:9001", index + 1));
    }
    assert!(
        compose.contains("\"127.0.0.1:2305:2305\"") && compose.contains("\"127.0.0.1:8080:8080\"")
    );
}

#[test]
fn compose_defaults_are_resolved_as_compose_does() {
    assert_eq!(resolve("${A:-x}"), "x");
    assert_eq!(
        resolve("postgres://u:${P:-pw}@h/db"),
        "postgres://u:pw@h/db"
    );
    assert_eq!(resolve("${UNSET}"), "");
    assert_eq!(resolve("plain"), "plain");
}
