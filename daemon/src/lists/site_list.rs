//! The site's own list: cards banned from this site, and, for doors that admit only named
//! workers (`[access] mode = "site_list"`), the cards allowed in.
//!
//! Design: the national ID06 list (the blocklist) has one authority, the backend, and its
//! versions are the backend's. The site list is the site's: it has versions of its own,
//! is replaced whole by `id06d site-list import` (also while the daemon runs, through the
//! control socket), and never touches the national list or its versions. The ID06 status
//! always applies first (a terminated card stays denied whatever the site says).
//!
//! Storage: sled tree `site_list`: UID bytes → `b` (banned) or `a` (allowed); tree
//! `site_list_meta`: `version`, `updated_at`, and while a list is being written its redo
//! record `pending` ([`crate::lists::pending`]: every entry and the version, synced before
//! the first entry is written, removed with the version's flip), so that a list is written
//! one insert at a time, never holding sled's process-wide lock against the taps, and
//! still all or nothing. Lookups are served from an immutable in-memory map swapped whole
//! on every change (site lists hold hundreds or thousands of cards).

use crate::lists::pending::{self, PendingUpdate};
use crate::storage::store::{decode_i64, decode_u64, StoreError};
use arc_swap::ArcSwap;
use id06_protocol::{CardUid, UtcMillis};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A card's entry on the site list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteEntry {
    /// Banned from this site.
    Ban,
    /// Allowed in (what `[access] mode = "site_list"` admits).
    Allow,
}

impl SiteEntry {
    /// The CSV / wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteEntry::Ban => "ban",
            SiteEntry::Allow => "allow",
        }
    }
}

/// The site list in force, for lookups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteIndex {
    entries: HashMap<CardUid, SiteEntry>,
    /// Its version (0: never imported).
    pub version: u64,
    /// When it was imported.
    pub updated_at: Option<UtcMillis>,
}

impl SiteIndex {
    /// The card's entry.
    #[inline]
    pub fn lookup(&self, uid: &CardUid) -> Option<SiteEntry> {
        self.entries.get(uid).copied()
    }

    /// Cards banned and allowed.
    pub fn counts(&self) -> (usize, usize) {
        let banned = self
            .entries
            .values()
            .filter(|e| **e == SiteEntry::Ban)
            .count();
        (banned, self.entries.len() - banned)
    }

