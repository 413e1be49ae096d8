//! rsync's `wildmatch`: shell-style matching where `*` stops at `/`, `**` crosses it, `?`
//! matches one non-`/` byte, `[...]` is a byte class (`!`/`^` negate, `a-z` ranges, `[:alpha:]`
//! names, `\` escapes) that never matches `/`, and `\` escapes the next byte.
//!
//! A port of rsync 3.x `lib/wildmatch.c` (`dowild`, `wildmatch_array`, `litmatch_array`,
//! `trailing_N_elements`), working on one byte string instead of an array of pieces (the pieces
//! are only ever concatenated). The `ABORT_*` results keep the matcher polynomial on patterns
//! with many stars, as in rsync; a hand port rather than a glob crate because no crate has
//! exactly these semantics (`**/` does not match zero directories, `[` classes exclude `/`).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Res {
    True,
    False,
    AbortAll,
    AbortToStarStar,
}

/// Where a pattern may start matching in the text (rsync's `where` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Anchor {
    /// Only at the start of the text.
    Start,
    /// At the start of the last `n` `/`-separated elements (fails if there are fewer).
    Trailing(usize),
    /// At the start or after any `/`.
    AnySlash,
}

fn class_matches(name: &[u8], c: u8) -> Option<bool> {
    Some(match name {
        b"alnum" => c.is_ascii_alphanumeric(),
        b"alpha" => c.is_ascii_alphabetic(),
        b"blank" => c == b' ' || c == b'\t',
        b"cntrl" => c.is_ascii_control(),
        b"digit" => c.is_ascii_digit(),
        b"graph" => c.is_ascii_graphic(),
        b"lower" => c.is_ascii_lowercase(),
        b"print" => c.is_ascii_graphic() || c == b' ',
        b"punct" => c.is_ascii_punctuation(),
        b"space" => c.is_ascii_whitespace() || c == 0x0b,
        b"upper" => c.is_ascii_uppercase(),
        b"xdigit" => c.is_ascii_hexdigit(),
        _ => return None,
    })
}

fn dowild(p: &[u8], t: &[u8]) -> Res {
    let mut pi = 0usize;
    let mut ti = 0usize;
    while pi < p.len() {
        let p_ch = p[pi];
        if ti >= t.len() && p_ch != b'*' {
            return Res::AbortAll;
        }
        // `t_ch` is 0 past the end, like the C string terminator (only reachable for '*').
        let t_ch = t.get(ti).copied().unwrap_or(0);
        match p_ch {
            b'\\' => {
                pi += 1;
                let lit = p.get(pi).copied().unwrap_or(0);
                if t_ch != lit {
                    return Res::False;
                }
            }
            b'?' => {
                if t_ch == b'/' {
                    return Res::False;
                }
            }
            b'*' => {
                pi += 1;
                let special = if p.get(pi) == Some(&b'*') {
                    while p.get(pi) == Some(&b'*') {
                        pi += 1;
                    }
                    true
                } else {
                    false
                };
                if pi >= p.len() {
                    // Trailing "**" matches everything; trailing "*" only without more '/'.
                    if !special && t[ti..].contains(&b'/') {
                        return Res::False;
                    }
                    return Res::True;
                }
                let rest = &p[pi..];
                while ti < t.len() {
                    let m = dowild(rest, &t[ti..]);
                    if m != Res::False {
                        if !special || m != Res::AbortToStarStar {
                            return m;
                        }
                    } else if !special && t[ti] == b'/' {
                        return Res::AbortToStarStar;
                    }
                    ti += 1;
                }
                return Res::AbortAll;
            }
            b'[' => {
                pi += 1;
                let mut pc = p.get(pi).copied().unwrap_or(0);
                let negated = pc == b'!' || pc == b'^';
                if negated {
                    pi += 1;
                    pc = p.get(pi).copied().unwrap_or(0);
                }
                let mut prev: u8 = 0;
                let mut matched = false;
                loop {
                    if pc == 0 {
                        return Res::AbortAll;
                    }
                    if pc == b'\\' {
                        pi += 1;
                        pc = p.get(pi).copied().unwrap_or(0);
                        if pc == 0 {
                            return Res::AbortAll;
                        }
                        if t_ch == pc {
                            matched = true;
                        }
                    } else if pc == b'-' && prev != 0 && p.get(pi + 1).is_some_and(|&c| c != b']') {
                        pi += 1;
                        pc = p[pi];
                        if pc == b'\\' {
                            pi += 1;
                            pc = p.get(pi).copied().unwrap_or(0);
                            if pc == 0 {
                                return Res::AbortAll;
                            }
                        }
                        if t_ch <= pc && t_ch >= prev {
                            matched = true;
                        }
                        pc = 0; // so that `prev` becomes 0
                    } else if pc == b'[' && p.get(pi + 1) == Some(&b':') {
                        let s = pi + 2;
                        let mut q = s;
                        while q < p.len() && p[q] != b']' {
                            q += 1;
                        }
                        if q >= p.len() {
                            return Res::AbortAll;
                        }
                        if q < s + 1 || p[q - 1] != b':' {
                            // No ":]": treat the '[' as a literal member of the set.
                            pc = b'[';
                            if t_ch == pc {
                                matched = true;
                            }
                        } else {
                            match class_matches(&p[s..q - 1], t_ch) {
                                Some(true) => matched = true,
                                Some(false) => {}
                                None => return Res::AbortAll,
                            }
                            pi = q;
                            pc = 0;
                        }
                    } else if t_ch == pc {
                        matched = true;
                    }
                    prev = pc;
                    pi += 1;
                    pc = p.get(pi).copied().unwrap_or(0);
                    if pc == b']' {
                        break;
                    }
                }
                if matched == negated || t_ch == b'/' {
                    return Res::False;
                }
            }
            c => {
                if t_ch != c {
                    return Res::False;
                }
            }
        }
        pi += 1;
        ti += 1;
    }
    if ti < t.len() { Res::False } else { Res::True }
}

