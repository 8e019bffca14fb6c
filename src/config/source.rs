//! Reading a configuration file before it is parsed: only a regular file, of bounded size and
//! nesting. Reloads read the file while serving; a path swapped for a FIFO would block the read
//! until someone writes to it, and a few hundred kilobytes of deeply nested flow collections
//! (`[[[[…]]]]`) took the YAML parser seconds of CPU.

use std::io::Read;
use std::path::Path;

/// Largest configuration file read; real ones are a few kilobytes.
pub const MAX_SIZE: u64 = 1024 * 1024;

/// Deepest nesting of `[` and `{` accepted; the schema never needs more than a handful.
pub const MAX_DEPTH: usize = 64;

/// Why a configuration file was not read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A directory, FIFO, socket or device.
    #[error("it is not a regular file ({0}); point the configuration at a file")]
    NotAFile(&'static str),
    /// Past [`MAX_SIZE`].
    #[error("it is larger than {} KiB; a configuration file is a few kilobytes", MAX_SIZE / 1024)]
    TooLarge,
    /// Not UTF-8.
    #[error("it is not UTF-8 text")]
    NotText,
    /// The system refused.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads `path` (following symlinks, as Kubernetes mounts need) if it is a regular file of at
/// most [`MAX_SIZE`] bytes. The file is opened without blocking and checked again once open,
/// so a path swapped for a FIFO in between cannot block the read either.
pub fn read(path: &Path) -> Result<String, SourceError> {
    use std::os::unix::fs::OpenOptionsExt;
    kind(&std::fs::metadata(path)?)?;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    kind(&meta)?;
    if meta.len() > MAX_SIZE {
        return Err(SourceError::TooLarge);
    }
    let mut bytes = Vec::new();
    file.take(MAX_SIZE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SIZE {
        return Err(SourceError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|_| SourceError::NotText)
}

fn kind(meta: &std::fs::Metadata) -> Result<(), SourceError> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = match () {
        () if t.is_file() => return Ok(()),
        () if t.is_dir() => "a directory",
        () if t.is_fifo() => "a FIFO",
        () if t.is_socket() => "a socket",
        () if t.is_block_device() || t.is_char_device() => "a device",
        () => "not a file",
    };
    Err(SourceError::NotAFile(what))
}

/// The line (1-based) where flow collections (`[`, `{`) first nest deeper than [`MAX_DEPTH`],
/// outside quotes and comments; `None` when they never do.
pub fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        let mut quote = None;
        let mut previous = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some('"'), '\\') if previous == '\\' => {
                    previous = ' ';
                    continue;
                }
                (Some(q), c) if c == q && !(q == '"' && previous == '\\') => quote = None,
                (Some(_), _) => {}
                (None, '#') if previous.is_whitespace() => break,
                (None, '"' | '\'') => quote = Some(c),
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Some(n + 1);
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            previous = c;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "listen: 127.0.0.1:1\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&file).ok().as_deref(), Some("listen: 127.0.0.1:1\n"));
        assert!(matches!(read(dir.path()), Err(SourceError::NotAFile("a directory"))));
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_SIZE as usize + 1]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(read(&big), Err(SourceError::TooLarge)));
        assert!(matches!(read(Path::new("/dev/null")), Err(SourceError::NotAFile("a device"))));
    }

    #[test]
    fn nesting_is_counted_outside_quotes_and_comments() {
        let deep = format!("a: {}{}\n", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(too_deep(&format!("x: 1\n{deep}")), Some(2));
        let shallow = format!("a: {}{}\n", "{b: ".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert_eq!(too_deep(&shallow), None);
        let quoted = format!("a: \"{}\"\nb: '{}' # {}\n", "[".repeat(500), "{".repeat(500), "[".repeat(500));
        assert_eq!(too_deep(&quoted), None);
        assert_eq!(too_deep("a: [x, {b: [1, 2]}]\nc: ${X}\n"), None);
    }
}
