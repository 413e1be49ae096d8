//! One parsed rule and the rsync rule-token grammar (`parse_rule_tok` and `add_rule` in rsync's
//! `exclude.c`): prefixes, long names, modifiers, and how a pattern is classified for matching.

use std::borrow::Cow;

use crate::FilterError;
use crate::wildmatch::{Anchor, litmatch, wildmatch};

/// Which process applies a rule (rsync's `s`/`r` modifiers and the H/S/P/R prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Sides {
    pub(crate) sender: bool,
    pub(crate) receiver: bool,
}

/// The modifiers a merge rule gives the rules read from its file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Template {
    /// `Some(include)` when the file has no prefixes (`-`/`+` modifier, or `C`).
    pub(crate) no_prefixes: Option<bool>,
    pub(crate) word_split: bool,
    pub(crate) cvs: bool,
    pub(crate) sides: Sides,
    pub(crate) abs_path: bool,
    pub(crate) perishable: bool,
    pub(crate) xattr: bool,
}

/// How the rule line is to be read (rsync's `xflags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syntax {
    /// Full filter-rule syntax (`--filter`, merge files).
    Full,
    /// `--exclude`/`--include`(-from): only `+ `, `- ` and `!` prefixes.
    OldPrefixes { include: bool },
}

/// An include/exclude rule ready for matching.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) pattern: Vec<u8>,
    pub(crate) include: bool,
    pub(crate) negate: bool,
    pub(crate) dir_only: bool,
    pub(crate) abs_path: bool,
    pub(crate) sides: Sides,
    pub(crate) perishable: bool,
    pub(crate) xattr: bool,
    wild: bool,
    wild2: bool,
    wild2_prefix: bool,
    wild3_suffix: bool,
    slash_cnt: usize,
}

/// What one rule token is.
#[derive(Debug, Clone)]
pub(crate) enum Token {
    Rule(Rule),
    /// `!`: clear the current list.
    Clear,
    /// `-C`: the default CVS ignore list, with these sides.
    Cvs(Sides, bool),
    /// `.`/`:` merge rule: file name plus template; `per_dir` for `:`; `exclude_self` for `e`.
    Merge {
        file: String,
        template: Template,
        per_dir: bool,
        no_inherit: bool,
        exclude_self: bool,
    },
}

/// rsync 3.x `default_cvsignore` (the `-C` list; `$HOME/.cvsignore` and `$CVSIGNORE` are not
/// read: this crate has no environment or file access).
pub(crate) const DEFAULT_CVSIGNORE: &str = "RCS SCCS CVS CVS.adm RCSLOG cvslog.* tags TAGS \
    .make.state .nse_depinfo *~ #* .#* ,* _$* *$ *.old *.bak *.BAK *.orig *.rej .del-* *.a \
    *.olb *.o *.obj *.so *.exe *.Z *.elc *.ln core .svn/ .git/ .hg/ .bzr/";

const LONG_NAMES: &[(&str, u8)] = &[
    ("clear", b'!'),
    ("dir-merge", b':'),
    ("exclude", b'-'),
    ("hide", b'H'),
    ("include", b'+'),
    ("merge", b'.'),
    ("protect", b'P'),
    ("risk", b'R'),
    ("show", b'S'),
];

fn is_space(c: u8) -> bool {
    c.is_ascii_whitespace() || c == 0x0b
}

impl Rule {
    /// Build a rule from a raw pattern (rsync's `add_rule`). `anchor_dir`, for rules read from a
    /// per-directory merge file, is that directory (relative to the root, no trailing '/'):
    /// a leading '/' anchors there.
    pub(crate) fn new(
        pat: &[u8],
        include: bool,
        negate: bool,
        t: &Template,
        anchor_dir: Option<&[u8]>,
    ) -> Rule {
        let mut pat = pat.to_vec();
        let mut dir_only = false;
        if pat.len() > 1 && pat.last() == Some(&b'/') {
            pat.pop();
            dir_only = true;
        }
        let mut pattern = Vec::with_capacity(pat.len() + 16);
        if let (Some(dir), Some(b'/'), false) = (anchor_dir, pat.first(), t.abs_path)
            && !dir.is_empty()
        {
            pattern.push(b'/');
            pattern.extend_from_slice(dir);
        }
        pattern.extend_from_slice(&pat);
        let slash_cnt = pattern.iter().filter(|&&c| c == b'/').count();
        let wild = pattern.iter().any(|&c| matches!(c, b'*' | b'[' | b'?'));
        let mut wild2 = false;
        let mut wild2_prefix = false;
        let mut wild3_suffix = false;
        if wild && let Some(pos) = pattern.windows(2).position(|w| w == b"**") {
            wild2 = true;
            wild2_prefix = pos == 0;
            wild3_suffix = pattern.ends_with(b"***");
        }
        Rule {
            pattern,
            include,
            negate,
            dir_only,
            abs_path: t.abs_path,
            sides: t.sides,
            perishable: t.perishable,
            xattr: t.xattr,
            wild,
            wild2,
            wild2_prefix,
            wild3_suffix,
            slash_cnt,
        }
    }

