//! Maps between byte spans, dotted key paths and line/column positions, using the spanned
//! document tree from `toml::de::DeTable`.

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A dotted key path such as `network.wireguard.peers[1].public_key`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KeyPath(Vec<Segment>);

impl KeyPath {
    pub(super) fn root() -> Self {
        Self::default()
    }

    pub(super) fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    /// The path without its last segment.
    pub(super) fn parent(&self) -> Self {
        let mut path = self.clone();
        path.0.pop();
        path
    }

    pub(super) fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Answers "where is this key?" and "which key is at this offset?" for one document.
pub(super) struct Locator<'a> {
    text: &'a str,
    root: Option<&'a Spanned<DeTable<'a>>>,
    /// The byte offset where each line starts, so a position costs a search, not a scan of
    /// the text before it.
    line_starts: Vec<usize>,
}

impl<'a> Locator<'a> {
    pub(super) fn new(text: &'a str, root: Option<&'a Spanned<DeTable<'a>>>) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            text,
            root,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        // Lines that start at or before the offset; the first always does.
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let line_start = self.line_starts[line - 1];
        let col = self.text[line_start..offset].chars().count() + 1;
        (line, col)
    }

    /// The value span of `path`, if the document has it. For a `[table]` that is its header.
    pub(super) fn find(&self, path: &KeyPath) -> Option<Range<usize>> {
        let root = self.root?;
        let mut span = root.span();
        let mut table = Some(root.get_ref());
        let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
        for segment in &path.0 {
            let value = match segment {
                Segment::Key(key) => table?.get(key.as_str())?,
                Segment::Index(index) => array?.get(*index)?,
            };
            span = value.span();
            table = value.get_ref().as_table();
            array = value.get_ref().as_array().map(|a| a.as_ref());
        }
        Some(span)
    }

    /// The span of `path`, or of its deepest ancestor present in the document, or the start of
    /// the file.
    pub(super) fn nearest(&self, path: &KeyPath) -> Range<usize> {
        (1..=path.0.len())
            .rev()
            .find_map(|len| self.find(&KeyPath(path.0[..len].to_vec())))
            .unwrap_or(0..0)
    }

    /// The deepest key whose key or value span contains `span`.
    pub(super) fn key_at(&self, span: &Range<usize>) -> Option<KeyPath> {
        let root = self.root?;
        let mut best: Option<KeyPath> = None;
        visit_table(
            root.get_ref(),
            &mut KeyPath::root(),
            &mut |path, key_span, value| {
                let hit =
                    key_span.is_some_and(|k| contains(&k, span)) || contains(&value.span(), span);
                if hit && best.as_ref().is_none_or(|b| path.0.len() > b.0.len()) {
                    best = Some(path.clone());
                }
            },
        );
        best
    }

    /// The `[table]` (or `[[array]]` element) whose section contains `offset`; the root when
    /// the offset lies before any header.
    pub(super) fn table_at(&self, offset: usize) -> KeyPath {
        let Some(root) = self.root else {
            return KeyPath::root();
        };
        let mut header: Option<(usize, KeyPath)> = None;
        visit_table(
            root.get_ref(),
            &mut KeyPath::root(),
            &mut |path, _, value| {
                let span = value.span();
                let is_header = value.get_ref().is_table()
                    && self
                        .text
                        .get(span.clone())
                        .is_some_and(|t| t.starts_with('['));
                let later = header
                    .as_ref()
                    .is_none_or(|(start, _)| span.start >= *start);
                if is_header && span.start <= offset && later {
                    header = Some((span.start, path.clone()));
                }
            },
        );
        header.map(|(_, path)| path).unwrap_or_default()
    }

