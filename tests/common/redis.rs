//! A real `redis-server` for the shared-cache tests.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Pki, closed_port, pki, skipped};

/// A `redis-server` on a free loopback port, stopped on drop. `.ci/run` installs it. With TLS
/// it listens only on TLS (a private CA from [`pki`]) and admits only the ACL user
/// [`REDIS_USER`] (the default user is off).
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub tls: Option<Pki>,
    _dir: tempfile::TempDir,
}

pub const REDIS_USER: &str = "tokengate";
/// A password with the characters that broke the hand-written client (`:`) and need
/// percent-encoding in a URL (`@`, `/`).
pub const REDIS_PASSWORD: &str = "p:w@rd/x";

impl RedisServer {
    pub fn start(tls: bool) -> Option<RedisServer> {
        let port = closed_port().port();
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> =
            ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(String::from).to_vec();
        let pki = tls.then(pki);
        match &pki {
            None => args.extend(["--port".into(), port.to_string()]),
            Some(pki) => {
                args.extend(["--port".into(), "0".into(), "--tls-port".into(), port.to_string()]);
                for (flag, path) in [
                    ("--tls-cert-file", &pki.server_cert),
                    ("--tls-key-file", &pki.server_key),
                    ("--tls-ca-cert-file", &pki.ca),
                ] {
                    args.extend([flag.into(), path.display().to_string()]);
                }
                args.extend(["--tls-auth-clients".into(), "no".into()]);
                args.extend(["--user".into(), "default".into(), "off".into()]);
                args.extend(
                    ["--user", REDIS_USER, "on", &format!(">{REDIS_PASSWORD}"), "~tokengate:*", "+@all"]
                        .map(String::from),
                );
            }
        }
        let child = Command::new("redis-server")
            .args(&args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(_) => {
                skipped("redis-server", "apt-get install redis-server");
                return None;
            }
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(RedisServer { child: Some(child), port, tls: pki, _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start");
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(pki) = &self.tls {
            cmd.args([
                "--tls",
                "--cacert",
                pki.ca.to_str().unwrap(),
                "--user",
                REDIS_USER,
                "--pass",
                REDIS_PASSWORD,
            ]);
            cmd.arg("--no-auth-warning");
        }
        let out = cmd.args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
