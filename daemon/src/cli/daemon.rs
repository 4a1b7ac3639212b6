//! `id06d run`, `demo`, `check-config` and `readers`: the daemon itself and what an
//! installer runs before it.

use super::{load_config, read_password, runtime, tokio_runtime, usage, Failure};
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// `id06d run`: the daemon, until SIGTERM or SIGINT.
pub(super) fn run(config: &Path) -> Result<(), Failure> {
    // libosdp's own lines repeat what the reader's state says, every few seconds while a
    // reader is away (RUST_LOG=info,libosdp=debug shows them).
    let _log = crate::ops::logging::init_daemon_logging("info,libosdp=off");
    let config = load_config(config)?;
    let rt = tokio_runtime()?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        // Register the handlers before anything else, so that a SIGTERM that comes
        // early is a clean stop, not the default "terminate now".
        let signals = Signals::register()
            .map_err(|e| runtime(format!("cannot install signal handlers: {e}")))?;
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            signals.wait().await;
            cancel.cancel();
        });
        crate::run::run(config, Default::default(), shutdown, |_| {})
            .await
            .map_err(|e| runtime(e.to_string()))
    })
}

/// `id06d demo`.
pub(super) fn demo() -> Result<(), Failure> {
    let _log = crate::ops::logging::init_daemon_logging("info,rumqttc=off");
    let rt = tokio_runtime()?;
    rt.block_on(super::demo::run_demo()).map_err(runtime)
}

/// `id06d check-config`: reads what `run` would read, and prints the effective configuration.
pub(super) fn check_config(config: &Path) -> Result<(), Failure> {
    let config = load_config(config)?;
    let file = config.source.display().to_string();
    // Every file `run` will read is read now, not at the first connection.
    read_password(&config).map_err(|f| usage(format!("{file}: {}", f.message)))?;
    if let Some(http) = &config.http {
        http.read_password()
            .map_err(|e| usage(format!("{file}: {e}")))?;
    }
    if config.mqtt.tls {
        crate::mqtt::tls::client_config(&config.mqtt)
            .map_err(|e| usage(format!("{file}: [mqtt] {e}")))?;
    }
    let dir = &config.data_dir;
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(usage(format!(
                "{file}: data_dir {} is not a directory",
                dir.display()
            )))
        }
        Ok(_) => {}
        Err(_) => {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) {
                return Err(usage(format!(
                    "{file}: data_dir {} cannot be created: {} does not exist",
                    dir.display(),
                    parent.map(|p| p.display().to_string()).unwrap_or_default()
                )));
            }
            eprintln!(
                "note: data_dir {} does not exist yet; `id06d run` creates it",
                dir.display()
            );
        }
    }
    if config.readers.is_empty() {
        eprintln!("warning: {file} has no [[reader]]: this gateway will record no taps");
    }
    print!("{}", config.render());
    Ok(())
}

/// `id06d readers`: the readers and ports this machine offers.
pub(super) fn readers() -> Result<(), Failure> {
    println!("PC/SC readers (kind = \"pcsc\", match = a part of the name):");
    match id06_readers::pcsc::list_readers() {
        Ok(names) if names.is_empty() => {
            println!("  none: pcscd runs but sees no reader (is one plugged in?)")
        }
        Ok(names) => names.iter().for_each(|n| println!("  {n}")),
        Err(e) => println!("  none: {e}"),
    }
    println!("Serial ports (kind = \"pn532\" or \"line\", path = …):");
    let ports = id06_readers::pn532::list_ports();
    if ports.is_empty() {
        println!("  none found");
    }
    ports.iter().for_each(|p| println!("  {p}"));
    Ok(())
}

/// SIGTERM and SIGINT, registered with tokio at once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
