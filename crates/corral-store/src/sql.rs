//! Read-only ad-hoc SQL over the store, for `corral log --sql`.

use std::path::Path;

use rusqlite::types::ValueRef;

use crate::{Result, Store, StoreError};

/// The result of an ad-hoc query: column names and rows of JSON values.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SqlRows {
    /// The result's column names, in order.
    pub columns: Vec<String>,
    /// The rows; each has one value per column. Integers and reals become JSON numbers, text
    /// strings, NULL null, and blobs a hex string.
    pub rows: Vec<Vec<serde_json::Value>>,
}

/// Pragmas that take an argument in parentheses but only read.
const READING_PRAGMA_FUNCTIONS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "integrity_check",
    "quick_check",
];

impl Store {
    /// Runs one statement on a read-only connection to the store at `path` and returns its
    /// result.
    ///
    /// Three locks keep the file safe: the connection is opened with `SQLITE_OPEN_READ_ONLY`,
    /// `PRAGMA query_only` is on, and a statement that SQLite reports as writing (or an
    /// `ATTACH`/`DETACH`, or a `PRAGMA` that sets something) is refused with
    /// [`StoreError::ReadOnly`] before it runs.
    pub fn query_sql(path: impl AsRef<Path>, sql: &str) -> Result<SqlRows> {
        let store = Store::open_read_only(path)?;
        store.run_read_only_sql(sql)
    }

    /// Like [`Store::query_sql`], on this store's connection (which must be read-only).
    pub fn run_read_only_sql(&self, sql: &str) -> Result<SqlRows> {
        let keyword = first_keyword(sql);
        let refuse = || StoreError::ReadOnly {
            keyword: if keyword.is_empty() {
                "empty".into()
            } else {
                keyword.clone()
            },
            sql: sql.to_owned(),
        };
        if !self.is_read_only() || !statement_looks_reading(&keyword, sql) {
            return Err(refuse());
        }
        let mut stmt = self.conn.prepare(sql).map_err(|e| match e {
            // SQLite refuses to even compile some writes under query_only / read-only flags.
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ReadOnly => {
                refuse()
            }
            other => StoreError::Sql {
                path: self.path.clone(),
                sql: sql.to_owned(),
                source: other,
            },
        })?;
        if !stmt.readonly() {
            return Err(refuse());
        }
        let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let n = columns.len();
        let mut rows = stmt.query([]).map_err(self.sql_err(sql))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql_err(sql))? {
            let mut vals = Vec::with_capacity(n);
            for i in 0..n {
                let v = row.get_ref(i).map_err(self.sql_err(sql))?;
                vals.push(json_value(v));
            }
            out.push(vals);
        }
        Ok(SqlRows { columns, rows: out })
    }
}

fn json_value(v: ValueRef<'_>) -> serde_json::Value {
    match v {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(f) => serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
        ValueRef::Blob(b) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into(),
    }
}

/// The statement's first word, upper-cased, skipping leading whitespace and comments.
fn first_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect::<String>()
        .to_ascii_uppercase()
}

/// A first, conservative filter by keyword; SQLite's own `stmt.readonly()` is the second.
fn statement_looks_reading(keyword: &str, sql: &str) -> bool {
    match keyword {
        "SELECT" | "WITH" | "VALUES" | "EXPLAIN" => true,
        "PRAGMA" => {
            // `PRAGMA name` and `PRAGMA table_info(t)` read; `PRAGMA name = v` and
            // `PRAGMA name(v)` (for any other name) set.
            let body = sql.trim().trim_end_matches(';');
            if body.contains('=') {
                return false;
            }
            match body.split_once('(') {
                None => true,
                Some((head, _)) => {
                    let name = head
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .rsplit('.')
                        .next()
                        .unwrap_or("")
                        .to_ascii_lowercase();
                    READING_PRAGMA_FUNCTIONS.contains(&name.as_str())
                }
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_skip_comments() {
        assert_eq!(first_keyword("  -- hi\n /* x */ select 1"), "SELECT");
        assert_eq!(first_keyword("delete from t"), "DELETE");
        assert_eq!(first_keyword(""), "");
    }

    #[test]
    fn pragma_classification() {
        assert!(statement_looks_reading("PRAGMA", "PRAGMA user_version"));
        assert!(statement_looks_reading(
            "PRAGMA",
            "PRAGMA table_info(events)"
        ));
        assert!(!statement_looks_reading(
            "PRAGMA",
            "PRAGMA user_version = 3"
        ));
        assert!(!statement_looks_reading(
            "PRAGMA",
            "PRAGMA journal_mode(DELETE)"
        ));
        assert!(!statement_looks_reading("ATTACH", "ATTACH 'x' AS y"));
    }
}
