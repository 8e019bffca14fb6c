//! Where things are written in a configuration file: the line and column of every key path
//! (`routes[2].provider`), read from a span-aware YAML parser (saphyr) before the file is
//! deserialized, and hints for the mistakes that put a key where it does not belong.

use saphyr_parser::{Event, Parser, ScanError, Span};

/// A position in the file, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The line.
    pub line: usize,
    /// The column, in characters.
    pub column: usize,
}

impl Place {
    fn of(span: &Span) -> Place {
        Place { line: span.start.line(), column: span.start.col() + 1 }
    }
}

/// One key path: where its key is written, and where its value is when that is a scalar.
struct Entry {
    path: String,
    key: Place,
    scalar: Option<(Place, String)>,
}

/// Every key path of a document with its place, in document order.
pub(super) struct Spans {
    entries: Vec<Entry>,
}

/// A mapping or a sequence being read.
struct Frame {
    path: String,
    /// In a mapping: the key whose value comes next (None: a key comes next).
    key: Option<String>,
    /// In a sequence: the next item's index.
    index: usize,
    is_seq: bool,
    /// A collection used as a mapping key (`? [a, b]: x`), which has no path of its own.
    is_key: bool,
}

/// A YAML syntax error, where the parser found it.
pub(super) struct Syntax {
    pub place: Place,
    pub message: String,
}

impl Spans {
    /// Reads the document's structure, or the first syntax error with a hint for its usual causes.
    pub(super) fn of(text: &str) -> Result<Spans, Syntax> {
        let mut entries = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        for event in Parser::new_from_str(text) {
            let (event, span) = event.map_err(|e| syntax(text, &e))?;
            let collection = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
            match event {
                Event::MappingEnd | Event::SequenceEnd => {
                    let done = stack.pop();
                    if let (Some(parent), Some(done)) = (stack.last_mut(), done)
                        && !parent.is_seq
                    {
                        // A key collection is followed by its value; a value by the next key.
                        parent.key = done.is_key.then(|| "?".to_owned());
                    }
                    continue;
                }
                Event::Scalar(..) | Event::Alias(..) | Event::MappingStart(..) | Event::SequenceStart(..) => {
                }
                _ => continue,
            }
            let place = Place::of(&span);
            let (path, is_key) = match stack.last_mut() {
                None => (String::new(), false),
                Some(f) if f.is_seq => {
                    let path = format!("{}[{}]", f.path, f.index);
                    f.index += 1;
                    entries.push(Entry { path: path.clone(), key: place, scalar: None });
                    (path, false)
                }
                Some(f) => match f.key.take() {
                    // A key: a scalar names the path; a collection as a key has none.
                    None => {
                        if let Event::Scalar(name, ..) = &event {
                            let path = join(&f.path, name);
                            entries.push(Entry { path, key: place, scalar: None });
                            f.key = Some(name.to_string());
                        } else if collection {
                            stack.push(Frame::new(
                                "?".into(),
                                matches!(event, Event::SequenceStart(..)),
                                true,
                            ));
                        }
                        continue;
                    }
                    Some(key) => (join(&f.path, &key), false),
                },
            };
            if !collection {
                if let Some(e) = entries.iter_mut().rev().find(|e| e.path == path) {
                    let text =
                        if let Event::Scalar(text, ..) = &event { text.to_string() } else { String::new() };
                    e.scalar = Some((place, text));
                }
                continue;
            }
            stack.push(Frame::new(path, matches!(event, Event::SequenceStart(..)), is_key));
        }
        Ok(Spans { entries })
    }

    /// Where the key of `path` is written (for a list item: where the item starts).
    pub(super) fn key(&self, path: &str) -> Option<Place> {
        self.entries.iter().find(|e| e.path == path).map(|e| e.key)
    }

    /// Where the value of `path` is: the scalar itself, or the key of a map or list.
    pub(super) fn value(&self, path: &str) -> Option<Place> {
        self.entries.iter().find(|e| e.path == path).map(|e| e.scalar.as_ref().map_or(e.key, |s| s.0))
    }

