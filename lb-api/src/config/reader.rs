//! The line-keeping machinery: a TOML table read key by key, each value with the line it is
//! on, every problem collected rather than the first one returned, and the keys no reader
//! took reported as unknown.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::{Range, RangeInclusive},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use toml_edit::{Item, Key, TableLike};

use super::{
    checks::unusable,
    types::{NAME_MAX, Problem},
};

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

pub(super) struct Cx<'a> {
    /// Offsets of the text's newlines, to turn a span into a line number in O(log n)
    /// (counting from the start each time made a big file's parse quadratic).
    pub(super) newlines: Vec<usize>,
    pub(super) base: &'a Path,
    pub(super) problems: Vec<Problem>,
}

impl Cx<'_> {
    pub(super) fn line(&self, span: Option<Range<usize>>) -> usize {
        span.map(|s| self.newlines.partition_point(|&n| n < s.start) + 1)
            .unwrap_or(0)
    }
    pub(super) fn err(&mut self, line: usize, message: impl Into<String>) {
        self.problems.push(Problem {
            line,
            message: message.into(),
        });
    }
}

/// A value and the line it is on.
#[derive(Clone, Debug)]
pub(super) struct At<T> {
    pub(super) v: T,
    pub(super) line: usize,
}

/// One table being read: remembers the keys taken, so the rest can be reported as unknown.
pub(super) struct Tab<'a> {
    t: &'a dyn TableLike,
    /// How the operator wrote it: `[cluster]`, `[[service.server]]`...
    name: String,
    line: usize,
    known: Vec<&'static str>,
}

impl<'a> Tab<'a> {
    pub(super) fn new(t: &'a dyn TableLike, name: impl Into<String>, line: usize) -> Self {
        Tab {
            t,
            name: name.into(),
            line,
            known: Vec::new(),
        }
    }

    /// The item under `key` and its line (the key's line).
    pub(super) fn item(&mut self, cx: &Cx, key: &'static str) -> Option<(&'a Item, usize)> {
        self.known.push(key);
        let (k, item): (&Key, &Item) = self.t.get_key_value(key)?;
        Some((item, cx.line(k.span()).max(cx.line(item.span()))))
    }

    pub(super) fn missing(&self, cx: &mut Cx, key: &str) {
        cx.err(self.line, format!("{} needs `{key}`", self.name));
    }

    pub(super) fn str(&mut self, cx: &mut Cx, key: &'static str) -> Option<At<String>> {
        let (item, line) = self.item(cx, key)?;
        match item.as_str() {
            Some(s) => Some(At {
                v: s.to_string(),
                line,
            }),
            None => {
                cx.err(
                    line,
                    format!("`{key}` must be a string, not {}", kind(item)),
                );
                None
            }
        }
    }

