//! Opening, validating and migrating the database file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::schema::{self, APPLICATION_ID, MIGRATIONS};
use crate::{Result, StoreError};

/// The first 16 bytes of every SQLite 3 database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// How long a statement waits for another connection's lock before failing (readers such as
/// `corral log` run beside the daemon's writer).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection to a corral store.
///
/// Cheap reads and writes on the calling thread. Network code should not write through a
/// `Store` directly: hand it to a [`crate::Recorder`], which writes on its own thread.
#[derive(Debug)]
pub struct Store {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
    read_only: bool,
}

impl Store {
    /// Opens the store at `path` for reading and writing, creating the file (and its parent
    /// directory) when missing and applying any pending migrations.
    ///
    /// The journal is WAL with `synchronous=NORMAL`: a committed batch survives a crash of the
    /// process (not necessarily of the machine), and readers never block the writer.
    ///
    /// A file that is not SQLite, is another application's database, is corrupt, or has a
    /// newer schema than this build knows is refused with an error and left byte-for-byte
    /// untouched.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        let exists = check_existing_file(&path)?;
        if exists {
            // Validate through a read-only connection first, so that nothing (not even the
            // switch to WAL) is written to a file we end up refusing.
            let ro = open_conn(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            validate(&ro, &path)?;
            drop(ro);
        } else if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs_err::create_dir_all(dir).map_err(|e| StoreError::Io {
                op: "creating directory",
                path: dir.to_path_buf(),
                source: e,
            })?;
        }
        let conn = open_conn(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        let mut store = Store {
            conn,
            path,
            read_only: false,
        };
        store.configure_writer()?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing store read-only (`SQLITE_OPEN_READ_ONLY` and `PRAGMA query_only`).
    ///
    /// Fails with [`StoreError::NotFound`] when the file does not exist; never creates or
    /// modifies anything.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        if !check_existing_file(&path)? {
            return Err(StoreError::NotFound { path });
        }
        let conn = open_conn(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        if validate(&conn, &path)? == 0 {
            // An empty SQLite file that no corral has initialised yet: nothing to read.
            return Err(StoreError::NotFound { path });
        }
        let store = Store {
            conn,
            path,
            read_only: true,
        };
        store.exec("PRAGMA query_only = ON")?;
        Ok(store)
    }