    /// The item of the list at `path` whose value `message` quotes: where a list parsed as a
    /// whole (address blocks) has its bad item.
    pub(super) fn item_named(&self, path: &str, message: &str) -> Option<Place> {
        let prefix = format!("{path}[");
        self.entries.iter().filter(|e| e.path.starts_with(&prefix)).find_map(|e| {
            let (place, text) = e.scalar.as_ref()?;
            let quoted = [format!("\"{text}\""), format!("`{text}`"), format!("{text}:")];
            (!text.is_empty() && quoted.iter().any(|q| message.contains(q.as_str()))).then_some(*place)
        })
    }

    /// When the map at `path` lacks `field`, a key of that name written near it but, through its
    /// indentation, in another map: its place and a message saying so.
    pub(super) fn misplaced(&self, path: &str, field: &str) -> Option<(Place, String)> {
        let at = self.entries.iter().position(|e| e.path == path)?;
        let own = self.entries[at].key;
        let prefix = format!("{path}.");
        let child = self.entries[at + 1..].iter().find(|e| e.path.starts_with(&prefix))?.key;
        // After the map's own keys: the key dedented into the parent map, or nested in a child.
        let beside = match path.rsplit_once('.') {
            Some((parent, _)) => format!("{parent}.{field}"),
            None => field.to_owned(),
        };
        let stray = self.entries[at + 1..]
            .iter()
            .take_while(|e| e.key.column >= own.column || e.path.starts_with(&prefix))
            .find(|e| {
                let named = e.path == beside
                    || (e.path.starts_with(&prefix) && e.path.ends_with(&format!(".{field}")));
                named && e.key.column != child.column
            })?;
        let parent = path.rsplit_once('.').map_or(path, |(_, last)| last);
        Some((
            stray.key,
            format!(
                "`{field}` here is indented {} spaces, so it is not one of {path}'s keys (indented {}); \
                 indent it like `{parent}`'s other keys ({path}: needs {field})",
                stray.key.column - 1,
                child.column - 1
            ),
        ))
    }
}

impl Frame {
    fn new(path: String, is_seq: bool, is_key: bool) -> Frame {
        Frame { path, key: None, index: 0, is_seq, is_key }
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_owned() } else { format!("{parent}.{key}") }
}

/// The parser's error at its place, with what usually causes it when the lines around show it:
/// a tab in the indentation, a key without its colon, a line out of step with its neighbours.
fn syntax(text: &str, error: &ScanError) -> Syntax {
    let at = Place { line: error.marker().line(), column: error.marker().col() + 1 };
    let info = error.info();
    let around = Around::new(text, at.line);
    let hint = around.tab().or_else(|| around.missing_colon()).or_else(|| around.out_of_step());
    match hint.or_else(|| around.unaligned()) {
        Some((i, column, text)) => {
            Syntax { place: Place { line: i + 1, column }, message: format!("{info}: {text}") }
        }
        None => Syntax { place: at, message: info.to_owned() },
    }
}

/// The lines around a syntax error: each hint is (0-based line, column, what to say).
struct Around<'a> {
    lines: Vec<&'a str>,
    /// The lines with content (not blank, not comments), by index.
    content: Vec<usize>,
    /// Positions in `content` from two lines before the error's line to the one after it.
    near: Vec<usize>,
    /// The error's line (1-based).
    line: usize,
}

type Hint = Option<(usize, usize, String)>;

impl<'a> Around<'a> {
    fn new(text: &'a str, line: usize) -> Around<'a> {
        let lines: Vec<&str> = text.lines().collect();
        let content: Vec<usize> = (0..lines.len())
            .filter(|&i| {
                let t = lines[i].trim_start();
                !t.is_empty() && !t.starts_with('#')
            })
            .collect();
        let near = (0..content.len()).filter(|&k| content[k] + 3 >= line && content[k] <= line).collect();
        Around { lines, content, near, line }
    }

    /// The spaces and tabs before line `i`'s text.
    fn margin(&self, i: usize) -> &'a str {
        let l = self.lines[i];
        &l[..l.len() - l.trim_start_matches([' ', '\t']).len()]
    }

    fn tab(&self) -> Hint {
        let i = self.near.iter().map(|&k| self.content[k]).find(|&i| self.margin(i).contains('\t'))?;
        let column = self.margin(i).find('\t').unwrap_or(0) + 1;
        Some((i, column, format!("line {} is indented with a tab; YAML indents with spaces only", i + 1)))
    }

