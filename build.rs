//! Stamps the binary with its git revision and build date for `tokengate --version`.
//! `TOKENGATE_GIT_REV` overrides the revision (an image built without `.git`), and
//! `SOURCE_DATE_EPOCH` the date (reproducible builds).

use std::process::Command;

fn main() {
    let rev = std::env::var("TOKENGATE_GIT_REV").ok().or_else(git_rev).unwrap_or_else(|| "unknown".into());
    let epoch =
        std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=TOKENGATE_GIT_REV={rev}");
    println!("cargo:rustc-env=TOKENGATE_BUILD_DATE={}", civil_date(epoch / 86_400));
    println!("cargo:rerun-if-env-changed=TOKENGATE_GIT_REV");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit or checkout changes HEAD or the branch it points at.
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(branch) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed=.git/{branch}");
    }
}

/// The commit the build was made from.
fn git_rev() -> Option<String> {
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !rev.is_empty()).then_some(rev)
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01 (Howard Hinnant's days-to-civil algorithm; a
/// build script does not get the crate's dependencies).
fn civil_date(days: u64) -> String {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
