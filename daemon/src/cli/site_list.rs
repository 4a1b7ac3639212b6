//! `id06d site-list import`.

use super::{init_logging, load_config, runtime, usage, Failure, DEFAULT_CONFIG, OPENED};
use crate::storage::store::Store;
use clap::Subcommand;
use id06_protocol::UtcMillis;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(crate) enum SiteListCommand {
    /// Replace the site list from a CSV file of `uid,ban` / `uid,allow` lines (also while
    /// the daemon runs: it takes effect at once).
    Import {
        /// The CSV file.
        file: PathBuf,
        /// The new site list's version, newer than the one in force (default: the current + 1).
        #[arg(long)]
        version: Option<u64>,
        /// Import also a file that lists no card (an empty site list).
        #[arg(long)]
        allow_shrink: bool,
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// `id06d site-list import`.
pub(super) fn import(
    file: &Path,
    version: Option<u64>,
    allow_shrink: bool,
    config: &Path,
) -> Result<(), Failure> {
    let config = load_config(config)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    let entries = crate::lists::site_list::parse_site_csv(&text).map_err(|problems| {
        let shown: Vec<String> = problems
            .iter()
            .take(20)
            .map(|p| format!("{}:{}: {}", file.display(), p.line, p.message))
            .collect();
        usage(format!(
            "nothing imported: {} bad line(s)\n{}",
            problems.len(),
            shown.join("\n")
        ))
    })?;
    if entries.is_empty() && !allow_shrink {
        return Err(usage(format!(
            "nothing imported: {} lists no card; importing it would empty the site list (say --allow-shrink if that is what you want)",
            file.display()
        )));
    }
    let (banned, allowed) = entries.iter().fold((0, 0), |(b, a), (_, e)| match e {
        crate::lists::site_list::SiteEntry::Ban => (b + 1, a),
        crate::lists::site_list::SiteEntry::Allow => (b, a + 1),
    });
    let _ = OPENED.set(config.data_dir.clone());
    init_logging("warn");
    let opened = match Store::open(&config.data_dir, &config.terminal_id) {
        Ok(store) => Some(store),
        Err(crate::storage::store::StoreError::InUse(_)) => None,
        Err(e) => return Err(runtime(e.to_string())),
    };
    let (version, was) = match opened {
        Some(store) => {
            let list = crate::lists::site_list::SiteList::open(&store.db, &store.dir)
                .map_err(|e| runtime(e.to_string()))?;
            let version = version.unwrap_or(list.index().version + 1);
            let was = list
                .replace(&entries, version, UtcMillis::now())
                .map_err(|e| usage(format!("nothing imported: {e}")))?;
            (version, was)
        }
        None => {
            // The daemon holds the database: it takes the list and uses it at once.
            let version = match version {
                Some(v) => v,
                None => {
                    crate::ops::control::remote_blocklist(&config.data_dir, None)
                        .map_err(|e| runtime(e.to_string()))?
                        .site
                        .version
                        + 1
                }
            };
            let was =
                crate::ops::control::remote_site_list_replace(&config.data_dir, &entries, version)
                    .map_err(|e| runtime(format!("nothing imported: {e}")))?;
            (version, was)
        }
    };
    println!(
        "site list version {version} in force (was {was}): {banned} banned, {allowed} allowed, from {}",
        file.display()
    );
    Ok(())
}
