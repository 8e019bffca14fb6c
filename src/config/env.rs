//! `${VAR}` interpolation in configuration strings.
//!
//! Expansion happens per string value after YAML parsing, not on the raw text, so a secret that
//! contains `: ` or `#` can never change the structure of the file.

use std::cell::RefCell;

type Lookup = Box<dyn Fn(&str) -> Option<String>>;

thread_local! {
    static LOOKUP: RefCell<Option<Lookup>> = const { RefCell::new(None) };
}

/// Runs `body` with `lookup` as the source of variables instead of the process environment.
/// Loading is synchronous, so a thread-local scope is enough (and keeps tests free of `set_var`).
pub fn with_lookup<R>(lookup: impl Fn(&str) -> Option<String> + 'static, body: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            LOOKUP.with(|l| *l.borrow_mut() = None);
        }
    }
    LOOKUP.with(|l| *l.borrow_mut() = Some(Box::new(lookup)));
    let _reset = Reset;
    body()
}

fn lookup(name: &str) -> Option<String> {
    LOOKUP.with(|l| match &*l.borrow() {
        Some(f) => f(name),
        None => std::env::var(name).ok(),
    })
}

/// Expands `${NAME}` and `${NAME:-default}`; `$$` is a literal `$`. `$NAME` without braces is
/// refused (a shell would expand it, tokengate would not: the value would silently be the text);
/// any other `$` is kept as is.
pub fn expand(input: &str) -> Result<String, String> {
    if !input.contains('$') {
        return Ok(input.to_owned());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| format!("unterminated `${{` in {input:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if !is_var_name(name) {
                return Err(format!(
                    "`${{{expr}}}` is not a valid variable reference (use ${{NAME}} or ${{NAME:-default}})"
                ));
            }
            // As in shells and Compose, `:-` also applies when the variable is set but empty.
            match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set"));
                }
            }
            rest = &body[end + 1..];
        } else if after.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            return Err(format!(
                "`${name}` is not expanded: write ${{{name}}} for the environment variable, or $${name} for a literal `$`"
            ));
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Every `${NAME}` without a default in `text` whose variable is not set, with its line (1-based),
/// in order. Comments are skipped, so the whole file's missing variables are reported at once
/// rather than one per run.
pub fn missing(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = if line.trim_start().starts_with('#') {
            ""
        } else {
            line.find(" #").map_or(line, |i| &line[..i])
        };
        let mut rest = code;
        while let Some(i) = rest.find('$') {
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                rest = tail;
                continue;
            }
            rest = after;
            let Some(body) = after.strip_prefix('{') else { continue };
            let Some(end) = body.find('}') else { continue };
            let expr = &body[..end];
            if !expr.contains(":-") && is_var_name(expr) && lookup(expr).is_none() {
                out.push((n + 1, expr.to_owned()));
            }
            rest = &body[end + 1..];
        }
    }
    out
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TENANT" => Some("acme".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_defaults_and_escapes() {
        with_lookup(env, || {
            assert_eq!(expand("https://x/${TENANT}/t").unwrap(), "https://x/acme/t");
            assert_eq!(expand("${MISSING:-fallback}").unwrap(), "fallback");
            assert_eq!(expand("${EMPTY:-fallback}").unwrap(), "fallback");
            assert_eq!(expand("${EMPTY}").unwrap(), "");
            assert_eq!(expand("a$$b").unwrap(), "a$b");
            // A shell would expand `$word`; tokengate refuses it rather than keep the text.
            assert!(expand("pa$word").unwrap_err().contains("${word}"));
            assert_eq!(expand("price: 5$ or $5").unwrap(), "price: 5$ or $5");
            assert_eq!(expand("no vars").unwrap(), "no vars");
        });
    }

    #[test]
    fn every_missing_variable_is_found_with_its_line() {
        let text = "a: ${NOPE}\n# b: ${IN_COMMENT}\nc: ${TENANT} ${ALSO_NOPE} # ${TRAILING}\nd: ${X:-y} $${LITERAL}\n";
        let found = with_lookup(env, || missing(text));
        assert_eq!(found, vec![(1, "NOPE".to_owned()), (3, "ALSO_NOPE".to_owned())]);
    }

    #[test]
    fn unset_variable_is_an_error_naming_it() {
        let err = with_lookup(env, || expand("${NOPE}")).unwrap_err();
        assert!(err.contains("NOPE is not set"), "{err}");
        assert!(with_lookup(env, || expand("${1X}")).is_err());
        assert!(with_lookup(env, || expand("${OPEN")).is_err());
    }
}