    /// `key value` where `key: value` was meant (the parser notices on the next line).
    fn missing_colon(&self) -> Hint {
        self.near.iter().map(|&k| self.content[k]).filter(|&i| i < self.line).find_map(|i| {
            let item = self.lines[i].trim_start().trim_start_matches("- ");
            let bare = !item.contains(": ")
                && !item.ends_with(':')
                && !item.starts_with(['[', '{', '"', '\'', '|', '>']);
            let key =
                item.split_whitespace().next().filter(|_| bare && item.split_whitespace().count() > 1)?;
            let column = self.lines[i].len() - item.len() + 1;
            Some((i, column, format!("`{key}` has no ':' after it; write `{key}: <value>`")))
        })
    }

    /// A line indented unlike the two around it, which agree. Closest to the error first; a key
    /// opening a block (`routes:`) is rightly left of its items.
    fn out_of_step(&self) -> Hint {
        let indent = |k: usize| key_indent(self.lines[self.content[k]]);
        self.near.iter().rev().filter(|&&k| k > 0 && k + 1 < self.content.len()).find_map(|&k| {
            let i = self.content[k];
            let opens = self.lines[i].trim_end().ends_with(':');
            (!opens && indent(k - 1) == indent(k + 1) && indent(k) != indent(k - 1)).then(|| {
                let text = format!(
                    "line {} is indented {} spaces, unlike the lines around it ({}); indent it like them",
                    i + 1,
                    indent(k),
                    indent(k - 1)
                );
                (i, self.margin(i).len() + 1, text)
            })
        })
    }

    /// A line whose indentation is that of no key before it (the keys of one map line up).
    fn unaligned(&self) -> Hint {
        self.near.iter().rev().find_map(|&k| {
            let i = self.content[k];
            let mut above: Vec<usize> = self.content[..k].iter().map(|&j| key_indent(self.lines[j])).collect();
            let own = self.margin(i).len();
            if above.is_empty() || above.contains(&own) || self.lines[i].trim_start().starts_with('-') {
                return None;
            }
            above.sort_unstable_by(|a, b| b.cmp(a));
            above.dedup();
            let list: Vec<String> = above.iter().map(ToString::to_string).collect();
            let text = format!(
                "line {} is indented {own} spaces, like no key above it (indented {}); keys of one map line up",
                i + 1,
                list.join(", ")
            );
            Some((i, own + 1, text))
        })
    }
}

/// Where a line's key starts: its indentation counting a list item's `- ` (`  - prefix:` is 4).
fn key_indent(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '-']).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "listen: 127.0.0.1:8080\nproviders:\n  idp:\n    client_id: app\nroutes:\n  - prefix: /a/\n    upstream: \"https://x/\"\n  - { prefix: /b/, provider: idp }\n";

    #[test]
    fn every_key_path_has_its_line_and_column() {
        let spans = Spans::of(DOC).unwrap_or_else(|e| panic!("{}", e.message));
        let at = |line, column| Some(Place { line, column });
        assert_eq!(spans.key("listen"), at(1, 1));
        assert_eq!(spans.value("listen"), at(1, 9));
        assert_eq!(spans.key("providers.idp.client_id"), at(4, 5));
        assert_eq!(spans.value("providers.idp"), at(3, 3));
        assert_eq!(spans.key("routes[0]"), at(6, 5));
        assert_eq!(spans.value("routes[0].upstream"), at(7, 15));
        assert_eq!(spans.value("routes[1].provider"), at(8, 30));
        assert_eq!(spans.key("routes[2]"), None);
    }

    #[test]
    fn syntax_errors_name_their_usual_cause() {
        let tab = DOC.replace("    client_id", "\tclient_id");
        let e = Spans::of(&tab).err().map(|e| (e.place.line, e.message));
        assert!(e.as_ref().is_some_and(|(l, m)| *l == 4 && m.contains("tab")), "{e:?}");
        let colon = DOC.replace("    upstream: \"https://x/\"", "    upstream https://x/\n    provider: idp");
        let e = Spans::of(&colon).err().map(|e| (e.place, e.message));
        assert!(
            e.as_ref()
                .is_some_and(|(p, m)| p.line == 7 && p.column == 5 && m.contains("`upstream` has no ':'")),
            "{e:?}"
        );
    }
}
