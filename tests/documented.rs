//! The command lines the README and the Dockerfile document work as written, without a container
//! runtime: the image's entrypoint, command, environment and default configuration path are read
//! from the Dockerfile, the `docker run` line from the README, container paths are mapped to the
//! repository, and the real binary is started with them (listening on loopback: the documented
//! `0.0.0.0` addresses are checked to parse, not bound).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A JSON-array Dockerfile instruction (`CMD ["run", ...]`) as its words.
fn exec_form(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile.lines().find(|l| l.starts_with(&format!("{instruction} "))).unwrap();
    serde_json::from_str(&line[instruction.len() + 1..]).unwrap()
}

/// `ENV A=1 B=2` lines.
fn env(dockerfile: &str) -> HashMap<String, String> {
    dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// The image's file at `path`, from its `COPY` lines and the README's mount of `config/`.
fn host_path(path: &str, dockerfile: &str) -> std::path::PathBuf {
    for line in dockerfile.lines().filter_map(|l| l.strip_prefix("COPY ")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() == 2 && parts[1] == path {
            return std::path::Path::new(ROOT).join(parts[0]);
        }
    }
    let rest =
        path.strip_prefix("/etc/tokengate/config/").unwrap_or_else(|| panic!("{path} is not in the image"));
    std::path::Path::new(ROOT).join("config").join(rest)
}

/// Starts the binary with `args` (image paths mapped) and `vars`, the listeners on loopback, and
/// waits until it listens (its providers' IdPs are not reachable from a test).
async fn started(args: &[String], vars: &[(&str, &str)], dockerfile: &str) -> Process {
    let mapped: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("/etc/tokengate/") {
                host_path(a, dockerfile).display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    launched(&mapped, vars).await
}

/// Starts the binary with `args` and only `vars` in its environment, the listeners on loopback
/// (`TOKENGATE_LISTEN`), and waits until it listens.
async fn launched(mapped: &[String], vars: &[(&str, &str)]) -> Process {
    let admin = closed_port();
    let listen = closed_port().to_string();
    let admin_text = admin.to_string();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tokengate.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(mapped)
        .env_clear()
        .envs(vars.iter().copied())
        .env("TOKENGATE_LISTEN", &listen)
        .env("TOKENGATE_ADMIN_LISTEN", &admin_text)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let p = Process { child, admin, log };
    p.logged("tokengate is listening").await;
    let health = client().get(format!("http://{admin}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    std::mem::forget(dir);
    p
}

#[tokio::test]
async fn the_images_default_command_starts() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    assert_eq!(exec_form(&dockerfile, "ENTRYPOINT"), ["/usr/local/bin/tokengate"]);
    let cmd = exec_form(&dockerfile, "CMD");
    let vars = env(&dockerfile);
    for key in ["TOKENGATE_LISTEN", "TOKENGATE_ADMIN_LISTEN"] {
        let addr: std::net::SocketAddr = vars[key].parse().unwrap();
        assert!(addr.ip().is_unspecified(), "{key}: a container must listen on every interface");
    }
    let config = host_path(cmd.last().unwrap(), &dockerfile);
    assert!(
        config.is_file(),
        "the image's default configuration {} is not in the repository",
        config.display()
    );
    let p =
        started(&cmd, &[("EXAMPLE_CLIENT_ID", "id"), ("EXAMPLE_CLIENT_SECRET", "secret")], &dockerfile).await;
    assert!(p.log_text().contains(&format!("proxy_addr={listen}", listen = "127.0.0.1")), "{}", p.log_text());
}

#[tokio::test]
async fn the_readmes_docker_run_line_starts() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let start = readme.find("docker run --rm").unwrap();
    let line: String = readme[start..]
        .lines()
        .take_while(|l| !l.trim_start().starts_with("```"))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = line.split_whitespace().filter(|w| *w != "\\").collect();
    // After the image name come the arguments of the entrypoint.
    let image = words.iter().position(|w| *w == "tokengate").unwrap();
    let args: Vec<String> = words[image + 1..].iter().map(|w| (*w).to_owned()).collect();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{line}");
    let env_names: Vec<&str> = words.windows(2).filter(|w| w[0] == "-e").map(|w| w[1]).collect();
    let vars: Vec<(&str, &str)> = env_names.iter().map(|n| (*n, "placeholder-value")).collect();
    started(&args, &vars, &dockerfile).await;
}

#[test]
fn a_file_argument_works_where_minus_c_does() {
    let example = format!("{ROOT}/config/sensu-apikey.yaml");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "placeholder-key\n").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(args)
            .env_clear()
            .env("SENSU_URL", "https://sensu.example.com:8080")
            .env("SENSU_API_KEY_FILE", &key)
            .output()
            .unwrap()
    };
    let out = run(&["check", &example]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    let out = run(&["check", &example, "sensu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("go with --live"));
    let out = run(&["run", "-c", &example, &example]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("once"));
    let out = run(&["run"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("as an argument or -c FILE"));
}

/// What a shell would expand, and a glob, are refused with the fix rather than taken literally.
#[test]
fn shell_habits_are_refused_with_the_fix() {
    let parse = |text: &str| tokengate::config::parse(text, "t.yaml").map(|_| ()).unwrap_err().to_string();
    let base = |provider: &str, route: &str| {
        format!(
            "providers:\n  p:\n    type: static\n{provider}routes:\n  - prefix: /a\n    upstream: https://api.example\n    provider: p\n{route}"
        )
    };
    let e = parse(&base("    value: $API_KEY\n", ""));
    assert!(e.contains("${API_KEY}") && e.contains("$$API_KEY"), "{e}");
    let e = parse(&base("    value_file: ~/secrets/key\n", ""));
    assert!(e.contains("`~` is not expanded") && e.contains("${HOME}/secrets/key"), "{e}");
    let e = parse(&base("    value: v\n", "    ca_file: ~/ca.pem\n"));
    assert!(e.contains("routes[0].ca_file") && e.contains("${HOME}/ca.pem"), "{e}");
    let e = parse(&base("    value: v\n", "").replace("prefix: /a", "prefix: /crm/*"));
    assert!(e.contains("no wildcards") && e.contains("\"/crm\""), "{e}");
    // A literal `$` is still possible.
    assert!(tokengate::config::parse(&base("    value: a$$b\n", ""), "t.yaml").is_ok());
}

/// The systemd unit in deploy/ passes `systemd-analyze verify` (its ExecStart pointed at this
/// build), and its command line, with the credentials directory systemd would make, serves and
/// stops cleanly on the SIGTERM `systemctl stop` sends.
#[tokio::test]
async fn the_systemd_unit_verifies_and_its_command_runs() {
    let unit = std::fs::read_to_string(format!("{ROOT}/deploy/systemd/tokengate.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/tokengate");
    for key in ["DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n"]
    {
        assert!(unit.contains(key), "the unit lacks {key:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().join("tokengate.service");
    std::fs::write(&here, unit.replace("/usr/local/bin/tokengate", env!("CARGO_BIN_EXE_tokengate"))).unwrap();
    match std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&here).output() {
        Ok(out) => {
            let said =
                String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !said.contains("tokengate.service"),
                "systemd-analyze verify:\n{said}"
            );
        }
        Err(_) => skipped("systemd-analyze", "apt-get install systemd"),
    }
    // The credential the unit loads, where systemd puts it.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let name =
        unit.lines().find_map(|l| l.strip_prefix("LoadCredential=")).unwrap().split(':').next().unwrap();
    std::fs::write(credentials.join(name), "placeholder-secret").unwrap();
    let config = words[2].strip_prefix("/etc/tokengate/").unwrap();
    let mapped = [words[1].to_owned(), format!("{ROOT}/deploy/systemd/{config}")];
    let mut p = launched(&mapped, &[("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())]).await;
    p.signal("-TERM");
    assert_eq!(p.exited_within(std::time::Duration::from_secs(10)).await, Some(Some(0)), "{}", p.log_text());
}
