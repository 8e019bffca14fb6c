//! What operators' tools read: the configuration's JSON Schema (generated from the config types,
//! shipped in `config/`, named by every example and checked against them by an independent
//! validator), `--version`, shell completions and the manual page.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const FIRST_LINE: &str = "# yaml-language-server: $schema=";

fn tokengate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn examples() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(format!("{ROOT}/config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files.push(format!("{ROOT}/deploy/systemd/tokengate.yaml").into());
    files
}

fn validator() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/config/tokengate.schema.json")).unwrap(),
    )
    .unwrap();
    jsonschema::draft7::new(&schema).unwrap()
}

/// The errors of a YAML document against the schema.
fn errors(validator: &jsonschema::Validator, yaml: &str) -> Vec<String> {
    let doc: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    validator.iter_errors(&doc).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

#[test]
fn the_shipped_schema_is_the_one_the_config_types_generate() {
    let shipped = std::fs::read_to_string(format!("{ROOT}/config/tokengate.schema.json")).unwrap();
    assert!(
        tokengate(&["schema"]) == shipped,
        "config/tokengate.schema.json is stale: run `cargo run -- schema > config/tokengate.schema.json`"
    );
}

#[test]
fn every_example_names_the_schema_and_follows_it() {
    let validator = validator();
    for file in examples() {
        let text = std::fs::read_to_string(&file).unwrap();
        // The first line names the schema by a path relative to the file, which editors follow.
        let named = text.lines().next().and_then(|l| l.strip_prefix(FIRST_LINE));
        let schema = named.map(|n| file.parent().unwrap().join(n));
        assert!(
            schema.as_ref().is_some_and(|s| s.ends_with("tokengate.schema.json") && s.is_file()),
            "{}: the first line must be {FIRST_LINE}<path to config/tokengate.schema.json>",
            file.display()
        );
        let errors = errors(&validator, &text);
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
    }
}

#[test]
fn the_schema_refuses_what_load_refuses() {
    let validator = validator();
    let good = "providers:\n  idp:\n    type: oauth2\n    token_url: https://idp/t\n    client_id: a\n    \
                client_secret: ${SECRET}\nroutes:\n  - prefix: /api\n    upstream: https://api.example.com\n    \
                provider: idp\nlimits:\n  upstream_timeout: 30s\n";
    assert_eq!(errors(&validator, good), Vec::<String>::new());
    for (from, to, at) in [
        ("upstream_timeout: 30s", "upstream_timeout: soon", "/limits/upstream_timeout"),
        ("    provider: idp", "    provider: idp\n    timeout: 30s", "/routes/0"),
        ("    type: oauth2", "    type: saml", "/providers/idp/type"),
        ("    client_id: a", "    client_idd: a", "/providers/idp"),
        ("upstream: https://api", "upstream: ftp://api", "/routes/0/upstream"),
        ("prefix: /api", "prefix: api", "/routes/0/prefix"),
    ] {
        let bad = good.replace(from, to);
        let errors = errors(&validator, &bad);
        assert!(errors.iter().any(|e| e.starts_with(&format!("{at}:"))), "{to}: {errors:#?}");
    }
}

#[test]
fn version_names_the_commit_and_the_build_day() {
    let version = tokengate(&["--version"]);
    let (release, stamp) = version.trim().strip_prefix("tokengate ").unwrap().split_once(' ').unwrap();
    assert_eq!(release, env!("CARGO_PKG_VERSION"));
    let (rev, day) = stamp.trim_matches(['(', ')']).split_once(", built ").unwrap();
    let head = Command::new("git").args(["-C", ROOT, "rev-parse", "--short=12", "HEAD"]).output();
    match head {
        Ok(out) if out.status.success() => assert_eq!(rev, String::from_utf8_lossy(&out.stdout).trim()),
        _ => eprintln!("!!! git is not available here: the revision {rev:?} was not compared with HEAD"),
    }
    let parts: Vec<&str> = day.split('-').collect();
    assert!(parts.len() == 3 && parts[0].len() == 4 && day.len() == 10, "{day}");
    assert!(day.bytes().all(|b| b.is_ascii_digit() || b == b'-'), "{day}");
}

#[test]
fn completions_and_the_manual_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let script = tokengate(&["completions", shell]);
        for word in ["check", "token", "listen", "log-format"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    // bash itself reads the bash script.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.bash");
    std::fs::write(&path, tokengate(&["completions", "bash"])).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(syntax.success());
    let man = tokengate(&["man"]);
    assert!(man.contains(".TH tokengate 1"), "{}", &man[..200.min(man.len())]);
    for word in ["check", "completions", "TOKENGATE_CONFIG", "tokengate\\-run(1)"] {
        assert!(man.contains(word), "the manual page lacks {word}");
    }
    let run = tokengate(&["man", "run"]);
    assert!(run.contains(".TH tokengate-run 1"), "{}", &run[..200.min(run.len())]);
    assert!(run.contains("TOKENGATE_LISTEN") && run.contains("\\-\\-workers"), "{run}");
}