    /// rsync's `rule_matches`: `name` is relative to the transfer root ("a/b/c"); `abs_root`
    /// is the transfer root's absolute path without leading '/' (for `/`-modifier rules).
    pub(crate) fn matches(&self, name: &[u8], is_dir: bool, abs_root: &[u8]) -> bool {
        let hit = !self.negate;
        if name.is_empty() || self.xattr {
            // xattr rules match attribute names, never paths.
            return false;
        }
        // The text to match; allocated only when rsync would match several strings.
        let mut text: Cow<'_, [u8]>;
        let mut multi = false;
        if self.slash_cnt == 0 && !self.wild2 {
            // No slash and no "**": only the last path element is compared.
            text = Cow::Borrowed(match name.iter().rposition(|&c| c == b'/') {
                Some(i) => &name[i + 1..],
                None => name,
            });
        } else if self.abs_path && !abs_root.is_empty() {
            let mut v = Vec::with_capacity(abs_root.len() + 2 + name.len());
            v.extend_from_slice(abs_root);
            v.push(b'/');
            v.extend_from_slice(name);
            text = Cow::Owned(v);
            multi = true;
        } else if self.wild2_prefix {
            // Let a leading "**/" match at the start.
            let mut v = Vec::with_capacity(name.len() + 2);
            v.push(b'/');
            v.extend_from_slice(name);
            text = Cow::Owned(v);
            multi = true;
        } else {
            text = Cow::Borrowed(name);
        }
        if is_dir {
            if self.wild3_suffix {
                // Let a trailing "/***" match the directory itself.
                text.to_mut().push(b'/');
                multi = true;
            }
        } else if self.dir_only {
            return !hit;
        }
        let mut pattern: &[u8] = &self.pattern;
        let anchored = pattern.first() == Some(&b'/');
        if anchored {
            pattern = &pattern[1..];
        }
        let anchor = if !anchored && self.slash_cnt > 0 && !self.wild2 {
            Anchor::Trailing(self.slash_cnt + 1)
        } else if !anchored && !self.wild2_prefix && self.wild2 {
            Anchor::AnySlash
        } else {
            Anchor::Start
        };
        let matched = if self.wild {
            wildmatch(pattern, &text, anchor)
        } else if multi {
            litmatch(pattern, &text, anchor)
        } else if anchored {
            *text == *pattern
        } else {
            let (l1, l2) = (text.len(), pattern.len());
            l2 <= l1 && text[l1 - l2..] == *pattern && (l1 == l2 || text[l1 - l2 - 1] == b'/')
        };
        if matched { hit } else { !hit }
    }
}