    /// `key`: a program lb runs (a check script, a hook), an executable file named by an
    /// absolute path or one relative to the config file's directory; `what` names it in
    /// the error. `Err` when it is given but unusable (reported).
    pub(super) fn program(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        what: &str,
    ) -> Result<Option<At<PathBuf>>, ()> {
        let Some(s) = self.str(cx, key) else {
            return if self.t.contains_key(key) {
                Err(())
            } else {
                Ok(None)
            };
        };
        if s.v.trim().is_empty() {
            cx.err(s.line, format!("`{key}` must not be empty"));
            return Err(());
        }
        let p = if Path::new(&s.v).is_absolute() {
            PathBuf::from(&s.v)
        } else {
            cx.base.join(&s.v)
        };
        match std::fs::metadata(&p) {
            Err(e) => {
                cx.err(s.line, format!("{what} {}: {e}", p.display()));
                Err(())
            }
            Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
                cx.err(
                    s.line,
                    format!("{what} {} is not an executable file", p.display()),
                );
                Err(())
            }
            Ok(_) => Ok(Some(At { v: p, line: s.line })),
        }
    }

    pub(super) fn req_str(&mut self, cx: &mut Cx, key: &'static str) -> Option<At<String>> {
        let v = self.str(cx, key);
        if v.is_none() && !self.t.contains_key(key) {
            self.missing(cx, key);
        }
        match v {
            Some(s) if s.v.trim().is_empty() => {
                cx.err(s.line, format!("`{key}` must not be empty"));
                None
            }
            v => v,
        }
    }

    /// `name`: required, 1 to `NAME_MAX` bytes, and one word. The tables print one record a
    /// line with fields separated by spaces, so a space or a newline in a name would shift
    /// or split a record. A bad name is reported and kept, so the checks across tables
    /// still see its table.
    pub(super) fn name(&mut self, cx: &mut Cx) -> Option<At<String>> {
        let n = self.req_str(cx, "name")?;
        let long = n.v.len() > NAME_MAX;
        if long {
            cx.err(
                n.line,
                format!(
                    "`name` is {} bytes long: names are at most {NAME_MAX} bytes",
                    n.v.len()
                ),
            );
        }
        if n.v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            // A name over the limit can be the whole file: do not echo it.
            let shown = if long {
                String::new()
            } else {
                format!(" = {:?}", n.v)
            };
            cx.err(
                n.line,
                format!("`name`{shown} must not contain spaces or control characters"),
            );
        }
        Some(n)
    }

    pub(super) fn int(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        range: RangeInclusive<i64>,
        unit: &str,
    ) -> Option<At<i64>> {
        let (item, line) = self.item(cx, key)?;
        let Some(v) = item.as_integer() else {
            cx.err(
                line,
                format!("`{key}` must be an integer, not {}", kind(item)),
            );
            return None;
        };
        if !range.contains(&v) {
            cx.err(
                line,
                format!(
                    "`{key}` = {v} is out of range: it must be {} to {}{unit}",
                    range.start(),
                    range.end()
                ),
            );
            return None;
        }
        Some(At { v, line })
    }

    pub(super) fn bool(&mut self, cx: &mut Cx, key: &'static str) -> Option<At<bool>> {
        let (item, line) = self.item(cx, key)?;
        match item.as_bool() {
            Some(v) => Some(At { v, line }),
            None => {
                cx.err(
                    line,
                    format!("`{key}` must be true or false, not {}", kind(item)),
                );
                None
            }
        }
    }

    /// A required IPv4 address that some machine holds or answers as `role` ("the NAT
    /// gateway"...): not one of the addresses no host can own.
    pub(super) fn addr(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        role: &str,
    ) -> Option<At<Ipv4Addr>> {
        let s = self.req_str(cx, key)?;
        let Ok(a) = s.v.parse::<Ipv4Addr>() else {
            cx.err(
                s.line,
                format!("`{key}` = {:?} is not an IPv4 address", s.v),
            );
            return None;
        };
        usable(cx, key, IpAddr::V4(a), role, s.line)?;
        Some(At { v: a, line: s.line })
    }

    /// [`Tab::addr`] of either family (a VIP, a server).
    pub(super) fn ip(&mut self, cx: &mut Cx, key: &'static str, role: &str) -> Option<At<IpAddr>> {
        let s = self.req_str(cx, key)?;
        let Ok(a) = s.v.parse::<IpAddr>() else {
            cx.err(
                s.line,
                format!("`{key}` = {:?} is not an IPv4 or IPv6 address", s.v),
            );
            return None;
        };
        usable(cx, key, a, role, s.line)?;
        Some(At { v: a, line: s.line })
    }

    /// An optional IPv6 address (`address6`, `gateway6`): `Ok(None)` when the key is absent,
    /// `Err(())` when it is there but no usable IPv6 address (reported).
    pub(super) fn ip6(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        role: &str,
    ) -> Result<Option<At<Ipv6Addr>>, ()> {
        if !self.t.contains_key(key) {
            return Ok(None);
        }
        let s = self.req_str(cx, key).ok_or(())?;
        let Ok(a) = s.v.parse::<Ipv6Addr>() else {
            cx.err(
                s.line,
                format!("`{key}` = {:?} is not an IPv6 address", s.v),
            );
            return Err(());
        };
        usable(cx, key, IpAddr::V6(a), role, s.line).ok_or(())?;
        Ok(Some(At { v: a, line: s.line }))
    }

    /// One of `choices` (given as `(word, value)`).
    pub(super) fn choice<T: Copy>(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        choices: &[(&str, T)],
    ) -> Option<At<T>> {
        let s = self.str(cx, key)?;
        match choices.iter().find(|(w, _)| *w == s.v) {
            Some((_, v)) => Some(At {
                v: *v,
                line: s.line,
            }),
            None => {
                let words: Vec<&str> = choices.iter().map(|(w, _)| *w).collect();
                cx.err(
                    s.line,
                    format!("`{key}` = {:?} must be one of: {}", s.v, words.join(", ")),
                );
                None
            }
        }
    }

    /// A sub-table (`[a.b]` or an inline table) and its line.
    pub(super) fn table(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
    ) -> Option<(&'a dyn TableLike, usize)> {
        let (item, line) = self.item(cx, key)?;
        match item.as_table_like() {
            Some(t) if !item.is_array_of_tables() => Some((t, line)),
            _ => {
                cx.err(line, format!("`{key}` must be a table, not {}", kind(item)));
                None
            }
        }
    }

    /// An array of tables (`[[a.b]]`): each table with its header line.
    pub(super) fn tables(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
    ) -> Vec<(&'a dyn TableLike, usize)> {
        let Some((item, line)) = self.item(cx, key) else {
            return Vec::new();
        };
        match item.as_array_of_tables() {
            Some(a) => a
                .iter()
                .map(|t| (t as &dyn TableLike, cx.line(t.span())))
                .collect(),
            None => {
                cx.err(
                    line,
                    format!(
                        "`{key}` must be written as [[...]] tables, not {}",
                        kind(item)
                    ),
                );
                Vec::new()
            }
        }
    }

    /// Reports every key not taken.
    pub(super) fn finish(self, cx: &mut Cx) {
        for (k, item) in self.t.iter() {
            if self.known.contains(&k) {
                continue;
            }
            let line = self
                .t
                .key(k)
                .map(|key| cx.line(key.span()))
                .filter(|l| *l > 0)
                .unwrap_or_else(|| cx.line(item.span()));
            let hint = self
                .known
                .iter()
                .find(|known| close(k, known))
                .map(|known| format!(" (did you mean `{known}`?)"))
                .unwrap_or_default();
            cx.err(line, format!("unknown key `{k}` in {}{hint}", self.name));
        }
    }
}

