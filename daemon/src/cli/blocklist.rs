//! `id06d blocklist …`: the national list on this gateway, and the backend-side commands
//! that sign and publish it.

use super::{
    load_config, open_store, open_store_or_running, read_broker_password, runtime, tokio_runtime,
    usage, Failure, DEFAULT_CONFIG,
};
use crate::config::Config;
use crate::lists::blocklist::{parse_csv, Blocklist};
use clap::Subcommand;
use id06_protocol::{CardUid, UtcMillis};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(crate) enum BlocklistCommand {
    /// Replace the list from a CSV file of `uid,status` lines.
    /// Only on a gateway without `[blocklist] public_key` (with a key, the national list
    /// comes from the backend alone; ban cards for this site with `site-list import`).
    Import {
        /// The CSV file.
        file: PathBuf,
        /// The new list's version, newer than the one in force (default: the current + 1).
        #[arg(long)]
        version: Option<u64>,
        /// Import also a file that lists no card, or one that takes more than
        /// `[blocklist] import_max_shrink_percent` of the listed cards off the list.
        #[arg(long)]
        allow_shrink: bool,
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// The status of one card, and the list's version and age.
    Lookup {
        /// The card UID (any spelling: 04A1B2…, 04:a1:b2…).
        uid: String,
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Size, version, age and counts per status.
    Stats {
        /// The configuration file.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Make a signing key pair: the secret goes to a file, the public key is printed
    /// (for `[blocklist] public_key`).
    Keygen {
        /// Where to write the secret key (created with mode 0600; never overwritten).
        #[arg(long)]
        secret_out: PathBuf,
    },
    /// Sign an update (JSON file); prints the signed update.
    Sign {
        /// The update, `id06d/blocklist-update/v1` JSON.
        file: PathBuf,
        /// The secret key file from `keygen`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Publish an update (JSON file) to `{prefix}/blocklist/update`.
    PublishUpdate {
        /// The update, `id06d/blocklist-update/v1` JSON.
        file: PathBuf,
        /// Sign it with this secret key first.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The configuration file naming the broker and topic prefix.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Publish a full list (CSV of uid,status) as the retained snapshot.
    PublishSnapshot {
        /// The CSV file.
        file: PathBuf,
        /// The snapshot's version.
        #[arg(long)]
        version: u64,
        /// Sign the manifest with this secret key.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The configuration file naming the broker and topic prefix.
        #[arg(long, env = "ID06D_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

pub(super) fn blocklist(command: BlocklistCommand) -> Result<(), Failure> {
    match command {
        BlocklistCommand::Import {
            file,
            version,
            allow_shrink,
            config,
        } => {
            let config = load_config(&config)?;
            if config.blocklist.public_key.is_some() {
                return Err(usage(format!(
                    "nothing imported: {} sets [blocklist] public_key, so the national list comes from the backend's signed snapshots and updates alone (a local import would take a version number the backend may use next); ban a card at this site with `id06d site-list import`",
                    config.source.display()
                )));
            }
            let entries = read_csv(&file, "nothing imported")?;
            let store = open_store(&config)?;
            let bl = Blocklist::open(&store.db, &store.dir).map_err(|e| runtime(e.to_string()))?;
            let index = bl.index();
            let current = index.version;
            let version = version.unwrap_or(current + 1);
            if version <= current {
                return Err(usage(format!(
                    "nothing imported: version {version} is not newer than the list in force (version {current}); list versions only go forward"
                )));
            }
            let shrink = import_shrink(&index, &entries);
            drop(index);
            if !allow_shrink {
                if entries.is_empty() {
                    return Err(usage(format!(
                        "nothing imported: {} lists no card; importing it would let every card pass (say --allow-shrink if that is what you want)",
                        file.display()
                    )));
                }
                let limit = u64::from(config.blocklist.import_max_shrink_percent);
                if shrink.removed * 100 > shrink.listed * limit {
                    return Err(usage(format!(
                        "nothing imported: {} would take {} of the {} listed cards off the list, more than [blocklist] import_max_shrink_percent = {limit} %; check the file, or say --allow-shrink",
                        file.display(),
                        shrink.removed,
                        shrink.listed
                    )));
                }
            }
            eprintln!(
                "importing {} cards as version {version} (the version in force is {current}; {} cards come off the list)",
                entries.len(),
                shrink.removed
            );
            let total = entries.len();
            let big = total >= 200_000;
            let mut last_shown = std::time::Instant::now();
            bl.replace(&entries, version, UtcMillis::now(), |done| {
                if big && (last_shown.elapsed().as_millis() >= 1000 || done == total) {
                    last_shown = std::time::Instant::now();
                    eprintln!(
                        "imported {done} of {total} cards ({}%)",
                        done * 100 / total.max(1)
                    );
                }
            })
            .map_err(|e| runtime(format!("nothing imported: {e}")))?;
            println!(
                "imported {total} listed cards from {} as version {version} (was {current})",
                file.display()
            );
            Ok(())
        }
        BlocklistCommand::Lookup { uid, config } => {
            let config = load_config(&config)?;
            let uid = CardUid::parse(&uid).map_err(|e| usage(format!("{uid:?}: {e}")))?;
            let lists = blocklist_summary(&config, Some(&uid))?;
            let summary = &lists.national;
            let now = UtcMillis::now();
            let status = summary
                .status
                .unwrap_or(id06_protocol::CardStatus::Unlisted);
            let stale = summary.is_stale(now, config.blocklist.max_age_hours);
            println!("card {uid}: {status}");
            println!(
                "blocklist version {}, {}{}",
                summary.version,
                age_text(summary.age_s(now)),
                if stale { " (stale)" } else { "" }
            );
            println!(
                "site list version {}: {}",
                lists.site.version,
                match lists.site.entry {
                    Some(crate::lists::site_list::SiteEntry::Ban) => "banned from this site",
                    Some(crate::lists::site_list::SiteEntry::Allow) => "allowed in",
                    None => "not on it",
                }
            );
            let ruling = crate::tap::decide::decide_at_site(
                summary.status,
                lists.site.entry,
                config.access.mode,
                stale,
                config.blocklist.when_stale,
            );
            match ruling.reason {
                None => println!("a tap now: granted"),
                Some(r) => println!("a tap now: denied: {r}"),
            }
            Ok(())
        }
        BlocklistCommand::Keygen { secret_out } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = crate::lists::signing::generate_key().map_err(runtime)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&secret_out)
                .map_err(|e| {
                    usage(format!(
                        "cannot create {} (it must not exist yet): {e}",
                        secret_out.display()
                    ))
                })?;
            writeln!(f, "{}", crate::lists::signing::secret_key_text(&key))
                .map_err(|e| runtime(format!("cannot write {}: {e}", secret_out.display())))?;
            println!(
                "secret key written to {} (keep it on the backend only)",
                secret_out.display()
            );
            println!(
                "public_key = \"{}\"",
                crate::lists::signing::public_key_text(&key)
            );
            Ok(())
        }
        BlocklistCommand::Sign { file, key } => {
            let mut update = read_update(&file)?;
            let key = load_key(&key)?;
            update.signature = Some(crate::lists::signing::sign(&key, &update.canonical_bytes()));
            println!(
                "{}",
                serde_json::to_string_pretty(&update).unwrap_or_default()
            );
            Ok(())
        }
        BlocklistCommand::PublishUpdate { file, key, config } => {
            let mqtt = crate::config::load_broker(&config).map_err(|e| usage(e.to_string()))?;
            let mut update = read_update(&file)?;
            if let Some(k) = key {
                update.signature = Some(crate::lists::signing::sign(
                    &load_key(&k)?,
                    &update.canonical_bytes(),
                ));
            }
            // The blocklist's topics depend on the prefix alone.
            let topics = id06_protocol::Topics::new(&mqtt.topic_prefix, "-", "-");
            let payload = serde_json::to_vec(&update).unwrap_or_default();
            let label = format!("update {}→{}", update.from_version, update.to_version);
            publish(
                &mqtt,
                vec![crate::mqtt::publish::Message {
                    topic: topics.blocklist_update(),
                    payload,
                    retain: false,
                }],
                &label,
            )
        }
        BlocklistCommand::PublishSnapshot {
            file,
            version,
            key,
            config,
        } => {
            let mqtt = crate::config::load_broker(&config).map_err(|e| usage(e.to_string()))?;
            let entries = read_csv(&file, "nothing published")?;
            // The blocklist's topics depend on the prefix alone.
            let topics = id06_protocol::Topics::new(&mqtt.topic_prefix, "-", "-");
            let (mut manifest, mut messages) = crate::mqtt::publish::snapshot_messages(
                &topics.blocklist_snapshot(),
                version,
                &entries,
            );
            if let Some(k) = key {
                manifest.signature = Some(crate::lists::signing::sign(
                    &load_key(&k)?,
                    &manifest.canonical_bytes(),
                ));
            }
            messages.push(crate::mqtt::publish::Message {
                topic: topics.blocklist_snapshot(),
                payload: serde_json::to_vec(&manifest).unwrap_or_default(),
                retain: true,
            });
            let label = format!(
                "snapshot version {version}: {} cards in {} chunk(s)",
                entries.len(),
                manifest.chunks
            );
            publish(&mqtt, messages, &label)
        }
        BlocklistCommand::Stats { config } => {
            let config = load_config(&config)?;
            let lists = blocklist_summary(&config, None)?;
            let summary = &lists.national;
            let now = UtcMillis::now();
            println!(
                "blocklist version {}: {} listed cards",
                summary.version, summary.listed
            );
            for (status, n) in &summary.counts {
                println!("  {:<11} {n}", status.as_str());
            }
            println!(
                "{}{}",
                age_text(summary.age_s(now)),
                if summary.is_stale(now, config.blocklist.max_age_hours) {
                    format!(" — stale (older than {} h)", config.blocklist.max_age_hours)
                } else {
                    String::new()
                }
            );
            println!(
                "site list version {}: {} banned, {} allowed (access mode {})",
                lists.site.version,
                lists.site.banned,
                lists.site.allowed,
                match config.access.mode {
                    crate::config::AccessMode::Open => "open",
                    crate::config::AccessMode::SiteList => "site_list",
                }
            );
            Ok(())
        }
    }
}

/// How many listed cards an import would take off the list.
struct Shrink {
    listed: u64,
    removed: u64,
}

fn import_shrink(
    index: &crate::lists::blocklist::BlocklistIndex,
    entries: &[(CardUid, id06_protocol::CardStatus)],
) -> Shrink {
    let new: std::collections::HashSet<CardUid> = entries.iter().map(|(u, _)| *u).collect();
    Shrink {
        listed: index.len() as u64,
        removed: index.iter().filter(|(u, _)| !new.contains(u)).count() as u64,
    }
}

/// The lists in force, from the database, or from the running daemon that holds it.
fn blocklist_summary(
    config: &Config,
    card: Option<&CardUid>,
) -> Result<crate::ops::control::ListsSummary, Failure> {
    match open_store_or_running(config)? {
        Some(store) => {
            let bl = Blocklist::open(&store.db, &store.dir).map_err(|e| runtime(e.to_string()))?;
            let site = crate::lists::site_list::SiteList::open(&store.db, &store.dir)
                .map_err(|e| runtime(e.to_string()))?;
            Ok(crate::ops::control::ListsSummary {
                national: bl.index().summary(card),
                site: crate::ops::control::SiteSummary::of(&site.index(), card),
            })
        }
        None => crate::ops::control::remote_blocklist(&config.data_dir, card)
            .map_err(|e| runtime(e.to_string())),
    }
}

/// Reads a `uid,status` CSV file; every bad line is named (the first 20 shown).
fn read_csv(
    file: &Path,
    outcome: &str,
) -> Result<Vec<(CardUid, id06_protocol::CardStatus)>, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    parse_csv(&text).map_err(|problems| {
        let shown: Vec<String> = problems
            .iter()
            .take(20)
            .map(|p| format!("{}:{}: {}", file.display(), p.line, p.message))
            .collect();
        let mut m = format!(
            "{outcome}: {} bad line(s)\n{}",
            problems.len(),
            shown.join("\n")
        );
        if problems.len() > 20 {
            m.push_str(&format!("\n… and {} more", problems.len() - 20));
        }
        usage(m)
    })
}

fn read_update(file: &Path) -> Result<id06_protocol::BlocklistUpdate, Failure> {
    let bytes =
        std::fs::read(file).map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    id06_protocol::BlocklistUpdate::decode(&bytes)
        .map_err(|e| usage(format!("{}: {e}", file.display())))
}

fn load_key(path: &Path) -> Result<ed25519_dalek::SigningKey, Failure> {
    crate::lists::signing::load_secret_key(path).map_err(usage)
}

fn publish(
    mqtt: &crate::config::MqttSettings,
    messages: Vec<crate::mqtt::publish::Message>,
    label: &str,
) -> Result<(), Failure> {
    let password = read_broker_password(mqtt)?;
    let rt = tokio_runtime()?;
    let total = messages.len();
    let mut last = std::time::Instant::now();
    rt.block_on(crate::mqtt::publish::publish_all(
        mqtt,
        password,
        messages,
        |done, all| {
            if all > 5 && (last.elapsed().as_millis() >= 1000 || done == all) {
                last = std::time::Instant::now();
                eprintln!("published {done} of {all} messages");
            }
        },
    ))
    .map_err(runtime)?;
    println!("published {label} ({total} message(s)) to {}", mqtt.url);
    Ok(())
}

fn age_text(age: Option<u64>) -> String {
    match age {
        None => "never confirmed".into(),
        Some(s) => format!("confirmed {}h {}m {}s ago", s / 3600, s / 60 % 60, s % 60),
    }
}