    /// How many cards are on it.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Why a site-list import was refused.
#[derive(Debug, thiserror::Error)]
pub enum SiteListError {
    /// Versions only go forward.
    #[error("version {asked} is not newer than the site list in force (version {have}); site-list versions only go forward")]
    NotNewer {
        /// What was asked for.
        asked: u64,
        /// What is in force.
        have: u64,
    },
    /// The database refused.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The site list. Cheap to clone.
#[derive(Clone)]
pub struct SiteList {
    db: sled::Db,
    dir: PathBuf,
    current: Arc<ArcSwap<SiteIndex>>,
    writer: Arc<std::sync::Mutex<()>>,
}

/// A bad line in a site-list CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteCsvProblem {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses `uid,ban` / `uid,allow` lines (a header, blank lines and `#` comments skipped).
/// Every problem is returned, not just the first.
pub fn parse_site_csv(text: &str) -> Result<Vec<(CardUid, SiteEntry)>, Vec<SiteCsvProblem>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut seen: HashMap<CardUid, usize> = HashMap::new();
    let mut header_allowed = true;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.trim().trim_start_matches('\u{feff}');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let mut fields = content.split(',').map(str::trim);
        let (Some(uid), Some(entry), None) = (fields.next(), fields.next(), fields.next()) else {
            problems.push(SiteCsvProblem {
                line,
                message: "expected two fields: uid,ban or uid,allow".into(),
            });
            continue;
        };
        if std::mem::take(&mut header_allowed)
            && (uid.eq_ignore_ascii_case("uid") || uid.eq_ignore_ascii_case("card_uid"))
        {
            continue;
        }
        let uid = match CardUid::parse(uid.trim_matches('"')) {
            Ok(u) => u,
            Err(e) => {
                problems.push(SiteCsvProblem {
                    line,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let entry = match entry.trim_matches('"').to_ascii_lowercase().as_str() {
            "ban" | "banned" => SiteEntry::Ban,
            "allow" | "allowed" => SiteEntry::Allow,
            other => {
                problems.push(SiteCsvProblem {
                    line,
                    message: format!("{other:?} is neither ban nor allow"),
                });
                continue;
            }
        };
        if let Some(first) = seen.insert(uid, line) {
            problems.push(SiteCsvProblem {
                line,
                message: format!("card {uid} is already on line {first}"),
            });
            continue;
        }
        out.push((uid, entry));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

impl SiteList {
    /// Opens the site list in `db` (empty, version 0, when there is none).
    pub fn open(db: &sled::Db, dir: &Path) -> Result<SiteList, StoreError> {
        let err = |e| StoreError::from_sled(dir, e);
        let tree = db.open_tree("site_list").map_err(err)?;
        let meta = db.open_tree("site_list_meta").map_err(err)?;
        finish_pending(db, dir, &tree, &meta)?;
        let mut entries = HashMap::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(err)?;
            let Ok(uid) = CardUid::from_bytes(&k) else {
                tracing::warn!("a stored site-list entry cannot be decoded; skipped");
                continue;
            };
            let entry = match v.first() {
                Some(b'b') => SiteEntry::Ban,
                Some(b'a') => SiteEntry::Allow,
                _ => {
                    tracing::warn!(card = %uid, "a stored site-list entry is unknown; skipped");
                    continue;
                }
            };
            entries.insert(uid, entry);
        }
        let version = meta
            .get("version")
            .map_err(err)?
            .and_then(|v| decode_u64(&v))
            .unwrap_or(0);
        let updated_at = meta
            .get("updated_at")
            .map_err(err)?
            .and_then(|v| decode_i64(&v))
            .map(UtcMillis);
        Ok(SiteList {
            db: db.clone(),
            dir: dir.to_path_buf(),
            current: Arc::new(ArcSwap::from_pointee(SiteIndex {
                entries,
                version,
                updated_at,
            })),
            writer: Arc::new(std::sync::Mutex::new(())),
        })
    }

    /// The list in force (lock-free).
    pub fn index(&self) -> Arc<SiteIndex> {
        self.current.load_full()
    }

    /// Replaces the list with `entries` as `version` (which must be newer), atomically and
    /// durably; returns the version replaced. Should the disk refuse a write half-way, the
    /// list in force stays and the next start finishes writing this one.
    pub fn replace(
        &self,
        entries: &[(CardUid, SiteEntry)],
        version: u64,
        now: UtcMillis,
    ) -> Result<u64, SiteListError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let have = self.index().version;
        if version <= have {
            return Err(SiteListError::NotNewer {
                asked: version,
                have,
            });
        }
        let err = |e| StoreError::from_sled(&self.dir, e);
        let tree = self.db.open_tree("site_list").map_err(err)?;
        let meta = self.db.open_tree("site_list_meta").map_err(err)?;
        let record = PendingUpdate {
            generation: 0,
            to_version: version,
            confirmed_at: now.as_millis(),
            changes: entries.iter().map(|(uid, e)| (*uid, code(*e))).collect(),
        };
        pending::begin(&self.db, &self.dir, &meta, PENDING, &record)?;
        write_list(&self.db, &self.dir, &tree, &meta, &record)?;
        self.current.store(Arc::new(SiteIndex {
            entries: entries.iter().copied().collect(),
            version,
            updated_at: Some(now),
        }));
        Ok(have)
    }
}

/// The site list's redo record in `site_list_meta`.
const PENDING: &[u8] = b"pending";

fn code(entry: SiteEntry) -> u8 {
    match entry {
        SiteEntry::Ban => b'b',
        SiteEntry::Allow => b'a',
    }
}

/// Writes the list of a durable redo record: the entries not on it removed and its own
/// inserted, one at a time, synced, then the version set and the record removed in one
/// small batch, synced.
fn write_list(
    db: &sled::Db,
    dir: &Path,
    tree: &sled::Tree,
    meta: &sled::Tree,
    record: &PendingUpdate,
) -> Result<(), StoreError> {
    let err = |e| StoreError::from_sled(dir, e);
    let keep: std::collections::HashSet<&[u8]> = record
        .changes
        .iter()
        .map(|(uid, _)| uid.as_bytes())
        .collect();
    for key in tree.iter().keys() {
        let key = key.map_err(err)?;
        if !keep.contains(key.as_ref()) {
            tree.remove(key).map_err(err)?;
        }
    }
    for (uid, code) in &record.changes {
        tree.insert(uid.as_bytes(), &[*code]).map_err(err)?;
    }
    crate::storage::store::flush_db(db, dir)?;
    let values = [
        (&b"version"[..], record.to_version.to_be_bytes()),
        (&b"updated_at"[..], record.confirmed_at.to_be_bytes()),
    ];
    pending::end(db, dir, meta, PENDING, &values)
}

/// Finishes a list found half-written (the gateway stopped while writing it).
fn finish_pending(
    db: &sled::Db,
    dir: &Path,
    tree: &sled::Tree,
    meta: &sled::Tree,
) -> Result<(), StoreError> {
    let err = |e| StoreError::from_sled(dir, e);
    let Some(bytes) = meta.get(PENDING).map_err(err)? else {
        return Ok(());
    };
    match PendingUpdate::decode(&bytes) {
        Ok(record) => {
            write_list(db, dir, tree, meta, &record)?;
            tracing::info!(
                version = record.to_version,
                cards = record.changes.len(),
                "finished writing the site list that was being imported when the gateway stopped"
            );
        }
        Err(why) => {
            // Which entries reached the disk is unknown: version 0 lets any import
            // replace the list.
            tracing::error!(
                "the site list being imported when the gateway stopped cannot be read back ({why}); its entries may be part old, part new: import the site list again (id06d site-list import)"
            );
            pending::end(db, dir, meta, PENDING, &[(b"version", 0u64.to_be_bytes())])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> CardUid {
        CardUid::parse(s).unwrap()
    }

    #[test]
    fn csv_reads_bans_and_allows_and_names_every_bad_line() {
        let ok = parse_site_csv("uid,entry\n04A1B2C3,ban\n# x\n04:a1:b2:c4, Allow\n").unwrap();
        assert_eq!(
            ok,
            vec![
                (uid("04A1B2C3"), SiteEntry::Ban),
                (uid("04A1B2C4"), SiteEntry::Allow)
            ]
        );
        let bad =
            parse_site_csv("04A1B2C3,ban\n04A1B2C3,allow\nzz,ban\n04A1B2C5,maybe\n04A1B2C6\n")
                .unwrap_err();
        let lines: Vec<usize> = bad.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5]);
    }

    #[test]
    fn a_replaced_list_is_durable_and_versions_only_go_forward() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::storage::store::Store::open(dir.path(), "t").unwrap();
            let s = SiteList::open(&store.db, &store.dir).unwrap();
            assert_eq!(s.index().version, 0);
            s.replace(&[(uid("04A1B2C3"), SiteEntry::Ban)], 1, UtcMillis(5))
                .unwrap();
            s.replace(
                &[
                    (uid("04A1B2C4"), SiteEntry::Allow),
                    (uid("04A1B2C5"), SiteEntry::Ban),
                ],
                2,
                UtcMillis(6),
            )
            .unwrap();
            assert!(matches!(
                s.replace(&[], 2, UtcMillis(7)),
                Err(SiteListError::NotNewer { asked: 2, have: 2 })
            ));
        }
        let store = crate::storage::store::Store::open(dir.path(), "t").unwrap();
        let s = SiteList::open(&store.db, &store.dir).unwrap();
        let i = s.index();
        assert_eq!((i.version, i.len()), (2, 2));
        assert_eq!(i.lookup(&uid("04A1B2C3")), None, "replaced whole");
        assert_eq!(i.lookup(&uid("04A1B2C5")), Some(SiteEntry::Ban));
        assert_eq!(i.counts(), (1, 1));
    }

    #[test]
    fn a_list_cut_short_by_a_crash_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let s = SiteList::open(&db, dir.path()).unwrap();
        s.replace(
            &[
                (uid("04A1B2C3"), SiteEntry::Ban),
                (uid("04A1B2C4"), SiteEntry::Allow),
            ],
            1,
            UtcMillis(5),
        )
        .unwrap();
        // The next list's record is durable and one of its entries written, as a crash
        // between them leaves it.
        let record = PendingUpdate {
            generation: 0,
            to_version: 2,
            confirmed_at: 9,
            changes: vec![
                (uid("04A1B2C5"), code(SiteEntry::Allow)),
                (uid("04A1B2C4"), code(SiteEntry::Ban)),
            ],
        };
        let meta = db.open_tree("site_list_meta").unwrap();
        meta.insert(PENDING, record.encode()).unwrap();
        db.open_tree("site_list")
            .unwrap()
            .insert(uid("04A1B2C5").as_bytes(), b"a")
            .unwrap();
        drop(s);
        let s = SiteList::open(&db, dir.path()).unwrap();
        let i = s.index();
        assert_eq!(i.version, 2);
        assert_eq!(i.updated_at, Some(UtcMillis(9)));
        assert_eq!(i.lookup(&uid("04A1B2C3")), None, "replaced whole");
        assert_eq!(i.lookup(&uid("04A1B2C4")), Some(SiteEntry::Ban));
        assert_eq!(i.lookup(&uid("04A1B2C5")), Some(SiteEntry::Allow));
        assert_eq!(meta.get(PENDING).unwrap(), None);
    }

    #[test]
    fn a_damaged_record_leaves_version_0_so_that_any_import_replaces_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let s = SiteList::open(&db, dir.path()).unwrap();
        s.replace(&[(uid("04A1B2C3"), SiteEntry::Ban)], 7, UtcMillis(5))
            .unwrap();
        let meta = db.open_tree("site_list_meta").unwrap();
        meta.insert(PENDING, &b"torn"[..]).unwrap();
        drop(s);
        let s = SiteList::open(&db, dir.path()).unwrap();
        assert_eq!(s.index().version, 0);
        assert_eq!(s.replace(&[], 1, UtcMillis(6)).unwrap(), 0);
        assert_eq!(s.index().len(), 0);
    }
}
