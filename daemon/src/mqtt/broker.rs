//! A private mosquitto on a free loopback port, for the demo and the integration tests:
//! a real broker, started and stopped on demand, never a system service.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) private broker.
pub struct LocalBroker {
    /// The loopback port it listens on (kept across restarts).
    pub port: u16,
    dir: PathBuf,
    extra_config: String,
    /// `per_listener_settings true`: each listener in `extra_config` has its own security
    /// settings (the plain loopback listener stays open to anonymous clients).
    per_listener: bool,
    child: Option<Child>,
}

/// Where mosquitto is installed (Debian puts it in /usr/sbin, often not on a user's PATH).
pub fn mosquitto_binary() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mosquitto"))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalBroker {
    /// Starts mosquitto with its files in `dir` (persistence on, so sessions survive a
    /// restart like on a real broker). `extra_config` is appended to the configuration.
    pub fn start(dir: &Path, extra_config: &str) -> Result<LocalBroker, String> {
        Self::start_inner(dir, extra_config, false)
    }

    /// Like [`start`](Self::start), with `per_listener_settings true`: `extra_config` adds
    /// listeners (TLS ones, say) with security settings of their own.
    pub fn start_with_listeners(dir: &Path, extra_config: &str) -> Result<LocalBroker, String> {
        Self::start_inner(dir, extra_config, true)
    }

    fn start_inner(
        dir: &Path,
        extra_config: &str,
        per_listener: bool,
    ) -> Result<LocalBroker, String> {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port().map_err(|e| format!("cannot find a free port: {e}"))?;
            let mut b = LocalBroker {
                port,
                dir: dir.to_path_buf(),
                extra_config: extra_config.to_string(),
                per_listener,
                child: None,
            };
            match b.restart() {
                Ok(()) => return Ok(b),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Starts the broker again on the same port (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)) and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.is_running() {
            return Ok(());
        }
        let binary = mosquitto_binary().ok_or_else(|| {
            "mosquitto is not installed (Debian: apt-get install mosquitto)".to_string()
        })?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let conf = self.dir.join("mosquitto.conf");
        let text = format!(
            "{per_listener}listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\npersistence_location {dir}/\nautosave_interval 1\nlog_dest file {dir}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\nmax_queued_messages 0\n{extra}\n",
            per_listener = if self.per_listener {
                "per_listener_settings true\n"
            } else {
                ""
            },
            port = self.port,
            dir = self.dir.display(),
            extra = self.extra_config
        );
        std::fs::write(&conf, text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if !self.is_running() {
                let log =
                    std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
                self.child = None;
                return Err(format!(
                    "mosquitto exited at start on port {}: {}",
                    self.port,
                    log.lines().last().unwrap_or("no log")
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "mosquitto did not listen on port {} within 10 s",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker gracefully (SIGTERM: it saves its sessions) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child process, identified by its pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the broker (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