pub(super) fn kind(item: &Item) -> &'static str {
    if item.is_array_of_tables() {
        "an array of tables"
    } else if item.is_table_like() {
        "a table"
    } else if item.is_str() {
        "a string"
    } else if item.is_integer() {
        "an integer"
    } else if item.is_bool() {
        "a boolean"
    } else if item.is_float() {
        "a float"
    } else if item.is_array() {
        "an array"
    } else {
        "a date"
    }
}

/// Whether two keys are a typo apart (edit distance 1, or two letters swapped).
pub(super) fn close(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a == b {
        return false;
    }
    if a.len() == b.len() {
        let diff: Vec<usize> = (0..a.len()).filter(|i| a[*i] != b[*i]).collect();
        return diff.len() == 1
            || (diff.len() == 2
                && diff[1] == diff[0] + 1
                && a[diff[0]] == b[diff[1]]
                && a[diff[1]] == b[diff[0]]);
    }
    let (short, long) = if a.len() < b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    if long.len() - short.len() != 1 {
        return false;
    }
    (0..long.len()).any(|skip| {
        long.iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, c)| c)
            .eq(short.iter())
    })
}

/// `a`, the value of `key` at `line`, refused (the error says why) if no host can hold it as
/// `role`.
fn usable(cx: &mut Cx, key: &str, a: IpAddr, role: &str, line: usize) -> Option<()> {
    match unusable(a) {
        Some(what) => {
            cx.err(
                line,
                format!("`{key}` = {a} is {what}: it cannot be {role}"),
            );
            None
        }
        None => Some(()),
    }
}