    /// A fresh, migrated store in memory, for tests of code that records or queries events.
    pub fn open_in_memory() -> Result<Store> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|e| StoreError::Sql {
            path: path.clone(),
            sql: "open in memory".into(),
            source: e,
        })?;
        let mut store = Store {
            conn,
            path,
            read_only: false,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when opened with [`Store::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The schema version of the file (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64> {
        self.pragma_i64("user_version")
    }

    /// Runs `PRAGMA integrity_check` and returns its messages (`["ok"]` for a sound file).
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        let sql = "PRAGMA integrity_check";
        let mut stmt = self.conn.prepare(sql).map_err(self.sql_err(sql))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.sql_err(sql))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql_err(sql))
    }

    /// Builds the `Sql` error for a failed statement.
    pub(crate) fn sql_err<'a>(
        &'a self,
        sql: &'a str,
    ) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
        move |source| StoreError::Sql {
            path: self.path.clone(),
            sql: sql.to_owned(),
            source,
        }
    }

    pub(crate) fn exec(&self, sql: &str) -> Result<()> {
        self.conn.execute_batch(sql).map_err(self.sql_err(sql))
    }

    fn pragma_i64(&self, name: &str) -> Result<i64> {
        let sql = format!("PRAGMA {name}");
        self.conn
            .query_row(&sql, [], |r| r.get(0))
            .map_err(self.sql_err(&sql))
    }

    fn configure_writer(&self) -> Result<()> {
        let sql = "PRAGMA journal_mode = WAL";
        // Switching the journal mode of a new file returns SQLITE_BUSY at once, without the
        // busy handler, while another process is creating the same store: retry for as long
        // as the busy timeout would have waited.
        let started = std::time::Instant::now();
        let mode: String = loop {
            match self.conn.query_row(sql, [], |r| r.get(0)) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && started.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => break other.map_err(self.sql_err(sql))?,
            }
        };
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %self.path.display(), %mode, "the store could not switch to WAL");
        }
        // A 32 MiB page cache keeps the five event indexes' hot pages in memory under
        // sustained inserts (the 2 MiB default thrashes past a few hundred thousand rows).
        // Checkpointing every 32768 WAL pages (128 MiB) instead of every 8192 lets a page that
        // several batches dirty be copied into the database once: +15% sustained events/s in
        // `store_bench`. `journal_size_limit` truncates the WAL back after a checkpoint, so the
        // file does not stay at its high-water mark.
        self.exec(
            "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA cache_size = -32768; \
             PRAGMA wal_autocheckpoint = 32768; PRAGMA journal_size_limit = 134217728",
        )
    }

    /// Applies every migration newer than the file's version, one transaction each.
    fn migrate(&mut self) -> Result<()> {
        let current = self.schema_version()?;
        let latest = schema::latest_version();
        if current > latest {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: current,
                supported: latest,
            });
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > current) {
            let path = self.path.clone();
            let err = |source| StoreError::Migration {
                path: path.clone(),
                version: m.version,
                name: m.name,
                source,
            };
            // IMMEDIATE takes the write lock first, so when several processes open a new file
            // at once (a sender and its receivers sharing one store) only one applies each
            // migration; the others wait (busy timeout), see the new version and skip it.
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(err)?;
            let now: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(err)?;
            if now >= m.version {
                continue;
            }
            tx.execute_batch(m.sql).map_err(err)?;
            // Both pragmas write the database header inside the transaction, so a crash leaves
            // either the old version or the new one, never a half-applied schema.
            tx.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {};",
                m.version
            ))
            .map_err(err)?;
            tx.commit().map_err(err)?;
            tracing::debug!(path = %self.path.display(), version = m.version, name = m.name, "store migrated");
        }
        Ok(())
    }
}

/// Returns whether `path` exists and is a non-empty file, refusing (without opening it with
/// SQLite) anything whose header is not SQLite's.
fn check_existing_file(path: &Path) -> Result<bool> {
    let meta = match fs_err::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(StoreError::Io {
                op: "inspecting",
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    if meta.len() == 0 {
        // An empty file is a valid empty SQLite database; SQLite initialises it.
        return Ok(meta.is_file());
    }
    let mut header = [0u8; 16];
    let mut f = fs_err::File::open(path).map_err(|e| StoreError::Io {
        op: "opening",
        path: path.to_path_buf(),
        source: e,
    })?;
    let n = read_up_to(&mut f, &mut header).map_err(|e| StoreError::Io {
        op: "reading header of",
        path: path.to_path_buf(),
        source: e,
    })?;
    if n < header.len() || &header != SQLITE_HEADER {
        return Err(StoreError::NotSqlite {
            path: path.to_path_buf(),
        });
    }
    Ok(true)
}

fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn open_conn(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let flags = flags | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::Sql {
        path: path.to_path_buf(),
        sql: "open".into(),
        source: e,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| StoreError::Sql {
            path: path.to_path_buf(),
            sql: "busy_timeout".into(),
            source: e,
        })?;
    Ok(conn)
}

/// Checks that an existing file is a corral store this build can use, and returns its schema
/// version (0 for an empty SQLite file). Reads only.
fn validate(conn: &Connection, path: &Path) -> Result<i64> {
    let corrupt = |source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    // One read transaction, so the header and the schema come from the same snapshot even
    // when another process is creating the store at this moment.
    let snapshot = conn.unchecked_transaction().map_err(corrupt)?;
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(corrupt)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(corrupt)?;
    // Reading the schema forces SQLite to parse the first page: this is where a damaged file
    // shows itself.
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .map_err(corrupt)?;
    drop(snapshot);
    if app_id == APPLICATION_ID {
        let latest = schema::latest_version();
        if version > latest {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                supported: latest,
            });
        }
        return Ok(version);
    }
    if app_id == 0 && version == 0 && tables == 0 {
        // An empty SQLite file (for example one created by `touch` or `sqlite3 x.db ''`):
        // nothing to lose, it becomes a store.
        return Ok(0);
    }
    Err(StoreError::Foreign {
        path: path.to_path_buf(),
        application_id: app_id,
        tables,
    })
}
