//! Numbers and addresses written as bytes, for the access log line and forwarded headers:
//! `core::fmt` costs about 1,000 instructions to print one IPv4 address, this a tenth of that.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::time::SystemTime;

/// Appends the decimal digits of `n`.
pub fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `ip` as `Display` writes it (IPv6 is rare enough to leave to `core::fmt`).
pub fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, octet);
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

thread_local! {
    /// The RFC 3339 time of the current second, formatted once per second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends the current time, RFC 3339 with milliseconds, UTC (`2026-11-25T17:12:01.123Z`): the
/// access log's and the operator log's timestamps.
pub fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let second = now.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(second).unwrap_or(0))
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            // Whole seconds format as `...:01Z`; the milliseconds go before the `Z`.
            let whole = t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            *cached = (second, whole.trim_end_matches('Z').to_owned());
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
    out.push(b'.');
    three_digits(out, now.subsec_millis());
    out.push(b'Z');
}

/// Appends `n % 1000` as three digits.
pub fn three_digits(out: &mut Vec<u8>, n: u32) {
    let n = n % 1000;
    out.extend_from_slice(&[b'0' + (n / 100) as u8, b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for a in [
            "0.0.0.0",
            "10.0.0.7",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:1.2.3.4",
        ] {
            let addr: IpAddr = a.parse().expect("test address");
            let mut out = Vec::new();
            ip(&mut out, addr);
            assert_eq!(String::from_utf8(out).expect("ascii"), addr.to_string());
        }
    }
}
