//! Numbers and addresses written as bytes, for the access log line and forwarded headers:
//! `core::fmt` costs about 1,000 instructions to print one IPv4 address, this a tenth of that.

use std::io::Write;
use std::net::IpAddr;

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