/// The start of the last `count` elements of `t` (rsync's `trailing_N_elements`).
fn trailing_elements(t: &[u8], mut count: usize) -> Option<&[u8]> {
    for i in (0..t.len()).rev() {
        if t[i] == b'/' {
            count -= 1;
            if count == 0 {
                return Some(&t[i + 1..]);
            }
        }
    }
    (count == 1).then_some(t)
}

/// Does the wildcard `pattern` match `text` starting where `anchor` allows?
pub(crate) fn wildmatch(pattern: &[u8], text: &[u8], anchor: Anchor) -> bool {
    let mut text = match anchor {
        Anchor::Trailing(n) => match trailing_elements(text, n) {
            Some(t) => t,
            None => return false,
        },
        _ => text,
    };
    loop {
        let m = dowild(pattern, text);
        if m == Res::True {
            return true;
        }
        if anchor != Anchor::AnySlash || m == Res::AbortAll {
            return false;
        }
        match text.iter().position(|&c| c == b'/') {
            Some(i) => text = &text[i + 1..],
            None => return false,
        }
    }
}

/// Literal comparison with the same anchoring (rsync's `litmatch_array`).
pub(crate) fn litmatch(pattern: &[u8], text: &[u8], anchor: Anchor) -> bool {
    let text = match anchor {
        Anchor::Trailing(n) => match trailing_elements(text, n) {
            Some(t) => t,
            None => return false,
        },
        _ => text,
    };
    pattern == text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        wildmatch(p.as_bytes(), t.as_bytes(), Anchor::Start)
    }

    #[test]
    fn stars() {
        assert!(m("*", "abc"));
        assert!(!m("*", "a/b"));
        assert!(m("**", "a/b"));
        assert!(m("a/*/c", "a/b/c"));
        assert!(!m("a/*/c", "a/b/x/c"));
        assert!(m("a/**/c", "a/b/x/c"));
        assert!(
            !m("a/**/c", "a/c"),
            "rsync's ** does not match zero directories"
        );
        assert!(m("*.o", "x.o"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy/c"));
        assert!(m("dir/***", "dir/"));
        assert!(m("dir/***", "dir/x/y"));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(m("[abc]", "b"));
        assert!(!m("[abc]", "d"));
        assert!(m("[!abc]", "d"));
        assert!(m("[^abc]", "d"));
        assert!(m("[a-c]x", "bx"));
        assert!(m("[]]", "]"));
        assert!(m("[[:digit:]]", "7"));
        assert!(!m("[[:digit:]]", "x"));
        assert!(!m("[!a]", "/"));
        assert!(m("\\*", "*"));
        assert!(!m("\\*", "x"));
        assert!(!m("?", "/"));
        assert!(m("a?c", "abc"));
        assert!(!m("[[:bogus:]]", "b"));
        assert!(!m("[abc", "a"));
    }

    #[test]
    fn anchors() {
        assert!(wildmatch(b"b/*", b"a/b/c", Anchor::Trailing(2)));
        assert!(!wildmatch(b"b/*", b"c", Anchor::Trailing(2)));
        assert!(wildmatch(b"b/**", b"a/b/c/d", Anchor::AnySlash));
        assert!(!wildmatch(b"b/**", b"ab/c/d", Anchor::AnySlash));
        assert!(litmatch(b"b/c", b"a/b/c", Anchor::Trailing(2)));
        assert!(!litmatch(b"b/c", b"a/xb/c", Anchor::Trailing(2)));
    }

    #[test]
    fn many_stars_terminate() {
        let p = "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
        let t = "a".repeat(200);
        assert!(!m(p, &t));
        let p = "**a**a**a**a**a**a**a**a**a**a**b";
        let t = "a/".repeat(100);
        assert!(!m(p, &t));
    }
}
