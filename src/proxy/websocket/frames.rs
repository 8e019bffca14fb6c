//! Where WebSocket frames begin and end in a byte stream (RFC 6455 section 5.2), so a close
//! frame can be put between two frames, never inside one. Only headers are read: payloads,
//! masked or compressed, pass as they are.

/// The longest frame header: 2 bytes, a 64-bit length and a masking key.
const MAX_HEADER: usize = 14;

/// The position in one direction's stream of frames.
#[derive(Debug, Default)]
pub struct Frames {
    // The header read so far of the frame being entered.
    header: [u8; MAX_HEADER],
    header_len: usize,
    // Payload bytes of the current frame still to come.
    remaining: u64,
    // A close frame has begun.
    closing: bool,
}

impl Frames {
    /// A close frame has come this way: this side began (or answered) the closing handshake.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Between two frames: a frame can be inserted here.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// Follows `data` through the stream and returns how many of its bytes were taken: all of
    /// them, or with `stop_at_boundary` only those up to the first frame boundary (none when
    /// already at one).
    pub fn advance(&mut self, data: &[u8], stop_at_boundary: bool) -> usize {
        let mut at = 0;
        while at < data.len() {
            if stop_at_boundary && self.at_boundary() {
                return at;
            }
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(data.len() - at);
                self.remaining -= take as u64;
                at += take;
                continue;
            }
            self.header[self.header_len] = data[at];
            self.header_len += 1;
            at += 1;
            if let Some(payload) = self.complete_header() {
                self.closing |= self.header[0] & 0x0f == 0x8;
                self.header_len = 0;
                self.remaining = payload;
            }
        }
        at
    }

    /// The payload length once the header read so far is whole.
    fn complete_header(&self) -> Option<u64> {
        let h = &self.header[..self.header_len];
        if h.len() < 2 {
            return None;
        }
        let masked = h[1] & 0x80 != 0;
        let (extended, short) = match h[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let needed = 2 + extended + if masked { 4 } else { 0 };
        if h.len() < needed {
            return None;
        }
        Some(short.unwrap_or_else(|| h[2..2 + extended].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b))))
    }
}

/// A close frame with status `code` and no reason; masked with `mask` when sent by the client
/// side (every client-to-server frame is masked).
pub fn close(code: u16, mask: Option<[u8; 4]>) -> Vec<u8> {
    let payload = code.to_be_bytes();
    match mask {
        None => vec![0x88, 0x02, payload[0], payload[1]],
        Some(m) => vec![0x88, 0x82, m[0], m[1], m[2], m[3], payload[0] ^ m[0], payload[1] ^ m[1]],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let mask = if masked { 0x80 } else { 0 };
        match payload {
            0..=125 => f.push(mask | payload as u8),
            126..=65535 => {
                f.push(mask | 126);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                f.push(mask | 127);
                f.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0xAB, payload));
        f
    }

    #[test]
    fn boundaries_are_found_however_the_bytes_are_split() {
        let sizes = [0, 1, 125, 126, 65535, 65536, 70000];
        for masked in [false, true] {
            let stream: Vec<u8> = sizes.iter().flat_map(|n| frame(*n, masked)).collect();
            let mut ends = Vec::new();
            let mut total = 0;
            for n in sizes {
                total += frame(n, masked).len();
                ends.push(total);
            }
            for split in [1, 3, 7, 13, 1000, stream.len()] {
                let mut frames = Frames::default();
                let mut found = Vec::new();
                let mut pos = 0;
                for chunk in stream.chunks(split) {
                    let mut at = 0;
                    while at < chunk.len() {
                        // Step one byte, then run to the next boundary.
                        at += frames.advance(&chunk[at..at + 1], false);
                        at += frames.advance(&chunk[at..], true);
                        if frames.at_boundary() {
                            found.push(pos + at);
                        }
                    }
                    pos += chunk.len();
                }
                assert_eq!(found, ends, "masked {masked}, split {split}");
            }
        }
    }

    #[test]
    fn close_frames_are_well_formed() {
        assert_eq!(close(1001, None), [0x88, 0x02, 0x03, 0xE9]);
        let masked = close(1001, Some([0xFF, 0x00, 0x0F, 0xF0]));
        assert_eq!(masked, [0x88, 0x82, 0xFF, 0x00, 0x0F, 0xF0, 0x03 ^ 0xFF, 0xE9]);
        let mut frames = Frames::default();
        assert_eq!(frames.advance(&masked, false), masked.len());
        assert!(frames.at_boundary() && frames.closing());
    }
}
