//! A real headless Chromium driven over the DevTools protocol: open a page, evaluate
//! JavaScript in it. Chromium runs in its own process group with a profile in a scratch
//! directory and no network but loopback use; dropping the browser kills the whole group.

use super::wait_for;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where Debian's chromium package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// One browser with one page.
pub struct Browser {
    _child: Group,
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium on `url`, with its profile under `dir`.
    pub fn open(url: &str, dir: &Path) -> Browser {
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own group, so that its helper processes go with it.
            .process_group(0);
        let mut child = Group(
            command
                .spawn()
                .expect("chromium starts (apt package chromium)"),
        );
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…" on stderr; the
        // rest of stderr is drained so that Chromium never blocks on it.
        let stderr = child.0.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<u16>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("DevTools listening on ws://127.0.0.1:").nth(1) {
                    if let Some(port) = rest.split('/').next().and_then(|p| p.parse().ok()) {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium opens its DevTools port within 60 s");
        let page = page_socket(port, url);
        let (socket, _) =
            tungstenite::client(page.as_str(), connect(&page)).expect("the DevTools websocket");
        Browser {
            _child: child,
            socket,
            next_id: 1,
        }
    }

    /// Evaluates `expression` in the page; its value as JSON.
    pub fn eval(&mut self, expression: &str) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let call = serde_json::json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.socket
            .send(tungstenite::Message::text(call.to_string()))
            .expect("send to DevTools");
        loop {
            let message = self.socket.read().expect("read from DevTools");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let Ok(reply) = serde_json::from_str::<serde_json::Value>(text) else {
                continue;
            };
            if reply["id"] == id {
                return reply["result"]["result"]["value"].clone();
            }
        }
    }

    /// The page's visible text.
    pub fn text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the page's text contains every one of `needles`.
    pub fn wait_for_text(&mut self, what: &str, needles: &[&str]) -> String {
        let mut last = String::new();
        wait_for(what, Duration::from_secs(30), || {
            last = self.text();
            needles.iter().all(|n| last.contains(n))
        });
        last
    }
}

/// Chromium's process group, killed when dropped (also when a test fails half-way).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // Asked first, Chromium stops and reaps its helpers itself; whatever of the group
        // is left after 5 s is killed.
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: signalling the process (group) this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn connect(ws_url: &str) -> TcpStream {
    let host = ws_url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let s = TcpStream::connect(host).expect("connect to DevTools");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// The DevTools websocket of the page showing `url`.
fn page_socket(port: u16, url: &str) -> String {
    let mut found = None;
    wait_for(
        "the page target in DevTools",
        Duration::from_secs(30),
        || {
            let Some(body) = devtools_get(port, "/json/list") else {
                return false;
            };
            let Ok(targets) = serde_json::from_str::<Vec<serde_json::Value>>(&body) else {
                return false;
            };
            found = targets
                .iter()
                .find(|t| {
                    t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url))
                })
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string));
            found.is_some()
        },
    );
    found.unwrap()
}

/// `GET path` from Chromium's DevTools HTTP server (HTTP/1.1 only; it keeps the
/// connection open, so the body is read by its Content-Length).
fn devtools_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())
                    .flatten()
            })
            .unwrap_or(0);
        if body.len() >= length {
            return Some(body.to_string());
        }
    }
}