    /// The source text of `span`, if it is a valid range.
    pub(super) fn text_of(&self, span: &Range<usize>) -> Option<&'a str> {
        self.text.get(span.clone())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Called with each value's path, key span (none for array items) and value.
type Visit<'f, 'i> = dyn FnMut(&KeyPath, Option<Range<usize>>, &Spanned<DeValue<'i>>) + 'f;

/// Calls `f(path, key span, value)` for every value below `table`, depth first.
fn visit_table<'i>(table: &DeTable<'i>, path: &mut KeyPath, f: &mut Visit<'_, 'i>) {
    for (key, value) in table.iter() {
        path.0.push(Segment::Key(key.get_ref().to_string()));
        f(path, Some(key.span()), value);
        visit_value(value.get_ref(), path, f);
        path.0.pop();
    }
}

fn visit_value<'i>(value: &DeValue<'i>, path: &mut KeyPath, f: &mut Visit<'_, 'i>) {
    match value {
        DeValue::Table(table) => visit_table(table, path, f),
        DeValue::Array(array) => {
            for (index, item) in array.iter().enumerate() {
                path.0.push(Segment::Index(index));
                f(path, None, item);
                visit_value(item.get_ref(), path, f);
                path.0.pop();
            }
        }
        DeValue::String(_)
        | DeValue::Integer(_)
        | DeValue::Float(_)
        | DeValue::Boolean(_)
        | DeValue::Datetime(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[network]\nprovider = \"wireguard\"\n\n[network.wireguard]\nmtu = 1420\n\n[[network.wireguard.peers]]\nname = \"a\"\n\n[[network.wireguard.peers]]\nname = \"b\"\nallowed_ips = [\"10.0.0.1/32\", \"x\"]\n[services]\n\"a.b\" = { port = 1 }\n";

    fn with_locator(f: impl FnOnce(&Locator<'_>)) {
        let (root, errors) = DeTable::parse_recoverable(DOC);
        assert!(errors.is_empty());
        f(&Locator::new(DOC, Some(&root)));
    }

    fn path(text: &str) -> KeyPath {
        let mut path = KeyPath::root();
        for part in text.split('.') {
            match part.split_once('[') {
                Some((key, index)) => {
                    path = path
                        .key(key)
                        .index(index.trim_end_matches(']').parse().unwrap());
                }
                None => path = path.key(part),
            }
        }
        path
    }

    #[test]
    fn key_paths_print_dotted_with_indices_and_quote_odd_keys() {
        let p = path("network.wireguard.peers[1].public_key");
        assert_eq!(p.to_string(), "network.wireguard.peers[1].public_key");
        assert_eq!(
            KeyPath::root().key("services").key("a.b").to_string(),
            "services.\"a.b\""
        );
    }

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let locator = Locator::new("ab\nçd = 1\n", None);
        assert_eq!(locator.line_col(0), (1, 1));
        assert_eq!(locator.line_col(3), (2, 1));
        assert_eq!(locator.line_col(6), (2, 3));
        assert_eq!(locator.line_col(5), (2, 2));
        assert_eq!(locator.line_col(999), (3, 1));
    }

    #[test]
    fn key_paths_are_found_including_array_of_table_elements() {
        with_locator(|loc| {
            let span = loc.find(&path("network.wireguard.peers[1].name")).unwrap();
            assert_eq!(loc.line_col(span.start), (11, 8));
            let span = loc.find(&path("network.wireguard.peers[1]")).unwrap();
            assert_eq!(loc.line_col(span.start), (10, 1));
            assert!(loc.find(&path("network.wireguard.address")).is_none());
            let span = loc.nearest(&path("network.wireguard.address"));
            assert_eq!(loc.line_col(span.start), (4, 1));
            assert_eq!(loc.nearest(&path("gpu.enabled")), 0..0);
        });
    }

    #[test]
    fn spans_map_back_to_the_deepest_key() {
        with_locator(|loc| {
            let x = DOC.find("\"x\"").unwrap();
            assert_eq!(
                loc.key_at(&(x..x + 3)).unwrap().to_string(),
                "network.wireguard.peers[1].allowed_ips[1]"
            );
            let second = DOC.rfind("[[network").unwrap();
            assert_eq!(
                loc.key_at(&(second..second + 27)).unwrap().to_string(),
                "network.wireguard.peers[1]"
            );
            let port = DOC.find("port").unwrap();
            assert_eq!(
                loc.key_at(&(port..port + 4)).unwrap().to_string(),
                "services.\"a.b\".port"
            );
        });
    }

    #[test]
    fn offsets_outside_any_key_map_to_the_enclosing_table() {
        with_locator(|loc| {
            let blank = DOC.find("1420\n\n").unwrap() + 5;
            assert_eq!(loc.key_at(&(blank..blank)), None);
            assert_eq!(loc.table_at(blank).to_string(), "network.wireguard");
            assert_eq!(loc.table_at(0).to_string(), "network");
        });
    }
}
