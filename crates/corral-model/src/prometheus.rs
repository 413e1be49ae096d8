//! The Prometheus text exposition format's one shared spelling rule: how a label value is
//! written. Every `/metrics` writer (DHCP, TFTP, HTTP, cast) uses it, so a hostname, interface
//! or image name with a quote or newline never breaks a scrape.

/// `v` escaped as a label value (inside the double quotes): backslash, double quote and line
/// feed are the three characters the text format escapes.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_exactly_backslash_quote_and_newline() {
        assert_eq!(escape_label("eth0"), "eth0");
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny\tz"), "x\\ny\tz");
        assert_eq!(escape_label("ünïcode"), "ünïcode");
    }
}