/// Parse one rule token starting at `s[*pos..]` (rsync's `parse_rule_tok`); advances `pos`.
/// Returns `None` when only whitespace (word-split mode) or nothing is left.
pub(crate) fn parse_token(
    s: &[u8],
    pos: &mut usize,
    template: &Template,
    syntax: Syntax,
    origin: &str,
    anchor_dir: Option<&[u8]>,
) -> Result<Option<Token>, FilterError> {
    let start0 = *pos;
    let mut i = *pos;
    if template.word_split {
        while i < s.len() && is_space(s[i]) {
            i += 1;
        }
    }
    if i >= s.len() {
        *pos = i;
        return Ok(None);
    }
    let rule_text = String::from_utf8_lossy(&s[start0..]).into_owned();
    let err_rule = || rule_text.clone();

    let mut include = template.no_prefixes.unwrap_or(false);
    let mut negate = false;
    let mut clear = false;
    let mut merge = false;
    let mut per_dir = false;
    let mut no_prefixes = template.no_prefixes;
    let mut word_split = false;
    let mut cvs = false;
    let mut no_inherit = false;
    let mut exclude_self = false;
    let mut sides = Sides::default();
    let mut abs_path = template.abs_path;
    let mut perishable = template.perishable;
    let mut xattr = template.xattr;

    if template.no_prefixes.is_some() {
        if s[i] == b'!' && template.cvs {
            clear = true; // tentative: only if the token is "!" alone
        }
    } else if let Syntax::OldPrefixes { include: inc } = syntax {
        include = inc;
        if s[i..].starts_with(b"- ") {
            include = false;
            i += 2;
        } else if s[i..].starts_with(b"+ ") {
            include = true;
            i += 2;
        } else if s[i] == b'!' {
            clear = true; // tentative
        }
    } else {
        // Rule name: a long name followed by space, '_', ',' or the end; else one character
        // optionally followed by ','.
        let mut ch = 0u8;
        let mut j = i; // index of the last char of the rule name (or of the ',')
        for (name, c) in LONG_NAMES {
            let n = name.as_bytes();
            if s[i..].starts_with(n) {
                match s.get(i + n.len()) {
                    None => {
                        ch = *c;
                        j = i + n.len() - 1;
                    }
                    Some(&b) if is_space(b) || b == b'_' => {
                        ch = *c;
                        j = i + n.len() - 1;
                    }
                    Some(b',') => {
                        ch = *c;
                        j = i + n.len();
                    }
                    _ => {}
                }
                if ch != 0 {
                    break;
                }
            }
        }
        if ch == 0 {
            // rsync reads a word with a long name's initial as that long name, or fails.
            if matches!(
                s[i],
                b'c' | b'd' | b'e' | b'h' | b'i' | b'm' | b'p' | b'r' | b's'
            ) {
                return Err(FilterError::UnknownRule {
                    origin: origin.to_owned(),
                    rule: err_rule(),
                });
            }
            ch = s[i];
            j = i;
            if s.get(i + 1) == Some(&b',') {
                j = i + 1;
            }
        }
        let mut side_prefix = false;
        match ch {
            b':' => {
                per_dir = true;
                merge = true;
            }
            b'.' => merge = true,
            b'+' => include = true,
            b'-' => {}
            b'S' => {
                include = true;
                sides = Sides {
                    sender: true,
                    receiver: false,
                };
                side_prefix = true;
            }
            b'H' => {
                sides = Sides {
                    sender: true,
                    receiver: false,
                };
                side_prefix = true;
            }
            b'R' => {
                include = true;
                sides = Sides {
                    sender: false,
                    receiver: true,
                };
                side_prefix = true;
            }
            b'P' => {
                sides = Sides {
                    sender: false,
                    receiver: true,
                };
                side_prefix = true;
            }
            b'!' => clear = true,
            _ => {
                return Err(FilterError::UnknownRule {
                    origin: origin.to_owned(),
                    rule: err_rule(),
                });
            }
        }
        i = j;
        if ch != b'!' {
            loop {
                i += 1;
                let Some(&c) = s.get(i) else { break };
                if c == b' ' || c == b'_' {
                    break;
                }
                if template.word_split && is_space(c) {
                    i -= 1;
                    break;
                }
                let invalid = || FilterError::InvalidModifier {
                    origin: origin.to_owned(),
                    modifier: c as char,
                    rule: err_rule(),
                };
                match c {
                    b'-' | b'+' => {
                        if !merge || no_prefixes.is_some() {
                            return Err(invalid());
                        }
                        no_prefixes = Some(c == b'+');
                    }
                    b'/' => abs_path = true,
                    b'!' => {
                        if merge {
                            return Err(invalid());
                        }
                        negate = true;
                    }
                    b'C' => {
                        if no_prefixes.is_some() || side_prefix {
                            return Err(invalid());
                        }
                        no_prefixes = Some(false);
                        word_split = true;
                        no_inherit = true;
                        cvs = true;
                    }
                    b'e' => {
                        if !merge {
                            return Err(invalid());
                        }
                        exclude_self = true;
                    }
                    b'n' => {
                        if !merge {
                            return Err(invalid());
                        }
                        no_inherit = true;
                    }
                    b'p' => perishable = true,
                    b'r' => {
                        if side_prefix {
                            return Err(invalid());
                        }
                        sides.receiver = true;
                    }
                    b's' => {
                        if side_prefix {
                            return Err(invalid());
                        }
                        sides.sender = true;
                    }
                    b'w' => {
                        if !merge {
                            return Err(invalid());
                        }
                        word_split = true;
                    }
                    b'x' => xattr = true,
                    _ => return Err(invalid()),
                }
            }
        }
        if i < s.len() {
            i += 1;
        }
    }

    // The pattern: up to whitespace in word-split mode, else the rest of the string.
    let end = if template.word_split {
        let mut e = i;
        while e < s.len() && !is_space(s[e]) {
            e += 1;
        }
        e
    } else {
        s.len()
    };
    let pat = &s[i.min(end)..end];
    *pos = end;

    if clear {
        let explicit = template.no_prefixes.is_none() && matches!(syntax, Syntax::Full);
        if explicit && !pat.is_empty() {
            return Err(FilterError::ClearTrailing {
                origin: origin.to_owned(),
                rule: err_rule(),
            });
        }
        if pat.len() <= 1 {
            return Ok(Some(Token::Clear));
        }
        // "!foo" in a prefix-less or old-style list is an ordinary pattern.
    } else if pat.is_empty() && !cvs {
        return Err(FilterError::MissingPattern {
            origin: origin.to_owned(),
            rule: err_rule(),
        });
    }

    if template.sides != Sides::default() {
        if sides != Sides::default() {
            return Err(FilterError::SideConflict {
                origin: origin.to_owned(),
                rule: err_rule(),
            });
        }
        sides = template.sides;
    }
    let t = Template {
        no_prefixes,
        word_split,
        cvs,
        sides,
        abs_path,
        perishable,
        xattr,
    };
    if merge {
        let file = if pat.is_empty() {
            ".cvsignore".to_owned()
        } else {
            String::from_utf8_lossy(pat).into_owned()
        };
        return Ok(Some(Token::Merge {
            file,
            template: t,
            per_dir,
            no_inherit,
            exclude_self,
        }));
    }
    if cvs {
        return Ok(Some(Token::Cvs(sides, perishable)));
    }
    Ok(Some(Token::Rule(Rule::new(
        pat, include, negate, &t, anchor_dir,
    ))))
}
